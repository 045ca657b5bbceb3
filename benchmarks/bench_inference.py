"""Inference benchmark: the pipeline's overhead, per-stage times, and speed/memory at real size.

Three parts, each runnable by anyone:

``tiny``    (CPU, offline) ThinkDiffPipeline vs. calling its components directly on the same
            inputs (LVLM ``generate`` / vision tower, aligner, the stock FluxPipeline with the same
            embeddings), for all three modes, with every model loaded once (``keep_loaded=True``)
            so that both sides do the same work. Reports medians, per-stage times and the overhead.
``memory``  (CPU, instant) the peak-GPU-memory table for Qwen2-VL-7B + FLUX.1-dev per offload
            mode, from parameter counts of the real architectures (built on the meta device) plus
            the activation estimates written out in :func:`activation_estimates`.
``gpu``     (needs CUDA) seconds per 512 px and 1024 px image and peak memory per stage for each
            offload mode, with the real Qwen2-VL-7B and FLUX.1-dev architectures and random bf16
            weights (no download). ``--smoke`` runs the same code on the CPU with 1-layer models.

    python benchmarks/bench_inference.py tiny --repeats 7
    python benchmarks/bench_inference.py memory
    python benchmarks/bench_inference.py gpu --sizes 512 1024 --offload none model sequential --steps 28
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from common import default_dtype

GiB = 1024**3

# ---- shared -------------------------------------------------------------------------------------


def ensure_tiny_kit() -> Path:
    """Use $THINKDIFF_TINY_DIR if set, else build the kit into a temporary folder."""
    if "THINKDIFF_TINY_DIR" not in os.environ:
        os.environ["THINKDIFF_TINY_DIR"] = str(Path(tempfile.mkdtemp(prefix="thinkdiff-bench-")) / "tiny")
    from thinkdiff.models.loading import resolve_tiny

    return resolve_tiny("tiny:flux").parent


def sample_items(size: int = 56) -> list[Any]:
    """A CoBSAT-style 2-shot input with two generated images."""
    import numpy as np
    from PIL import Image

    from thinkdiff.pipelines import cobsat_items

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(2)]
    return cobsat_items(["white", "blue", "red"], images)


def make_tiny_model(folder: Path, variant: str) -> Path:
    from thinkdiff.models.aligner import Aligner
    from thinkdiff.models.bundle import ThinkDiffInfo, save_model

    in_dim, source = (64, "tiny:qwen2-vl") if variant == "lvlm" else (48, "tiny:blip2-vision")
    torch.manual_seed(0)
    info = ThinkDiffInfo(variant, source, "tiny:t5", "tiny:flux", in_dim=in_dim, out_dim=32)
    return save_model(folder, Aligner(in_dim, 32), info)


class Clock:
    """Per-stage wall times of a direct run."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start


# ---- tiny: overhead over the components ---------------------------------------------------------


@torch.no_grad()
def direct_run(pipe: Any, mode: str, items: list[Any], seed: int, size: int, steps: int, cache: dict) -> dict:
    """The same work as ``pipe(Request(items, seed))``, written against the components directly."""
    from thinkdiff.data.image_caption import blip2_preprocess
    from thinkdiff.models.lvlm import SamplingSettings
    from thinkdiff.pipelines import DEFAULT_INSTRUCTION

    clock = Clock()
    flux = pipe._loaded["decoder"]
    generator = torch.Generator().manual_seed(seed)
    if mode in ("lvlm", "text-bridge"):
        extractor = pipe._loaded["lvlm"]
        if mode == "lvlm":
            sampling = SamplingSettings.exactly(128, temperature=0.6, top_p=0.9, seed=seed)
        else:
            sampling = SamplingSettings(max_new_tokens=128, temperature=0.6, top_p=0.9, seed=seed)
        with clock("lvlm"):
            # As the pipeline does: no hidden states kept by generate (lvlm: one teacher-forced
            # pass for the features; text-bridge: the text only).
            out = extractor.generate(
                [[DEFAULT_INSTRUCTION, *items]], sampling, teacher_forced=True, with_states=mode == "lvlm"
            )
        if mode == "lvlm":
            with clock("aligner"):
                prompt_embeds = pipe.aligner(out.features)
            # Like any careful caller, compute the constant CLIP("") once (FLUX's own CLIP half
            # of encode_prompt; the kept pipeline has no T5 in lvlm mode).
            if "pooled" not in cache:
                cache["pooled"] = flux._get_clip_prompt_embeds(prompt=[""])
            pooled = cache["pooled"]
        else:
            with clock("text_encoders"):
                prompt_embeds, pooled, _ = flux.encode_prompt(prompt=out.texts, max_sequence_length=512)
    else:
        vision = pipe._loaded["vision"]
        images = [it for it in items if not isinstance(it, str)]
        pixels = torch.stack([blip2_preprocess(im) for im in images])
        with clock("vision"):
            tokens = vision(pixels)
        with clock("aligner"):
            tokens = pipe.aligner(tokens)
        text = " ".join(t.strip() for t in items if isinstance(t, str) and t.strip())
        with clock("text_encoders"):
            t5, pooled, _ = flux.encode_prompt(prompt=text, max_sequence_length=128)
        prompt_embeds = torch.cat([tokens.flatten(0, 1)[None], t5], dim=1)
    with clock("decoder"):
        flux(
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled,
            generator=generator,
            height=size,
            width=size,
            num_inference_steps=steps,
        )
    return clock.times


