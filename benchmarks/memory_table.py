"""Peak GPU memory of ThinkDiff-LVLM per decoder x offload x quantization, at 512 and 1024 px.

Computed, not measured: every component is built with its real architecture on the meta device
(no memory, no download) and its parameters are counted, split into what ``--quantize`` quantizes
(the ``nn.Linear`` weights of the LVLM, the decoder's transformer and its T5 encoder; the LVLM's
``lm_head`` stays bf16 as transformers keeps output embeddings) and the rest (bf16). Bytes per
quantized weight: bf16 2, int8 / fp8 1 (+ one bf16 scale per row), nf4 0.5 + 1/64 (one absmax per
64 values, double-quantized). Activations are *estimates* (see :func:`activations`), as in
``bench_inference.py memory``; measured peaks come from ``benchmarks/gpu_check.py``.

ThinkDiff runs in stages and releases each before the next, so the peak is the largest stage:

1. the LVLM (Qwen2-VL-7B, never offloaded) + the fp32 aligner;
2. the decoder's text encoders: FLUX.1-dev in lvlm mode needs only CLIP (pooled vector of ""),
   SD3 its two CLIPs and T5, the decoders with classifier-free guidance on by default (Chroma,
   PixArt-Sigma, SD3, LTX-Video) T5-XXL for the negative T5("");
3. the transformer and the VAE (denoising, then decoding).

Offload modes (the decoder's stages only): ``none`` everything of a stage resident; ``model`` one
whole model at a time; ``sequential`` one leaf module at a time; ``group`` two transformer blocks
at a time (the running one and the one being copied) plus everything outside the blocks.
bitsandbytes (nf4) models cannot be sequentially offloaded: those cells are n/a.

    python benchmarks/memory_table.py            # the tables and the per-budget answer
    python benchmarks/memory_table.py --json out.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench_inference import CLIP_L_TEXT, FLUX_VAE, T5_XXL, qwen2_vl_7b_config
from thinkdiff.models.quantization import offload_conflict

GiB = 1024**3
QUANTIZATIONS = ("none", "int8", "fp8", "nf4")
OFFLOADS = ("none", "model", "group", "sequential")
SIZES = (512, 1024)
BUDGETS_GB = (8, 12, 16, 24, 80)
CUDA_CONTEXT_GIB = 0.6
"""What the CUDA context and allocator slack take beside the tensors (a budget must hold it too)."""
QUANTIZED_BYTES = {"none": 2.0, "int8": 1.0, "fp8": 1.0, "nf4": 0.5 + 1 / 64}


@dataclass
class Weights:
    """Parameter counts of one model: quantizable linear weights, the rest, its largest leaf
    module and its largest block (an element of a ``ModuleList``), all on the meta device."""

    linear: int
    other: int
    largest_leaf: int
    largest_block: int
    in_blocks: int

    def gib(self, quantize: str) -> float:
        return (self.linear * QUANTIZED_BYTES[quantize] + self.other * 2) / GiB

    def block_gib(self, quantize: str) -> float:
        share = self.linear / max(self.linear + self.other, 1)  # blocks are mostly linear weights
        return self.largest_block * (share * QUANTIZED_BYTES[quantize] + (1 - share) * 2) / GiB

    def outside_blocks_gib(self, quantize: str) -> float:
        return max(self.gib(quantize) - (self.in_blocks / max(self.linear + self.other, 1)) * self.gib(quantize), 0)


def count(build: Callable[[], torch.nn.Module], keep_bf16: tuple[str, ...] = ()) -> Weights:
    """Build on the meta device and count; modules named in ``keep_bf16`` are never quantized."""
    with torch.device("meta"):
        model = build()
    linear = other = 0
    for name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            quantizable = isinstance(module, torch.nn.Linear) and param_name == "weight"
            if quantizable and not any(name.endswith(k) for k in keep_bf16):
                linear += param.numel()
            else:
                other += param.numel()
    leaves = [sum(p.numel() for p in m.parameters()) for m in model.modules() if not list(m.children())]
    blocks = [sum(p.numel() for p in b.parameters()) for m in model.modules() if isinstance(m, torch.nn.ModuleList) for b in m]
    return Weights(linear, other, max(leaves), max(blocks, default=0), sum(blocks))


# ---- the real architectures ------------------------------------------------------------------------


def t5_xxl() -> torch.nn.Module:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**T5_XXL, is_encoder_decoder=False, use_cache=False))


def clip_l(projection: bool = False) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(CLIPTextConfig(**CLIP_L_TEXT))


def clip_g() -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
        num_attention_heads=20, projection_dim=1280, max_position_embeddings=77, hidden_act="gelu",
    )  # fmt: skip
    return CLIPTextModelWithProjection(config)


def vae(**overrides: Any) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**{**FLUX_VAE, **overrides})


@dataclass
class Decoder:
    """One decoder's components and what its activations look like."""

    name: str
    transformer: Callable[[], torch.nn.Module]
    vae: Callable[[], torch.nn.Module]
    text: dict[str, Callable[[], torch.nn.Module]]
    """Stage 2 in lvlm mode with its default guidance: name -> builder (T5-XXL as ``t5``, quantized
    with the transformer)."""
    hidden: int
    """The transformer's width (its activations scale with it)."""
    tokens: Callable[[int], int]
    """Image (or video) tokens at a size."""
    cfg_batch: int
    """2 where classifier-free guidance runs the negative in the same batch (PixArt, SD3, LTX)."""
    vae_decode: Callable[[int], float]
    """Estimated VAE decode peak (GiB) at a size."""
    text_tokens: int = 128


