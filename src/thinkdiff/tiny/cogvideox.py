"""A tiny random CogVideoX (2B style) ``diffusers.CogVideoXPipeline``."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
)
from transformers import T5TokenizerFast

from thinkdiff.tiny.t5 import T5_D_MODEL, tiny_t5_encoder
from thinkdiff.tiny.tokenizers import save_t5_tokenizer

__all__ = ["COGVIDEOX_MAX_TEXT_SEQ_LENGTH", "save_tiny_cogvideox"]

COGVIDEOX_MAX_TEXT_SEQ_LENGTH = 226
"""Text tokens the transformer takes: the real value, because with sincos positions (2B style)
``prompt_embeds`` must be exactly this long, and ThinkDiff's video path splits it (65 image tokens
+ 161 text tokens)."""


def save_tiny_cogvideox(path: Path, seed: int = 0) -> Path:
    """Write a tiny CogVideoX pipeline (``CogVideoXPipeline.save_pretrained`` layout) into ``path``.

    2B style: learned-free 3D sincos positions, no rotary embeddings, so ``prompt_embeds`` must be
    ``[B, 226, 32]``. Transformer width 4 heads x 8 = 32 = ``text_embed_dim`` = T5 width. VAE:
    spatial factor 8, temporal factor 4, 4 latent channels. ``height=width=16, num_frames=9`` gives
    a 2x2x3 latent and 9 frames.
    """
    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(
        # 3D sincos positions need heads x head_dim divisible by 16 (here 32).
        num_attention_heads=4,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=8,
        text_embed_dim=T5_D_MODEL,
        num_layers=1,
        # Default sample size in latent units (16 px x 16 px x 9 frames); other sizes recompute
        # the sincos table on the fly.
        sample_width=2,
        sample_height=2,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=COGVIDEOX_MAX_TEXT_SEQ_LENGTH,
        use_rotary_positional_embeddings=False,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
        sample_height=16,
        sample_width=16,
    )
    # CogVideoX-2b's scheduler settings.
    scheduler = CogVideoXDDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=True,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        snr_shift_scale=3.0,
    )
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = T5TokenizerFast.from_pretrained(save_t5_tokenizer(Path(tmp) / "t5"))
    # Seed offset: a T5 distinct from the proxy (seed) and from FLUX's (seed + 1).
    text_encoder = tiny_t5_encoder(seed=seed + 2)

    pipe = CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )
    path = Path(path)
    pipe.save_pretrained(path)
    return path