def bench_tiny(args: argparse.Namespace) -> dict[str, Any]:
    from thinkdiff.pipelines import Request, ThinkDiffPipeline

    torch.set_num_threads(args.threads)
    ensure_tiny_kit()
    root = Path(tempfile.mkdtemp(prefix="thinkdiff-bench-models-"))
    models = {"lvlm": make_tiny_model(root / "lvlm", "lvlm"), "clip": make_tiny_model(root / "clip", "clip")}
    items = sample_items()
    results: dict[str, Any] = {"size": args.size, "steps": args.steps, "repeats": args.repeats, "modes": {}}
    for mode in args.modes:
        kwargs = {"lvlm": "tiny:qwen2-vl", "decoder": "tiny:flux"} if mode == "text-bridge" else {}
        # Cold: staged, every stage loads and releases its models (what one CLI call does).
        staged = ThinkDiffPipeline.from_pretrained(models.get(mode), device="cpu", mode=mode, **kwargs)
        start = time.perf_counter()
        cold = staged(
            Request(items, seed=0), height=args.size, width=args.size, num_inference_steps=args.steps
        )
        cold_total = time.perf_counter() - start

        # Warm: models kept; the pipeline and the direct calls share the very same modules.
        pipe = ThinkDiffPipeline.from_pretrained(
            models.get(mode), device="cpu", mode=mode, keep_loaded=True, **kwargs
        )
        pipe(Request(items, seed=0), height=args.size, width=args.size, num_inference_steps=args.steps)
        cache: dict = {}
        direct_run(pipe, mode, items, 0, args.size, args.steps, cache)  # warm-up
        totals: dict[str, list[float]] = {"pipeline": [], "direct": []}
        stages: dict[str, dict[str, list[float]]] = {"pipeline": {}, "direct": {}}
        for r in range(args.repeats):
            # Alternate the order so drift on a shared machine hits both sides alike.
            for side in ("pipeline", "direct") if r % 2 == 0 else ("direct", "pipeline"):
                start = time.perf_counter()
                if side == "pipeline":
                    out = pipe(
                        Request(items, seed=r),
                        height=args.size,
                        width=args.size,
                        num_inference_steps=args.steps,
                    )
                    times = out.timings
                else:
                    times = direct_run(pipe, mode, items, r, args.size, args.steps, cache)
                totals[side].append(time.perf_counter() - start)
                for name, value in times.items():
                    stages[side].setdefault(name, []).append(value)
        pipe_s, direct_s = statistics.median(totals["pipeline"]), statistics.median(totals["direct"])
        results["modes"][mode] = {
            "pipeline_s": pipe_s,
            "direct_s": direct_s,
            "overhead_pct": 100 * (pipe_s - direct_s) / direct_s,
            "pipeline_stages_s": {k: statistics.median(v) for k, v in stages["pipeline"].items()},
            "direct_stages_s": {k: statistics.median(v) for k, v in stages["direct"].items()},
            "cold_staged_total_s": cold_total,
            "cold_staged_stages_s": cold.timings,
        }
        pipe.release()
    return results


