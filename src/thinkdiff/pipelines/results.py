"""What the pipeline returns: the prompt embeddings a stock decoder takes
(:class:`ThinkDiffEmbeddings`) and, after decoding, the images or videos (:class:`ThinkDiffOutput`).

Shapes: B requests, L prompt tokens, D prompt width (the decoder's T5 d_model), P pooled width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["ThinkDiffEmbeddings", "ThinkDiffOutput"]


@dataclass
class ThinkDiffEmbeddings:
    """What a stock decoder takes, for B requests (rows right-padded to the longest)."""

    prompt_embeds: torch.Tensor
    """[B, L, D] aligned tokens first (after SD3's CLIP block), then any T5 text tokens; zero after
    ``prompt_attention_mask``."""
    prompt_attention_mask: torch.Tensor
    """[B, L] bool: True for the row's tokens. Decoders take no padding: pass only the real rows
    (:meth:`decoder_kwargs`); the masked decoders' own mask is :attr:`decoder_attention_mask`."""
    pooled_prompt_embeds: torch.Tensor | None
    """[B, P]: the pooled CLIP text vector of FLUX and SD3; ``None`` for the other decoders."""
    negative_prompt_embeds: torch.Tensor | None
    """[B, L, D]: the classifier-free guidance negative, the decoder's T5 of ``""``. CogVideoX:
    always (its guidance); FLUX: when a request of the batch uses true CFG (``true_cfg_scale > 1``),
    then for every row, ``""`` padded to that row's length (zero after the mask); else ``None``."""
    num_aligned_tokens: list[int]
    """How many leading tokens of each row came from the aligner (0 in text-bridge mode)."""
    lvlm_texts: list[str | None]
    """The LVLM's generated text per request (``None`` in clip mode)."""
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    """[B, P]: FLUX's pooled negative, CLIP of ``""``, beside a FLUX ``negative_prompt_embeds``."""
    device: torch.device | None = None
    """Where the pipeline that computed them runs its decoder (the tensors themselves are kept on
    the CPU): :meth:`decoder_kwargs` moves them there unless told otherwise."""
    decoder_attention_mask: torch.Tensor | None = None
    """[B, L]: the ``prompt_attention_mask`` that Chroma, PixArt-Sigma and LTX-Video take, in the
    dtype their ``encode_prompt`` gives it: 1 for aligned tokens, the decoder's own mask for its T5
    tokens (Chroma's keeps one pad token), 0 after the row; ``None`` for the other decoders."""
    negative_decoder_attention_mask: torch.Tensor | None = None
    """[B, L]: the mask of ``negative_prompt_embeds`` for those decoders (T5 of ``""``'s own)."""
    num_prefix_tokens: int = 0
    """SD3: the CLIP-L/G tokens (77) each row starts with, before the aligned tokens."""

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def rows(self, indices: Sequence[int], length: int) -> dict[str, torch.Tensor]:
        """The stock ``__call__`` arguments for the rows ``indices``, cut to ``length`` tokens (CPU)."""
        fields = {
            "prompt_embeds": (self.prompt_embeds, True),
            "prompt_attention_mask": (self.decoder_attention_mask, True),
            "pooled_prompt_embeds": (self.pooled_prompt_embeds, False),
            "negative_prompt_embeds": (self.negative_prompt_embeds, True),
            "negative_prompt_attention_mask": (self.negative_decoder_attention_mask, True),
            "negative_pooled_prompt_embeds": (self.negative_pooled_prompt_embeds, False),
        }
        index = list(indices)
        return {
            name: tensor[index, :length] if per_token else tensor[index]
            for name, (tensor, per_token) in fields.items()
            if tensor is not None
        }

    def decoder_kwargs(
        self,
        index: int,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> dict[str, torch.Tensor]:
        """Keyword arguments for the stock pipeline for request ``index`` (batch of one, unpadded).

        FLUX: ``pipe(**emb.decoder_kwargs(0), generator=...)`` with ``prompt_embeds`` [1, L, D] and
        ``pooled_prompt_embeds`` [1, P] (and the negatives when computed: pass ``true_cfg_scale``
        too); SD3 the same (``guidance_scale``); CogVideoX: ``prompt_embeds`` and
        ``negative_prompt_embeds``; Chroma, PixArt-Sigma, LTX-Video: those and their
        ``prompt_attention_mask`` / ``negative_prompt_attention_mask`` (PixArt-Sigma: pass
        ``negative_prompt=None`` too; its default ``""`` is refused beside negative embeddings).

        The tensors are moved to ``device`` (default: :attr:`device`, the computing pipeline's
        device) and cast to ``dtype`` (default: unchanged, the pipeline's dtype): the stock
        ``FluxPipeline.encode_prompt`` passes given embeddings on as they are, so CPU tensors would
        reach a CUDA transformer.
        """
        target = device if device is not None else self.device
        kwargs = self.rows([index], int(self.prompt_attention_mask[index].sum()))
        # Masks keep the dtype the stock encode_prompt gives them.
        return {
            name: tensor.to(device=target, dtype=None if name.endswith("mask") else dtype)
            for name, tensor in kwargs.items()
        }


@dataclass
class ThinkDiffOutput:
    """Results of :meth:`ThinkDiffPipeline.__call__`, in request order."""

    images: list[Image.Image]
    """One image per request (image decoders); empty for video decoders."""
    videos: list[list[Image.Image]]
    """One list of frames per request (video decoders); empty for image decoders."""
    embeddings: ThinkDiffEmbeddings
    settings: list[dict[str, Any]]
    """The decoder settings each request ran with (height, width, steps, guidance, FLUX's true CFG
    scale, CogVideoX's frames)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage for the whole call (loads are their own ``load_*`` stages)."""
    peak_memory: dict[str, int] = field(default_factory=dict)
    """Peak allocated GPU bytes per stage (CUDA only)."""

    @property
    def lvlm_texts(self) -> list[str | None]:
        return self.embeddings.lvlm_texts
