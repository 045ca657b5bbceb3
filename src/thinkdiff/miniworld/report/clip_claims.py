"""The paper's ThinkDiff-CLIP claims, each task from the same inputs and seeds by the ground-truth
caption (the ceiling), the captioning text bridge and ThinkDiff-CLIP (proxy-only and calibrated, the
default and the split lever at the same budgets), with the vision tower's linear probe (:mod:`thinkdiff.miniworld.clip_claims`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from thinkdiff.miniworld.report.common import SectionContext, pct

__all__ = [
    "CALIBRATED",
    "LEVER_CALIBRATED",
    "LEVER_PROXY_ONLY",
    "PROXY_ONLY",
    "aligner_folders",
    "clip_claims_markdown",
    "run_clip_claims",
]

PROXY_ONLY = "ThinkDiff-CLIP proxy-only"
CALIBRATED = "ThinkDiff-CLIP calibrated"
LEVER_PROXY_ONLY = "ThinkDiff-CLIP proxy-only, split lever"
LEVER_CALIBRATED = "ThinkDiff-CLIP calibrated, split lever"


def aligner_folders(root: Path) -> dict[str, Path]:
    """The ThinkDiff-CLIP model folders of the world in ``root`` that the section measures, by row
    name: the default and the split lever, proxy-only and calibrated (a world built before the
    lever, or before calibration, has fewer)."""
    from thinkdiff.miniworld.build import CLIP_LEVER, calibrated_dir, clip_lever_dir

    folders = {
        PROXY_ONLY: Path(root) / "thinkdiff" / "clip",
        CALIBRATED: calibrated_dir(root, "clip"),
        LEVER_PROXY_ONLY: clip_lever_dir(root),
        LEVER_CALIBRATED: calibrated_dir(root, CLIP_LEVER),
    }
    return {row: folder for row, folder in folders.items() if folder.is_dir()}


def run_clip_claims(ctx: SectionContext) -> dict[str, Any]:
    """``{"clip_claims": {"vision_probe", "n", "tasks", "paired", "preservation_by_attribute",
    "preservation_by_attribute_paired"}}`` (n = ``clip_n`` inputs)."""
    from thinkdiff.miniworld import clip_claims as cc
    from thinkdiff.miniworld.components.vision import vision_probe

    world, n, seed = ctx.world, ctx.config.clip_n, ctx.build_config.seed
    # The probe as the fidelity section draws it: 5n training renders, 2n test renders with held-out cells.
    probe = vision_probe(
        world.root / "vision",
        n_train=5 * ctx.config.fidelity_n,
        n_test=2 * ctx.config.fidelity_n,
        seed=seed + 1234,
    )
    rows = {cc.CEILING: cc.ceiling_source(world), cc.TEXT_BRIDGE: cc.text_bridge_source(world)}
    for row, folder in aligner_folders(world.root).items():
        rows[row] = cc.aligner_source(world, world.aligner(str(folder))[0])
    compare = [
        (CALIBRATED, cc.TEXT_BRIDGE),
        (CALIBRATED, PROXY_ONLY),
        (cc.CEILING, CALIBRATED),
        (LEVER_CALIBRATED, CALIBRATED),
        (LEVER_PROXY_ONLY, PROXY_ONLY),
        (LEVER_CALIBRATED, cc.TEXT_BRIDGE),
    ]
    result = cc.clip_claims(world, rows, n, seed, compare=compare, **ctx.config.sampling)
    result.pop("outcomes")
    return {"clip_claims": {"vision_probe": probe, "n": n, **result}}


def clip_claims_markdown(report: dict[str, Any]) -> list[str]:
    """The CLIP claims table (nothing for a report measured before it existed)."""
    if "clip_claims" not in report:
        return []
    cc = report["clip_claims"]
    probe = ", ".join(f"{k} {pct(v)}" for k, v in cc["vision_probe"].items())
    tasks = cc["tasks"]
    rows = list(next(iter(tasks.values())))
    lines = [
        "",
        "## ThinkDiff-CLIP claims",
        "",
        f"Linear probe of the vision tower's pooled tokens (held-out renders, held-out cells included): {probe}.",
        "",
        f"n = {cc['n']} inputs per task (half from held-out cells); every row draws the same inputs with the same seeds.",
        "",
        "| row | " + " | ".join(tasks) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    for row in rows:
        cells = [tasks[t][row] for t in tasks]
        lines.append(
            f"| {row} | "
            + " | ".join(f"{pct(c['accuracy'])} [{pct(c['ci95'][0])}, {pct(c['ci95'][1])}]" for c in cells)
            + " |"
        )
    lines.append("")
    for task, tests in cc["paired"].items():
        for pair, t in tests.items():
            lines.append(
                f"* {task}, {pair}: {t['a_only']} vs {t['b_only']} inputs only one right, p = {t['p_value']:.3g}."
            )
    by_attribute = cc.get("preservation_by_attribute")
    if by_attribute:
        attributes = list(next(iter(by_attribute.values())))
        lines += [
            "",
            "Preservation per attribute (the attribute read back equal to the input's):",
            "",
            "| row | " + " | ".join(attributes) + " |",
            "|---|" + "---|" * len(attributes),
        ]
        for row, cells in by_attribute.items():
            lines.append(
                f"| {row} | "
                + " | ".join(
                    f"{pct(c['accuracy'])} [{pct(c['ci95'][0])}, {pct(c['ci95'][1])}]" for c in cells.values()
                )
                + " |"
            )
        lines.append("")
        for pair, tests in cc["preservation_by_attribute_paired"].items():
            lines.append(
                f"* preservation per attribute, {pair}: "
                + "; ".join(
                    f"{k} {t['a_only']} vs {t['b_only']}, p = {t['p_value']:.3g}" for k, t in tests.items()
                )
                + "."
            )
    return lines
