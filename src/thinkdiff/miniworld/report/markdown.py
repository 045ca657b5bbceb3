"""The report as Markdown: a header, then each section's own part, in reading order."""

from __future__ import annotations

from typing import Any

from thinkdiff.miniworld.report.ablation import ablation_markdown
from thinkdiff.miniworld.report.calibration import calibration_markdown
from thinkdiff.miniworld.report.claims import claims_markdown
from thinkdiff.miniworld.report.clip import clip_markdown
from thinkdiff.miniworld.report.clip_claims import clip_claims_markdown
from thinkdiff.miniworld.report.fidelity import fidelity_markdown
from thinkdiff.miniworld.report.lvlm import lvlm_markdown
from thinkdiff.miniworld.report.premise import premise_markdown
from thinkdiff.miniworld.report.qcd import qcd_section_markdown

__all__ = ["render_markdown"]

FIGURES = (
    ("norm ablation", "norm_ablation.png"),
    ("mini-CoBSAT accuracy", "lvlm_accuracy.png"),
    ("examples", "examples_lvlm.png"),
    ("ThinkDiff-CLIP examples", "examples_clip.png"),
    ("component losses", "component_losses.png"),
)


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown (every number read from ``report``)."""
    lines = _header(report)
    for part in (
        fidelity_markdown,
        premise_markdown,
        lvlm_markdown,
        calibration_markdown,
        qcd_section_markdown,
        claims_markdown,
        clip_markdown,
        clip_claims_markdown,
        ablation_markdown,
    ):
        lines += part(report)
    for alt, path in FIGURES:
        lines += ["", f"![{alt}]({path})"]
    lines.append("")
    return "\n".join(lines)


def _header(report: dict[str, Any]) -> list[str]:
    b = report["build"]
    return [
        "# ThinkDiff in the miniature world",
        "",
        f"Models built with seed {b['config']['seed']} ({b['config']['note']} preset) in "
        f"{b['seconds']['total']:.0f} s; this report took {report['seconds']['total']:.0f} s. "
        f"Mini-CoBSAT: the first {report['config']['num_prompts']} prompts of the seed-123 list per task and shot; "
        f"sampler: {report['config']['steps']} Euler steps, true CFG {report['config']['cfg']}.",
        "",
        "## Build time per step (s)",
        "",
        "| " + " | ".join(b["seconds"]) + " |",
        "|" + "---|" * len(b["seconds"]),
        "| " + " | ".join(f"{v:.0f}" for v in b["seconds"].values()) + " |",
        "",
    ]
