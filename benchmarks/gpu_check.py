"""The first check on one GPU: training, extraction and inference at real size, in minutes.

With one H100/H200 and nothing downloaded, this runs the project's own code at the real dimensions
(Qwen2-VL-7B, the Flan-T5-XXL decoder, FLUX.1-dev) with random weights built on the GPU in bf16:

``training``     ProxyT5Decoder + the LVLM objective through ``Trainer.train_step`` and accelerate:
                 samples/s, MFU, peak allocated/reserved memory at micro-batch 32 and 96, with and
                 without activation checkpointing.
``features``     the hf extraction engine: features read out of ``generate`` vs the teacher-forced
                 pass on the same tokens, in bf16 (agreement), and extraction samples/s both ways.
``inference``    ThinkDiffPipeline: seconds per image and peak memory per stage at 512 and 1024 px
                 for offload none and model, and sequential and group at 512 px with 4 steps.
``calibration``  one calibration step (when the calibration code exists in this version).
``quantized``    the quantized decoder modes (when they exist in this version).

Every part has a time budget: once it is spent, the part's remaining runs are skipped with a note.
``gpu-check.json`` and ``gpu-check.md`` are rewritten atomically after every run, so a kill keeps
everything measured so far. ``--smoke`` runs every branch on the CPU with narrow models (the same
builders, widths cut) in well under two minutes; ``make test`` runs it.

    python benchmarks/gpu_check.py [--smoke] [--out DIR] [--parts training inference]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark modules

from common import QWEN2VL_7B_HIDDEN, XXL, random_proxy_t5, write_scaled_lvlm

GiB = 1024**3
PARTS = ("training", "features", "inference", "calibration", "quantized")

AGREEMENT_TOLERANCE = {"median_rel": 0.03, "p99_rel": 0.10, "min_cosine": 0.99}
"""bf16 agreement of generate-time and teacher-forced features on the same tokens, per token:
relative L2 error ``|a - b| / |b|`` (median and 99th percentile) and cosine similarity.

Why these numbers: bf16 keeps 8 significant bits, a rounding error of up to u = 2^-8 = 0.0039 per
value. The two paths run different kernels (one token at a time against a KV cache vs the whole
sequence at once), so their roundings are independent; they differ at each of Qwen2-VL-7B's 56
residual additions, and independent errors add up like a random walk: sqrt(56) x u = 0.029 for a
typical token, hence 0.03 for the median. A few tokens sit on attention or softmax outliers, hence
0.10 for the 99th percentile; a cosine of 0.99 means an angle of at most 8 degrees, far below what
separates two different tokens' features. A bug (an off-by-one position, a wrong M-RoPE id, a
missing image) gives errors of order 1 (cosine near 0), not of order 0.01."""


# ---- settings of the two modes ---------------------------------------------------------------------


@dataclass
class Settings:
    """Sizes, steps and budgets of one mode (the real check, or the CPU smoke run)."""

    smoke: bool
    device: torch.device
    frozen_dtype: torch.dtype
    """Training's frozen proxy: bf16 on the GPU (as the trainer loads it), fp32 on the CPU."""
    narrow: bool
    depth: int | None
    t5_scale: int
    t5_layers: int | None
    feature_width: int
    micro_batches: tuple[int, ...]
    warmup_steps: int
    timed_steps: int
    workers: int
    new_tokens: int
    agreement_batch: int
    extract_images: int
    extract_batch: int
    image_size: int
    sizes: dict[int, int]
    """Image size named in the report -> pixels run (the smoke run scales them down)."""
    steps: int
    sequential_steps: int
    calibration_batch: int
    calibration_size: int
    quantized_depth: int
    lvlm_tokens: int
    """Tokens the LVLM generates in the pipeline runs (ThinkDiff's 128 on the GPU)."""
    budgets: dict[str, float]
    max_seconds: float


