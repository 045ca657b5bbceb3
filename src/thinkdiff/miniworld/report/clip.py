"""ThinkDiff-CLIP: attribute preservation, image + text, two-image composition (proxy-trained, and calibrated)."""

from __future__ import annotations

from typing import Any

from thinkdiff.miniworld.experiments import score_clip
from thinkdiff.miniworld.report.clip_claims import CALIBRATED, PROXY_ONLY, aligner_folders
from thinkdiff.miniworld.report.common import SectionContext, pct
from thinkdiff.miniworld.report.plots import plot_clip_examples
from thinkdiff.miniworld.world import ATTRIBUTES

__all__ = ["clip_markdown", "run_clip"]


def run_clip(ctx: SectionContext) -> dict[str, Any]:
    """The CLIP section: ``{"clip": ...}`` and, where the build calibrated it, ``{"clip_calibrated": ...}``;
    draws ``examples_clip.png``."""
    world, n, seed = ctx.world, ctx.config.clip_n, ctx.build_config.seed
    folders = aligner_folders(world.root)
    clip_aligner, _ = world.aligner(str(folders[PROXY_ONLY]))
    out: dict[str, Any] = {"clip": score_clip(world, clip_aligner, n, seed, **ctx.config.sampling)}
    plot_clip_examples(out["clip"].pop("examples"), ctx.out_dir / "examples_clip.png")
    if CALIBRATED in folders:
        clip_calibrated, _ = world.aligner(str(folders[CALIBRATED]))
        out["clip_calibrated"] = score_clip(world, clip_calibrated, n, seed, **ctx.config.sampling)
        out["clip_calibrated"].pop("examples")
    return out


def clip_markdown(report: dict[str, Any]) -> list[str]:
    """The ThinkDiff-CLIP tables."""
    cl = report["clip"]
    lines = ["", "## ThinkDiff-CLIP", "", f"n = {cl['n']} input renders (half from held-out cells).", ""]
    lines.append("| image in -> image out | " + " | ".join([*ATTRIBUTES, "all"]) + " |")
    lines.append("|---|" + "---|" * (len(ATTRIBUTES) + 1))
    lines.append(
        "| attribute preserved | " + " | ".join(pct(cl["image"][k]) for k in [*ATTRIBUTES, "all"]) + " |"
    )
    it = cl["image_text"]
    lines += [
        "",
        f'Image + text ("on a {{new colour}} background"): background from the text {pct(it["background_from_text"])}, '
        f"shape kept {pct(it['shape_kept'])}, colour kept {pct(it['color_kept'])}, all three {pct(it['all'])}.",
        "",
        "| two images in | " + " | ".join(ATTRIBUTES) + " |",
        "|---|" + "---|" * len(ATTRIBUTES),
        "| from A | " + " | ".join(pct(cl["composition"][k]["from_a"]) for k in ATTRIBUTES) + " |",
        "| from B | " + " | ".join(pct(cl["composition"][k]["from_b"]) for k in ATTRIBUTES) + " |",
        "",
        f"Composed (every attribute from A or B, at least one from each): {pct(cl['composition']['composed'])}.",
        "",
    ]
    return lines
