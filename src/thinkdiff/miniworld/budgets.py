"""The budgets of a miniature-world build: one seed, and how long each component trains.

:func:`full_config` is the committed world's; :func:`quick_config` a reduced world in which every
step runs for a few dozen iterations (the test suite's). The build
(:mod:`~thinkdiff.miniworld.build`) and the experiments it runs
(:mod:`~thinkdiff.miniworld.experiments`) both read these budgets, so they live below both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

__all__ = ["BuildConfig", "full_config", "quick_config"]


@dataclass
class BuildConfig:
    """Budgets of one build (see :func:`full_config` and :func:`quick_config`)."""

    seed: int = 0
    threads: int = 2
    """torch CPU threads (the machine's cores)."""
    pool_size: int = 24_000
    """Rendered training scenes, shared by the decoder, the VLM and the vision encoder."""
    judge_train: int = 20_000
    judge_steps: int = 600
    judge_test: int = 3000
    t5_steps: int = 1500
    flux_steps: int = 2400
    flux_batch: int = 64
    vlm_vision_steps: int = 800
    """Stage 1 of the VLM: its vision tower learns the attributes (see ``pretrain_vision_tower``)."""
    vlm_steps: int = 1600
    vlm_batch: int = 32
    vlm_pool: int = 24_000
    """Pool images the VLM trains on (the first ``vlm_pool`` of the pool)."""
    vision_steps: int = 12000
    """Steps of the mini EVA ViT (its position embedding started at the sine-cosine table of
    :func:`~thinkdiff.miniworld.components.vision.build_vision`). Its probe's shape reading grows
    with steps: 0.533 at 3000, 0.827 at 6000, 0.928 at 9000 and 0.933 at 12000 steps of 64, with
    texture 0.85 -> 0.96 (one run, probed on the way). From a random start, 6000 steps read shape
    0.532, and more batch did not help (3000 x 128: 0.330; 12000 x 32: 0.343)."""
    vision_batch: int = 64
    lvlm_train: int = 3000
    """Images the VLM describes for ThinkDiff-LVLM's training features."""
    lvlm_val: int = 200
    aligner_steps: int = 800
    aligner_batch: int = 64
    aligner_lr: float = 1e-3
    clip_train: int = 3000
    clip_steps: int = 2000
    """Steps of each ThinkDiff-CLIP proxy aligner (the default and the split lever, equal budget).
    At 500, the proxy T5 read the input's colour from the split lever's aligned tokens alone in
    0.165 of images, at 2000 in 0.745."""
    clip_batch: int = 32
    calib_prompts: int = 2000
    """Task-format prompts (training cells only) the VLM answers greedily for calibration."""
    calib_steps: int = 2000
    """Steps of the main calibrated aligners (the default recipe and the regression)."""
    calib_lever_steps: int = 200
    """Steps of each lever run: one change from the default recipe, beside the default at this budget."""
    calib_batch: int = 32
    calib_lr: float = 1e-3
    calib_proxy_weight: float = 0.1
    """Weight of the no-split proxy loss added to velocity distillation."""
    calib_noise: str = "auto"
    """Noisy inputs of the calibration ('auto', 'pure', 'teacher', 'source'). Every run here has the
    task source's target images, so 'auto' is 'source': the noised target image's latents."""
    clip_calib_steps: int = 200
    """Steps of each ThinkDiff-CLIP calibration. 1000 steps of the split lever kept the input's colour
    in 0.345 of images against 0.175 at 200, and all four attributes in 0.010 against 0.000, at
    about 8x the seconds (docs/miniworld.md)."""
    clip_calib_noise: str = "pure"
    """Noisy inputs of the ThinkDiff-CLIP calibration. At 1000 steps 'pure' kept colour / background
    in 0.345 / 0.895 of images, 'teacher' 0.085 / 0.835 and 'source' (the input's own latents,
    which show the student the answer) 0.100 / 0.515."""
    note: str = field(default="full", metadata={"help": "preset name"})

    def __post_init__(self) -> None:
        bad = {
            k: v for k, v in dataclasses.asdict(self).items() if isinstance(v, int) and v < 1 and k != "seed"
        }
        if bad:
            raise ValueError(f"build budgets must be >= 1, got {bad}")
        if self.vlm_pool > self.pool_size:
            raise ValueError(f"vlm_pool={self.vlm_pool} exceeds pool_size={self.pool_size}")


def full_config(seed: int = 0) -> BuildConfig:
    """The committed world (its ``build.json`` records each step's seconds: its last full build took
    1352 s for the components and aligners and 588 s for the calibration, 1940 s in all, on an idle
    2-core CPU, with a 6000-step vision encoder; the encoder now trains 12000 steps)."""
    return BuildConfig(seed=seed)


def quick_config(seed: int = 0) -> BuildConfig:
    """A reduced world for tests: every step runs, for a few dozen steps each (22 s on an idle 2-core
    CPU)."""
    return BuildConfig(
        seed=seed,
        pool_size=600,
        judge_train=600,
        judge_steps=10,
        judge_test=100,
        t5_steps=40,
        flux_steps=30,
        flux_batch=16,
        vlm_vision_steps=10,
        vlm_steps=30,
        vlm_batch=8,
        vlm_pool=200,
        vision_steps=20,
        vision_batch=16,
        lvlm_train=48,
        lvlm_val=16,
        aligner_steps=20,
        aligner_batch=8,
        clip_train=48,
        clip_steps=10,
        clip_batch=8,
        calib_prompts=24,
        calib_steps=10,
        calib_lever_steps=5,
        calib_batch=8,
        clip_calib_steps=5,
        note="quick",
    )
