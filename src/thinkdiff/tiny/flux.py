"""A tiny random FLUX.1-dev style ``diffusers.FluxPipeline``."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5TokenizerFast

from thinkdiff.tiny.t5 import T5_D_MODEL, tiny_t5_encoder
from thinkdiff.tiny.tokenizers import save_clip_tokenizer, save_t5_tokenizer

__all__ = ["CLIP_TEXT_HIDDEN", "save_tiny_flux", "tiny_vae"]

CLIP_TEXT_HIDDEN = 32
"""Width of the tiny CLIP text encoder = FLUX ``pooled_projection_dim`` (768 in FLUX.1)."""


def tiny_vae(**overrides: Any) -> AutoencoderKL:
    """A tiny ``AutoencoderKL`` like FLUX.1's: 4 levels (scale factor 8 like the real one), 4 latent
    channels, no quant convs, FLUX's shift and scale constants; ``overrides`` for other decoders'
    VAEs (SD3's constants, SDXL's quant convs for PixArt-Sigma)."""
    kwargs: dict[str, Any] = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (8, 8, 8, 8),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 2,
        "sample_size": 64,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "shift_factor": 0.1159,
        "scaling_factor": 0.3611,
    }
    return AutoencoderKL(**{**kwargs, **overrides})


def save_tiny_flux(path: Path, seed: int = 0) -> Path:
    """Write a tiny FLUX.1-dev style pipeline (``FluxPipeline.save_pretrained`` layout) into ``path``.

    Transformer: 1 double + 1 single block, 2 heads of 16, guidance embedding on (FLUX.1-dev),
    ``joint_attention_dim`` = T5 width 32, ``pooled_projection_dim`` = CLIP width 32. VAE: 4 levels
    (scale factor 8 like the real one) and 4 latent channels, so 2x2 packing gives the
    transformer's 16 input channels. A 64x64 image is 16 image tokens.
    """
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_D_MODEL,
        pooled_projection_dim=CLIP_TEXT_HIDDEN,
        guidance_embeds=True,
        # RoPE axes (text index, row, column) must sum to the head dim.
        axes_dims_rope=(4, 4, 8),
    )
    torch.manual_seed(seed)
    vae = tiny_vae()
    # FLUX.1-dev's scheduler settings (resolution-dependent shift).
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )

    with tempfile.TemporaryDirectory() as tmp:
        clip_tokenizer = CLIPTokenizer.from_pretrained(save_clip_tokenizer(Path(tmp) / "clip"))
        t5_tokenizer = T5TokenizerFast.from_pretrained(save_t5_tokenizer(Path(tmp) / "t5"))
    torch.manual_seed(seed)
    clip_text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tokenizer),
            hidden_size=CLIP_TEXT_HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=clip_tokenizer.model_max_length,
            projection_dim=CLIP_TEXT_HIDDEN,
            hidden_act="quick_gelu",
            bos_token_id=clip_tokenizer.bos_token_id,
            # The pooled output is read at the first eos; id 2 would select a legacy argmax path.
            eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id,
        )
    ).eval()
    # A different seed from the proxy T5: FLUX's T5 v1.1 is not the flan-t5 proxy decoder.
    t5_encoder = tiny_t5_encoder(seed=seed + 1)

    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip_text,
        tokenizer=clip_tokenizer,
        text_encoder_2=t5_encoder,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
    path = Path(path)
    pipe.save_pretrained(path)
    return path
