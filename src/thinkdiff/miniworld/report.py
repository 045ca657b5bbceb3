"""``thinkdiff miniworld report``: measure the components and ThinkDiff's claims in the miniature world.

Every number in the report comes from running the evaluation code below on a built models folder;
nothing is typed in. The report folder gets ``report.md``, ``report.json`` (all numbers, with the
prompt-level outcomes), and PNGs: component loss curves, the norm ablation (the paper's Figure 7),
accuracy bars, and grids of example inputs and outputs.

Measured:

1. *Fidelity of each component*: the judge on fresh renders; caption reconstruction by the mini
   T5; the decoder's images from ground-truth captions (the ceiling for everything downstream);
   the VLM's captions of single images and its text answers on mini-CoBSAT (the reasoning ceiling);
   a linear probe of the vision encoder's tokens.
2. *The premise*: with no VLM, an aligner learns the proxy loss from perfect features of a caption
   (its own T5 states; its T5 word embeddings); does FLUX draw the caption from the aligned
   features? (:func:`~thinkdiff.miniworld.experiments.proxy_transfer`)
3. *ThinkDiff-LVLM on mini-CoBSAT*, per task, 2- and 4-shot, for: the ground-truth caption (decoder
   ceiling), the text bridge (VLM answer -> T5 -> FLUX), ThinkDiff-LVLM, no-split training,
   input-token features, and an untrained aligner (chance).
4. *ThinkDiff-CLIP*: attribute preservation, image + text, two-image composition.
5. *The norm ablation*: training loss of the aligner with the T5-initialised, default and no norm.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from thinkdiff.miniworld.experiments import TRANSFER_CEILING, TRANSFER_MAPPED, TRANSFER_SOURCES
from thinkdiff.miniworld.minicobsat import MINI_TASKS, TASK_COLUMN_ORDER, build_prompts
from thinkdiff.miniworld.models import DEFAULT_CFG, DEFAULT_STEPS
from thinkdiff.miniworld.stats import cell, paired_test
from thinkdiff.miniworld.world import (
    ATTRIBUTES,
    HELD_OUT,
    THEMES,
    full_caption,
    parse_caption,
    render,
    sample_scene,
    scene_rng,
    theme_caption,
    to_pil,
)
from thinkdiff.utils import atomic_write_text

__all__ = ["ReportConfig", "write_report"]

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


@dataclasses.dataclass
class ReportConfig:
    """What the report measures, and how much of it."""

    num_prompts: int = 100
    """First N prompts of the 1000-prompt list, per task and shot."""
    shots: tuple[int, ...] = (2, 4)
    steps: int = DEFAULT_STEPS
    cfg: float = DEFAULT_CFG
    fidelity_n: int = 300
    clip_n: int = 200
    retrain: bool = True
    """Train the ablation aligners (no split, input tokens, norm default/none); else skip them."""
    transfer_train: int = 3000
    """Captions the oracle aligners of the premise test learn from."""
    transfer_n: int = 200
    """Held-out captions the premise test draws (half from held-out cells)."""
    transfer_steps: int = 400
    """Training steps of each oracle aligner of the premise test."""
    transfer_calibration_steps: int = 600
    """Calibration steps of the premise test's T5-states aligner after its proxy stage (0: none)."""
    transfer_noise: str = "teacher"
    """Noisy inputs of that calibration ('teacher' or 'pure')."""
    qcd: bool = True
    """Measure the query-contrastive baseline's rows (:mod:`thinkdiff.miniworld.qcd`)."""
    threads: int = 2
    """Two or more: the report's two independent halves run in two forked processes."""
    progress: bool = True


