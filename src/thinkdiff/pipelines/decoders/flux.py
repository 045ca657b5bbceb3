"""FLUX.1 (``FluxPipeline``): images, in a VAE's latent space or, for a folder without a VAE, in
pixel space (pixel-unshuffled images, said by the folder's descriptor).

Shapes: B batch, N packed image tokens, C packed channels, r the pixel-unshuffle factor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from thinkdiff.pipelines.decoders.base import DiffusionDecoder, TextEncoding
from thinkdiff.pipelines.decoders.spec import FLUX_MAX_T5_TOKENS

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from PIL import Image


def pixels_to_latents(images_BHWC: np.ndarray | torch.Tensor, pixel_unshuffle: int) -> torch.Tensor:
    """uint8 images [B, H, W, 3] -> packed pixel-space FLUX latents [B, N, C] in [-1, 1].

    ``N = (H / 2r) * (W / 2r)`` and ``C = 4 * 3 * r * r``: the image is pixel-unshuffled by r, then
    packed 2x2 exactly as ``FluxPipeline`` packs VAE latents.
    """
    from diffusers import FluxPipeline

    x_B3HW = torch.as_tensor(np.asarray(images_BHWC)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    lat = F.pixel_unshuffle(x_B3HW, pixel_unshuffle)  # [B, 3 r r, H / r, W / r]
    return FluxPipeline._pack_latents(lat, *lat.shape)


def latents_to_pixels(packed_BNC: torch.Tensor, height: int, width: int, pixel_unshuffle: int) -> np.ndarray:
    """Packed latents [B, N, C] (``FluxPipeline(..., output_type="latent")``) -> uint8 images [B, H, W, 3].

    The inverse of :func:`pixels_to_latents`; ``height`` and ``width`` are the image's pixels.
    """
    from diffusers import FluxPipeline

    # The stock unpacking, given the unshuffled grid directly (a "VAE scale factor" of 1).
    lat = FluxPipeline._unpack_latents(
        packed_BNC.float(), height // pixel_unshuffle, width // pixel_unshuffle, 1
    )
    x_B3HW = F.pixel_shuffle(lat, pixel_unshuffle)
    return ((x_B3HW.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


class FluxDecoder(DiffusionDecoder):
    """FLUX.1-dev / schnell (any ``FluxPipeline``-compatible folder): images.

    In pixel space (``spec.latent_space == "pixels"``) there is no VAE: the stock pipeline runs with
    ``vae=None`` and ``output_type="latent"``, and :func:`latents_to_pixels` makes the images.
    Heights and widths are always the image's pixels.
    """

    text_encoder_components: ClassVar[dict[str, tuple[str, ...]]] = {
        "pooled": ("text_encoder", "tokenizer"),
        "t5": ("text_encoder_2", "tokenizer_2"),
    }
    empty_roles: ClassVar[tuple[str, ...]] = ("pooled",)
    conditioning_names: ClassVar[tuple[str, ...]] = ("prompt_embeds", "pooled_prompt_embeds")
    cfg_setting: ClassVar[str | None] = "true_cfg_scale"
    max_t5_tokens: ClassVar[int] = FLUX_MAX_T5_TOKENS
    """The longest T5 prompt FLUX.1 was trained with (``FluxPipeline.check_inputs`` refuses a
    longer ``max_sequence_length``). Given embeddings may be longer, and run, but leave that regime."""

    @property
    def pipeline_cls(self) -> type[DiffusionPipeline]:
        from diffusers import FluxPipeline

        return FluxPipeline

    @property
    def pixel_space(self) -> bool:
        return self.spec.latent_space == "pixels"

    @property
    def denoise_components(self) -> tuple[str, ...]:
        return ("transformer",) if self.pixel_space else ("transformer", "vae")

    @property
    def absent_components(self) -> tuple[str, ...]:
        return ("vae",) if self.pixel_space else ()

    def default_settings(self) -> dict[str, Any]:
        # schnell (no guidance embedding) is a 4-step model that ignores guidance; the stock
        # defaults (28 steps, 3.5) are dev's. A descriptor knows its checkpoint better.
        settings: dict[str, Any] = {}
        if not self.spec.guidance_embeds:
            settings = {"num_inference_steps": 4, "guidance_scale": 0.0}
        if self.spec.sample_size is not None:
            settings.update(height=self.spec.sample_size, width=self.spec.sample_size)
        settings.update(self.spec.defaults)
        return settings

    def size_step(self) -> tuple[int, str]:
        # The stock pipeline silently rounds a VAE FLUX's size down to a multiple of 16 (the AE's 8x
        # downscaling, then the 2x2 packing), and below 16 no latent row is left and the AE fails
        # deep inside. In pixel space every pixel is a latent value, so the size must fold into
        # whole 2x2-packed tokens.
        if not self.pixel_space:
            return self._vae_step(2, "FLUX packs 2x2 latents")
        r = self.spec.pixel_unshuffle
        assert r is not None
        return 2 * r, f"it works on pixels unshuffled by {r}, then packed 2x2"

    def text_bridge_length(self) -> int:
        # FluxPipeline's default is 512; schnell was trained with 256 T5 tokens.
        if self.spec.max_sequence_length is not None:
            return self.spec.max_sequence_length
        return self.max_t5_tokens if self.spec.guidance_embeds else 256

    def encode_text(self, pipe: DiffusionPipeline, texts: list[str], max_length: int) -> TextEncoding:
        prompt_embeds, pooled, _ = pipe.encode_prompt(
            prompt=texts, device=self.device, max_sequence_length=max_length
        )
        return TextEncoding(prompt_embeds, pooled=pooled)

    def empty_conditioning(self, pipe: DiffusionPipeline | None) -> dict[str, torch.Tensor]:
        # encode_prompt always runs T5 too (9 GB for T5-XXL) although only CLIP's pooled vector of
        # "" is needed; its CLIP half is this method, so the vector is the same.
        assert pipe is not None
        return {"pooled_prompt_embeds": pipe._get_clip_prompt_embeds(prompt=[""], device=self.device)}

    def generate(
        self,
        pipe: DiffusionPipeline,
        embeds: dict[str, torch.Tensor],
        generators: list[torch.Generator],
        settings: dict[str, Any],
    ) -> list[Image.Image]:
        kwargs = self.call_kwargs(pipe, embeds, {k: v for k, v in settings.items() if k != "num_frames"})
        if not self.pixel_space:
            return pipe(**kwargs, generator=generators).images

        from PIL import Image

        r = self.spec.pixel_unshuffle
        assert r is not None
        height, width = kwargs.pop("height"), kwargs.pop("width")
        # Without a VAE, FluxPipeline still sizes its latents as height / vae_scale_factor (8), so
        # it is given the size whose latent grid is the unshuffled image's.
        scale = pipe.vae_scale_factor
        latents_BNC = pipe(
            **kwargs,
            generator=generators,
            height=height // r * scale,
            width=width // r * scale,
            output_type="latent",
        ).images
        return [Image.fromarray(image) for image in latents_to_pixels(latents_BNC, height, width, r)]

    # ---- calibration ---------------------------------------------------------------------------

    def _latent_grid(self, pipe: DiffusionPipeline, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of FLUX's packed 2x2 latent tokens for an image of this size."""
        if self.pixel_space:
            assert self.spec.pixel_unshuffle is not None
            step = 2 * self.spec.pixel_unshuffle
        else:
            step = 2 * pipe.vae_scale_factor  # the VAE's downscaling, then the 2x2 packing
        return height // step, width // step

    def latent_shape(self, pipe: DiffusionPipeline, height: int, width: int) -> tuple[int, ...]:
        rows, cols = self._latent_grid(pipe, height, width)
        return (rows * cols, int(pipe.transformer.config.in_channels))

    def image_latents(self, pipe: DiffusionPipeline, images_BHWC: np.ndarray) -> torch.Tensor:
        if self.pixel_space:
            assert self.spec.pixel_unshuffle is not None
            return pixels_to_latents(images_BHWC, self.spec.pixel_unshuffle).to(self.device)
        z = self._vae_latents(pipe, images_BHWC)
        return pipe._pack_latents(z, *z.shape)

    def calibration_conditioning(
        self, pipe: DiffusionPipeline, text: str | None, max_length: int | None
    ) -> dict[str, torch.Tensor]:
        if text is None:
            return dict(self.empty_conditioning(pipe))
        if max_length is None:  # FLUX takes prompts of any length (it has no text mask)
            max_length = len(pipe.tokenizer_2(text).input_ids)
        encoded = self.encode_text(pipe, [text], max_length)
        assert encoded.pooled is not None
        return {"prompt_embeds": encoded.embeds, "pooled_prompt_embeds": encoded.pooled}

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
        batch = prompt_BLD.shape[0]
        pooled_BP = conditioning["pooled_prompt_embeds"].to(self.device, transformer.dtype)
        if pooled_BP.shape[0] == 1 and batch > 1:
            pooled_BP = pooled_BP.expand(batch, -1)
        rows, cols = self._latent_grid(pipe, height, width)
        img_ids = pipe._prepare_latent_image_ids(batch, rows, cols, self.device, transformer.dtype)
        txt_ids = torch.zeros(prompt_BLD.shape[1], 3, device=self.device, dtype=transformer.dtype)
        guidance = None
        if self.spec.guidance_embeds:
            scale = float(self.default_settings().get("guidance_scale", 3.5))
            guidance = torch.full((batch,), scale, device=self.device, dtype=torch.float32)
        # FluxPipeline passes timestep / 1000 with timesteps in [0, 1000]: the sigma itself.
        return transformer(
            hidden_states=latents.to(self.device, transformer.dtype),
            timestep=sigmas_B.to(self.device, transformer.dtype),
            guidance=guidance,
            pooled_projections=pooled_BP,
            encoder_hidden_states=prompt_BLD,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
