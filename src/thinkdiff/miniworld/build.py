"""``thinkdiff miniworld build``: train every component of the miniature world from scratch.

One seed decides everything (scenes, initialisations, data order). The steps, in order:

1. render a pool of training scenes (none from a held-out cell);
2. the judge (CNN for shape and texture; colours are read by pixel statistics);
3. the mini T5 (caption autoencoder + continuation);
4. the mini FLUX.1 (flow matching on the pool, conditioned on the frozen T5 encoder);
5. the mini Qwen2-VL (describe + mini-CoBSAT answers);
6. the mini EVA ViT (contrastive against captions);
7. ThinkDiff-LVLM: the VLM describes fresh images through the project's ``extract_features``, and
   the project's trainer fits the aligner against the frozen T5 decoder;
8. ThinkDiff-CLIP: the project's trainer fits the aligner on an image-caption folder.

Models go to ``OUT_DIR/{judge,t5,flux,vlm,vision,thinkdiff/lvlm,thinkdiff/clip}`` (safetensors,
configs, tokenizers: what ``make demo`` needs); intermediate data (feature shards, renders,
training runs) to ``OUT_DIR/work``, which a ``.gitignore`` keeps out of version control.
``build.json`` records the configuration, each step's wall time and the judge's accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from thinkdiff.miniworld.budgets import BuildConfig, full_config, quick_config
from thinkdiff.utils import atomic_write_text

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor

__all__ = [
    "CALIBRATION_RUNS",
    "CLIP_EMPTY_FIRST",
    "CLIP_LEVER",
    "DEMO_CALIBRATED",
    "BuildConfig",
    "CalibrationRun",
    "build",
    "build_calibration",
    "build_clip_lever",
    "calibrated_dir",
    "clip_lever_dir",
    "full_config",
    "quick_config",
    "rebuild_clip",
    "train_clip_lever",
]

logger = logging.getLogger(__name__)


def _write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _text_to_image(out_dir: Path, config: BuildConfig, pool: Any, progress: bool) -> dict[str, float]:
    """Branch 1: the mini T5, then the mini FLUX conditioned on it."""
    from thinkdiff.miniworld.components.flux import train_flux
    from thinkdiff.miniworld.components.t5 import train_t5

    seconds: dict[str, float] = {}
    with _Timer("t5", seconds):
        train_t5(out_dir / "t5", seed=config.seed, steps=config.t5_steps, progress=progress)
    with _Timer("flux", seconds):
        train_flux(
            out_dir / "flux", out_dir / "t5", pool, seed=config.seed, steps=config.flux_steps,
            batch_size=config.flux_batch, progress=progress,
        )  # fmt: skip
    return seconds


def _readers(out_dir: Path, config: BuildConfig, pool: Any, progress: bool) -> tuple[dict[str, float], dict]:
    """Branch 2: everything that reads images: the judge, the mini VLM, the mini EVA ViT."""
    from thinkdiff.miniworld.components.vision import train_vision
    from thinkdiff.miniworld.components.vlm import train_vlm
    from thinkdiff.miniworld.judge import held_out_scenes, judge_accuracy, train_judge
    from thinkdiff.miniworld.world import sample_scene, scene_rng

    seconds: dict[str, float] = {}
    results: dict[str, Any] = {}
    with _Timer("judge", seconds):
        judge, _ = train_judge(
            seed=config.seed, num_train=config.judge_train, steps=config.judge_steps, progress=progress
        )
        judge.save(out_dir / "judge")
        rng = scene_rng("judge-test", config.seed)
        fresh = [sample_scene(rng, allow_held_out=True) for _ in range(config.judge_test)]
        results["judge_fresh_renders"] = judge_accuracy(judge, fresh)
        results["judge_held_out_cells"] = judge_accuracy(
            judge, held_out_scenes(config.judge_test, config.seed + 1)
        )
    with _Timer("vlm", seconds):
        train_vlm(
            out_dir / "vlm", pool.subset(config.vlm_pool), seed=config.seed, steps=config.vlm_steps,
            vision_steps=config.vlm_vision_steps, batch_size=config.vlm_batch, progress=progress,
        )  # fmt: skip
    with _Timer("vision", seconds):
        train_vision(
            out_dir / "vision", pool, seed=config.seed, steps=config.vision_steps,
            batch_size=config.vision_batch, progress=progress,
        )  # fmt: skip
    return seconds, results


def _run_branch(fn: Any, threads: int, *args: Any) -> Any:
    """A branch in a forked process with its own share of the cores."""
    torch.set_num_threads(threads)
    return fn(*args)


def build(out_dir: Path, config: BuildConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train every component into ``out_dir`` (see the module docstring); returns ``build.json``.

    The two independent branches (T5 -> FLUX, and judge -> VLM -> vision encoder) run in two
    processes of ``threads // 2`` threads each when ``config.threads >= 2``: these models are too
    small for two threads to speed up one of them, so two processes finish sooner. Each branch
    seeds itself, so the result does not depend on how the branches are scheduled.
    """
    from thinkdiff.miniworld.experiments import train_clip_aligner, train_lvlm_aligner, write_lvlm_features
    from thinkdiff.miniworld.pool import render_pool

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / ".gitignore").write_text("work/\n")
    work = out_dir / "work"
    record: dict[str, Any] = {"config": dataclasses.asdict(config), "seconds": {}, "results": {}}
    started = time.perf_counter()

    with _Timer("render_pool", record["seconds"]):
        pool = render_pool(config.pool_size, config.seed, progress=progress)
    with _Timer("components", record["seconds"]):
        if config.threads >= 2:
            # The children inherit the rendered pool instead of re-rendering it.
            with two_processes() as ex:
                half = config.threads // 2
                a = ex.submit(_run_branch, _text_to_image, half, out_dir, config, pool, progress)
                b = ex.submit(_run_branch, _readers, config.threads - half, out_dir, config, pool, progress)
                seconds_a, (seconds_b, results) = a.result(), b.result()
        else:
            torch.set_num_threads(config.threads)
            seconds_a = _text_to_image(out_dir, config, pool, progress)
            seconds_b, results = _readers(out_dir, config, pool, progress)
    record["seconds"].update(seconds_a | seconds_b)
    record["results"].update(results)
    del pool
    torch.set_num_threads(config.threads)
    with _Timer("lvlm_features", record["seconds"]):
        write_lvlm_features(out_dir, work, config, progress=progress)
    with _Timer("lvlm_aligner", record["seconds"]):
        train_lvlm_aligner(
            out_dir, work, config, name="lvlm", target=out_dir / "thinkdiff" / "lvlm", progress=progress
        )
    with _Timer("clip_aligner", record["seconds"]):
        train_clip_aligner(out_dir, work, config, target=out_dir / "thinkdiff" / "clip", progress=progress)
    with _Timer("clip_lever_aligner", record["seconds"]):
        train_clip_lever(out_dir, config, progress=progress)
    record["seconds"]["total"] = round(time.perf_counter() - started, 1)
    _write_json(out_dir / "build.json", record)
    logger.info("built the miniature world in %.0f s into %s", record["seconds"]["total"], out_dir)
    return build_calibration(out_dir, config, progress=progress)


