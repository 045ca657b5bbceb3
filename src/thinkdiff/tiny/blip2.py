"""A tiny BLIP-2 vision tower (EVA ViT-g/14 geometry, tiny width) with its image processor."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Blip2VisionConfig, Blip2VisionModel, BlipImageProcessorPil

__all__ = ["BLIP2_VISION_HIDDEN", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "save_tiny_blip2_vision"]

BLIP2_VISION_HIDDEN = 48
"""Width of the tiny vision tower (1408 in BLIP-2's EVA ViT-g)."""

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def save_tiny_blip2_vision(path: Path, seed: int = 0) -> Path:
    """Write a tiny ``Blip2VisionModel`` and a BLIP-2 image processor into ``path``.

    The geometry is the real one (224 px, patch 14: 16x16 patches + CLS = 257 tokens) so token
    counts and pooling match the paper; only the width and depth are tiny. The processor is the
    PIL/numpy ``BlipImageProcessorPil`` (torchvision does not work here) with BLIP-2's settings:
    bicubic resize to 224x224, rescale 1/255, OpenAI CLIP mean/std.
    """
    torch.manual_seed(seed)
    config = Blip2VisionConfig(
        hidden_size=BLIP2_VISION_HIDDEN,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=224,
        patch_size=14,
    )
    model = Blip2VisionModel(config).eval()
    processor = BlipImageProcessorPil(
        size={"height": 224, "width": 224},
        resample=3,  # PIL.Image.BICUBIC
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        do_convert_rgb=True,
    )
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