def settings_for(smoke: bool) -> Settings:
    if smoke:
        return Settings(
            smoke=True,
            device=torch.device("cpu"),
            frozen_dtype=torch.float32,
            narrow=True,
            depth=1,
            t5_scale=16,
            t5_layers=2,
            feature_width=256,
            micro_batches=(2, 6),  # 32 and 96 divided by 16
            warmup_steps=1,
            timed_steps=2,
            workers=0,
            new_tokens=8,
            agreement_batch=2,
            extract_images=2,
            extract_batch=2,
            image_size=56,
            sizes={512: 64, 1024: 128},
            steps=2,
            sequential_steps=1,
            calibration_batch=2,
            calibration_size=64,
            quantized_depth=1,
            lvlm_tokens=16,
            # About 3x what each part takes on 2 busy cores (~60 s in all), so that a slow machine
            # still runs every branch; the budgets' own logic runs as on the GPU.
            budgets={"training": 60, "features": 45, "inference": 90, "calibration": 30, "quantized": 45},
            max_seconds=300,
        )
    return Settings(
        smoke=False,
        device=torch.device("cuda"),
        frozen_dtype=torch.bfloat16,
        narrow=False,
        depth=None,
        t5_scale=1,
        t5_layers=None,
        feature_width=QWEN2VL_7B_HIDDEN,
        micro_batches=(32, 96),
        warmup_steps=2,
        timed_steps=5,
        workers=2,
        new_tokens=64,
        agreement_batch=4,
        extract_images=32,
        extract_batch=16,
        image_size=448,
        sizes={512: 512, 1024: 1024},
        steps=28,
        sequential_steps=4,
        calibration_batch=4,
        calibration_size=256,  # the calibrate preset's
        quantized_depth=2,
        lvlm_tokens=128,
        budgets={"training": 110, "features": 70, "inference": 180, "calibration": 45, "quantized": 45},
        max_seconds=460,
    )


# ---- the report --------------------------------------------------------------------------------------


@dataclass
class Budget:
    """A part's time box, cut short by the whole run's deadline."""

    seconds: float
    deadline: float
    start: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.end = min(self.start + self.seconds, self.deadline)

    def over(self) -> bool:
        return time.perf_counter() >= self.end


class Report:
    """``gpu-check.json`` + ``gpu-check.md``, rewritten atomically after every measurement."""

    def __init__(self, out: Path, meta: dict[str, Any]) -> None:
        self.out = out
        self.data: dict[str, Any] = {"meta": meta, "parts": {}}
        self.started = time.perf_counter()

    def log(self, message: str) -> None:
        elapsed = time.perf_counter() - self.started
        print(f"[gpu-check {int(elapsed) // 60:02d}:{int(elapsed) % 60:02d}] {message}", flush=True)

    def part(self, name: str, budget_s: float) -> dict[str, Any]:
        entry = {"status": "running", "budget_s": budget_s, "seconds": 0.0, "rows": [], "notes": []}
        self.data["parts"][name] = entry
        self.save()
        return entry

    def save(self) -> None:
        from thinkdiff.utils import atomic_write_text

        self.data["meta"]["elapsed_s"] = round(time.perf_counter() - self.started, 1)
        atomic_write_text(self.out / "gpu-check.json", json.dumps(self.data, indent=2, default=str) + "\n")
        atomic_write_text(self.out / "gpu-check.md", markdown(self.data))


