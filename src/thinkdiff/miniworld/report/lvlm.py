"""ThinkDiff-LVLM on mini-CoBSAT, per task, 2- and 4-shot, for every method of :data:`METHODS`.

The ground-truth caption (the decoder's ceiling), the text bridge (VLM answer -> T5 -> FLUX),
ThinkDiff-LVLM, no-split training, input-token features, an untrained aligner (chance), and the
calibrated aligners: the VLM runs once, every method draws the same prompts with the same seeds,
and the judge reads every image.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from thinkdiff.miniworld.experiments import ALIGNMENT_REFERENCE
from thinkdiff.miniworld.minicobsat import MINI_TASKS, TASK_COLUMN_ORDER, build_prompts
from thinkdiff.miniworld.report.ablation import aligner_folders
from thinkdiff.miniworld.report.common import ReportConfig, SectionContext, pct
from thinkdiff.miniworld.report.plots import plot_examples, plot_lvlm
from thinkdiff.miniworld.stats import cell

__all__ = ["METHODS", "finish_lvlm", "lvlm_markdown", "measure_lvlm", "run_lvlm", "run_lvlm_calibrated"]

logger = logging.getLogger(__name__)

METHODS: tuple[str, ...] = (
    "ground-truth caption",
    "text bridge",
    "lvlm",
    "no split",
    "input tokens",
    "untrained",
    "calibrated no split",
    "calibrated lvlm regress",
    "calibrated no split, lever budget",
    "calibrated lvlm",
    "calibrated input tokens",
    "calibrated no split, pure noise",
    "calibrated no split, teacher noise",
    "calibrated no split, no proxy term",
    "calibrated no split, flow matching",
)
"""Rows of the mini-CoBSAT table, in order."""


def run_lvlm(ctx: SectionContext) -> dict[str, Any]:
    """The LVLM section's proxy-only rows (the text rows, ThinkDiff-LVLM, the ablations, chance):
    ``{"lvlm": ...}``; its example images wait in the work folder for :func:`finish_lvlm`."""
    return {"lvlm": _measure_part(ctx, calibrated=False)}


def run_lvlm_calibrated(ctx: SectionContext) -> dict[str, Any]:
    """The LVLM section's calibrated rows, measured beside the other lane's proxy-only rows (the
    same prompts and seeds): ``{"lvlm_calibrated": ...}``, merged into ``lvlm`` by :func:`finish_lvlm`."""
    return {"lvlm_calibrated": _measure_part(ctx, calibrated=True)}


def _measure_part(ctx: SectionContext, *, calibrated: bool) -> dict[str, Any]:
    aligners = aligner_folders(ctx.world, ctx.out_dir / "work", retrain=ctx.config.retrain)
    result, images = measure_lvlm(ctx.world, aligners, ctx.config, ctx.config.sampling, calibrated=calibrated)
    _save_examples(ctx.out_dir, "calibrated" if calibrated else "proxy", images)
    return result


def finish_lvlm(report: dict[str, Any], out_dir: Path) -> None:
    """Merge the calibrated rows into ``report["lvlm"]`` (in :data:`METHODS` order, as one table),
    then draw ``lvlm_accuracy.png`` and ``examples_lvlm.png``."""
    lvlm = report["lvlm"]
    calibrated = report.pop("lvlm_calibrated", None)
    if calibrated is not None:
        for key in ("tables", "outcomes"):
            lvlm[key] = {**lvlm[key], **calibrated[key]}
        # The T5 states' reference row stays last.
        reference, alignment = {}, {}
        for part in (lvlm["alignment"], calibrated["alignment"]):
            for name, row in part.items():
                (reference if name == ALIGNMENT_REFERENCE else alignment)[name] = row
        lvlm["alignment"] = {**alignment, **reference}
    plot_lvlm(lvlm, out_dir / "lvlm_accuracy.png")
    config = report["config"]
    prompts = list(build_prompts(TASK_COLUMN_ORDER, config["shots"], range(config["num_prompts"])))
    picks = _example_picks(prompts)
    figure = out_dir / "examples_lvlm.png"
    parts = [part for part in ("proxy", "calibrated") if _examples_file(out_dir, part).is_file()]
    if figure.is_file() and len(parts) < 2:
        # A report folder copied without its work folder, then resumed to measure other sections
        # again: the drawn images are gone, and a figure redrawn without them would lose its columns.
        logger.info("keeping %s: the LVLM sections' example images are not in %s", figure, out_dir / "work")
        return
    images: dict[str, np.ndarray] = {}
    for part in parts:
        images.update(_load_examples(out_dir, part))
    plot_examples([prompts[i] for i in picks], images, figure)


def _example_picks(prompts) -> list[int]:
    """The example grid's rows: prompt 0 of each task, 2 shots first."""
    return [i for i, p in enumerate(prompts) if p.index == 0][: 2 * len(TASK_COLUMN_ORDER)]