def image_vae_decode(size: int) -> float:
    # The last two up-blocks of the FLUX / SD3 / SDXL VAE run at full resolution with 256 then
    # 128 channels; ~4 tensors of size^2 x 256 x 2 B are alive together (bench_inference's estimate).
    return size * size * 256 * 2 * 4 / GiB


def ltx_vae_decode(size: int, frames: int = 161) -> float:
    # LTX-Video's VAE decodes all frames at once; its last block runs at size / 4 (patch size 4)
    # with 128 channels: ~4 such tensors alive together.
    return frames * (size // 4) ** 2 * 128 * 2 * 4 / GiB


def ltx_tokens(size: int, frames: int = 161) -> int:
    return ((frames - 1) // 8 + 1) * (size // 32) ** 2


def decoders() -> list[Decoder]:
    from diffusers import (
        AutoencoderKLLTXVideo,
        ChromaTransformer2DModel,
        FluxTransformer2DModel,
        LTXVideoTransformer3DModel,
        PixArtTransformer2DModel,
        SD3Transformer2DModel,
    )

    def image_tokens(size: int) -> int:
        return (size // 16) ** 2  # VAE factor 8, 2x2 patches

    def sd35(layers: int, heads: int, pos: int, dual: tuple[int, ...] = ()) -> Callable[[], torch.nn.Module]:
        return lambda: SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, num_layers=layers, attention_head_dim=64,
            num_attention_heads=heads, joint_attention_dim=4096, caption_projection_dim=64 * heads,
            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=pos, dual_attention_layers=dual,
            qk_norm="rms_norm",
        )  # fmt: skip

    sdxl_vae = {"latent_channels": 4, "use_quant_conv": True, "use_post_quant_conv": True}
    sd3_text = {"clip_l": lambda: clip_l(projection=True), "clip_g": clip_g, "t5": t5_xxl}
    return [
        Decoder(
            "FLUX.1-dev", lambda: FluxTransformer2DModel(guidance_embeds=True), vae, {"clip_l": clip_l},
            3072, image_tokens, 1, image_vae_decode,
        ),
        Decoder(
            "Chroma1-HD", ChromaTransformer2DModel, vae, {"t5": t5_xxl}, 3072, image_tokens, 1,
            image_vae_decode,
        ),
        Decoder(
            "PixArt-Sigma XL 1024",
            lambda: PixArtTransformer2DModel(
                num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                cross_attention_dim=1152, sample_size=128, patch_size=2, caption_channels=4096,
                use_additional_conditions=False, interpolation_scale=2,
            ),
            lambda: vae(**sdxl_vae), {"t5": t5_xxl}, 1152, image_tokens, 2, image_vae_decode,
        ),
        Decoder("SD3.5 Large", sd35(38, 38, 192), vae, sd3_text, 2432, image_tokens, 2, image_vae_decode, 128 + 77),
        Decoder(
            "SD3.5 Medium", sd35(24, 24, 384, tuple(range(13))), vae, sd3_text, 1536, image_tokens, 2,
            image_vae_decode, 128 + 77,
        ),
        Decoder(
            "LTX-Video 2B (161 frames)", LTXVideoTransformer3DModel, AutoencoderKLLTXVideo, {"t5": t5_xxl},
            2048, ltx_tokens, 2, ltx_vae_decode,
        ),
        Decoder(
            "LTX-Video 13B (161 frames)",
            lambda: LTXVideoTransformer3DModel(num_layers=48, attention_head_dim=128, cross_attention_dim=4096),
            AutoencoderKLLTXVideo, {"t5": t5_xxl}, 4096, ltx_tokens, 2, ltx_vae_decode,
        ),
    ]  # fmt: skip


def transformer_activations(decoder: Decoder, size: int) -> float:
    """Estimated transformer activation peak (GiB): per token ~17 x width values alive in a block
    (norm, qkv, attention output, the 4x MLP; FLUX's single-stream block: 52k values at width
    3072), bf16, x1.5 for the residual streams and the latents; doubled for batched CFG."""
    tokens = decoder.tokens(size) + decoder.text_tokens
    return decoder.cfg_batch * tokens * 17 * decoder.hidden * 2 * 1.5 / GiB


# ---- the table -----------------------------------------------------------------------------------------


def lvlm_stage(quantize: str) -> float:
    from transformers import Qwen2VLForConditionalGeneration

    weights = count(lambda: Qwen2VLForConditionalGeneration(qwen2_vl_7b_config()), keep_bf16=("lm_head",))
    aligner = (3584 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096) * 4 / GiB  # fp32
    return weights.gib(quantize) + aligner + 1.0  # + activations (bench_inference's estimate)


def stage_peaks(decoder: Decoder, weights: dict[str, Weights], size: int, offload: str, quantize: str) -> dict[str, float]:
    """GiB per stage of the decoder (text, denoise) for one configuration."""
    def quantized(name: str) -> str:
        return quantize if name in ("transformer", "text:t5") else "none"

    text = {name: weights[name].gib(quantized(name)) for name in weights if name.startswith("text:")}
    tr, vae_w = weights["transformer"].gib(quantize), weights["vae"].gib("none")
    act_tr, act_vae = transformer_activations(decoder, size), decoder.vae_decode(size)
    text_act = 0.1
    if offload == "none":
        return {"text": sum(text.values()) + text_act, "denoise": tr + vae_w + max(act_tr, act_vae)}
    if offload == "model":
        return {"text": max(text.values()) + text_act, "denoise": max(tr + act_tr, vae_w + act_vae)}
    if offload == "group":
        block = weights["transformer"].block_gib(quantize)
        outside = weights["transformer"].outside_blocks_gib(quantize)
        t5_block = max((w.block_gib(quantized(n)) for n, w in weights.items() if n.startswith("text:")), default=0)
        return {
            "text": 2 * t5_block + 0.25 + text_act,  # + T5's 32128 x 4096 embedding
            "denoise": max(outside + 2 * block + act_tr, vae_w + act_vae),
        }
    leaf = max(w.largest_leaf for w in weights.values()) * 2 / GiB
    return {"text": leaf + text_act, "denoise": leaf + max(act_tr, act_vae)}


def build_table() -> dict[str, Any]:
    lvlm = {q: lvlm_stage(q) for q in QUANTIZATIONS}
    rows = []
    for decoder in decoders():
        weights = {"transformer": count(decoder.transformer), "vae": count(decoder.vae)}
        weights |= {f"text:{name}": count(build) for name, build in decoder.text.items()}
        params = {name: (w.linear + w.other) / 1e9 for name, w in weights.items()}
        for offload in OFFLOADS:
            for quantize in QUANTIZATIONS:
                row: dict[str, Any] = {"decoder": decoder.name, "offload": offload, "quantize": quantize}
                if offload_conflict(quantize, offload) is not None:  # refused by the pipeline too
                    rows.append({**row, "n/a": True})
                    continue
                for size in SIZES:
                    stages = {"lvlm": lvlm[quantize], **stage_peaks(decoder, weights, size, offload, quantize)}
                    row[size] = {**{k: round(v, 2) for k, v in stages.items()}, "peak": round(max(stages.values()), 2)}
                rows.append(row)
        rows.append({"decoder": decoder.name, "parameters_billion": {k: round(v, 3) for k, v in params.items()}})
    return {"lvlm_gib": {k: round(v, 2) for k, v in lvlm.items()}, "rows": rows}


def fits(row: dict[str, Any], size: int, budget_gb: int) -> bool:
    return size in row and row[size]["peak"] + CUDA_CONTEXT_GIB <= budget_gb


def answer(table: dict[str, Any], size: int = 1024) -> dict[int, list[str]]:
    """Per budget: each decoder's lightest-offload, least-quantized configuration that fits."""
    preference = [(o, q) for o in OFFLOADS for q in QUANTIZATIONS]  # faster offload first, then quality
    out: dict[int, list[str]] = {}
    for budget in BUDGETS_GB:
        found = []
        for name in dict.fromkeys(r["decoder"] for r in table["rows"]):
            rows = {(r["offload"], r["quantize"]): r for r in table["rows"] if r["decoder"] == name and "offload" in r}
            for offload, quantize in preference:
                row = rows[(offload, quantize)]
                if fits(row, size, budget):
                    found.append(f"{name} ({quantize}, offload {offload})")
                    break
        out[budget] = found
    return out


def print_table(table: dict[str, Any]) -> None:
    print("LVLM stage (Qwen2-VL-7B + aligner + ~1 GiB activations), GiB:", table["lvlm_gib"])
    for size in SIZES:
        print(f"\n### {size} px: peak GiB (largest stage), ThinkDiff-LVLM, batch 1; weights counted, activations estimated")
        print("| decoder | offload | " + " | ".join(QUANTIZATIONS) + " |")
        print("|---|---|" + "---|" * len(QUANTIZATIONS))
        for name in dict.fromkeys(r["decoder"] for r in table["rows"]):
            for offload in OFFLOADS:
                cells = []
                for quantize in QUANTIZATIONS:
                    (row,) = [
                        r for r in table["rows"]
                        if r["decoder"] == name and r.get("offload") == offload and r.get("quantize") == quantize
                    ]  # fmt: skip
                    if row.get("n/a"):
                        cells.append("n/a")
                    else:
                        stage = max((k for k in row[size] if k != "peak"), key=lambda k: row[size][k])
                        cells.append(f"{row[size]['peak']:.1f} ({stage})")
                print(f"| {name} | {offload} | " + " | ".join(cells) + " |")
    for size in SIZES:
        print(f"\nWhat runs at {size} px (peak + {CUDA_CONTEXT_GIB} GiB CUDA context within the card):")
        for budget, found in answer(table, size).items():
            print(f"  {budget:3d} GB: " + ("; ".join(found) if found else "nothing"))
    print("\nparameters (billions):")
    for row in table["rows"]:
        if "parameters_billion" in row:
            print(f"  {row['decoder']}: {row['parameters_billion']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    table = build_table()
    print_table(table)
    if args.json:
        args.json.write_text(json.dumps({**table, "answer_1024": answer(table)}, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
