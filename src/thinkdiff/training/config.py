"""Training configuration: one typed dataclass, named presets, validation before any work starts.

A run is described by a preset (the paper's two runs, or tiny debug runs on the offline kit),
optionally a JSON file, then command-line overrides, in that order. The resolved config is saved
in the run folder as ``config.json``: a record of the run, not a second source of defaults.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Variant = Literal["lvlm", "clip"]


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class TrainConfig:
    """Everything a ThinkDiff training run needs; see each field's help."""

    variant: Variant = _help(
        "'lvlm' (features of the LVLM's generated tokens) or 'clip' (EVA vision tokens)", default="lvlm"
    )
    data: list[str] = _help(
        "training data: feature-shard folders (lvlm) or image-caption sources (clip)", default_factory=list
    )
    val_data: list[str] = _help(
        "held-out data of the same kind (validation loss and decoded samples)", default_factory=list
    )
    output_dir: str = _help("run folder: checkpoints, logs, the exported model", default="runs/thinkdiff")

    lvlm: str = _help(
        "the LVLM that made the features (its tokenizer decodes the targets)",
        default="Qwen/Qwen2-VL-7B-Instruct",
    )
    vision_model: str = _help(
        "BLIP-2 checkpoint or vision-tower folder (clip)", default="Salesforce/blip2-flan-t5-xxl"
    )
    proxy_t5: str = _help(
        "T5 encoder-decoder whose decoder is the frozen proxy", default="google/flan-t5-xxl"
    )
    diffusion_decoder: str = _help(
        "the decoder the aligner is meant for (recorded in thinkdiff.json)",
        default="black-forest-labs/FLUX.1-dev",
    )

    aligner_norm: str = _help(
        "aligner norm: 't5' (copied from the proxy encoder), 'default' (ones), 'none'", default="t5"
    )
    aligner_hidden_dim: int | None = _help("aligner hidden width; default = T5 d_model", default=None)
    split: bool = _help("random masked training (False = the paper's no-split ablation)", default=True)
    features: str = _help(
        "'generated' token features, or 'prompt' (the input-token ablation)", default="generated"
    )
    max_split: int = _help("largest random cut of the generated tokens", default=128)
    clip_empty_first: float = _help(
        "clip: fraction of captions cut before their first word, so that the whole caption is asked "
        "of the image tokens (0: every cut leaves at least one word to the text side, as released)",
        default=0.0,
    )
    max_target_tokens: int = _help(
        "T5 target length cap (lvlm: 128; clip uses 32 per caption part)", default=128
    )
    proxy_dropout: bool = _help("keep T5 dropout 0.1 active as the released code did", default=False)

    global_batch_size: int = _help("samples per optimiser step over all processes", default=96)
    micro_batch_size: int | None = _help(
        "samples per process per forward; default = global / processes", default=None
    )
    max_steps: int = _help("optimiser steps", default=25_000)
    lr: float = _help("peak learning rate", default=1e-4)
    warmup_start_lr: float = _help("learning rate at step 0", default=1e-6)
    warmup_steps: int = _help("linear warm-up steps", default=2000)
    min_lr: float = _help("final learning rate of the cosine decay", default=8e-5)
    weight_decay: float = _help("AdamW weight decay on >= 2-D parameters only", default=0.05)
    beta1: float = _help("AdamW beta1", default=0.9)
    beta2: float = _help("AdamW beta2", default=0.999)
    grad_clip: float | None = _help(
        "clip the gradient norm to this value (None: no clipping, as released)", default=None
    )
    mixed_precision: str = _help("'auto' (bf16 on GPU, fp32 on CPU), 'bf16' or 'no'", default="auto")
    activation_checkpointing: bool = _help(
        "recompute the frozen decoder's activations in backward", default=False
    )

    objective: str = _help(
        "'proxy' (the paper's: the frozen T5 decoder reads the aligned features back) or 'calibrate' "
        "(decoder in the loop: the frozen diffusion decoder on the aligned features must act as on "
        "its own text states; start from init_aligner; see docs/calibration.md)",
        default="proxy",
    )
    init_aligner: str | None = _help(
        "a trained aligner model folder (thinkdiff train's model/) to start from", default=None
    )
    calibrate_from_scratch: bool = _help(
        "calibrate: start from random aligner weights instead of init_aligner (recorded in the model's "
        "thinkdiff.json); without it a calibration run needs init_aligner",
        default=False,
    )
    calibration_loss: str = _help(
        "calibrate: 'distill' (MSE between the decoder's velocities on aligned features and on its "
        "own T5 states of the answer; any tokenizers) or 'regress' (per-position MSE onto those T5 "
        "states where the tokens align; lvlm only) or 'flow' (distillation on the target image's noised "
        "latents towards the mean of the teacher and the image's flow-matching target; lvlm on "
        "task-format data, needs target_images)",
        default="distill",
    )
    target_images: str | None = _help(
        "'flow' and lvlm 'source' noise: the task-format source folder holding each sample's target "
        "image ({target_key}.png)",
        default=None,
    )
    proxy_weight: float = _help(
        "calibrate: weight of the no-split proxy cross-entropy added to the loss (0: none)", default=0.1
    )
    token_alignment: str = _help(
        "regress: 'offsets' (through character offsets, any two tokenizers) or 'one-to-one'",
        default="offsets",
    )
    noise_source: str = _help(
        "calibrate: noisy inputs from 'pure' noise at sigma >= noise_min_sigma, the 'teacher''s own "
        "partial samples, or the 'source' image's latents (clip: the caption's image; lvlm: the "
        "task-format target image, needs target_images); 'auto': 'source' where the images are at "
        "hand (clip, or lvlm with target_images), else 'teacher' (same accuracy in the mini world; "
        "'source' is the cheaper)",
        default="auto",
    )
    noise_min_sigma: float = _help("'pure' noise: lowest noise level (1 = pure noise)", default=0.7)
    teacher_steps: int = _help("'teacher' noise: Euler steps of the teacher's sampler path", default=4)
    teacher_max_length: int | None = _help(
        "calibrate: T5 tokens of the teacher's text (None: each text at its own length)", default=None
    )
    calibration_size: int | None = _help(
        "calibrate: image size in pixels of the noisy inputs (None: the decoder's sample size, else 512)",
        default=None,
    )
    cache_teacher: bool = _help("calibrate: keep each text's teacher states (CPU) for reuse", default=True)

    seed: int = _help("base seed (data order, random cuts, init)", default=42)
    num_workers: int = _help("data-loader worker processes per rank", default=4)
    shuffle_buffer: int = _help("samples in the shuffle buffer", default=2000)
    bucket_batches: int = _help(
        "lvlm: sort windows of this many micro-batches by the random cut, so a batch holds similar memory "
        "and target lengths (little padding); 0 keeps the released order",
        default=4,
    )

    log_every: int = _help("steps between console/TensorBoard logs", default=10)
    val_every: int = _help("steps between validation losses (0: never)", default=500)
    val_batches: int = _help("batches per validation", default=8)
    decode_every: int = _help("steps between decoded validation samples (0: never)", default=1000)
    decode_samples: int = _help("validation samples decoded to text", default=4)
    save_every: int = _help("steps between checkpoints", default=1000)
    keep_last: int = _help("checkpoints kept", default=3)
    max_bad_steps: int = _help("consecutive non-finite steps that stop training", default=20)

    @property
    def calibration_noise(self) -> str:
        """The noisy inputs a calibration run uses: ``noise_source`` with 'auto' resolved."""
        if self.noise_source != "auto":
            return self.noise_source
        return "source" if self.variant == "clip" or self.target_images is not None else "teacher"

    def validate(self, num_processes: int = 1) -> None:
        """Raise ``ValueError`` naming every bad value; called before any model loads."""
        problems: list[str] = []
        if self.variant not in ("lvlm", "clip"):
            problems.append(f"variant must be 'lvlm' or 'clip', got {self.variant!r}")
        if self.aligner_norm not in ("t5", "default", "none"):
            problems.append(f"aligner_norm must be 't5', 'default' or 'none', got {self.aligner_norm!r}")
        if self.features not in ("generated", "prompt"):
            problems.append(f"features must be 'generated' or 'prompt', got {self.features!r}")
        if self.mixed_precision not in ("auto", "bf16", "no"):
            problems.append(f"mixed_precision must be 'auto', 'bf16' or 'no', got {self.mixed_precision!r}")
        for name in (
            "global_batch_size",
            "max_steps",
            "max_split",
            "max_target_tokens",
            "log_every",
            "keep_last",
            "save_every",
            "max_bad_steps",
            "val_batches",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.clip_empty_first <= 1.0:
            problems.append(f"clip_empty_first must be in [0, 1], got {self.clip_empty_first}")
        if self.warmup_steps < 0 or self.num_workers < 0 or self.bucket_batches < 0:
            problems.append("warmup_steps, num_workers and bucket_batches must be >= 0")
        problems.extend(self._calibration_problems())
        if not self.data:
            problems.append("no training data given (data)")
        for path in [*self.data, *self.val_data]:
            # Brace patterns and URLs are expanded by the data readers; plain paths must exist now.
            if not any(c in path for c in "{*[") and "://" not in path and not Path(path).exists():
                problems.append(f"training data {path} does not exist")
        if self.global_batch_size % num_processes:
            problems.append(
                f"global batch {self.global_batch_size} is not divisible by {num_processes} processes"
            )
        else:
            per_process = self.global_batch_size // num_processes
            micro = self.micro_batch_size or per_process
            if micro < 1 or per_process % micro:
                problems.append(
                    f"micro batch {micro} does not divide the per-process batch {per_process} "
                    f"(global {self.global_batch_size} / {num_processes} processes)"
                )
        if problems:
            raise ValueError("bad training config: " + "; ".join(problems))

    def _calibration_problems(self) -> list[str]:
        problems: list[str] = []
        if self.objective not in ("proxy", "calibrate"):
            problems.append(f"objective must be 'proxy' or 'calibrate', got {self.objective!r}")
        if self.init_aligner is not None and not Path(self.init_aligner).is_dir():
            problems.append(f"init_aligner {self.init_aligner} does not exist")
        if self.calibrate_from_scratch and (self.objective != "calibrate" or self.init_aligner is not None):
            problems.append("calibrate_from_scratch is for objective 'calibrate' without init_aligner")
        if self.objective != "calibrate":
            return problems
        if self.init_aligner is None and not self.calibrate_from_scratch:
            problems.append(
                "objective 'calibrate' starts from a trained aligner: give init_aligner (a model/ folder "
                "of thinkdiff train), or set calibrate_from_scratch to start from random weights"
            )
        if self.calibration_loss not in ("distill", "regress", "flow"):
            problems.append(
                f"calibration_loss must be 'distill', 'regress' or 'flow', got {self.calibration_loss!r}"
            )
        if self.calibration_loss == "flow" and (self.variant != "lvlm" or self.target_images is None):
            problems.append("calibration_loss 'flow' is for lvlm task-format data and needs target_images")
        if self.target_images is not None and not Path(self.target_images).is_dir():
            problems.append(f"target_images {self.target_images} does not exist")
        if self.token_alignment not in ("one-to-one", "offsets"):
            problems.append(f"token_alignment must be 'one-to-one' or 'offsets', got {self.token_alignment!r}")
        if self.noise_source not in ("auto", "pure", "teacher", "source"):
            problems.append(
                f"noise_source must be 'auto', 'pure', 'teacher' or 'source', got {self.noise_source!r}"
            )
        if self.variant == "lvlm" and self.split:
            problems.append("calibration reads whole answers: set split to false (the no-split collator)")
        if self.variant == "lvlm" and self.noise_source == "source" and self.target_images is None:
            problems.append("lvlm noise_source 'source' noises the task-format target images: set target_images")
        if self.variant == "clip" and self.calibration_loss == "regress":
            problems.append("calibration_loss 'regress' aligns LVLM tokens: lvlm only")
        if self.calibration_loss == "regress" and self.features != "generated":
            problems.append("calibration_loss 'regress' needs generated-token features")
        if self.proxy_weight < 0:
            problems.append(f"proxy_weight must be >= 0, got {self.proxy_weight}")
        if not 0 < self.noise_min_sigma <= 1:
            problems.append(f"noise_min_sigma must be in (0, 1], got {self.noise_min_sigma}")
        if self.teacher_steps < 1:
            problems.append(f"teacher_steps must be >= 1, got {self.teacher_steps}")
        for name in ("teacher_max_length", "calibration_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be >= 1, got {value}")
        return problems

    def accumulation_steps(self, num_processes: int) -> int:
        per_process = self.global_batch_size // num_processes
        return per_process // (self.micro_batch_size or per_process)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        from thinkdiff.utils import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**values)

    def updated(self, **overrides: Any) -> TrainConfig:
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **overrides)