class CalibrationRun(NamedTuple):
    """One calibrated ThinkDiff-LVLM aligner of the build."""

    start: str
    """The proxy aligner it starts from ('no split', 'lvlm', 'input tokens')."""
    lever: bool
    """Trained for ``calib_lever_steps`` (a lever, one change from the default) or ``calib_steps``."""
    overrides: dict[str, Any]
    """Changes to the calibration config (:func:`~thinkdiff.miniworld.experiments.calibration_config`)."""


CALIBRATION_RUNS: dict[str, CalibrationRun] = {
    "no split": CalibrationRun("no split", False, {}),
    "lvlm regress": CalibrationRun(
        "no split", False, {"calibration_loss": "regress", "token_alignment": "one-to-one", "proxy_weight": 0.0}
    ),
    "no split, lever budget": CalibrationRun("no split", True, {}),
    "lvlm": CalibrationRun("lvlm", True, {}),
    "input tokens": CalibrationRun("input tokens", True, {"features": "prompt"}),
    "no split, flow matching": CalibrationRun("no split", True, {"calibration_loss": "flow"}),
    "no split, pure noise": CalibrationRun("no split", True, {"noise_source": "pure"}),
    "no split, teacher noise": CalibrationRun("no split", True, {"noise_source": "teacher"}),
    "no split, no proxy term": CalibrationRun("no split", True, {"proxy_weight": 0.0}),
}
"""The calibrated ThinkDiff-LVLM aligners. Each lands in ``thinkdiff/<name>-calibrated`` (spaces as
dashes); the levers compare with ``no split, lever budget``, the default recipe at their budget."""


CLIP_LEVER = "clip, empty first"
"""The ThinkDiff-CLIP split lever: proxy aligner ``thinkdiff/clip-empty-first`` and its calibrated
version, each at the default's budget with :data:`CLIP_EMPTY_FIRST` of the captions cut before
their first word, so that every attribute is asked of the image tokens."""

CLIP_EMPTY_FIRST = 0.5
"""``clip_empty_first`` of the split lever's training and calibration."""


