"""Tiny random Chroma, PixArt-Sigma, Stable Diffusion 3 and LTX-Video pipelines: the other decoders
that read T5 prompt states (FLUX.1 and CogVideoX are in their own modules).

Each is the real diffusers pipeline class with every component tiny and random, written with
``save_pretrained``; the transformers read ``T5_D_MODEL``-wide prompt states like the tiny FLUX.
Every T5 encoder has its own seed: none of them is the flan-t5 proxy.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLLTXVideo,
    ChromaPipeline,
    ChromaTransformer2DModel,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    LTXPipeline,
    LTXVideoTransformer3DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5TokenizerFast

from thinkdiff.tiny.flux import tiny_vae
from thinkdiff.tiny.t5 import T5_D_MODEL, tiny_t5_encoder
from thinkdiff.tiny.tokenizers import save_clip_tokenizer, save_t5_tokenizer

__all__ = [
    "PIXART_MAX_SEQUENCE_LENGTH",
    "SD3_CLIP_G_HIDDEN",
    "SD3_CLIP_L_HIDDEN",
    "save_tiny_chroma",
    "save_tiny_ltx_video",
    "save_tiny_pixart_sigma",
    "save_tiny_sd3",
]

SD3_CLIP_L_HIDDEN = 8
"""Width of the tiny SD3's CLIP-L (768 in SD3); with CLIP-G's it makes the pooled width."""
SD3_CLIP_G_HIDDEN = 16
"""Width of the tiny SD3's CLIP-G (1280 in SD3). 8 + 16 = 24 < the 32-wide T5, so the CLIP block is
zero-padded to the prompt width as in SD3 (2048 -> 4096)."""
PIXART_MAX_SEQUENCE_LENGTH = 300
"""PixArt-Sigma's T5 tokens (its pipeline's default, kept at real size)."""


def _t5_tokenizer() -> T5TokenizerFast:
    with tempfile.TemporaryDirectory() as tmp:
        return T5TokenizerFast.from_pretrained(save_t5_tokenizer(Path(tmp) / "t5"))


def save_tiny_chroma(path: Path, seed: int = 0) -> Path:
    """Write a tiny ``ChromaPipeline`` (Chroma1-HD layout: T5 only, no CLIP) into ``path``.

    Transformer: 1 double + 1 single block, 2 heads of 16, ``joint_attention_dim`` = T5 width, a
    1-layer distilled-guidance approximator. VAE as the tiny FLUX's. A 64x64 image is 16 tokens.
    """
    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_D_MODEL,
        axes_dims_rope=(4, 4, 8),
        approximator_num_channels=16,
        approximator_hidden_dim=32,
        approximator_layers=1,
    )
    torch.manual_seed(seed)
    vae = tiny_vae()
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = ChromaPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=tiny_t5_encoder(seed=seed + 3),
        tokenizer=_t5_tokenizer(),
        transformer=transformer,
    )
    path = Path(path)
    pipe.save_pretrained(path)
    return path


def save_tiny_pixart_sigma(path: Path, seed: int = 0) -> Path:
    """Write a tiny ``PixArtSigmaPipeline`` into ``path``.

    Transformer: 1 block, 2 heads of 8, ``caption_channels`` = T5 width, learned sigma (8 output
    channels for 4 latent ones), ``sample_size`` 32 latents: PixArt's smallest resolution bin, so
    the stock size binning works (256 px by default). VAE: scale factor 8, 4 latent channels.
    """
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        cross_attention_dim=16,
        sample_size=32,
        patch_size=2,
        caption_channels=T5_D_MODEL,
        use_additional_conditions=False,  # Sigma: no resolution / aspect-ratio embedding
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    torch.manual_seed(seed)
    # The SDXL VAE's layout and scale, as PixArt-Sigma uses it.
    vae = tiny_vae(
        sample_size=256, use_quant_conv=True, use_post_quant_conv=True, shift_factor=None, scaling_factor=0.13025
    )
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
    )
    pipe = PixArtSigmaPipeline(
        tokenizer=_t5_tokenizer(),
        text_encoder=tiny_t5_encoder(seed=seed + 4),
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )
    path = Path(path)
    pipe.save_pretrained(path)
    return path


def _clip_with_projection(tokenizer: CLIPTokenizer, width: int, seed: int) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,  # SD3 reads the penultimate hidden states
            num_attention_heads=2,
            max_position_embeddings=tokenizer.model_max_length,
            projection_dim=width,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()


def save_tiny_sd3(path: Path, seed: int = 0) -> Path:
    """Write a tiny ``StableDiffusion3Pipeline`` (SD3 / SD3.5 layout) into ``path``.

    CLIP-L and CLIP-G (widths :data:`SD3_CLIP_L_HIDDEN`, :data:`SD3_CLIP_G_HIDDEN`, 77 tokens) and
    T5 as ``text_encoder_3``. Transformer: 1 MMDiT block, 2 heads of 8, ``joint_attention_dim`` = T5
    width, ``pooled_projection_dim`` = 8 + 16. ``sample_size`` 8 latents: 64 px by default.
    """
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=T5_D_MODEL,
        caption_projection_dim=16,  # = heads x head dim
        pooled_projection_dim=SD3_CLIP_L_HIDDEN + SD3_CLIP_G_HIDDEN,
        out_channels=4,
        pos_embed_max_size=32,
    )
    torch.manual_seed(seed)
    vae = tiny_vae(shift_factor=0.0609, scaling_factor=1.5305)  # SD3's VAE constants
    with tempfile.TemporaryDirectory() as tmp:
        clip_tokenizer = CLIPTokenizer.from_pretrained(save_clip_tokenizer(Path(tmp) / "clip"))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=_clip_with_projection(clip_tokenizer, SD3_CLIP_L_HIDDEN, seed + 5),
        tokenizer=clip_tokenizer,
        text_encoder_2=_clip_with_projection(clip_tokenizer, SD3_CLIP_G_HIDDEN, seed + 6),
        tokenizer_2=clip_tokenizer,
        text_encoder_3=tiny_t5_encoder(seed=seed + 7),
        tokenizer_3=_t5_tokenizer(),
    )
    path = Path(path)
    pipe.save_pretrained(path)
    return path


def save_tiny_ltx_video(path: Path, seed: int = 0) -> Path:
    """Write a tiny ``LTXPipeline`` (LTX-Video text-to-video) into ``path``.

    Transformer: 1 block, 4 heads of 8, ``caption_channels`` = T5 width. VAE: 8 latent channels,
    spatial factor 4 and temporal factor 4 (32 and 8 in LTX-Video). ``height=width=32,
    num_frames=9`` gives an 8x8x3 latent and 9 frames.
    """
    torch.manual_seed(seed)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=4,
        attention_head_dim=8,
        cross_attention_dim=32,
        num_layers=1,
        caption_channels=T5_D_MODEL,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLLTXVideo(
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    # LTX-Video's scheduler settings (resolution-dependent shift).
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.95,
        max_shift=2.05,
        base_image_seq_len=1024,
        max_image_seq_len=4096,
        shift_terminal=0.1,
    )
    pipe = LTXPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=tiny_t5_encoder(seed=seed + 8),
        tokenizer=_t5_tokenizer(),
        transformer=transformer,
    )
    path = Path(path)
    pipe.save_pretrained(path)
    return path
