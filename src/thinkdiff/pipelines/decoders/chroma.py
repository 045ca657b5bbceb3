"""Chroma (``ChromaPipeline``): images from T5 states with their mask, no CLIP."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

import torch

from thinkdiff.pipelines.decoders.base import MaskedT5Decoder, TextEncoding
from thinkdiff.pipelines.decoders.flux import FluxDecoder

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


class ChromaDecoder(MaskedT5Decoder):
    """Chroma (``ChromaPipeline``, e.g. Chroma1-HD): images from T5 alone, no CLIP.

    Chroma's own mask keeps the text tokens, their EOS and one pad token (the rest is masked out in
    the transformer); ThinkDiff keeps every aligned token and gives T5 text Chroma's own mask.
    """

    @property
    def pipeline_cls(self) -> type[DiffusionPipeline]:
        from diffusers import ChromaPipeline

        return ChromaPipeline

    def size_step(self) -> tuple[int, str]:
        return self._vae_step(2, "Chroma packs 2x2 latents")  # the stock pipeline rounds other sizes down

    @property
    def attention_mask_dtype(self) -> torch.dtype | None:
        # ChromaPipeline._get_t5_prompt_embeds returns its mask in the embeddings' dtype.
        return self.dtype

    # Calibration: Chroma packs its latents 2x2 and places them with image ids exactly as FLUX does.
    pixel_space: ClassVar[bool] = False
    _latent_grid = FluxDecoder._latent_grid
    latent_shape = FluxDecoder.latent_shape
    image_latents = FluxDecoder.image_latents

    def velocity(
        self,
        pipe: DiffusionPipeline,
        latents: torch.Tensor,
        sigmas_B: torch.Tensor,
        conditioning: Mapping[str, torch.Tensor],
        height: int,
        width: int,
    ) -> torch.Tensor:
        transformer = pipe.transformer
        prompt_BLD = conditioning["prompt_embeds"].to(self.device, transformer.dtype)
        batch, length = prompt_BLD.shape[:2]
        rows, cols = self._latent_grid(pipe, height, width)
        # As ChromaPipeline.__call__: the text mask extended with ones for the image tokens.
        mask = pipe._prepare_attention_mask(
            batch, rows * cols, transformer.dtype, self._calibration_mask(conditioning, prompt_BLD)
        )
        return transformer(
            hidden_states=latents.to(self.device, transformer.dtype),
            timestep=sigmas_B.to(self.device, transformer.dtype),  # the pipeline's timestep / 1000
            encoder_hidden_states=prompt_BLD,
            txt_ids=torch.zeros(length, 3, device=self.device, dtype=transformer.dtype),
            img_ids=pipe._prepare_latent_image_ids(batch, rows, cols, self.device, transformer.dtype),
            attention_mask=mask,
            return_dict=False,
        )[0]

    def encode_text(self, pipe: DiffusionPipeline, texts: list[str], max_length: int) -> TextEncoding:
        embeds, _, mask, *_ = pipe.encode_prompt(
            prompt=texts, device=self.device, do_classifier_free_guidance=False, max_sequence_length=max_length
        )
        return TextEncoding(embeds, mask=mask)