COLUMNS: dict[str, list[tuple[str, str, str]]] = {
    # (key, header, format)
    "training": [
        ("micro_batch", "micro-batch", "{}"),
        ("activation_checkpointing", "act. ckpt", "{}"),
        ("samples_per_s", "samples/s", "{:.1f}"),
        ("mfu", "MFU", "{:.1%}"),
        ("memory_tokens", "memory tok", "{:.0f}"),
        ("target_tokens", "target tok", "{:.0f}"),
        ("samples_per_s_at_32_32", "samples/s at 32+32 (est.)", "{:.1f}"),
        ("peak_allocated_gib", "peak alloc GiB", "{:.1f}"),
        ("peak_reserved_gib", "peak reserved GiB", "{:.1f}"),
        ("step_s", "s/step", "{:.3f}"),
        ("data_wait_fraction", "data wait", "{:.1%}"),
        ("loss_last", "loss", "{:.2f}"),
    ],
    "features": [
        ("what", "measurement", "{}"),
        ("tokens", "tokens", "{}"),
        ("median_rel", "median rel. err", "{:.4f}"),
        ("p99_rel", "p99 rel. err", "{:.4f}"),
        ("min_cosine", "min cosine", "{:.4f}"),
        ("within_tolerance", "within tolerance", "{}"),
        ("samples_per_s", "samples/s", "{:.2f}"),
        ("peak_allocated_gib", "peak alloc GiB", "{:.1f}"),
        ("teacher_forced_peak_allocated_gib", "teacher-forced peak GiB", "{:.1f}"),
    ],
    "inference": [
        ("offload", "offload", "{}"),
        ("size", "px", "{}"),
        ("pixels", "px run", "{}"),
        ("steps", "steps", "{}"),
        ("seconds_per_image", "s / image", "{:.2f}"),
        ("seconds_with_loads", "s with loads", "{:.1f}"),
        ("stages", "stage s (peak GiB)", "{}"),
    ],
    "quantized": [
        ("quantize", "quantize", "{}"),
        ("seconds_per_image", "s / image", "{:.2f}"),
        ("decoder_s", "decoder s", "{:.2f}"),
        ("load_decoder_s", "load decoder s", "{:.1f}"),
        ("load_decoder_peak_gib", "load peak GiB", "{:.2f}"),
        ("decoder_peak_gib", "denoise peak GiB", "{:.2f}"),
    ],
}


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


def markdown(data: dict[str, Any]) -> str:
    meta = data["meta"]
    lines = [
        f"# gpu-check ({'smoke, CPU, narrow models' if meta['smoke'] else 'real dimensions, random bf16 weights'})",
        "",
        f"{meta['device']}; torch {meta['versions']['torch']}, transformers {meta['versions']['transformers']}, "
        f"diffusers {meta['versions']['diffusers']}; {meta['elapsed_s']} s in all.",
        "",
    ]
    for name, part in data["parts"].items():
        lines += [f"## {name}: {part['status']} ({part['seconds']:.0f} s of {part['budget_s']:.0f} s)", ""]
        rows = [r for r in part["rows"] if "error" not in r]
        columns = COLUMNS.get(name)
        if rows and columns is None:  # parts without a fixed layout show their own keys
            keys = list(dict.fromkeys(k for r in rows for k in r))
            columns = [(k, k, "{:.4g}" if isinstance(rows[0].get(k), float) else "{}") for k in keys]
        if rows and columns:
            lines.append("| " + " | ".join(h for _, h, _ in columns) + " |")
            lines.append("|" + "---|" * len(columns))
            lines += ["| " + " | ".join(_cell(r, k, f) for k, _, f in columns) + " |" for r in rows]
            lines.append("")
        if "error" in part:
            lines.append(f"- failed: {part['error']} (traceback in gpu-check.json)")
        for r in part["rows"]:
            if "error" in r:
                lines.append(f"- failed: {r.get('run', '')} {r['error']}")
        lines += [f"- {note}" for note in part["notes"]]
        lines.append("")
    return "\n".join(lines)


# ---- helpers -----------------------------------------------------------------------------------------


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peaks(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}  # no allocator statistics on the CPU
    torch.cuda.synchronize(device)
    return {
        "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GiB,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GiB,
    }


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_flops(s: Settings) -> tuple[float, str]:
    """The rate MFU is measured against: the card's dense bf16 peak, or this CPU's matmul rate."""
    from bench_training import PEAK_BF16, cpu_matmul_flops

    if s.device.type != "cuda":
        rate = cpu_matmul_flops(512, 5)
        return rate, f"this CPU's measured fp32 matmul rate, {rate / 1e9:.0f} GFLOP/s"
    name = torch.cuda.get_device_name(s.device)
    key = next((k for k in PEAK_BF16 if k in name), None)
    if key is None:
        return PEAK_BF16["H100"], f"{name} is not in the table; H100's dense bf16 peak used (989 TFLOP/s)"
    return PEAK_BF16[key], f"{key} dense bf16 peak, {PEAK_BF16[key] / 1e12:.0f} TFLOP/s"