def write_report(models_dir: Path, out_dir: Path, config: ReportConfig) -> dict[str, Any]:
    """Measure everything (see the module docstring) and write the report folder; returns report.json."""
    from thinkdiff.miniworld.build import BuildConfig
    from thinkdiff.miniworld.models import MiniWorld

    if config.threads < 2:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    models_dir, out_dir = Path(models_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    world = MiniWorld(models_dir)
    build_record = json.loads((models_dir / "build.json").read_text())
    build_config = BuildConfig(**build_record["config"])
    sampling = {"steps": config.steps, "cfg": config.cfg}
    report: dict[str, Any] = {"config": dataclasses.asdict(config), "build": build_record, "seconds": {}}

    parts = (_readers_part, _lvlm_part)
    if config.threads >= 2:
        from thinkdiff.miniworld.build import two_processes

        # Two independent halves in two forked one-thread processes (each seeds what it draws, so
        # the numbers do not depend on the split); no torch op has run here yet.
        with two_processes() as ex:
            futures = [ex.submit(part, world, config, build_config, sampling, out_dir) for part in parts]
            (readers, clip_examples), (aligners, lvlm, examples, lvlm_seconds) = (f.result() for f in futures)
    else:
        (readers, clip_examples), (aligners, lvlm, examples, lvlm_seconds) = (
            part(world, config, build_config, sampling, out_dir) for part in parts
        )
    report["seconds"].update(readers.pop("seconds"))
    report["seconds"].update(lvlm_seconds)
    report.update(readers)
    report["lvlm"] = lvlm
    report["fidelity"]["vlm_cobsat_text"] = lvlm["tables"]["vlm text answer"]
    report["calibration_cost"] = calibration_cost(build_record)

    report["norm_ablation"] = norm_curves(aligners)
    report["claims"] = claims(lvlm)
    report["seconds"]["total"] = round(time.perf_counter() - started, 1)

    _plot_losses(models_dir, out_dir / "component_losses.png")
    _plot_norm(report["norm_ablation"], out_dir / "norm_ablation.png")
    _plot_lvlm(lvlm, out_dir / "lvlm_accuracy.png")
    _plot_examples(examples, out_dir / "examples_lvlm.png")
    _plot_clip_examples(clip_examples, out_dir / "examples_clip.png")
    atomic_write_text(out_dir / "report.json", json.dumps(_jsonable(report), indent=1) + "\n")
    atomic_write_text(out_dir / "report.md", render_markdown(report))
    return report


def _readers_part(
    world, config: ReportConfig, build_config, sampling: dict[str, Any], out_dir: Path
) -> tuple[dict, Any]:
    """Fidelity, the premise test (and after calibration), ThinkDiff-CLIP (and after calibration), QCD."""
    from thinkdiff.miniworld.build import calibrated_dir
    from thinkdiff.miniworld.experiments import proxy_transfer, score_clip

    if config.threads >= 2:
        torch.set_num_threads(max(1, config.threads // 2))
    out: dict[str, Any] = {"seconds": {}}
    t0 = time.perf_counter()
    out["fidelity"] = measure_fidelity(world, config, sampling)
    out["seconds"]["fidelity"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    out["premise"] = proxy_transfer(
        world,
        n_train=config.transfer_train,
        n_test=config.transfer_n,
        train_steps=config.transfer_steps,
        seed=build_config.seed,
        calibration_steps=config.transfer_calibration_steps,
        proxy_weight=build_config.calib_proxy_weight,
        noise_source=config.transfer_noise,
        **sampling,
    )
    out["seconds"]["premise"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    clip_aligner, _ = world.aligner("clip")
    clip = score_clip(world, clip_aligner, config.clip_n, build_config.seed, **sampling)
    clip_examples = clip.pop("examples")
    out["clip"] = clip
    if calibrated_dir(world.root, "clip").is_dir():
        clip_calibrated, _ = world.aligner(str(calibrated_dir(world.root, "clip")))
        out["clip_calibrated"] = score_clip(world, clip_calibrated, config.clip_n, build_config.seed, **sampling)
        out["clip_calibrated"].pop("examples")
    out["seconds"]["clip"] = round(time.perf_counter() - t0, 1)

    if config.qcd:
        t0 = time.perf_counter()
        from thinkdiff.miniworld.qcd import measure_qcd

        prompts = list(build_prompts(TASK_COLUMN_ORDER, config.shots, range(config.num_prompts)))
        lvlm_model = world.root / "thinkdiff" / "lvlm"
        out["qcd"] = measure_qcd(world, prompts, lvlm_model, progress=config.progress, **sampling)
        out["seconds"]["qcd"] = round(time.perf_counter() - t0, 1)
    return out, clip_examples


def _lvlm_part(world, config: ReportConfig, build_config, sampling: dict[str, Any], out_dir: Path):
    """The ablation aligners, then ThinkDiff-LVLM on mini-CoBSAT for every method."""
    if config.threads >= 2:
        torch.set_num_threads(max(1, config.threads // 2))
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    aligners = ablation_aligners(world, out_dir / "work", build_config, retrain=config.retrain)
    seconds["ablation_training"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    lvlm, examples = measure_lvlm(world, aligners, config, sampling)
    seconds["lvlm"] = round(time.perf_counter() - t0, 1)
    return aligners, lvlm, examples, seconds


# ----------------------------------------------------------------------------------- fidelity
def measure_fidelity(world, config: ReportConfig, sampling: dict[str, Any]) -> dict[str, Any]:
    from thinkdiff.miniworld.components.t5 import reconstruction_accuracy
    from thinkdiff.miniworld.judge import attribute_accuracy, held_out_scenes, judge_accuracy
    from thinkdiff.models.lvlm import SamplingSettings

    n = config.fidelity_n
    out: dict[str, Any] = {}
    rng = scene_rng("report-fidelity", 0)
    fresh = [sample_scene(rng, allow_held_out=True) for _ in range(max(n, 1000))]
    held = held_out_scenes(n, 99)
    out["judge"] = {
        "fresh_renders": judge_accuracy(world.judge, fresh),
        "held_out_cells": judge_accuracy(world.judge, held),
    }

    from transformers import T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration.from_pretrained(world.root / "t5").eval()
    out["t5_reconstruction"] = {
        "full_captions": reconstruction_accuracy(
            t5, world.t5_tokenizer, [full_caption(s) for s in fresh[:n]]
        ),
        "full_captions_held_out_cells": reconstruction_accuracy(
            t5, world.t5_tokenizer, [full_caption(s) for s in held]
        ),
        "theme_captions": reconstruction_accuracy(
            t5,
            world.t5_tokenizer,
            [
                theme_caption(THEMES[i % 3], s.shape, s.value(THEMES[i % 3].split("_")[0]))
                for i, s in enumerate(fresh[:n])
            ],
        ),
        "n": n,
    }

    # The decoder from ground-truth captions: every cell of every theme, twice.
    decoder: dict[str, Any] = {}
    for theme in THEMES:
        detail = theme.split("_")[0]
        cells = [(d, s) for d in ATTRIBUTES[detail] for s in ATTRIBUTES["shape"]]
        texts = [theme_caption(theme, s, d) for d, s in cells] * 2
        seeds = list(range(len(texts)))
        images = world.images_from_text(texts, seeds, **sampling)
        verdicts = world.judge.read(images)
        targets = [{"shape": s, detail: d} for d, s in cells] * 2
        ok = [v.matches(t) for v, t in zip(verdicts, targets)]
        held_mask = [(d, s) in HELD_OUT[theme] for d, s in cells] * 2
        decoder[theme] = {
            "all_cells": cell(ok).to_dict(),
            "held_out_cells": cell([o for o, h in zip(ok, held_mask) if h]).to_dict(),
            "shape": float(np.mean([v.shape == t["shape"] for v, t in zip(verdicts, targets)])),
            detail: float(np.mean([v.value(detail) == t[detail] for v, t in zip(verdicts, targets)])),
        }
    texts = [full_caption(s) for s in fresh[:n]]
    verdicts = world.judge.read(world.images_from_text(texts, list(range(n)), **sampling))
    decoder["full_caption"] = attribute_accuracy(verdicts, fresh[:n])
    out["decoder"] = decoder

    # The VLM describing single images (greedy), held-out cells half of them.
    from thinkdiff.data.extraction import DESCRIPTION_PROMPTS
    from thinkdiff.miniworld.components.vlm import max_answer_tokens

    scenes = held[: n // 2] + fresh[: n - n // 2]
    prompts = [
        [to_pil(render(s)), DESCRIPTION_PROMPTS[i % len(DESCRIPTION_PROMPTS)]] for i, s in enumerate(scenes)
    ]
    sampling_vlm = SamplingSettings(
        max_new_tokens=max_answer_tokens(world.vlm.processor.tokenizer), do_sample=False
    )
    texts = []
    for start in range(0, len(prompts), 64):
        texts += world.vlm.generate(prompts[start : start + 64], sampling_vlm).texts
    parsed = [parse_caption(t) for t in texts]
    out["vlm_describe"] = {
        k: float(np.mean([p.get(k) == s.value(k) for p, s in zip(parsed, scenes)])) for k in ATTRIBUTES
    }
    out["vlm_describe"]["all"] = float(
        np.mean([all(p.get(k) == s.value(k) for k in ATTRIBUTES) for p, s in zip(parsed, scenes)])
    )
    out["vlm_describe"]["n"] = len(scenes)

    from thinkdiff.miniworld.components.vision import probe_accuracy
    from thinkdiff.miniworld.pool import render_pool

    train = render_pool(5 * n, 1234, progress=False)
    test = render_pool(2 * n, 4321, allow_held_out=True, progress=False)
    out["vision_probe"] = probe_accuracy(world.root / "vision", train, test)
    return out


# ----------------------------------------------------------------------------------- aligners
def ablation_aligners(world, work: Path, build_config, *, retrain: bool) -> dict[str, Path]:
    """The aligner folders of every method: the build's ThinkDiff-LVLM, and ablations trained now
    with the same budget on the same features (re-extracted when the build's work folder is gone).

    The T5-norm run is repeated here (same config as the build's) so that the three norm curves
    come from the same code path.
    """
    from thinkdiff.miniworld.build import CALIBRATION_RUNS, calibrated_dir
    from thinkdiff.miniworld.experiments import aligner_config, run_training, write_lvlm_features

    out = {"lvlm": world.root / "thinkdiff" / "lvlm"}
    for name in CALIBRATION_RUNS:  # built by `miniworld build` (or --only-calibration)
        if calibrated_dir(world.root, name).is_dir():
            out[f"calibrated {name}"] = calibrated_dir(world.root, name)
    if not retrain:
        return out
    features = world.root / "work"
    if not (features / "features" / "train" / "index.json").is_file():
        write_lvlm_features(world.root, work, build_config)
        features = work
    runs = {
        "lvlm (t5 norm)": ("norm-t5", {}),
        "no split": ("no-split", {"split": False}),
        "input tokens": ("input-tokens", {"features": "prompt"}),
        "norm default": ("norm-default", {"aligner_norm": "default"}),
        "norm none": ("norm-none", {"aligner_norm": "none"}),
    }
    for name, (slug, overrides) in runs.items():
        # The runs write into the report's work folder; the feature folders are only read.
        train_config = aligner_config(world.root, features, build_config, slug, **overrides)
        train_config.output_dir = str(work / "runs" / slug)
        out[name] = run_training(train_config, None)
    return out


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


# ----------------------------------------------------------------------------------- ThinkDiff-LVLM
def measure_lvlm(world, aligners: dict[str, Path], config: ReportConfig, sampling: dict[str, Any]):
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


def claims(lvlm: dict[str, Any]) -> list[dict[str, Any]]:
    """The paper's claims, each tested on the same prompts (McNemar's exact test, 5% level)."""
    outcomes = lvlm["outcomes"]
    prompts = lvlm["prompts"]
    out = []

    def compare(a: str, b: str, claim: str, shot: int | None = None) -> None:
        if a not in outcomes or b not in outcomes:
            return
        keep = [i for i, p in enumerate(prompts) if shot is None or p["shot"] == shot]
        xa, xb = [outcomes[a][i] for i in keep], [outcomes[b][i] for i in keep]
        test = paired_test(xa, xb)
        acc_a, acc_b = float(np.mean(xa)), float(np.mean(xb))
        if test.p_value >= 0.05:
            verdict = "not separated"
        else:
            verdict = "reproduces" if acc_a > acc_b else "reversed"
        out.append(
            {"claim": claim, "a": a, "b": b, "shot": shot, "accuracy_a": acc_a, "accuracy_b": acc_b,
             "a_only": test.a_only, "b_only": test.b_only, "p_value": test.p_value, "verdict": verdict}
        )  # fmt: skip

    def shot_accuracy(name: str, shot: int) -> float:
        return float(np.mean([o for o, p in zip(outcomes[name], prompts) if p["shot"] == shot]))

    def more_shots(name: str, claim: str) -> None:
        if name in outcomes and {p["shot"] for p in prompts} >= {2, 4}:
            acc4, acc2 = shot_accuracy(name, 4), shot_accuracy(name, 2)
            out.append({"claim": claim, "accuracy_a": acc4, "accuracy_b": acc2,
                        "verdict": "higher" if acc4 > acc2 else "not higher"})  # fmt: skip

    compare("lvlm", "input tokens", "ThinkDiff-LVLM far above input-token features")
    compare("lvlm", "no split", "ThinkDiff-LVLM above training without the random split")
    compare("lvlm", "untrained", "ThinkDiff-LVLM above an untrained aligner (chance)")
    compare("lvlm", "text bridge", "ThinkDiff-LVLM above the text bridge (the follow-up found the reverse)")
    more_shots("lvlm", "ThinkDiff-LVLM better at 4 shots than at 2")
    # Calibration (issue 17): beside the proxy-only aligners, and against the text bridge. The
    # levers are compared with the default recipe at their own (shorter) budget.
    lever = "calibrated no split, lever budget"
    for cal, proxy_only in (
        ("calibrated lvlm", "lvlm"),
        ("calibrated no split", "no split"),
        ("calibrated input tokens", "input tokens"),
    ):
        compare(cal, proxy_only, f"{cal} above proxy-only {proxy_only}")
    compare("calibrated no split", "input tokens", "calibrated ThinkDiff-LVLM far above input-token features")
    compare(lever, "calibrated input tokens", "calibrated: generated tokens above input tokens (lever budget)")
    compare(lever, "calibrated lvlm", "calibrated: no-split start above the random-split start (lever budget)")
    for name, what in (
        ("pure noise", "target-image noise above pure noise"),
        ("teacher noise", "target-image noise above teacher noise"),
        ("no proxy term", "the proxy term helps"),
        ("flow matching", "distillation above flow matching"),
    ):
        compare(lever, f"calibrated no split, {name}", f"calibration lever: {what} (lever budget)")
    compare("calibrated no split", lever, "calibrated: the main budget above the lever budget")
    compare("calibrated no split", "untrained", "calibrated ThinkDiff-LVLM above an untrained aligner (chance)")
    more_shots("calibrated no split", "calibrated ThinkDiff-LVLM better at 4 shots than at 2")
    # The stretch (beat the text bridge) for the main recipes and the signal beyond it; the 0.8x
    # target for the main recipes.
    compare("calibrated no split, flow matching", "text bridge", "calibrated no split, flow matching above the text bridge")
    for name in ("calibrated no split", "calibrated lvlm regress"):
        compare(name, "text bridge", f"{name} above the text bridge")
        for shot in (2, 4):
            if name not in outcomes or not any(p["shot"] == shot for p in prompts):
                continue
            acc, bridge = shot_accuracy(name, shot), shot_accuracy("text bridge", shot)
            ratio = acc / bridge if bridge else float("nan")
            out.append({"claim": f"{name} >= 0.8 x text bridge, {shot}-shot (issue 17 target)", "accuracy_a": acc,
                        "accuracy_b": bridge, "ratio": ratio, "verdict": "met" if ratio >= 0.8 else "not met"})  # fmt: skip
    ceiling = float(np.mean(outcomes["vlm text answer"]))
    if "calibrated no split" in outcomes:
        cal = float(np.mean(outcomes["calibrated no split"]))
        out.append(
            {"claim": "calibrated ThinkDiff-LVLM within 80% of the VLM's text-answer ceiling", "accuracy_a": cal,
             "accuracy_b": ceiling, "ratio": cal / ceiling if ceiling else float("nan"),
             "verdict": "met" if ceiling and cal >= 0.8 * ceiling else "not met"}
        )  # fmt: skip
    lv = float(np.mean(outcomes["lvlm"]))
    out.append(
        {"claim": "ThinkDiff-LVLM within 80% of the VLM's text-answer ceiling", "accuracy_a": lv, "accuracy_b": ceiling,
         "ratio": lv / ceiling if ceiling else float("nan"), "verdict": "met" if ceiling and lv >= 0.8 * ceiling else "not met"}
    )  # fmt: skip
    return out


def calibration_cost(build_record: dict[str, Any]) -> dict[str, Any]:
    """Wall seconds of the calibration stage per step of the build, and its budgets."""
    config = build_record["config"]
    return {
        "seconds": build_record.get("calibration_seconds", {}),
        "steps": config.get("calib_steps"),
        "lever_steps": config.get("calib_lever_steps", config.get("calib_steps")),
        "batch": config.get("calib_batch"),
        "clip_steps": config.get("clip_calib_steps"),
        "clip_noise": config.get("clip_calib_noise", config.get("calib_noise")),
        "prompts": config.get("calib_prompts"),
        "proxy_weight": config.get("calib_proxy_weight"),
        "noise": config.get("calib_noise"),
    }


def _calibration_markdown(report: dict[str, Any]) -> list[str]:
    from thinkdiff.miniworld.build import CALIBRATION_RUNS

    cost = report.get("calibration_cost", {})
    if not cost.get("seconds"):
        return []
    tables = report["lvlm"]["tables"]
    shots = report["config"]["shots"]
    lines = [
        "",
        "## Calibration: the decoder in the loop (issue 17)",
        "",
        "Each calibrated aligner starts from a proxy-trained one and trains with batch "
        f"{cost['batch']} on {cost['prompts']} task-format prompts built from training cells only (2 and 4 "
        "shots, fresh renders; the VLM answers greedily, `extract-features --task-shots 2 4 --greedy`). "
        f"Default recipe: velocity distillation + {cost['proxy_weight']} x the no-split proxy loss, noisy "
        f"inputs '{cost['noise']}'" + (" (here: the target image's latents, noised)" if cost["noise"] == "auto" else "")
        + f", {cost['steps']} steps. Every lever tried is a row, trained for "
        f"{cost['lever_steps']} steps beside the default recipe at that budget ('lever budget'); "
        "mini-CoBSAT average, n per cell below:",
        "",
        "| aligner | data | start | loss | noise | steps | " + " | ".join(f"{k}-shot" for k in shots) + " | wall s |",
        "|---|---|---|---|---|---|" + "---|" * len(shots) + "---|",
    ]
    for proxy_only in ("lvlm", "no split", "input tokens"):
        if proxy_only in tables:
            accs = " | ".join(_pct(tables[proxy_only][str(k)]["average"]["accuracy"]) for k in shots)
            lines.append(f"| {proxy_only} (proxy only) | describe | - | proxy | - | 0 | {accs} | - |")
    for name, (start, lever, overrides) in CALIBRATION_RUNS.items():
        key = f"calibrated {name}"
        if key not in tables:
            continue
        loss = overrides.get("calibration_loss", "distill")
        weight = overrides.get("proxy_weight", cost["proxy_weight"])
        loss_text = loss + (f" + {weight} x proxy" if weight else "")
        accs = " | ".join(_pct(tables[key][str(k)]["average"]["accuracy"]) for k in shots)
        secs = cost["seconds"].get(f"calibrate {name}", "-")
        noise = overrides.get("noise_source", cost["noise"])
        noise = {"regress": "-", "flow": "target image"}.get(loss, "target image" if noise in ("auto", "source") else noise)
        steps = cost["lever_steps"] if lever else cost["steps"]
        lines.append(f"| {key} | task format | {start} | {loss_text} | {noise} | {steps} | {accs} | {secs} |")
    if "text bridge" in tables:
        accs = " | ".join(_pct(tables["text bridge"][str(k)]["average"]["accuracy"]) for k in shots)
        lines.append(f"| text bridge (reference) | - | - | - | - | - | {accs} | - |")
    rows = report["premise"]["rows"]
    from thinkdiff.miniworld.experiments import TRANSFER_CALIBRATED

    calibrated = rows.get(TRANSFER_CALIBRATED.format(source=TRANSFER_SOURCES[0]))
    if calibrated is not None:
        ceiling = rows[TRANSFER_CEILING]["all"]
        lines += [
            "",
            f"Premise test after calibration ({calibrated['calibration_steps']} steps, "
            f"{calibrated['calibration_seconds']} s): FLUX draws {_pct(calibrated['all'])} of the held-out captions "
            f"fully right from the calibrated aligner's features (ceiling {_pct(ceiling)}: ratio "
            f"{calibrated['all'] / ceiling:.2f}; target 0.9), and the proxy decoder still writes "
            f"{_pct(calibrated['proxy_exact'])} of them exactly.",
        ]
    if "clip_calibrated" in report:
        before, after = report["clip"], report["clip_calibrated"]
        lines += [
            "",
            f"ThinkDiff-CLIP after calibration ({cost['clip_steps']} steps, '{cost['clip_noise']}' noise; "
            f"n = {after['n']}): attribute "
            f"preservation (all four) {_pct(after['image']['all'])} (proxy only {_pct(before['image']['all'])}); "
            "per attribute " + " / ".join(_pct(after["image"][k]) for k in ATTRIBUTES) + "; image + text all three "
            f"{_pct(after['image_text']['all'])} (proxy only {_pct(before['image_text']['all'])}); composed "
            f"{_pct(after['composition']['composed'])} (proxy only {_pct(before['composition']['composed'])}).",
        ]
    secs = cost["seconds"]
    lines += [
        "",
        "Cost of the stage (wall seconds on this machine, two runs at a time): "
        + ", ".join(f"{k} {v}" for k, v in secs.items())
        + ".",
    ]
    return lines


# ----------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_losses(models_dir: Path, path: Path) -> None:
    from thinkdiff.miniworld.components.common import smooth

    plt = _plt()
    names = ["t5", "flux", "vlm", "vision"]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3))
    for ax, name in zip(axes, names):
        record = models_dir / name / "training.json"
        if record.is_file():
            losses = json.loads(record.read_text())["losses"]
            ax.plot(losses, alpha=0.3, lw=0.5)
            ax.plot(smooth(losses), lw=1.5)
            ax.set_yscale("log")
        ax.set_title(f"mini {name}")
        ax.set_xlabel("step")
    axes[0].set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_norm(curves: dict[str, list[list[float]]], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = {"t5": "RMSNorm, T5 init (ours)", "default": "RMSNorm, default init", "none": "no RMSNorm"}
    for key, points in curves.items():
        if points:
            ax.plot(*zip(*points), label=labels[key])
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("proxy T5 cross-entropy")
    ax.set_title("Aligner norm ablation (paper Fig. 7)")
    if any(curves.values()):
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_lvlm(lvlm: dict[str, Any], path: Path) -> None:
    plt = _plt()
    tables = lvlm["tables"]
    shots = sorted({int(s) for t in tables.values() for s in t})
    fig, axes = plt.subplots(1, len(shots), figsize=(7 * len(shots), 4), squeeze=False)
    names = list(tables)
    for ax, shot in zip(axes[0], shots):
        cols = [MINI_TASKS[t].name for t in TASK_COLUMN_ORDER] + ["average"]
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            vals = [tables[name][str(shot)][c]["accuracy"] for c in cols]
            ax.bar(np.arange(len(cols)) + i * width, vals, width, label=name)
        ax.set_xticks(np.arange(len(cols)) + 0.4 - width / 2)
        ax.set_xticklabels(cols, rotation=30)
        ax.set_ylim(0, 1)
        ax.set_title(f"mini-CoBSAT, {shot}-shot")
    axes[0][0].set_ylabel("judge accuracy")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_examples(examples: dict[str, Any], path: Path) -> None:
    plt = _plt()
    runs, images = examples["runs"], examples["images"]
    if not runs:
        return
    max_shot = max(r.prompt.shot for r in runs)
    cols = max_shot + len(images)
    fig, axes = plt.subplots(len(runs), cols, figsize=(1.3 * cols, 1.45 * len(runs)), squeeze=False)
    for row, run in enumerate(runs):
        context = run.prompt.context_images()
        for c in range(cols):
            ax = axes[row][c]
            ax.axis("off")
            if c < run.prompt.shot:
                ax.imshow(context[c])
                ax.set_title(run.prompt.x_items[c], fontsize=6)
            elif c >= max_shot:
                name = list(images)[c - max_shot]
                ax.imshow(images[name][row])
                ax.set_title(name if row == 0 else "", fontsize=6)
        axes[row][0].text(
            -40,
            16,
            f"{run.prompt.task.short_name}\n{run.prompt.x_items[-1]}?\n-> {run.prompt.target_caption}",
            fontsize=5,
            ha="right",
            va="center",
        )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_clip_examples(ex: dict[str, Any], path: Path) -> None:
    plt = _plt()
    rows = [("input A", ex["inputs_a"]), ("A -> image", ex["image"]), ("A + text", ex["image_text"]),
            ("input B", ex["inputs_b"]), ("A + B", ex["pairs"])]  # fmt: skip
    n = len(ex["inputs_a"])
    fig, axes = plt.subplots(len(rows), n, figsize=(1.2 * n, 1.3 * len(rows)), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(n):
            axes[r][c].imshow(images[c])
            axes[r][c].axis("off")
            if r == 2:
                axes[r][c].set_title(ex["texts"][c], fontsize=4)
        axes[r][0].text(-4, 16, label, fontsize=6, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------- markdown
def _pct(x: float) -> str:
    return f"{x:.3f}"


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown (every number read from ``report``)."""
    f = report["fidelity"]
    b = report["build"]
    lines = ["# ThinkDiff in the miniature world", ""]
    lines += [
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
        "## Fidelity of each component",
        "",
        "| component | measurement | value |",
        "|---|---|---|",
    ]
    j = f["judge"]
    for key in ("fresh_renders", "held_out_cells"):
        lines.append(
            f"| judge | {key.replace('_', ' ')} (n={j[key]['n']}): shape / colour / background / texture / all | "
            + " / ".join(_pct(j[key][k]) for k in ("shape", "color", "background", "texture", "all"))
            + " |"
        )
    t = f["t5_reconstruction"]
    lines.append(
        f"| mini T5 | exact caption reconstruction (n={t['n']}): full / full, held-out cells / theme captions | "
        f"{_pct(t['full_captions'])} / {_pct(t['full_captions_held_out_cells'])} / {_pct(t['theme_captions'])} |"
    )
    for theme in THEMES:
        d = f["decoder"][theme]
        lines.append(
            f"| mini FLUX | {theme} from the ground-truth caption, all 100 cells x 2 seeds / held-out cells | "
            f"{_pct(d['all_cells']['accuracy'])} / {_pct(d['held_out_cells']['accuracy'])} |"
        )
    fc = f["decoder"]["full_caption"]
    lines.append(
        "| mini FLUX | full caption: shape / colour / background / texture / all | "
        + " / ".join(_pct(fc[k]) for k in ("shape", "color", "background", "texture", "all"))
        + " |"
    )
    vd = f["vlm_describe"]
    lines.append(
        f"| mini VLM | describe one image (n={vd['n']}, half held-out cells): shape / colour / background / texture / all | "
        + " / ".join(_pct(vd[k]) for k in ("shape", "color", "background", "texture", "all"))
        + " |"
    )
    for shot, row in f["vlm_cobsat_text"].items():
        lines.append(
            f"| mini VLM | mini-CoBSAT text answers, {shot}-shot average (the reasoning ceiling) | {_pct(row['average']['accuracy'])} |"
        )
    vp = f["vision_probe"]
    lines.append(
        "| mini EVA ViT | linear probe on pooled tokens: shape / colour / background / texture | "
        + " / ".join(_pct(vp[k]) for k in ("shape", "color", "background", "texture"))
        + " |"
    )
    lines += _premise_markdown(report["premise"])
    lines += ["", "## ThinkDiff-LVLM on mini-CoBSAT", ""]
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
            cells = [_pct(row[c]["accuracy"]) for c in cols[:-2]]
            cells.append(f"**{_pct(avg['accuracy'])}** [{avg['ci95'][0]:.2f}, {avg['ci95'][1]:.2f}]")
            cells.append(f"{_pct(row['held-out targets']['accuracy'])} (n={row['held-out targets']['n']})")
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
        reads = "-" if d["proxy_reads_answer"] != d["proxy_reads_answer"] else _pct(d["proxy_reads_answer"])
        lines.append(f"| {name} | {reads} | {d['cosine_to_t5_states']:.3f} | {d['rms']:.3f} |")
    lines += _calibration_markdown(report)
    if "qcd" in report:
        from thinkdiff.miniworld.qcd import qcd_markdown

        lines += qcd_markdown(report["qcd"])
    lines += [
        "",
        "## The paper's claims, tested",
        "",
    ]
    lines += ["| claim | accuracies | paired test | verdict |", "|---|---|---|---|"]
    for c in report["claims"]:
        acc = f"{_pct(c['accuracy_a'])} vs {_pct(c['accuracy_b'])}"
        test = (
            f"{c['a_only']} vs {c['b_only']} discordant, p={c['p_value']:.2g}"
            if "p_value" in c
            else (f"ratio {c['ratio']:.2f}" if "ratio" in c else "-")
        )
        lines.append(f"| {c['claim']} | {acc} | {test} | {c['verdict']} |")
    cl = report["clip"]
    lines += ["", "## ThinkDiff-CLIP", "", f"n = {cl['n']} input renders (half from held-out cells).", ""]
    lines.append("| image in -> image out | " + " | ".join([*ATTRIBUTES, "all"]) + " |")
    lines.append("|---|" + "---|" * (len(ATTRIBUTES) + 1))
    lines.append(
        "| attribute preserved | " + " | ".join(_pct(cl["image"][k]) for k in [*ATTRIBUTES, "all"]) + " |"
    )
    it = cl["image_text"]
    lines += [
        "",
        f'Image + text ("on a {{new colour}} background"): background from the text {_pct(it["background_from_text"])}, '
        f"shape kept {_pct(it['shape_kept'])}, colour kept {_pct(it['color_kept'])}, all three {_pct(it['all'])}.",
        "",
        "| two images in | " + " | ".join(ATTRIBUTES) + " |",
        "|---|" + "---|" * len(ATTRIBUTES),
        "| from A | " + " | ".join(_pct(cl["composition"][k]["from_a"]) for k in ATTRIBUTES) + " |",
        "| from B | " + " | ".join(_pct(cl["composition"][k]["from_b"]) for k in ATTRIBUTES) + " |",
        "",
        f"Composed (every attribute from A or B, at least one from each): {_pct(cl['composition']['composed'])}.",
        "",
        "## Norm ablation (paper Figure 7)",
        "",
    ]
    for key, points in report["norm_ablation"].items():
        if points:
            last = np.mean([p[1] for p in points[-5:]])
            lines.append(
                f"- {key}: first logged loss {points[0][1]:.3f}, final (mean of last 5 logs) {last:.3f}"
            )
    lines += [
        "",
        "![norm ablation](norm_ablation.png)",
        "",
        "![mini-CoBSAT accuracy](lvlm_accuracy.png)",
        "",
        "![examples](examples_lvlm.png)",
        "",
        "![ThinkDiff-CLIP examples](examples_clip.png)",
        "",
        "![component losses](component_losses.png)",
        "",
    ]
    return "\n".join(lines)


def _premise_markdown(premise: dict[str, Any]) -> list[str]:
    rows = premise["rows"]
    lines = [
        "",
        "## The premise, tested: does the proxy T5 decoder stand in for FLUX?",
        "",
        "ThinkDiff trains its aligner against the T5 *decoder* and then feeds FLUX, on the premise that "
        "what the decoder reads as a caption FLUX draws as that caption. No VLM here: an aligner learns "
        "the proxy loss from perfect features of a caption, then FLUX draws held-out captions from its "
        f"output ({premise['steps']} steps of batch {premise['batch_size']}; n={premise['n']} test "
        "captions, half from held-out cells). *Linear R²*: how much of the T5 states a linear map "
        "recovers from the aligned tokens; the rows *then a linear map* apply that map, fitted with the "
        "T5 encoder, which ThinkDiff-LVLM never uses.",
        "",
        "| features | proxy decoder writes the caption | cosine to T5 states | linear R² | FLUX image, judged: "
        "shape / colour / background / texture / all |",
        "|---|---|---|---|---|",
    ]
    for name, d in rows.items():
        exact = "-" if d["proxy_exact"] is None else _pct(d["proxy_exact"])
        r2 = f"{d['linear_r2']:.3f}" if "linear_r2" in d else "-"
        judged = " / ".join(_pct(d[k]) for k in ("shape", "color", "background", "texture", "all"))
        source = name if name == TRANSFER_CEILING else f"aligner learnt from {name}"
        lines.append(f"| {source} | {exact} | {d['cosine']:.3f} | {r2} | {judged} |")
    ceiling = rows[TRANSFER_CEILING]["all"]
    oracle = rows[TRANSFER_SOURCES[0]]
    mapped = rows[TRANSFER_MAPPED.format(source=TRANSFER_SOURCES[0])]
    holds = oracle["all"] >= 0.8 * ceiling
    lines += [
        "",
        f"Verdict: the premise {'holds' if holds else 'fails'} in this world. FLUX draws "
        f"{_pct(oracle['all'])} of the captions fully right from the aligned T5 states, against "
        f"{_pct(ceiling)} from the states themselves, although the proxy decoder reads "
        f"{_pct(oracle['proxy_exact'])} of them exactly and a linear map recovers the states with "
        f"R² {oracle['linear_r2']:.3f} (after it, FLUX gets {_pct(mapped['all'])}).",
    ]
    if not holds:
        lines += [
            "",
            "The proxy loss pins the content of the aligned features but not their basis: the "
            "decoder's choices have wide margins, so a whole family of linear changes of basis decodes "
            "the same text, and FLUX, trained on the exact states, reads each of them differently. "
            "Every ThinkDiff-LVLM and ThinkDiff-CLIP number below is bounded by this.",
        ]
    return lines


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.floating | np.integer):
        return x.item()
    return x