DEMO_CALIBRATED = "no split"
"""The calibrated aligner ``make demo`` draws with (the distillation recipe from the no-split start)."""


def calibrated_dir(out_dir: Path, name: str) -> Path:
    """Model folder of a calibrated aligner (``thinkdiff/lvlm-calibrated``, ...)."""
    return Path(out_dir) / "thinkdiff" / f"{name.replace(', ', '-').replace(' ', '-')}-calibrated"


def _calibrate_one(
    out_dir: Path, config: BuildConfig, name: str, threads: int, progress: bool = True
) -> tuple[str, float]:
    from thinkdiff.miniworld.experiments import calibration_config, run_training, train_clip_calibrated

    torch.set_num_threads(threads)
    work = out_dir / "work"
    started = time.perf_counter()
    if name == "clip":
        train_clip_calibrated(
            out_dir, work, config, init=out_dir / "thinkdiff" / "clip", target=calibrated_dir(out_dir, "clip"),
            progress=progress,
        )  # fmt: skip
    elif name == CLIP_LEVER:
        train_clip_calibrated(
            out_dir, work, config, name=clip_lever_dir(out_dir).name, init=clip_lever_dir(out_dir),
            target=calibrated_dir(out_dir, CLIP_LEVER), clip_empty_first=CLIP_EMPTY_FIRST, progress=progress,
        )  # fmt: skip
    else:
        start, lever, overrides = CALIBRATION_RUNS[name]
        overrides = {**overrides, "max_steps": config.calib_lever_steps if lever else config.calib_steps}
        # Flow matching and 'source' noise read the target images: the task source's last images.
        overrides["target_images"] = str(work / "task-source")
        init = out_dir / "thinkdiff" / "lvlm" if start == "lvlm" else work / "runs" / start.replace(" ", "-") / "model"
        run_training(
            calibration_config(out_dir, work, config, name, init, **overrides),
            calibrated_dir(out_dir, name),
            progress=progress,
        )
    return name, round(time.perf_counter() - started, 1)