def random_images(n: int, size: int, seed: int = 0) -> list[Any]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def feature_agreement(
    a_BNH: torch.Tensor, b_BNH: torch.Tensor, mask_BN: torch.Tensor
) -> dict[str, float | int | bool]:
    """Per-token agreement of two feature sets over the valid tokens (see AGREEMENT_TOLERANCE)."""
    mask_BN = mask_BN.to(a_BNH.device)
    a, b = a_BNH[mask_BN].float(), b_BNH[mask_BN].float().to(a_BNH.device)
    rel = (a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-12)
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    result: dict[str, float | int | bool] = {
        "tokens": int(mask_BN.sum()),
        "median_rel": float(rel.median()),
        "p99_rel": float(torch.quantile(rel, 0.99)),
        "max_rel": float(rel.max()),
        "min_cosine": float(cosine.min()),
        "max_abs": float((a - b).abs().max()),
        "rms": float(b.pow(2).mean().sqrt()),
    }
    tol = AGREEMENT_TOLERANCE
    result["within_tolerance"] = bool(
        result["median_rel"] <= tol["median_rel"]
        and result["p99_rel"] <= tol["p99_rel"]
        and result["min_cosine"] >= tol["min_cosine"]
    )
    return result


# ---- parts -------------------------------------------------------------------------------------------

Emit = Callable[[dict[str, Any]], None]


def part_training(s: Settings, budget: Budget, emit: Emit, note: Callable[[str], None], work: Path) -> None:
    """Trainer.train_step (accelerate, bf16 autocast, the LVLM objective) on a random proxy."""
    from unittest import mock

    from transformers import AutoTokenizer

    from bench_training import flops_per_sample, write_features
    from thinkdiff.models.proxy_decoder import ProxyT5Decoder
    from thinkdiff.training.config import debug_lvlm
    from thinkdiff.training.trainer import Trainer

    proxy = random_proxy_t5(s.device, s.frozen_dtype, s.t5_scale, s.t5_layers)
    t5 = proxy.t5.config
    dims = dict(XXL, d_model=t5.d_model, d_ff=t5.d_ff, num_heads=t5.num_heads, num_layers=t5.num_decoder_layers)
    steps = s.warmup_steps + s.timed_steps
    lvlm = write_scaled_lvlm(work / "lvlm", s.feature_width)
    write_features(work / "features", AutoTokenizer.from_pretrained(lvlm), s.feature_width, samples=max(s.micro_batches) * steps)
    peak, peak_source = peak_flops(s)
    note(f"MFU against {peak_source}; model FLOPs of the padded batches, "
         "recomputation under activation checkpointing not counted")  # fmt: skip
    # Without checkpointing first: the trainer switches it on in the shared proxy and never off.
    for checkpointing in (False, True):
        for batch in s.micro_batches:
            name = f"micro-batch {batch}, activation checkpointing {'on' if checkpointing else 'off'}"
            if budget.over():
                note(f"skipped {name}: over the part's budget")
                continue
            config = debug_lvlm().updated(
                data=[str(work / "features")],
                output_dir=str(work / f"run-{batch}-{checkpointing}"),
                proxy_t5="random:flan-t5-xxl-decoder",
                lvlm=str(lvlm),  # the tiny kit's tokenizer decodes the token ids; the config gives the width
                global_batch_size=batch,
                micro_batch_size=batch,
                max_steps=steps,
                activation_checkpointing=checkpointing,
                num_workers=s.workers,
                shuffle_buffer=4 * batch,
                max_target_tokens=128,
            )
            # Random weights have no files: the trainer takes the proxy built above where it would
            # load config.proxy_t5; everything else is the trainer's own set-up.
            with mock.patch.object(ProxyT5Decoder, "from_pretrained", return_value=proxy) as load:
                trainer = Trainer(config)
            assert load.call_count == 1 and trainer.proxy is proxy
            weights = torch.cuda.memory_allocated(s.device) / GiB if s.device.type == "cuda" else None
            reset_peak(s.device)
            losses, step_s, wait_s, flops, padding, lengths = [], 0.0, 0.0, 0.0, [], []
            # Forward calls inside the first decoder block: 2 per micro-batch when checkpointing
            # recomputes it (the block's own hooks stay outside the checkpoint, its layers' do not).
            calls = [0]
            hook = proxy.t5.decoder.block[0].layer[0].register_forward_hook(
                lambda *_, calls=calls: calls.__setitem__(0, calls[0] + 1)
            )
            try:
                for step in range(steps):
                    start = time.perf_counter()
                    micro_batches = trainer.data.next_step()
                    fetched = time.perf_counter()
                    loss, _, _ = trainer.train_step(micro_batches)  # float(loss) waits for the GPU
                    done = time.perf_counter()
                    losses.append(loss)
                    if step >= s.warmup_steps:
                        step_s += done - fetched
                        wait_s += fetched - start
                        for b in micro_batches:
                            flops += len(b.keys) * flops_per_sample(
                                dims, s.feature_width, b.features_BLH.shape[1], b.labels_BT.shape[1]
                            )
                            padding.append(b.padding_fraction())
                            lengths.append((b.features_BLH.shape[1], b.labels_BT.shape[1]))
            except torch.cuda.OutOfMemoryError as exc:
                emit({"run": name, "error": f"out of memory: {str(exc).splitlines()[0]}"})
                del trainer
                free_memory(s.device)
                continue
            finally:
                hook.remove()
            samples = batch * s.timed_steps
            flop_rate = flops / (step_s + wait_s)
            row = {
                "micro_batch": batch,
                "activation_checkpointing": checkpointing,
                "samples_per_s": samples / (step_s + wait_s),
                "step_s": step_s / s.timed_steps,
                "data_wait_fraction": wait_s / (step_s + wait_s),
                "mfu": flop_rate / peak,
                "memory_tokens": sum(m for m, _ in lengths) / len(lengths),
                "target_tokens": sum(t for _, t in lengths) / len(lengths),
                # The same FLOP rate spent on the paper's mean sample (a cut at 32 of 64 tokens).
                "samples_per_s_at_32_32": flop_rate / flops_per_sample(dims, s.feature_width, 32, 32),
                "weights_gib": weights,
                **peaks(s.device),
                "padding_fraction": sum(padding) / len(padding),
                "loss_first": losses[0],
                "loss_last": losses[-1],
                "finite": all(math.isfinite(x) for x in losses),
                "block_forwards_per_micro_batch": calls[0] / steps,
            }
            emit(row)
            del trainer
            free_memory(s.device)


