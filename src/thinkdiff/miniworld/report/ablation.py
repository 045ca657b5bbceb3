"""The ablation aligners, trained with the build's budget on the build's features, and the norm ablation.

Beside the build's ThinkDiff-LVLM aligner (and its calibrated aligners), the report trains: no
random split, input-token features, and the aligner's RMSNorm with default init and none (the
paper's Figure 7). The T5-norm run is repeated here (same config as the build's) so that the three
norm curves come from the same code path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from thinkdiff.miniworld.report.common import SectionContext
from thinkdiff.miniworld.report.plots import plot_norm

__all__ = ["ABLATION_RUNS", "ablation_markdown", "aligner_folders", "norm_curves", "run_ablation"]

ABLATION_RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    "lvlm (t5 norm)": ("norm-t5", {}),
    "no split": ("no-split", {"split": False}),
    "input tokens": ("input-tokens", {"features": "prompt"}),
    "norm default": ("norm-default", {"aligner_norm": "default"}),
    "norm none": ("norm-none", {"aligner_norm": "none"}),
}
"""The aligners the report trains: name -> (run folder under ``work/runs``, config changes)."""


def aligner_folders(world, work: Path, *, retrain: bool) -> dict[str, Path]:
    """The aligner folder of every method: the build's ThinkDiff-LVLM and calibrated aligners, and
    (``retrain``) where :func:`run_ablation` leaves the ablations."""
    from thinkdiff.miniworld.build import CALIBRATION_RUNS, calibrated_dir

    out = {"lvlm": world.root / "thinkdiff" / "lvlm"}
    for name in CALIBRATION_RUNS:  # built by `miniworld build` (or --only-calibration)
        if calibrated_dir(world.root, name).is_dir():
            out[f"calibrated {name}"] = calibrated_dir(world.root, name)
    if retrain:
        out.update({name: work / "runs" / slug / "model" for name, (slug, _) in ABLATION_RUNS.items()})
    return out


def run_ablation(ctx: SectionContext) -> dict[str, Any]:
    """The ablation-training section: trains :data:`ABLATION_RUNS` (``retrain``) into the report's
    work folder; ``{"norm_ablation": ...}``, drawn as ``norm_ablation.png``."""
    from thinkdiff.miniworld.experiments import aligner_config, run_training, write_lvlm_features

    world, work = ctx.world, ctx.out_dir / "work"
    if ctx.config.retrain:
        features = world.root / "work"
        if not (features / "features" / "train" / "index.json").is_file():
            write_lvlm_features(world.root, work, ctx.build_config)
            features = work
        for slug, overrides in ABLATION_RUNS.values():
            # The runs write into the report's work folder; the feature folders are only read.
            train_config = aligner_config(world.root, features, ctx.build_config, slug, **overrides)
            train_config.output_dir = str(work / "runs" / slug)
            run_training(train_config, None, progress=ctx.config.progress)
    curves = norm_curves(aligner_folders(world, work, retrain=ctx.config.retrain))
    plot_norm(curves, ctx.out_dir / "norm_ablation.png")
    return {"norm_ablation": curves}


def norm_curves(aligners: dict[str, Path]) -> dict[str, list[list[float]]]:
    """Training loss (step, loss) of the three norm settings, from the runs' metrics.jsonl."""
    curves = {}
    for label, name in (("t5", "lvlm (t5 norm)"), ("default", "norm default"), ("none", "norm none")):
        if name not in aligners:
            continue
        metrics = Path(aligners[name]).parent / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line]
        curves[label] = [[r["step"], r["loss"]] for r in rows if "loss" in r]
    return curves


def ablation_markdown(report: dict[str, Any]) -> list[str]:
    """The norm ablation's first and final losses."""
    lines = ["## Norm ablation (paper Figure 7)", ""]
    for key, points in report["norm_ablation"].items():
        if points:
            last = np.mean([p[1] for p in points[-5:]])
            lines.append(
                f"- {key}: first logged loss {points[0][1]:.3f}, final (mean of last 5 logs) {last:.3f}"
            )
    return lines
