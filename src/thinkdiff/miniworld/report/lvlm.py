"""ThinkDiff-LVLM on mini-CoBSAT, per task, 2- and 4-shot, for every method of :data:`METHODS`.

The ground-truth caption (the decoder's ceiling), the text bridge (VLM answer -> T5 -> FLUX),
ThinkDiff-LVLM, no-split training, input-token features, an untrained aligner (chance), and the
calibrated aligners: the VLM runs once, every method draws the same prompts with the same seeds,
and the judge reads every image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from thinkdiff.miniworld.minicobsat import MINI_TASKS, TASK_COLUMN_ORDER, build_prompts
from thinkdiff.miniworld.report.ablation import aligner_folders
from thinkdiff.miniworld.report.common import ReportConfig, SectionContext, pct
from thinkdiff.miniworld.report.plots import plot_examples, plot_lvlm
from thinkdiff.miniworld.stats import cell

__all__ = ["METHODS", "lvlm_markdown", "measure_lvlm", "run_lvlm"]

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
    """The LVLM section: ``{"lvlm": ...}``; draws ``lvlm_accuracy.png`` and ``examples_lvlm.png``."""
    aligners = aligner_folders(ctx.world, ctx.out_dir / "work", retrain=ctx.config.retrain)
    lvlm, examples = measure_lvlm(ctx.world, aligners, ctx.config, ctx.config.sampling)
    plot_lvlm(lvlm, ctx.out_dir / "lvlm_accuracy.png")
    plot_examples(examples, ctx.out_dir / "examples_lvlm.png")
    return {"lvlm": lvlm}


def measure_lvlm(world, aligners: dict[str, Path], config: ReportConfig, sampling: dict[str, Any]):
    """Every method of :data:`METHODS` whose aligner exists on the same prompts and seeds; the tables,
    the prompt-level outcomes, where the aligned features land, and example images."""
    from thinkdiff.miniworld.experiments import aligner_method, run_vlm, score_lvlm_methods
    from thinkdiff.models.aligner import Aligner
    from thinkdiff.models.bundle import load_model

    prompts = list(build_prompts(TASK_COLUMN_ORDER, config.shots, range(config.num_prompts)))
    runs = run_vlm(world, prompts, progress=config.progress)
    lvlm_aligner, info = load_model(aligners["lvlm"])
    torch.manual_seed(0)
    untrained = Aligner(info.in_dim, info.out_dim, norm="t5").eval()
    untrained.init_norm_from_t5(world.t5_encoder)
    text_cache: dict[str, torch.Tensor] = {}

    def text_states(text: str) -> torch.Tensor:
        if text not in text_cache:
            text_cache[text] = world.text_embeds([text or " "])[0]
        return text_cache[text]

    loaded = {"lvlm": lvlm_aligner, "untrained": untrained}
    if "no split" in aligners:
        loaded["no split"] = load_model(aligners["no split"])[0]
    if "input tokens" in aligners:
        loaded["input tokens"] = load_model(aligners["input tokens"])[0]
    methods: dict[str, Any] = {
        "ground-truth caption": lambda r: text_states(r.prompt.target_caption),
        "text bridge": lambda r: text_states(r.answer),
        "lvlm": aligner_method(lvlm_aligner),
    }
    if "no split" in loaded:
        methods["no split"] = aligner_method(loaded["no split"])
    if "input tokens" in loaded:
        methods["input tokens"] = aligner_method(loaded["input tokens"], use_prompt=True)
    methods["untrained"] = aligner_method(untrained)
    for name in METHODS:
        if name.startswith("calibrated ") and name in aligners:
            loaded[name] = load_model(aligners[name])[0]
            methods[name] = aligner_method(loaded[name], use_prompt="input tokens" in name)
    with torch.no_grad():
        correct, images = score_lvlm_methods(world, runs, methods, progress=config.progress, **sampling)
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
    picks = [i for i in range(len(runs)) if runs[i].prompt.index == 0][: 2 * len(TASK_COLUMN_ORDER)]
    examples = {"runs": [runs[i] for i in picks], "images": {k: v[picks] for k, v in images.items()}}
    return result, examples


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