def part_features(s: Settings, budget: Budget, emit: Emit, note: Callable[[str], None], work: Path) -> None:
    """The hf engine on a random Qwen2-VL-7B in bf16: feature agreement, then extraction rate."""
    from bench_inference import random_lvlm
    from thinkdiff.data.extraction import ExtractionSettings, HFEngine, extract_features
    from thinkdiff.data.synthetic import write_tar_shards
    from thinkdiff.models.lvlm import SamplingSettings

    extractor = random_lvlm(s.device, torch.bfloat16, s.depth, s.narrow)
    prompts = [[image, "Describe the image."] for image in random_images(s.agreement_batch, s.image_size)]
    sampling = SamplingSettings.exactly(s.new_tokens, seed=0)
    reset_peak(s.device)
    generated = extractor.generate(prompts, sampling, teacher_forced=False)
    generate_peak = peaks(s.device)
    reset_peak(s.device)
    forced = extractor.features_from_tokens(extractor.prepare_inputs(prompts), generated.token_ids)
    forced_peak = peaks(s.device)
    agreement = feature_agreement(generated.features, forced.features, generated.feature_mask & forced.feature_mask)
    emit({"what": "generate vs teacher-forced (bf16)", **agreement, **generate_peak,
          "teacher_forced_peak_allocated_gib": forced_peak.get("peak_allocated_gib")})  # fmt: skip
    note(
        f"tolerance: median rel. err <= {AGREEMENT_TOLERANCE['median_rel']}, p99 <= {AGREEMENT_TOLERANCE['p99_rel']}, "
        f"cosine >= {AGREEMENT_TOLERANCE['min_cosine']} (see AGREEMENT_TOLERANCE); peak of the agreement row is "
        "generate's, which keeps every layer's states"
    )
    settings = ExtractionSettings(max_new_tokens=s.new_tokens)
    write_tar_shards(work / "tars", num_shards=1, samples_per_shard=s.extract_images, bad=False, image_size=s.image_size)  # fmt: skip
    for way in ("recompute", "generate"):
        if budget.over():
            note(f"skipped extraction with features={way}: over the part's budget")
            continue
        engine = HFEngine(extractor, settings, features=way, model="random:Qwen2-VL-7B")
        reset_peak(s.device)
        summary = extract_features(
            work / "tars", work / f"out-{way}", engine, settings, batch_size=s.extract_batch, progress=False
        )
        tokens = json.loads((work / f"out-{way}" / "index.json").read_text())["num_tokens"]
        emit({"what": f"hf extraction, features={way}", "samples_per_s": summary.samples_per_second,
              "tokens": tokens, **peaks(s.device)})  # fmt: skip
    del extractor
    free_memory(s.device)