def print_tiny(results: dict[str, Any]) -> None:
    print(
        f"\ntiny kit, CPU, {results['size']} px, {results['steps']} steps, median of {results['repeats']} "
        "(models loaded once; pipeline and direct calls share them)\n"
    )
    print("| mode | pipeline s | direct s | overhead | pipeline stages (s) | direct stages (s) |")
    print("|---|---|---|---|---|---|")
    for mode, r in results["modes"].items():
        p = ", ".join(f"{k} {v:.4f}" for k, v in r["pipeline_stages_s"].items())
        d = ", ".join(f"{k} {v:.4f}" for k, v in r["direct_stages_s"].items())
        print(
            f"| {mode} | {r['pipeline_s']:.4f} | {r['direct_s']:.4f} | {r['overhead_pct']:+.1f}% | {p} | {d} |"
        )
    print("\ncold, staged (each stage loads, runs, releases):")
    for mode, r in results["modes"].items():
        stages = ", ".join(f"{k} {v:.3f}" for k, v in r["cold_staged_stages_s"].items())
        print(f"  {mode}: {r['cold_staged_total_s']:.3f} s ({stages})")


# ---- memory: the README table from sizes ---------------------------------------------------------

QWEN2_VL_7B_TEXT = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
}
QWEN2_VL_7B_VISION = {
    "depth": 32,
    "embed_dim": 1280,
    "hidden_size": 3584,
    "mlp_ratio": 4,
    "num_heads": 16,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}
T5_XXL = {
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_heads": 64,
    "num_layers": 24,
    "vocab_size": 32128,
    "feed_forward_proj": "gated-gelu",
}
CLIP_L_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
    "max_position_embeddings": 77,
}
# Widths cut for a CPU run of the same code (gpu_check.py --smoke): every head keeps its real head
# size (Qwen 128 with its M-RoPE sections, vision 80, T5 64, FLUX 128 with its RoPE axes) and every
# width that two components share stays equal (Qwen hidden = merger output, T5 d_model = FLUX
# joint_attention_dim = aligner output, CLIP width = FLUX pooled_projection_dim).
NARROW = {
    "text": {"hidden_size": 256, "intermediate_size": 1024, "num_attention_heads": 2, "num_key_value_heads": 1},
    "vision": {"embed_dim": 160, "num_heads": 2, "hidden_size": 256},
    "t5": {"d_model": 256, "d_ff": 640, "num_heads": 4},
    "clip": {"hidden_size": 128, "intermediate_size": 512, "num_attention_heads": 2, "projection_dim": 128},
    "transformer": {"num_attention_heads": 2, "joint_attention_dim": 256, "pooled_projection_dim": 128},
    "vae": {"block_out_channels": (32, 32, 32, 32), "layers_per_block": 1},
}

FLUX_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 16,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "shift_factor": 0.1159,
    "scaling_factor": 0.3611,
}


def qwen2_vl_7b_config(depth: int | None = None, template: Path | None = None, narrow: bool = False) -> Any:
    """Qwen2-VL-7B-Instruct's architecture; token ids from ``template`` (a processor's config).

    ``depth`` replaces both towers' layer counts; ``narrow`` uses the :data:`NARROW` widths.
    """
    from transformers import Qwen2VLConfig

    values: dict[str, Any] = json.loads((template / "config.json").read_text()) if template else {}
    text = {**values.get("text_config", {}), **QWEN2_VL_7B_TEXT, **(NARROW["text"] if narrow else {})}
    vision = {**values.get("vision_config", {}), **QWEN2_VL_7B_VISION, **(NARROW["vision"] if narrow else {})}
    if depth is not None:
        text["num_hidden_layers"], vision["depth"] = depth, depth
    text["max_window_layers"] = text["num_hidden_layers"]
    text["layer_types"] = ["full_attention"] * text["num_hidden_layers"]
    values.update(text_config=text, vision_config=vision, tie_word_embeddings=False)
    return Qwen2VLConfig(**values)