def _examples_file(out_dir: Path, part: str) -> Path:
    return out_dir / "work" / f"lvlm-examples-{part}.npz"


def _save_examples(out_dir: Path, part: str, images: dict[str, np.ndarray]) -> None:
    path = _examples_file(out_dir, part)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(images)
    stacked = np.stack([images[n] for n in names]) if names else np.zeros((0,), np.uint8)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, names=np.array(names, dtype=str), images=stacked)
    tmp.replace(path)


def _load_examples(out_dir: Path, part: str) -> dict[str, np.ndarray]:
    path = _examples_file(out_dir, part)
    if not path.is_file():
        return {}
    with np.load(path, allow_pickle=False) as data:
        return dict(zip([str(n) for n in data["names"]], data["images"]))


def measure_lvlm(
    world, aligners: dict[str, Path], config: ReportConfig, sampling: dict[str, Any], *, calibrated: bool
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The methods of :data:`METHODS` whose aligner exists, proxy-only or ``calibrated`` ones, on the
    same prompts and seeds: the tables, the prompt-level outcomes, where the aligned features land;
    and the example prompts' images per method."""
    from thinkdiff.miniworld.experiments import aligner_method, run_vlm, score_lvlm_methods
    from thinkdiff.models.aligner import Aligner
    from thinkdiff.models.bundle import load_model

    prompts = list(build_prompts(TASK_COLUMN_ORDER, config.shots, range(config.num_prompts)))
    runs = run_vlm(world, prompts, progress=config.progress)
    text_cache: dict[str, torch.Tensor] = {}

    def text_states(text: str) -> torch.Tensor:
        if text not in text_cache:
            text_cache[text] = world.text_embeds([text or " "])[0]
        return text_cache[text]

    loaded: dict[str, torch.nn.Module] = {}
    methods: dict[str, Any] = {}
    if calibrated:
        for name in METHODS:
            if name.startswith("calibrated ") and name in aligners:
                loaded[name] = load_model(aligners[name])[0]
                methods[name] = aligner_method(loaded[name], use_prompt="input tokens" in name)
    else:
        lvlm_aligner, info = load_model(aligners["lvlm"])
        torch.manual_seed(0)
        untrained = Aligner(info.in_dim, info.out_dim, norm="t5").eval()
        untrained.init_norm_from_t5(world.t5_encoder)
        loaded = {"lvlm": lvlm_aligner, "untrained": untrained}
        for name in ("no split", "input tokens"):
            if name in aligners:
                loaded[name] = load_model(aligners[name])[0]
        methods = {
            "ground-truth caption": lambda r: text_states(r.prompt.target_caption),
            "text bridge": lambda r: text_states(r.answer),
            "lvlm": aligner_method(lvlm_aligner),
        }
        if "no split" in loaded:
            methods["no split"] = aligner_method(loaded["no split"])
        if "input tokens" in loaded:
            methods["input tokens"] = aligner_method(loaded["input tokens"], use_prompt=True)
        methods["untrained"] = aligner_method(untrained)
    with torch.no_grad():
        correct, images = score_lvlm_methods(world, runs, methods, progress=config.progress, **sampling)
    if not calibrated:
        correct = {"vlm text answer": [r.text_correct for r in runs], **correct}

    tables: dict[str, Any] = {}
    for name, outcomes in correct.items():
        table: dict[str, Any] = {}
        for shot in config.shots:
            row = {}
            for task_id in TASK_COLUMN_ORDER:
                row[MINI_TASKS[task_id].name] = cell(
                    [
                        o
                        for o, r in zip(outcomes, runs)
                        if r.prompt.shot == shot and r.prompt.task_id == task_id
                    ]
                ).to_dict()
            row["average"] = cell([o for o, r in zip(outcomes, runs) if r.prompt.shot == shot]).to_dict()
            row["held-out targets"] = cell(
                [o for o, r in zip(outcomes, runs) if r.prompt.shot == shot and r.prompt.held_out_target]
            ).to_dict()
            table[str(shot)] = row
        tables[name] = table
    from thinkdiff.miniworld.experiments import alignment_diagnostics

    result = {
        "alignment": alignment_diagnostics(
            world, runs, loaded, use_prompt={"input tokens": True, "calibrated input tokens": True}
        ),
        "tables": tables,
        "outcomes": {k: [bool(x) for x in v] for k, v in correct.items()},
        "prompts": [
            {"task": r.prompt.task.name, "shot": r.prompt.shot, "index": r.prompt.index} for r in runs
        ],
        "answers": [r.answer for r in runs[:50]],
    }
    picks = _example_picks([r.prompt for r in runs])
    return result, {k: v[picks] for k, v in images.items()}


def lvlm_markdown(report: dict[str, Any]) -> list[str]:
    """The mini-CoBSAT tables per shot, and where the aligned features land."""
    lines = ["", "## ThinkDiff-LVLM on mini-CoBSAT", ""]
    tables = report["lvlm"]["tables"]
    for shot in report["config"]["shots"]:
        cols = [MINI_TASKS[t].name for t in TASK_COLUMN_ORDER] + ["average", "held-out targets"]
        lines += [
            f"### {shot}-shot",
            "",
            "| method | " + " | ".join(cols) + " |",
            "|---|" + "---|" * len(cols),
        ]
        for name, table in tables.items():
            row = table[str(shot)]
            avg = row["average"]
            cells = [pct(row[c]["accuracy"]) for c in cols[:-2]]
            cells.append(f"**{pct(avg['accuracy'])}** [{avg['ci95'][0]:.2f}, {avg['ci95'][1]:.2f}]")
            cells.append(f"{pct(row['held-out targets']['accuracy'])} (n={row['held-out targets']['n']})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    n_task = next(iter(next(iter(tables.values())).values()))[MINI_TASKS[TASK_COLUMN_ORDER[0]].name]["n"]
    lines += [f"n = {n_task} prompts per task; averages with 95% Wilson intervals.", ""]
    lines += [
        "### Where the aligned features land",
        "",
        "The proxy T5 *decoder* reading the aligned features (does its text name the VLM answer's shape "
        "and detail?), and their cosine to the T5 *encoder* states of the same answer, which are what "
        "the mini FLUX was trained on.",
        "",
        "| features | proxy decoder reads the answer | cosine to T5 encoder states | RMS |",
        "|---|---|---|---|",
    ]
    for name, d in report["lvlm"]["alignment"].items():
        reads = "-" if d["proxy_reads_answer"] != d["proxy_reads_answer"] else pct(d["proxy_reads_answer"])
        lines.append(f"| {name} | {reads} | {d['cosine_to_t5_states']:.3f} | {d['rms']:.3f} |")
    return lines
