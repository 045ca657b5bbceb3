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
        if self.warmup_steps < 0 or self.num_workers < 0 or self.bucket_batches < 0:
            problems.append("warmup_steps, num_workers and bucket_batches must be >= 0")
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


PRESETS = {
    "lvlm-qwen2vl-flant5xxl": lvlm_qwen2vl_flant5xxl,
    "clip-eva-flant5xxl": clip_eva_flant5xxl,
    "debug-lvlm": debug_lvlm,
    "debug-clip": debug_clip,
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
