"""PixArt-Sigma (``PixArtSigmaPipeline``): images from T5 states with their mask; a DDPM (noise-
predicting) decoder, so calibration brings its own noise process.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from thinkdiff.pipelines.decoders.base import MaskedT5Decoder, TextEncoding, UnpackedLatents

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


class PixArtSigmaDecoder(UnpackedLatents, MaskedT5Decoder):
    """PixArt-Sigma (``PixArtSigmaPipeline``, 0.6 B): images from T5 states with their mask, 300 tokens.

    Text is encoded without PixArt's optional caption cleaning (``clean_caption=False``, the
    ``encode_prompt`` default; the stock ``__call__`` cleans only where bs4 and ftfy are installed).
    The stock call bins the size to the nearest trained aspect ratio and resizes the result back.
    """

    @property
    def pipeline_cls(self) -> type[DiffusionPipeline]:
        from diffusers import PixArtSigmaPipeline

        return PixArtSigmaPipeline

    @property
    def attention_mask_dtype(self) -> torch.dtype | None:
        return torch.int64  # the tokenizer's mask, as encode_prompt passes it on

    def stock_setting(self, pipe: DiffusionPipeline, name: str) -> Any:
        return pipe.transformer.config.sample_size * pipe.vae_scale_factor

    def call_kwargs(
        self, pipe: DiffusionPipeline, embeds: Mapping[str, torch.Tensor], settings: Mapping[str, Any]
    ) -> dict[str, Any]:
        kwargs = super().call_kwargs(pipe, embeds, settings)
        if "negative_prompt_embeds" in kwargs:
            # The stock negative_prompt defaults to "", which check_inputs refuses beside embeddings.
            kwargs["negative_prompt"] = None
        return kwargs

    def encode_text(self, pipe: DiffusionPipeline, texts: list[str], max_length: int) -> TextEncoding:
        embeds, mask, _, _ = pipe.encode_prompt(
            prompt=texts,
            do_classifier_free_guidance=False,
            device=self.device,
            clean_caption=False,
            max_sequence_length=max_length,
        )
        return TextEncoding(embeds, mask=mask)

    # Calibration: PixArt predicts the noise of a discrete diffusion (DDPM betas), not a flow. A
    # noise level sigma in [0, 1] is the training timestep round(sigma * (T - 1)).

    @functools.cached_property
    def _alphas_cumprod(self) -> torch.Tensor:
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_pretrained(self._config_folder, subfolder="scheduler").alphas_cumprod.float()

    def _timesteps(self, sigmas_B: torch.Tensor) -> torch.Tensor:
        return (sigmas_B.float().cpu() * (len(self._alphas_cumprod) - 1)).round().long()

    def _signal_noise(self, sigmas: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = self._alphas_cumprod[self._timesteps(sigmas.reshape(-1))].reshape(-1, *[1] * (ndim - 1))
        return alpha.sqrt().to(self.device), (1 - alpha).sqrt().to(self.device)

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, sigmas_B: torch.Tensor) -> torch.Tensor:
        signal, noise_scale = self._signal_noise(sigmas_B, clean.ndim)
        return signal.to(clean.dtype) * clean + noise_scale.to(clean.dtype) * noise

    def euler_step(
        self, latents: torch.Tensor, output: torch.Tensor, sigma: float, sigma_next: float
    ) -> torch.Tensor:
        # A deterministic DDIM step with the predicted noise.
        signal, noise_scale = self._signal_noise(torch.tensor([sigma]), latents.ndim)
        signal_next, noise_next = self._signal_noise(torch.tensor([sigma_next]), latents.ndim)
        clean = (latents - noise_scale * output) / signal
        return signal_next * clean + noise_next * output

    def velocity(
        self,
        pipe: DiffusionPipeline,
        latents: torch.Tensor,
        sigmas_B: torch.Tensor,
        conditioning: Mapping[str, torch.Tensor],
        height: int,
        width: int,
    ) -> torch.Tensor:
        """PixArt's noise prediction (the learned-variance half dropped, as the pipeline does)."""
        transformer = pipe.transformer
        prompt_BLD = conditioning["prompt_embeds"].to(self.device, transformer.dtype)
        out = transformer(
            latents.to(self.device, transformer.dtype),
            encoder_hidden_states=prompt_BLD,
            encoder_attention_mask=self._calibration_mask(conditioning, prompt_BLD),
            timestep=self._timesteps(sigmas_B).to(self.device),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )[0]
        if transformer.config.out_channels // 2 == latents.shape[1]:
            out = out.chunk(2, dim=1)[0]
        return out