# ---------------------------------------------------------------------------------- presets
def lvlm_qwen2vl_flant5xxl() -> TrainConfig:
    """The paper's ThinkDiff-LVLM run: Qwen2-VL-7B features, Flan-T5-XXL proxy, 96 x 25k steps."""
    return TrainConfig(variant="lvlm", global_batch_size=96, max_steps=25_000)


def clip_eva_flant5xxl() -> TrainConfig:
    """The paper's ThinkDiff-CLIP run: BLIP-2 EVA ViT-g/14, Flan-T5-XXL proxy, 168 x 100k steps."""
    return TrainConfig(
        variant="clip",
        global_batch_size=168,
        max_steps=100_000,
        max_target_tokens=32,
    )


def _debug(variant: Variant) -> TrainConfig:
    return TrainConfig(
        variant=variant,
        lvlm="tiny:qwen2-vl",
        vision_model="tiny:blip2-vision",
        proxy_t5="tiny:t5",
        diffusion_decoder="tiny:flux",
        global_batch_size=8,
        max_steps=30,
        lr=3e-3,
        warmup_start_lr=3e-4,
        warmup_steps=5,
        min_lr=1e-3,
        max_target_tokens=32 if variant == "clip" else 64,
        num_workers=0,
        shuffle_buffer=64,
        log_every=5,
        val_every=10,
        val_batches=2,
        decode_every=15,
        decode_samples=2,
        save_every=10,
        keep_last=2,
        output_dir=f"runs/debug-{variant}",
    )


