"""LTX-Video (``LTXPipeline``): video from T5 states with their mask."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from thinkdiff.pipelines.decoders.base import MaskedT5Decoder, TextEncoding, call_defaults

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


class LTXVideoDecoder(MaskedT5Decoder):
    """LTX-Video (``LTXPipeline``) text-to-video: frames from T5 states with their mask, 128 tokens.

    Its stock size and frame count are the ``__call__`` defaults (512 x 704, 161 frames).
    """

    sized_settings: ClassVar[tuple[str, ...]] = ()

    @property
    def pipeline_cls(self) -> type[DiffusionPipeline]:
        from diffusers import LTXPipeline

        return LTXPipeline

    def size_step(self) -> tuple[int, str]:
        return 32, "its autoencoder downscales by 32, and LTXPipeline refuses other sizes"

    @property
    def attention_mask_dtype(self) -> torch.dtype | None:
        return torch.bool

    def encode_text(self, pipe: DiffusionPipeline, texts: list[str], max_length: int) -> TextEncoding:
        embeds, mask, _, _ = pipe.encode_prompt(
            prompt=texts, do_classifier_free_guidance=False, max_sequence_length=max_length, device=self.device
        )
        return TextEncoding(embeds, mask=mask)

    # Calibration on single frames (one latent frame): the text conditioning is the same for a
    # still as for a clip, and a frame costs a clip's 1/21.

    def _latent_size(self, pipe: DiffusionPipeline, height: int, width: int) -> tuple[int, int]:
        ratio = pipe.vae_spatial_compression_ratio
        return height // ratio, width // ratio

    def latent_shape(self, pipe: DiffusionPipeline, height: int, width: int) -> tuple[int, ...]:
        rows, cols = self._latent_size(pipe, height, width)
        patch = pipe.transformer_spatial_patch_size
        return ((rows // patch) * (cols // patch), int(pipe.transformer.config.in_channels))

    def image_latents(self, pipe: DiffusionPipeline, images_BHWC: np.ndarray) -> torch.Tensor:
        z = self._encode_images(pipe, images_BHWC, video=True)
        vae = pipe.vae
        z = pipe._normalize_latents(z, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
        return pipe._pack_latents(z, pipe.transformer_spatial_patch_size, pipe.transformer_temporal_patch_size)

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
        rows, cols = self._latent_size(pipe, height, width)
        frame_rate = call_defaults(self.pipeline_cls)["frame_rate"].default
        spatial = pipe.vae_spatial_compression_ratio
        return transformer(
            hidden_states=latents.to(self.device, transformer.dtype),
            encoder_hidden_states=prompt_BLD,
            timestep=(sigmas_B * 1000).to(self.device),  # LTXPipeline's timesteps: sigma x 1000
            encoder_attention_mask=self._calibration_mask(conditioning, prompt_BLD),
            num_frames=1,
            height=rows,
            width=cols,
            rope_interpolation_scale=(pipe.vae_temporal_compression_ratio / frame_rate, spatial, spatial),
            return_dict=False,
        )[0]