def part_inference(s: Settings, budget: Budget, emit: Emit, note: Callable[[str], None], work: Path) -> None:
    """ThinkDiffPipeline with random Qwen2-VL-7B + FLUX.1-dev, per offload mode and size."""
    from bench_inference import gpu_run

    plan = [("none", 512, s.steps), ("none", 1024, s.steps), ("model", 512, s.steps), ("model", 1024, s.steps),
            ("sequential", 512, s.sequential_steps), ("group", 512, s.sequential_steps)]  # fmt: skip
    for offload, size, steps in plan:
        name = f"offload {offload}, {size} px, {steps} steps"
        if budget.over():
            note(f"skipped {name}: over the part's budget")
            continue
        try:
            run = gpu_run(offload, s.sizes[size], steps, s.device, torch.bfloat16, s.depth, s.narrow,
                          lvlm_tokens=s.lvlm_tokens)  # fmt: skip
        except ValueError as exc:  # an offload mode this device cannot run (no GPU in the smoke run)
            note(f"skipped {name}: {exc}")
            continue
        except torch.cuda.OutOfMemoryError as exc:
            emit({"run": name, "error": f"out of memory: {str(exc).splitlines()[0]}"})
            free_memory(s.device)
            continue
        compute = {k: v for k, v in run["timings"].items() if not k.startswith("load_")}
        stages = ", ".join(
            f"{k} {v:.2f}" + (f" ({run['peak_gib'][k]:.1f})" if k in run["peak_gib"] else "")
            for k, v in compute.items()
        )
        emit({**run, "size": size, "pixels": s.sizes[size], "stages": stages})
        free_memory(s.device)


