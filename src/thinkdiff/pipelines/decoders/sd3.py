"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``): images from a CLIP-L/G block and T5 states."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from thinkdiff.pipelines.decoders.base import TextEncoding, UnpackedLatents

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


class StableDiffusion3Decoder(UnpackedLatents):
    """Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``): images.

    Its ``prompt_embeds`` are CLIP-L and CLIP-G states side by side (77 tokens, zero-padded to the
    T5 width), then the T5 tokens (``text_encoder_3``); ``pooled_prompt_embeds`` is pooled CLIP-L and
    CLIP-G. ThinkDiff puts the aligned tokens where T5 tokens go, after a CLIP block of ``""``
    (lvlm mode) or of the text (clip and text-bridge modes); T5 loads only to encode text.
    """

    text_encoder_components: ClassVar[dict[str, tuple[str, ...]]] = {
        "clip": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
        "t5": ("text_encoder_3", "tokenizer_3"),
    }
    empty_roles: ClassVar[tuple[str, ...]] = ("clip",)
    conditioning_names: ClassVar[tuple[str, ...]] = ("prompt_embeds", "pooled_prompt_embeds")
    cfg_setting: ClassVar[str | None] = "guidance_scale"

    @property
    def pipeline_cls(self) -> type[DiffusionPipeline]:
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    def size_step(self) -> tuple[int, str]:
        return self._patched_vae_step()

    def largest_side(self) -> tuple[int, str]:
        # The transformer crops its position table to the image; a larger image has no positions.
        table = self._component_config("transformer").get("pos_embed_max_size")
        step, _ = self.size_step()
        if table is None or table * step >= self.max_side:
            return super().largest_side()
        return table * step, f"its position table covers {table}x{table} patches"

    def encode_text(self, pipe: DiffusionPipeline, texts: list[str], max_length: int) -> TextEncoding:
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=texts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_length,
        )
        k = self.spec.prefix_length
        return TextEncoding(embeds[:, k:], pooled=pooled, prefix=embeds[:, :k])

    def empty_conditioning(self, pipe: DiffusionPipeline | None) -> dict[str, torch.Tensor]:
        # encode_prompt's CLIP half (without T5, which it would otherwise run): both CLIPs' states
        # side by side, zero-padded to the prompt width, and their pooled vectors.
        assert pipe is not None
        states, pooled = zip(
            *(pipe._get_clip_prompt_embeds(prompt=[""], device=self.device, clip_model_index=i) for i in (0, 1))
        )
        block = torch.cat(states, dim=-1)
        block = F.pad(block, (0, self.spec.prompt_width - block.shape[-1]))
        return {"prefix": block, "pooled_prompt_embeds": torch.cat(pooled, dim=-1)}

    # ---- calibration: prompt_embeds are the T5 positions; the CLIP block goes in as "prefix" ----

    def calibration_conditioning(
        self, pipe: DiffusionPipeline, text: str | None, max_length: int | None
    ) -> dict[str, torch.Tensor]:
        if text is None:  # aligned features: the CLIP block and pooled vector of "", as at inference
            return self.empty_conditioning(pipe)
        encoded = self.encode_text(pipe, [text], self._calibration_length(pipe, text, max_length))
        assert encoded.prefix is not None and encoded.pooled is not None
        return {"prompt_embeds": encoded.embeds, "prefix": encoded.prefix, "pooled_prompt_embeds": encoded.pooled}

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
        t5_BLD = conditioning["prompt_embeds"].to(self.device, transformer.dtype)
        batch = t5_BLD.shape[0]
        prefix = conditioning["prefix"].to(self.device, transformer.dtype).expand(batch, -1, -1)
        pooled = conditioning["pooled_prompt_embeds"].to(self.device, transformer.dtype).expand(batch, -1)
        return transformer(
            hidden_states=latents.to(self.device, transformer.dtype),
            timestep=(sigmas_B * 1000).to(self.device, transformer.dtype),  # the pipeline's timesteps
            encoder_hidden_states=torch.cat([prefix, t5_BLD], dim=1),
            pooled_projections=pooled,
            return_dict=False,
        )[0]