def build_calibration(out_dir: Path, config: BuildConfig | None = None, *, progress: bool = True) -> dict[str, Any]:
    """The calibration steps (the decoder in the loop) on top of a built world, e.g. the committed weights: the
    describe features and the no-split / input-token proxy aligners they start from, task-format
    features from training cells, then every run of :data:`CALIBRATION_RUNS` and the calibrated
    ThinkDiff-CLIP aligner (two at a time in forked processes when ``threads >= 2``). The other
    components are not touched. Updates ``build.json`` (``calibration`` config and seconds)."""
    from thinkdiff.miniworld.experiments import train_lvlm_aligner, write_lvlm_features, write_task_features

    out_dir = Path(out_dir)
    record = json.loads((out_dir / "build.json").read_text())
    if config is None:
        config = BuildConfig(**record["config"])
    record["config"] = dataclasses.asdict(config)
    work = out_dir / "work"
    seconds: dict[str, float] = {}
    # One thread per process: these models are too small for two to help, and on a busy machine
    # an OpenMP thread waiting for a descheduled sibling made the steps ~10x slower.
    torch.set_num_threads(1)
    started = time.perf_counter()
    with _Timer("describe_features", seconds):
        # Deterministic from the seed: a complete folder from this world's build is reused.
        if not all((work / "features" / split / "index.json").is_file() for split in ("train", "val")):
            write_lvlm_features(out_dir, work, config, progress=progress)
    with _Timer("proxy_starts", seconds):
        train_lvlm_aligner(out_dir, work, config, name="no-split", split=False, progress=progress)
        train_lvlm_aligner(out_dir, work, config, name="input-tokens", features="prompt", progress=progress)
    with _Timer("task_features", seconds):
        write_task_features(out_dir, work, config, progress=progress)
    # Longest first, so that the two processes finish together.
    names = [*list(CALIBRATION_RUNS)[:2], "clip", CLIP_LEVER, *list(CALIBRATION_RUNS)[2:]]
    if config.threads >= 2:
        with two_processes() as ex:
            half = max(1, config.threads // 2)
            done = list(ex.map(_calibrate_one, *zip(*[(out_dir, config, n, half, progress) for n in names])))
    else:
        done = [_calibrate_one(out_dir, config, n, config.threads, progress) for n in names]
    seconds.update({f"calibrate {n}": s for n, s in done})
    seconds["wall"] = round(time.perf_counter() - started, 1)
    record["calibration_seconds"] = seconds
    _write_json(out_dir / "build.json", record)
    return record


def rebuild_clip(out_dir: Path, config: BuildConfig | None = None, *, progress: bool = True) -> dict[str, Any]:
    """Retrain, in a built world, the vision tower and everything that reads it, exactly as
    :func:`build` and :func:`build_calibration` do (same pool, seeds and budgets): the mini EVA
    ViT, the ThinkDiff-CLIP aligner and its calibrated version. The other components are not
    touched. Updates ``build.json`` (``vision``, ``clip_aligner`` and ``calibrate clip`` seconds)."""
    from thinkdiff.miniworld.components.vision import train_vision
    from thinkdiff.miniworld.experiments import train_clip_aligner
    from thinkdiff.miniworld.pool import render_pool

    out_dir = Path(out_dir)
    record = json.loads((out_dir / "build.json").read_text())
    if config is None:
        config = BuildConfig(**record["config"])
    record["config"] = dataclasses.asdict(config)
    torch.set_num_threads(1)  # as each branch of the build runs
    seconds = record["seconds"]
    pool = render_pool(config.pool_size, config.seed, progress=progress)
    with _Timer("vision", seconds):
        train_vision(
            out_dir / "vision", pool, seed=config.seed, steps=config.vision_steps,
            batch_size=config.vision_batch, progress=progress,
        )  # fmt: skip
    del pool
    with _Timer("clip_aligner", seconds):
        train_clip_aligner(
            out_dir, out_dir / "work", config, target=out_dir / "thinkdiff" / "clip", progress=progress
        )
    calibration = record.setdefault("calibration_seconds", {})
    _, calibration["calibrate clip"] = _calibrate_one(out_dir, config, "clip", 1, progress)
    _write_json(out_dir / "build.json", record)
    return build_clip_lever(out_dir, config, progress=progress)


def clip_lever_dir(out_dir: Path) -> Path:
    """Model folder of the split lever's proxy aligner (:data:`CLIP_LEVER`)."""
    return Path(out_dir) / "thinkdiff" / "clip-empty-first"


def train_clip_lever(out_dir: Path, config: BuildConfig, *, progress: bool = True) -> Path:
    """The split lever's proxy aligner: :func:`~thinkdiff.miniworld.experiments.train_clip_aligner`
    with :data:`CLIP_EMPTY_FIRST`, on the same data, seed and budget as the default."""
    from thinkdiff.miniworld.experiments import train_clip_aligner

    return train_clip_aligner(
        out_dir, Path(out_dir) / "work", config, name="clip-empty-first", target=clip_lever_dir(out_dir),
        clip_empty_first=CLIP_EMPTY_FIRST, progress=progress,
    )  # fmt: skip


def build_clip_lever(out_dir: Path, config: BuildConfig | None = None, *, progress: bool = True) -> dict[str, Any]:
    """Train, in a built world, the split lever (:data:`CLIP_LEVER`) exactly as :func:`build` and
    :func:`build_calibration` do: its proxy aligner and its calibrated version. Nothing else is
    touched. Updates ``build.json`` (``clip_lever_aligner`` and ``calibrate clip, empty first``
    seconds)."""
    out_dir = Path(out_dir)
    record = json.loads((out_dir / "build.json").read_text())
    if config is None:
        config = BuildConfig(**record["config"])
    torch.set_num_threads(1)  # as the build's last stages run
    with _Timer("clip_lever_aligner", record["seconds"]):
        train_clip_lever(out_dir, config, progress=progress)
    name, seconds = _calibrate_one(out_dir, config, CLIP_LEVER, 1, progress)
    record.setdefault("calibration_seconds", {})[f"calibrate {name}"] = seconds
    _write_json(out_dir / "build.json", record)
    return record


def two_processes() -> ProcessPoolExecutor:
    """Two forked worker processes: the children inherit what the parent holds (a rendered pool, a
    loaded world). Fork only before any torch op has run in the parent, so that no thread pool is
    forked mid-state."""
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(
        max_workers=2,
        mp_context=mp.get_context("fork"),
        initializer=_exit_with_parent,
        initargs=(os.getpid(),),
    )


def _exit_with_parent(parent: int) -> None:
    """A worker's first act: have Linux kill it when its parent dies. A killed build or report would
    otherwise leave its two workers waiting for work forever (the finished sections are saved by the
    parent; what a worker was measuring is lost either way)."""
    import ctypes
    import os
    import signal
    import sys

    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request was in place
        os._exit(1)


class _Timer:
    """Records the wall time of one build step."""

    def __init__(self, name: str, into: dict[str, float]) -> None:
        self.name, self.into = name, into

    def __enter__(self) -> _Timer:
        logger.info("miniworld build: %s", self.name)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.into[self.name] = round(time.perf_counter() - self.start, 1)