def part_calibration(s: Settings, budget: Budget, emit: Emit, note: Callable[[str], None], work: Path) -> None:
    """One calibration step (``calibration_step``: the trainer with FLUX.1-dev in the loop)."""
    from unittest import mock

    try:
        from thinkdiff.training.config import calibrate_lvlm_flux
        from thinkdiff.training.probe import calibration_step
    except ImportError as exc:
        raise Unavailable(f"this version has no calibration step ({exc})") from exc
    from transformers import AutoTokenizer

    from bench_inference import random_flux
    from bench_training import write_features
    from thinkdiff.models.proxy_decoder import ProxyT5Decoder
    from thinkdiff.pipelines import decoders

    proxy = random_proxy_t5(s.device, s.frozen_dtype, s.t5_scale, s.t5_layers)
    spec, decoder_cls = random_flux(s.depth, s.narrow)
    batch = s.calibration_batch
    lvlm = write_scaled_lvlm(work / "lvlm", s.feature_width)
    write_features(work / "features", AutoTokenizer.from_pretrained(lvlm), s.feature_width, samples=4 * batch, tokens=32)
    config = calibrate_lvlm_flux().updated(
        data=[str(work / "features")],
        output_dir=str(work / "run"),
        proxy_t5="random:flan-t5-xxl-decoder",
        lvlm=str(lvlm),
        diffusion_decoder=spec.name,
        global_batch_size=batch,
        micro_batch_size=batch,
        calibration_size=s.calibration_size,
        num_workers=0,
        shuffle_buffer=4 * batch,
        val_every=0,
        decode_every=0,
        calibrate_from_scratch=True,  # random weights throughout: no trained aligner to start from
    )
    # Random weights have no files: the proxy and a random FLUX.1-dev stand in where the trainer
    # and the calibration would load them; the rest is calibration_step's own code.
    with (
        mock.patch.object(ProxyT5Decoder, "from_pretrained", return_value=proxy),
        mock.patch.object(decoders.DecoderSpec, "inspect", return_value=spec),
        mock.patch.object(decoders, "load_decoder", side_effect=lambda spec, device, dtype, offload="none": decoder_cls(spec, device, dtype, offload)),
    ):  # fmt: skip
        reset_peak(s.device)
        result = calibration_step(config)
    emit({
        "micro_batch": batch, "size": s.calibration_size, "loss": result["loss"], "grad_norm": result["grad_norm"],
        "finite": result["finite"], "step_s": result["seconds"], **peaks(s.device),
    })  # fmt: skip
    note(
        f"{config.calibration_loss} loss, noise {config.calibration_noise}, activation checkpointing "
        f"{'on' if config.activation_checkpointing else 'off'}; the peaks are the step's (calibration_step resets them after building)"
    )


def write_flux_folder(folder: Path, s: Settings) -> Path:
    """A FLUX.1-dev folder with random weights: its real widths (or NARROW), ``s.quantized_depth``
    blocks of each kind, the tiny kit's tokenizers and scheduler; loaded by the pipeline's own
    loader, where the quantization configs apply."""
    import shutil

    from bench_inference import build, flux_dev_modules
    from common import default_dtype
    from thinkdiff.models.loading import resolve_tiny

    kit = resolve_tiny("tiny:flux")
    folder.mkdir(parents=True)
    shutil.copy(kit / "model_index.json", folder)
    for name in ("scheduler", "tokenizer", "tokenizer_2"):
        shutil.copytree(kit / name, folder / name)
    for name, (cls, spec) in flux_dev_modules(s.quantized_depth, s.narrow).items():
        with torch.device(s.device), default_dtype(torch.bfloat16):
            module = build(cls, spec)
        module.save_pretrained(folder / name)
        del module
        free_memory(s.device)
    return folder


def part_quantized(s: Settings, budget: Budget, emit: Emit, note: Callable[[str], None], work: Path) -> None:
    """ThinkDiffPipeline with ``quantize`` none / int8 / nf4 / fp8 on a FLUX.1-dev-wide decoder."""
    try:
        from thinkdiff.models.quantization import QUANTIZE_MODES, check_quantize
    except ImportError as exc:
        raise Unavailable(f"this version has no quantized decoder modes ({exc})") from exc
    from bench_inference import gpu_run

    folder = write_flux_folder(work / "flux", s)
    note(
        f"{'narrow' if s.narrow else 'FLUX.1-dev'} widths with {s.quantized_depth} + {s.quantized_depth} of its 19 + 38 blocks (weights and "
        f"time scale with the blocks), random weights saved and loaded by the pipeline's loader; a 1-layer LVLM; "
        f"{s.sizes[512]} px, {s.sequential_steps} steps"
    )
    for mode in ("none", *(m for m in QUANTIZE_MODES if m != "none")):
        if budget.over():
            note(f"skipped quantize {mode}: over the part's budget")
            continue
        try:
            check_quantize(mode, s.device)
        except ValueError as exc:
            note(f"skipped quantize {mode}: {exc}")
            continue
        try:
            run = gpu_run("none", s.sizes[512], s.sequential_steps, s.device, torch.bfloat16, 1, s.narrow,
                          decoder_folder=folder, quantize=mode, lvlm_tokens=s.lvlm_tokens)  # fmt: skip
        except torch.cuda.OutOfMemoryError as exc:
            emit({"run": f"quantize {mode}", "error": f"out of memory: {str(exc).splitlines()[0]}"})
            free_memory(s.device)
            continue
        peak = run["peak_gib"]
        emit({"quantize": mode, "decoder_s": run["timings"].get("decoder"),
              "load_decoder_s": run["timings"].get("load_decoder"),
              "load_decoder_peak_gib": peak.get("load_decoder"), "decoder_peak_gib": peak.get("decoder"),
              "seconds_per_image": run["seconds_per_image"], "timings": run["timings"], "peak_gib": peak})  # fmt: skip
        free_memory(s.device)