def debug_lvlm() -> TrainConfig:
    """Seconds-long ThinkDiff-LVLM run on the offline tiny kit."""
    return _debug("lvlm")


def debug_clip() -> TrainConfig:
    """Seconds-long ThinkDiff-CLIP run on the offline tiny kit."""
    return _debug("clip")


def calibrate_lvlm_flux() -> TrainConfig:
    """Decoder-in-the-loop calibration of a trained ThinkDiff-LVLM aligner against FLUX.1-dev.

    Give ``init_aligner`` (the proxy run's model/) and ``data``: feature shards of task-format
    prompts (``extract-features --task-shots``) from a source disjoint from the benchmark.
    """
    return TrainConfig(
        variant="lvlm",
        objective="calibrate",
        split=False,
        global_batch_size=32,
        max_steps=2000,
        lr=1e-4,
        warmup_start_lr=1e-6,
        warmup_steps=100,
        min_lr=1e-5,
        calibration_size=256,
        activation_checkpointing=True,
        val_every=250,
        decode_every=500,
        save_every=250,
        output_dir="runs/calibrate-lvlm",
    )


def calibrate_clip_flux() -> TrainConfig:
    """Decoder-in-the-loop calibration of a trained ThinkDiff-CLIP aligner against FLUX.1-dev."""
    return calibrate_lvlm_flux().updated(
        variant="clip", max_target_tokens=32, split=True, output_dir="runs/calibrate-clip"
    )