def flux_dev_modules(depth: int | None = None, narrow: bool = False) -> dict[str, tuple[type, Any]]:
    """FLUX.1-dev's components as (class, constructor kwargs/config); ``narrow``: :data:`NARROW` widths."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    cut = NARROW if narrow else {}
    transformer = {"guidance_embeds": True, **cut.get("transformer", {})}
    t5 = {**T5_XXL, **cut.get("t5", {})}
    clip = {**CLIP_L_TEXT, **cut.get("clip", {})}
    if depth is not None:
        transformer.update(num_layers=depth, num_single_layers=depth)
        t5["num_layers"] = depth
        clip["num_hidden_layers"] = depth
    return {
        "transformer": (FluxTransformer2DModel, transformer),
        "vae": (AutoencoderKL, {**FLUX_VAE, **cut.get("vae", {})}),
        "text_encoder": (CLIPTextModel, CLIPTextConfig(**clip)),
        "text_encoder_2": (T5EncoderModel, T5Config(**t5, is_encoder_decoder=False, use_cache=False)),
    }


def build(cls: type, spec: Any) -> torch.nn.Module:
    return cls(**spec) if isinstance(spec, dict) else cls(spec)


def parameter_counts() -> dict[str, int]:
    """Parameters of each real component, counted on the meta device (no memory, no download)."""
    from transformers import Blip2VisionConfig, Blip2VisionModel, Qwen2VLForConditionalGeneration

    counts = {}
    with torch.device("meta"):
        counts["Qwen2-VL-7B"] = sum(
            p.numel() for p in Qwen2VLForConditionalGeneration(qwen2_vl_7b_config()).parameters()
        )
        counts["EVA ViT-g/14 (BLIP-2)"] = sum(
            p.numel() for p in Blip2VisionModel(Blip2VisionConfig()).parameters()
        )
        for name, (cls, spec) in flux_dev_modules().items():
            counts[f"FLUX.1-dev {name}"] = sum(p.numel() for p in build(cls, spec).parameters())
    return counts


def activation_estimates(size: int, text_tokens: int = 128) -> dict[str, float]:
    """Rough activation peaks in GiB at batch 1, bf16 (to be replaced by measurements on a GPU).

    - LVLM: prompt of ~1.4k tokens (4 CoBSAT images at ~324 tokens each + text): generate keeps no
      hidden states (the features come from one teacher-forced pass: final states 1.5k x 3584 x 2 B
      = 0.01 GB), KV cache (0.09 GB), the prefill MLP (1.4k x 18944 x 3 tensors x 2 B = 0.16 GB),
      vision tower (< 0.1 GB): ~0.4, taken as 1.0.
    - FLUX transformer: T = (size/16)^2 + text tokens; a single-stream block holds ~52k values per
      token at once (norm, qkv, attention out, 4x MLP, concat): T x 52k x 2 B, x1.5 for the residual
      streams and the scheduler's latents.
    - VAE decode: the last two up-blocks run at full resolution with 256 then 128 channels; the
      upsampler output, the conv after it and a resnet's intermediates are alive together: taken
      as 4 tensors of size^2 x 256 x 2 B (2 GiB at 1024 px, 0.5 GiB at 512 px).
    """
    tokens = (size // 16) ** 2 + text_tokens
    return {
        "lvlm": 1.0,
        "transformer": tokens * 52_000 * 2 * 1.5 / GiB,
        "vae_decode": size * size * 256 * 2 * 4 / GiB,
        "text_encoders": 0.1,
    }


def memory_table(counts: dict[str, int], dtype_bytes: int = 2) -> dict[str, Any]:
    """Peak GPU memory (GiB) per offload mode for ThinkDiff-LVLM with Qwen2-VL-7B + FLUX.1-dev."""
    w = {k: v * dtype_bytes / GiB for k, v in counts.items()}
    qwen, tr = w["Qwen2-VL-7B"], w["FLUX.1-dev transformer"]
    vae, clip, t5 = w["FLUX.1-dev vae"], w["FLUX.1-dev text_encoder"], w["FLUX.1-dev text_encoder_2"]
    # Sequential offload keeps one leaf module on the GPU at a time; the largest leaves are T5's
    # 32128 x 4096 embedding (0.25 GiB) and FLUX's 15360 x 3072 proj_out (0.09 GiB).
    leaf = 32128 * 4096 * dtype_bytes / GiB
    aligner = (3584 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096) * 4 / GiB  # fp32, Qwen2-VL-7B -> 4096
    rows = {}
    for size in (512, 1024):
        act = activation_estimates(size)
        # The LVLM is never offloaded (it fits 24 GB on its own); the fp32 aligner joins it.
        lvlm_stage = qwen + aligner + act["lvlm"]
        stages = {
            "none": {
                "lvlm": lvlm_stage,
                "text (lvlm mode: CLIP only)": clip + act["text_encoders"],
                "text (clip/text-bridge: CLIP+T5)": clip + t5 + act["text_encoders"],
                "denoise+VAE": tr + vae + max(act["transformer"], act["vae_decode"]),
            },
            "model": {
                "lvlm": lvlm_stage,
                "text (lvlm mode: CLIP only)": clip + act["text_encoders"],
                "text (clip/text-bridge: CLIP+T5)": t5 + act["text_encoders"],
                "denoise+VAE": max(tr + act["transformer"], vae + act["vae_decode"]),
            },
            "sequential": {
                "lvlm": lvlm_stage,
                "text (lvlm mode: CLIP only)": leaf + act["text_encoders"],
                "text (clip/text-bridge: CLIP+T5)": leaf + act["text_encoders"],
                "denoise+VAE": leaf + max(act["transformer"], act["vae_decode"]),
            },
        }
        rows[size] = {
            mode: {**s, "peak (lvlm mode)": max(v for k, v in s.items() if "clip/" not in k)}
            for mode, s in stages.items()
        }
    unstaged = qwen + tr + vae + clip + t5 + activation_estimates(1024)["transformer"]
    return {"weights_gib": w, "rows": rows, "unstaged_none_1024_gib": unstaged}


def print_memory(table: dict[str, Any], counts: dict[str, int]) -> None:
    print("\nparameters (bf16 weights):")
    for name, n in counts.items():
        print(f"  {name:32s} {n / 1e9:7.3f} B  {table['weights_gib'][name]:6.2f} GiB")
    for size, rows in table["rows"].items():
        print(f"\nThinkDiff-LVLM, Qwen2-VL-7B + FLUX.1-dev, {size} px, batch 1 (GiB, estimates)")
        names = list(next(iter(rows.values())))
        print("| offload | " + " | ".join(names) + " |")
        print("|---" * (len(names) + 1) + "|")
        for mode, stages in rows.items():
            print(f"| {mode} | " + " | ".join(f"{stages[n]:.1f}" for n in names) + " |")
    print(
        f"\nwithout staging (everything resident, offload none, 1024 px): {table['unstaged_none_1024_gib']:.1f} GiB"
    )


# ---- gpu: real architectures, random weights -----------------------------------------------------


def random_flux_decoder_class() -> type:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    from thinkdiff.models.loading import resolve_tiny
    from thinkdiff.pipelines.decoders import FluxDecoder

    class RandomFluxDecoder(FluxDecoder):
        """FLUX.1-dev with random weights, built directly where it will run (no files)."""

        def __init__(self, spec: Any, device: torch.device, dtype: torch.dtype, offload: str = "none") -> None:
            # --smoke runs the offload branch (build, move to the CPU, diffusers' hooks) with the
            # CPU as the hooks' execution device. The library refuses that, for it saves nothing.
            if offload not in ("none", "model", "sequential", "group"):
                raise ValueError(f"unknown offload mode {offload!r}")
            if offload == "sequential" and device.type == "cpu":
                # accelerate 1.15's sequential hooks fail with the CPU as execution device (a
                # TypeError moving a weight back to meta); on a GPU this branch is unverified.
                raise ValueError("sequential offload needs a GPU as the hooks' execution device")
            if offload == "group" and device.type == "cpu":
                raise ValueError("group offload streams blocks to a GPU (CUDA streams); it needs a GPU")
            super().__init__(spec, device, dtype, "none" if device.type == "cpu" else offload)  # type: ignore[arg-type]
            self.offload = offload  # type: ignore[assignment]

        depth: int | None = None
        narrow: bool = False

        def _component_config(self, component: str) -> dict[str, Any]:
            # No folder: the size checks read the configs this decoder builds from.
            config = flux_dev_modules(self.depth, self.narrow).get(component, (None, {}))[1]
            return config if isinstance(config, dict) else config.to_dict()

        def build(self, components: Sequence[str]) -> Any:
            kit = resolve_tiny("tiny:flux")
            modules: dict[str, Any] = {name: None for name in self.all_components}
            # Build on the device (random init is fast there); offloaded pipelines then start
            # from the CPU, as after from_pretrained.
            for name, (cls, spec) in flux_dev_modules(self.depth, self.narrow).items():
                if name in components:
                    with torch.device(self.device), default_dtype(self.dtype):
                        module = build(cls, spec).eval()
                    modules[name] = module.to("cpu") if self.offload != "none" else module
            if "text_encoder" in components:
                modules["tokenizer"] = CLIPTokenizer.from_pretrained(kit / "tokenizer")
            if "text_encoder_2" in components:
                modules["tokenizer_2"] = T5TokenizerFast.from_pretrained(kit / "tokenizer_2")
            scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(kit / "scheduler")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return FluxPipeline(scheduler=scheduler, **modules)

    return RandomFluxDecoder


def random_lvlm(device: torch.device, dtype: torch.dtype, depth: int | None, narrow: bool = False) -> Any:
    """Qwen2-VL-7B (or :data:`NARROW`) with random weights, built in ``dtype`` on ``device``."""
    from transformers import Qwen2VLForConditionalGeneration

    from thinkdiff.models.loading import resolve_tiny
    from thinkdiff.models.lvlm import LVLMFeatureExtractor, load_processor

    kit = resolve_tiny("tiny:qwen2-vl")
    config = qwen2_vl_7b_config(depth, template=kit, narrow=narrow)
    with torch.device(device), default_dtype(dtype):
        model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    return LVLMFeatureExtractor(model, load_processor(kit), max_images=16)


def random_flux(depth: int | None = None, narrow: bool = False) -> tuple[Any, type]:
    """The spec of a random FLUX.1-dev (or :data:`NARROW`) and the decoder class that builds it."""
    from thinkdiff.pipelines import DecoderSpec

    modules = flux_dev_modules(depth, narrow)
    prompt_width = modules["transformer"][1].get("joint_attention_dim", T5_XXL["d_model"])
    pooled_width = modules["text_encoder"][1].hidden_size
    spec = DecoderSpec("random:FLUX.1-dev", "flux", "FluxPipeline", prompt_width, pooled_width, None, True)
    decoder_cls = random_flux_decoder_class()
    decoder_cls.depth, decoder_cls.narrow = depth, narrow
    return spec, decoder_cls


def gpu_run(
    offload: str,
    size: int,
    steps: int,
    device: torch.device,
    dtype: torch.dtype,
    depth: int | None = None,
    narrow: bool = False,
    *,
    decoder_folder: Path | None = None,
    quantize: str = "none",
    lvlm_tokens: int = 128,
) -> dict[str, Any]:
    """One ThinkDiff-LVLM image through ThinkDiffPipeline with random Qwen2-VL-7B + FLUX.1-dev.

    ``depth``/``narrow`` shape the random models built in place. With ``decoder_folder`` the
    decoder is instead loaded from that folder by the pipeline's own loader (with ``quantize``).
    ``lvlm_tokens``: the tokens the LVLM generates (ThinkDiff's 128; fewer for a quick CPU run).
    Returns seconds per image (stages without loads), the stage timings and peak memory per stage.
    """
    from thinkdiff.models.aligner import Aligner
    from thinkdiff.models.bundle import ThinkDiffInfo
    from thinkdiff.pipelines import DecoderSpec, InferenceSettings, Request, ThinkDiffPipeline

    ensure_tiny_kit()
    features = NARROW["text"]["hidden_size"] if narrow else QWEN2_VL_7B_TEXT["hidden_size"]
    spec, decoder_cls = random_flux(depth, narrow)
    if decoder_folder is not None:
        spec = DecoderSpec.inspect(decoder_folder)
    prompt_width = spec.prompt_width
    info = ThinkDiffInfo(
        "lvlm", "random:Qwen2-VL-7B", "google/flan-t5-xxl", spec.name, in_dim=features, out_dim=prompt_width
    )
    items = sample_items(size=448)  # 2 images of 256 visual tokens each after merging
    pipe = ThinkDiffPipeline(
        "lvlm",
        spec,
        aligner=Aligner(features, prompt_width),
        info=info,
        source_model=info.source_model,
        device=device,
        dtype=dtype,
        # The random decoder is swapped in below with the offload; the library's own decoder (from a
        # folder) gets it here, and refuses an offload on the CPU.
        offload=offload if decoder_folder is not None else "none",  # type: ignore[arg-type]
        quantize=quantize,  # type: ignore[arg-type]
        settings=InferenceSettings(num_tokens=lvlm_tokens),
    )
    if decoder_folder is None:
        pipe.decoder = decoder_cls(spec, device, dtype, offload)
    pipe._load_lvlm = lambda: random_lvlm(device, dtype, depth, narrow)  # type: ignore[method-assign]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        out = pipe(Request(items, seed=0), height=size, width=size, num_inference_steps=steps)
    finally:
        total = time.perf_counter() - start
        pipe.release()
    compute = {k: v for k, v in out.timings.items() if not k.startswith("load_")}
    return {
        "offload": offload,
        "quantize": quantize,
        "size": size,
        "steps": steps,
        "seconds_per_image": sum(compute.values()),
        "seconds_with_loads": total,
        "timings": out.timings,
        "peak_gib": {k: v / GiB for k, v in out.peak_memory.items()},
        "peak_compute_gib": max(
            (v for k, v in out.peak_memory.items() if not k.startswith("load_")), default=0
        )
        / GiB,
    }


def bench_gpu(args: argparse.Namespace) -> dict[str, Any]:
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("the gpu benchmark needs CUDA (use --smoke to run its code on the CPU)")
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    depth = 1 if args.smoke else None
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if not args.smoke else "cpu",
        "dtype": "fp32" if dtype == torch.float32 else "bf16",
        "runs": [],
    }
    for offload in args.offload:
        if args.smoke and offload == "sequential":
            print("smoke: sequential offload skipped (its hooks need a GPU execution device)", flush=True)
            continue
        sizes, steps = args.sizes, args.steps
        if offload == "sequential":
            # It moves the whole transformer host-to-device at every step (28 x 23.8 GB at the
            # defaults): a few steps at the small size show its cost without dominating the run.
            sizes = [s for s in sizes if s <= args.sequential_max_size] or [min(sizes)]
            steps = min(steps, args.sequential_steps)
        for size in sizes:
            run = gpu_run(offload, size, steps, device, dtype, depth, narrow=args.narrow)
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
    return results


def print_gpu(results: dict[str, Any]) -> None:
    print(
        f"\n{results['device']}: ThinkDiff-LVLM, Qwen2-VL-7B + FLUX.1-dev architectures, random "
        f"{results.get('dtype', 'bf16')} weights"
    )
    print("| offload | px | steps | s / image (no loads) | peak GiB (compute stages) | decoder s |")
    print("|---|---|---|---|---|---|")
    for r in results["runs"]:
        print(
            f"| {r['offload']} | {r['size']} | {r['steps']} | {r['seconds_per_image']:.2f} | "
            f"{r['peak_compute_gib']:.1f} | {r['timings'].get('decoder', 0):.2f} |"
        )


# ---- main ----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    p = sub.add_parser("tiny", help="pipeline overhead on the tiny kit (CPU)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--modes", nargs="+", default=["lvlm", "clip", "text-bridge"])
    p.add_argument("--json", type=Path, help="also write the results here")
    p = sub.add_parser("memory", help="the README memory table, from parameter counts")
    p.add_argument("--json", type=Path)
    p = sub.add_parser("gpu", help="seconds and peak memory per offload mode (CUDA)")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--offload", nargs="+", default=["none", "model", "sequential"], choices=["none", "model", "sequential"])
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--sequential-steps", type=int, default=4, help="most denoising steps of a sequential-offload run")
    p.add_argument("--sequential-max-size", type=int, default=512, help="largest size run with sequential offload")
    p.add_argument("--smoke", action="store_true",
                   help="1-layer models on the CPU: checks the code path (offload none and model)")  # fmt: skip
    p.add_argument("--narrow", action="store_true", help="narrow widths too (a quicker smoke)")
    p.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    run: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
        "tiny": bench_tiny,
        "gpu": bench_gpu,
    }
    if args.part == "memory":
        counts = parameter_counts()
        table = memory_table(counts)
        print_memory(table, counts)
        results: dict[str, Any] = {"counts": counts, **table}
    else:
        results = run[args.part](args)
        (print_tiny if args.part == "tiny" else print_gpu)(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
