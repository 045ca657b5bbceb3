"""The aligner: maps VLM token features into the T5 encoder-output space.

``Linear(in, hidden) -> GELU -> Linear(hidden, out) -> RMSNorm(out)`` (paper eq. 1). The RMSNorm is
T5-style: no mean subtraction, no bias, variance computed in fp32. Its weight is copied from the
proxy T5 encoder's ``final_layer_norm`` so the aligned features start at the scale the T5 decoder
(and the diffusion decoder's T5 prompt space) expects; the paper reports that training does not
converge reliably without it (Figure 7).

Shapes: B batch, L tokens, D_in VLM feature width, D_out T5 d_model.
"""

from __future__ import annotations

from typing import Literal

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

NormChoice = Literal["t5", "default", "none"]
NORM_CHOICES: tuple[str, ...] = ("t5", "default", "none")


class T5RMSNorm(nn.Module):
    """RMSNorm as in T5: ``weight * x / sqrt(mean(x^2) + eps)``, variance in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 variance: in bf16 the mean of squares of 4096 values loses too many bits.
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class Aligner(ModelMixin, ConfigMixin):
    """Two-layer MLP with a T5 RMSNorm, mapping VLM features to T5 encoder outputs.

    Args:
        in_dim: width of the VLM features (3584 for Qwen2-VL-7B, 1408 for EVA ViT-g/14).
        out_dim: the proxy T5's ``d_model`` (4096 for T5-XXL), which must equal the diffusion
            decoder's prompt-embedding width.
        hidden_dim: width of the hidden layer; defaults to ``out_dim`` as in the paper.
        norm: ``"t5"`` (weight to be copied from the proxy T5 encoder's final norm with
            :meth:`init_norm_from_t5`; the paper's choice), ``"default"`` (weight of ones), or
            ``"none"`` (no norm; an ablation).
        eps: RMSNorm epsilon (T5 uses 1e-6).
    """

    @register_to_config
    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int | None = None,
        norm: str = "t5",
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if norm not in NORM_CHOICES:
            raise ValueError(f"unknown aligner norm {norm!r}; choose one of {', '.join(NORM_CHOICES)}")
        if in_dim <= 0 or out_dim <= 0 or (hidden_dim is not None and hidden_dim <= 0):
            raise ValueError(
                f"aligner dims must be positive, got in={in_dim} hidden={hidden_dim} out={out_dim}"
            )
        hidden_dim = hidden_dim or out_dim
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.final_norm: nn.Module = T5RMSNorm(out_dim, eps) if norm != "none" else nn.Identity()

    @property
    def in_dim(self) -> int:
        return self.fc1.in_features

    @property
    def out_dim(self) -> int:
        return self.fc2.out_features

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        """Map features ``[..., D_in]`` to ``[..., D_out]``."""
        if x_BLD.shape[-1] != self.in_dim:
            raise ValueError(
                f"feature width {x_BLD.shape[-1]} does not match the aligner's input width {self.in_dim}"
            )
        x = x_BLD.to(self.fc1.weight.dtype)
        return self.final_norm(self.fc2(self.act(self.fc1(x))))

    @torch.no_grad()
    def init_norm_from_t5(self, t5_model: nn.Module | torch.Tensor) -> None:
        """Copy the RMSNorm weight from a T5 encoder's ``final_layer_norm``.

        Accepts a ``T5ForConditionalGeneration``/``T5EncoderModel``, a :class:`ProxyT5Decoder`
        (which keeps that weight even when it does not load the encoder), or the weight itself.
        """
        if self.config.norm != "t5":
            raise ValueError(f"init_norm_from_t5 needs norm='t5', this aligner has norm={self.config.norm!r}")
        weight = _t5_final_norm_weight(t5_model)
        if weight.shape != self.final_norm.weight.shape:
            raise ValueError(
                f"T5 d_model {weight.shape[0]} does not match the aligner output width {self.out_dim}"
            )
        self.final_norm.weight.copy_(weight.to(self.final_norm.weight.dtype))


def _t5_final_norm_weight(source: nn.Module | torch.Tensor) -> torch.Tensor:
    if isinstance(source, torch.Tensor):
        return source
    weight = getattr(source, "encoder_final_norm_weight", None)
    if isinstance(weight, torch.Tensor):
        return weight
    encoder = getattr(source, "encoder", None)
    if encoder is not None and hasattr(encoder, "final_layer_norm"):
        return encoder.final_layer_norm.weight
    raise ValueError(f"cannot find a T5 encoder final_layer_norm in {type(source).__name__}")
