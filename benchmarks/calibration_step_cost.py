"""FLOPs and peak memory of one calibration step for FLUX.1-dev, computed from the sizes (meta device).

No weights and no GPU: the FLUX.1-dev transformer is built on the meta device from its published
config; ``torch.utils.flop_counter.FlopCounterMode`` counts the FLOPs of one forward pass at each
image size, and memory is the sum of the resident weights plus the activations activation
checkpointing keeps (each block's input), plus one block's activations recomputed in backward.

One step per sample (``noise_source='pure'`` or ``'source'``) = teacher forward (no grad) +
student forward + backward to the conditioning (about one forward: no weight gradients, the
transformer is frozen) + the recomputation of checkpointing (one forward) = about 4 forwards.
``'teacher'`` noise (the default) first runs j ~ U{0..teacher_steps-1} teacher Euler steps from
noise: (teacher_steps - 1) / 2 more forwards on average, 5.5 with the default 4 steps.

    .venv/bin/python benchmarks/calibration_step_cost.py [--batch 1] [--text-tokens 128] [--teacher-steps 4]
"""

from __future__ import annotations

import argparse

import torch

# black-forest-labs/FLUX.1-dev transformer/config.json
FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
T5_XXL_ENCODER_PARAMS = 4_762_310_656  # google/t5-v1_1-xxl encoder (FLUX text_encoder_2)
CLIP_L_TEXT_PARAMS = 123_060_480  # openai/clip-vit-large-patch14 text model (FLUX text_encoder)
QWEN2VL_7B_WIDTH = 3584


def forward_flops(transformer, image_tokens: int, text_tokens: int, batch: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        hidden = torch.empty(batch, image_tokens, 64)
        text = torch.empty(batch, text_tokens, 4096)
        pooled = torch.empty(batch, 768)
        t = torch.empty(batch)
        img_ids = torch.zeros(image_tokens, 3)
        txt_ids = torch.zeros(text_tokens, 3)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        transformer(
            hidden_states=hidden, timestep=t, guidance=t, pooled_projections=pooled,
            encoder_hidden_states=text, txt_ids=txt_ids, img_ids=img_ids, return_dict=False,
        )  # fmt: skip
    return counter.get_total_flops()


def main() -> None:
    from diffusers import FluxTransformer2DModel

    from thinkdiff.models.aligner import Aligner

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--text-tokens", type=int, default=128, help="aligned tokens (= teacher T5 tokens)")
    parser.add_argument("--teacher-steps", type=int, default=4, help="'teacher' noise: Euler steps of its path")
    args = parser.parse_args()
    teacher_forwards = 4 + (args.teacher_steps - 1) / 2
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**FLUX_DEV)
        aligner = Aligner(QWEN2VL_7B_WIDTH, 4096)
    n_flux = sum(p.numel() for p in transformer.parameters())
    n_aligner = sum(p.numel() for p in aligner.parameters())
    gib = 1024**3
    resident = 2 * (n_flux + T5_XXL_ENCODER_PARAMS + CLIP_L_TEXT_PARAMS) + 16 * n_aligner  # bf16; fp32 + Adam
    print(f"FLUX.1-dev transformer {n_flux / 1e9:.2f} B params; aligner {n_aligner / 1e6:.1f} M")
    print(
        f"| size | image tokens | forward TFLOPs | step TFLOPs, pure/source noise (4 fwd) | step TFLOPs, teacher "
        f"noise ({teacher_forwards:g} fwd) | checkpointed activations GiB | peak GiB |"
    )
    print("|---|---|---|---|---|---|---|")
    width = FLUX_DEV["num_attention_heads"] * FLUX_DEV["attention_head_dim"]
    blocks = FLUX_DEV["num_layers"] + FLUX_DEV["num_single_layers"]
    for size in (256, 512):
        tokens = (size // 16) ** 2
        flops = forward_flops(transformer, tokens, args.text_tokens, args.batch)
        seq = tokens + args.text_tokens
        kept = blocks * args.batch * seq * width * 2  # each block's bf16 input, kept for backward
        # One recomputed block in backward: ~ 12 activations of [seq, width] (qkv, attention, MLP x4) in bf16.
        block = 12 * args.batch * seq * width * 2 + 4 * args.batch * seq * width * 4 * 2
        peak = resident + kept + block
        print(
            f"| {size} px | {tokens} | {flops / 1e12:.2f} | {4 * flops / 1e12:.2f} | "
            f"{teacher_forwards * flops / 1e12:.2f} | {kept / gib:.2f} | {peak / gib:.1f} |"
        )
    print(
        f"resident: FLUX {2 * n_flux / gib:.1f} GiB + T5-XXL encoder {2 * T5_XXL_ENCODER_PARAMS / gib:.1f} GiB "
        f"(releasable once every teacher state is cached) + CLIP-L {2 * CLIP_L_TEXT_PARAMS / gib:.2f} GiB + aligner "
        f"with AdamW {16 * n_aligner / gib:.2f} GiB; the proxy term adds the Flan-T5-XXL decoder (~11 GiB bf16)"
    )


if __name__ == "__main__":
    main()