def _debug_calibrate(variant: Variant) -> TrainConfig:
    return _debug(variant).updated(
        objective="calibrate",
        split=variant == "clip",
        max_steps=10,
        warmup_steps=2,
        val_every=5,
        decode_every=0,
        save_every=5,
        output_dir=f"runs/debug-calibrate-{variant}",
    )


def debug_calibrate_lvlm() -> TrainConfig:
    """Seconds-long ThinkDiff-LVLM calibration on the offline tiny kit (give init_aligner and data)."""
    return _debug_calibrate("lvlm")


def debug_calibrate_clip() -> TrainConfig:
    """Seconds-long ThinkDiff-CLIP calibration on the offline tiny kit."""
    return _debug_calibrate("clip")


PRESETS = {
    "lvlm-qwen2vl-flant5xxl": lvlm_qwen2vl_flant5xxl,
    "clip-eva-flant5xxl": clip_eva_flant5xxl,
    "debug-lvlm": debug_lvlm,
    "debug-clip": debug_clip,
    "calibrate-lvlm-flux": calibrate_lvlm_flux,
    "calibrate-clip-flux": calibrate_clip_flux,
    "debug-calibrate-lvlm": debug_calibrate_lvlm,
    "debug-calibrate-clip": debug_calibrate_clip,
}


def preset(name: str) -> TrainConfig:
    """The config of a named preset; ``ValueError`` listing the known names otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]()


def load_config(preset_name: str | None, config_file: Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """Preset, then JSON file, then overrides (each later source wins)."""
    config = preset(preset_name) if preset_name else TrainConfig()
    if config_file is not None:
        if not Path(config_file).is_file():
            raise FileNotFoundError(f"config file {config_file} does not exist")
        try:
            values = json.loads(Path(config_file).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"config file {config_file} is not valid JSON: {exc}") from exc
        config = config.updated(**values)
    return config.updated(**overrides)
