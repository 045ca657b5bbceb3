"""ThinkDiff-CLIP's image tokens: BLIP-2's EVA ViT-g/14, CLS kept, patch grid halved.

At 224 px, EVA ViT-g/14 gives 1 CLS + 16x16 patch tokens of width 1408 (after its post-layernorm).
The patch grid is downsampled by 2 with bilinear interpolation (``align_corners=False``), which for
an exact halving equals 2x2 average pooling, so each image becomes 1 + 8x8 = 65 tokens.

The weights come from a full BLIP-2 checkpoint (only its ``vision_model.*`` tensors are read, not
the Q-Former or the language model) or from a vision-only folder.

Shapes: B images, N tokens, D vision width, G patch-grid side.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, Blip2VisionConfig, Blip2VisionModel

from thinkdiff.models.loading import default_dtype, resolve_model_dir
from thinkdiff.models.state_dicts import load_prefixed_state_dict

DEFAULT_VISION_MODEL = "Salesforce/blip2-flan-t5-xxl"


def pool_patch_tokens(tokens_BND: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Keep the CLS token and shrink the square patch grid by ``factor`` (bilinear).

    ``[B, 1 + G*G, D] -> [B, 1 + (G/factor)^2, D]``.
    """
    cls_B1D, patches_BPD = tokens_BND[:, :1], tokens_BND[:, 1:]
    grid = math.isqrt(patches_BPD.shape[1])
    if grid * grid != patches_BPD.shape[1]:
        raise ValueError(f"{patches_BPD.shape[1]} patch tokens do not form a square grid")
    if grid % factor:
        raise ValueError(f"patch grid {grid}x{grid} is not divisible by the pooling factor {factor}")
    b, _, d = patches_BPD.shape
    grid_BDGG = patches_BPD.transpose(1, 2).reshape(b, d, grid, grid)
    # Interpolate in fp32: bf16 bilinear kernels are not available on every device.
    pooled_BDgg = F.interpolate(
        grid_BDGG.float(), size=(grid // factor, grid // factor), mode="bilinear", align_corners=False
    ).to(tokens_BND.dtype)
    pooled_BPD = pooled_BDgg.flatten(2).transpose(1, 2)
    return torch.cat([cls_B1D, pooled_BPD], dim=1)


class CLIPVisionFeatures(nn.Module):
    """The frozen EVA vision tower of BLIP-2, returning 65 pooled tokens per 224 px image."""

    def __init__(self, vision: Blip2VisionModel, pool_factor: int = 2) -> None:
        super().__init__()
        self.vision = vision.eval().requires_grad_(False)
        self.pool_factor = pool_factor

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path = DEFAULT_VISION_MODEL,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        pool_factor: int = 2,
    ) -> CLIPVisionFeatures:
        """Load from a BLIP-2 checkpoint (hub id or folder) or a ``Blip2VisionModel`` folder."""
        # From the hub: only the shards of BLIP-2 that hold its vision tower (not the 11 B LLM).
        folder = resolve_model_dir(
            name_or_path, kind="BLIP-2 vision model", tensors=lambda name: name.startswith("vision_model.")
        )
        config = AutoConfig.from_pretrained(folder)
        device = (
            torch.device(device)
            if device is not None
            else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        dtype = dtype or default_dtype(device)
        if isinstance(config, Blip2VisionConfig):
            vision = Blip2VisionModel.from_pretrained(folder, dtype=dtype)
        elif config.model_type == "blip-2":
            vision_config = config.vision_config
            with torch.device("meta"):
                vision = Blip2VisionModel(vision_config)
            state = load_prefixed_state_dict(folder, "vision_model.", dtype=dtype)
            vision.load_state_dict(state, strict=True, assign=True)
        else:
            raise ValueError(
                f"{name_or_path} is a {config.model_type!r} model; expected a BLIP-2 checkpoint or its vision tower"
            )
        return cls(vision.to(device), pool_factor=pool_factor)

    @property
    def hidden_size(self) -> int:
        return self.vision.config.hidden_size

    @property
    def image_size(self) -> int:
        return self.vision.config.image_size

    @property
    def num_tokens(self) -> int:
        """Tokens per image after pooling (65 for 224 px and patch 14)."""
        grid = self.vision.config.image_size // self.vision.config.patch_size
        return 1 + (grid // self.pool_factor) ** 2

    @torch.no_grad()
    def forward(self, pixel_values_BCHW: torch.Tensor) -> torch.Tensor:
        """Pooled tokens ``[B, 65, D]`` of preprocessed images ``[B, 3, 224, 224]``."""
        size = self.image_size
        if pixel_values_BCHW.ndim != 4 or tuple(pixel_values_BCHW.shape[1:]) != (3, size, size):
            raise ValueError(
                f"pixel values must be [batch, 3, {size}, {size}], got {list(pixel_values_BCHW.shape)}"
            )
        param = next(self.vision.parameters())
        hidden_BND = self.vision(
            pixel_values=pixel_values_BCHW.to(param.device, param.dtype)
        ).last_hidden_state
        return pool_patch_tokens(hidden_BND, self.pool_factor)