class Unavailable(Exception):
    """The part's code does not exist in this version; it is reported, not failed."""


RUNNERS = {
    "training": part_training,
    "features": part_features,
    "inference": part_inference,
    "calibration": part_calibration,
    "quantized": part_quantized,
}


def run_part(name: str, s: Settings, report: Report, deadline: float) -> bool:
    """Run one part inside its budget; False when it failed."""
    entry = report.part(name, s.budgets[name])
    budget = Budget(s.budgets[name], deadline)

    def emit(row: dict[str, Any]) -> None:
        entry["rows"].append(row)
        entry["seconds"] = time.perf_counter() - budget.start
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k not in ("timings", "peak_gib")}
        report.log(f"{name}: {json.dumps(shown, default=str)}")
        report.save()

    def note(text: str) -> None:
        entry["notes"].append(text)
        report.log(f"{name}: {text}")
        report.save()

    if budget.over():
        entry["status"] = "skipped"
        note("skipped: no time left before the whole run's deadline")
        return True
    report.log(f"{name}: started (budget {budget.end - budget.start:.0f} s)")
    ok = True
    with tempfile.TemporaryDirectory(prefix=f"gpu-check-{name}-") as tmp:
        try:
            RUNNERS[name](s, budget, emit, note, Path(tmp))
            skipped = any(n.startswith("skipped") for n in entry["notes"])
            failed_rows = any("error" in r for r in entry["rows"])
            entry["status"] = "failed" if failed_rows else "partial" if skipped else "done"
            ok = not failed_rows
        except Unavailable as exc:
            entry["status"] = "unavailable"
            note(str(exc))
        except Exception as exc:
            entry["status"] = "failed"
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["traceback"] = traceback.format_exc()
            report.log(f"{name}: FAILED {entry['error']}")
            ok = False
        finally:
            free_memory(s.device)
    entry["seconds"] = time.perf_counter() - budget.start
    report.save()
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="every branch on the CPU with narrow models")
    parser.add_argument("--out", type=Path, default=Path("gpu-check"), help="folder for gpu-check.json/.md")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run")
    parser.add_argument("--max-seconds", type=float, help="deadline of the whole run (default: the mode's)")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; run it on a GPU machine, or use --smoke for the CPU check")
        return 2
    s = settings_for(args.smoke)
    if args.max_seconds:
        s.max_seconds = args.max_seconds
    os.environ.setdefault("THINKDIFF_TINY_DIR", str(Path(tempfile.gettempdir()) / "thinkdiff-gpu-check-tiny"))
    import diffusers
    import transformers

    meta = {
        "smoke": s.smoke,
        "device": torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "diffusers": diffusers.__version__},
        "settings": {k: v for k, v in asdict(s).items() if k not in ("device", "frozen_dtype")},
    }  # fmt: skip
    report = Report(args.out, meta)
    deadline = time.perf_counter() + s.max_seconds
    from thinkdiff.models.loading import resolve_tiny

    # Tokenizers, processor and scheduler come from the offline kit; built once (~5 s), before the
    # parts so that no part's budget pays for it.
    start = time.perf_counter()
    resolve_tiny("tiny:flux")
    meta["tiny_kit_s"] = round(time.perf_counter() - start, 1)
    report.log(f"offline tiny kit ready in {meta['tiny_kit_s']} s ({os.environ['THINKDIFF_TINY_DIR']})")
    results = [run_part(name, s, report, deadline) for name in args.parts]
    report.log(f"wrote {args.out / 'gpu-check.json'} and {args.out / 'gpu-check.md'}")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
