"""CogVideoX (``CogVideoXPipeline``, 2B and 5B): video from T5 states of a fixed length."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from thinkdiff.pipelines.decoders.base import DiffusionDecoder, TextEncoding

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


class CogVideoXDecoder(DiffusionDecoder):
    """CogVideoX text-to-video (2B and 5B): frames. Prompt embeddings have the configured length."""

    text_encoder_components: ClassVar[dict[str, tuple[str, ...]]] = {"t5": ("text_encoder", "tokenizer")}
    empty_roles: ClassVar[tuple[str, ...]] = ("t5",)
    sized_settings: ClassVar[tuple[str, ...]] = ("height", "width", "num_frames")

    @property
    def pipeline_cls(self) -> type[DiffusionPipeline]:
        from diffusers import CogVideoXPipeline

        return CogVideoXPipeline

    def stock_setting(self, pipe: DiffusionPipeline, name: str) -> Any:
        config = pipe.transformer.config
        if name == "num_frames":
            return config.sample_frames
        sample = config.sample_height if name == "height" else config.sample_width
        return sample * pipe.vae_scale_factor_spatial

    def size_step(self) -> tuple[int, str]:
        # check_inputs asks for multiples of 8 only, but a latent side the patches do not tile
        # leaves the noise prediction a row short of the latents: a shape error in the scheduler.
        return self._patched_vae_step()

    def text_bridge_length(self) -> int:
        assert self.spec.required_length is not None
        return self.spec.required_length

    def encode_text(self, pipe: DiffusionPipeline, texts: list[str], max_length: int) -> TextEncoding:
        prompt_embeds, _ = pipe.encode_prompt(
            prompt=texts,
            do_classifier_free_guidance=False,
            max_sequence_length=max_length,
            device=self.device,
        )
        return TextEncoding(prompt_embeds)

    def empty_conditioning(self, pipe: DiffusionPipeline | None) -> dict[str, torch.Tensor]:
        # The stock pipeline's negative prompt for guidance is T5("") at full length.
        assert pipe is not None and self.spec.required_length is not None
        return {"negative_prompt_embeds": self.encode_text(pipe, [""], self.spec.required_length).embeds}
