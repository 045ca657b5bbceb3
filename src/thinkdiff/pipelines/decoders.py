"""Stock diffusers decoders that take T5 prompt embeddings: FLUX.1 (images) and CogVideoX (video).

ThinkDiff never modifies a decoder. Like ``FluxPriorReduxPipeline``, it computes ``prompt_embeds``
(and FLUX's ``pooled_prompt_embeds``) itself and hands them to an unmodified stock pipeline. The
parts of a decoder it needs are loaded in stages, each with only the components it uses:

- the *text* stage: the decoder's own text encoders (FLUX: CLIP for the pooled vector, T5 for text
  tokens; CogVideoX: T5), called through the pipeline's own ``encode_prompt`` so that text
  embeddings equal what the decoder computes for a plain prompt;
- the *denoise* stage: transformer + VAE, given the finished embeddings.

:meth:`DecoderSpec.inspect` reads only the configs, so a width mismatch or an unsupported folder is
reported before any weights load. Every size (prompt width, pooled width, required prompt length)
comes from those configs.

Shapes: B batch, S text tokens, L prompt tokens, D prompt width (T5 d_model), P pooled width.
"""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from thinkdiff.models.loading import resolve_model_dir
from thinkdiff.pipelines.constants import DEFAULT_DECODER, OFFLOAD_MODES, Offload

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from PIL import Image

__all__ = [
    "DEFAULT_DECODER",
    "OFFLOAD_MODES",
    "CogVideoXDecoder",
    "DecoderSpec",
    "DiffusionDecoder",
    "FluxDecoder",
    "Offload",
    "load_decoder",
    "release",
]

logger = logging.getLogger(__name__)


def _dtype_kwarg() -> str:
    # diffusers 0.42 renamed from_pretrained's ``torch_dtype`` to ``dtype`` (the old name warns).
    import diffusers
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype"


# Enough of a hub snapshot to read every config without downloading weights.
_CONFIG_FILES = ["model_index.json", "*/config.json", "scheduler/*.json"]


@dataclass(frozen=True)
class DecoderSpec:
    """What a decoder folder is, read from its configs alone (no weights are loaded)."""

    name: str
    """As given: a folder, a hub id or ``tiny:<component>``; what the full load resolves."""
    family: Literal["flux", "cogvideox"]
    pipeline_class: str
    """``_class_name`` from ``model_index.json``."""
    prompt_width: int
    """D: width of the T5 prompt embeddings the transformer takes (FLUX ``joint_attention_dim``,
    CogVideoX ``text_embed_dim``)."""
    pooled_width: int | None
    """P: FLUX's ``pooled_projection_dim`` (the CLIP text width); ``None`` for CogVideoX."""
    required_length: int | None
    """CogVideoX's ``max_text_seq_length``: prompt embeddings are padded or cut to it; ``None``
    (FLUX): any length."""
    guidance_embeds: bool
    """FLUX.1-dev style distilled guidance (schnell has none)."""

    @property
    def kind(self) -> Literal["image", "video"]:
        return "video" if self.family == "cogvideox" else "image"

    @classmethod
    def inspect(cls, name_or_path: str | Path) -> DecoderSpec:
        """Read ``model_index.json`` and the transformer config of a decoder; no weights.

        Raises ``FileNotFoundError`` when the decoder cannot be found and ``ValueError`` when it is
        not a FLUX.1 or CogVideoX text-to-X pipeline.
        """
        folder = resolve_model_dir(name_or_path, kind="diffusion decoder", files=_CONFIG_FILES)
        index_file = folder / "model_index.json"
        if not index_file.is_file():
            raise ValueError(
                f"decoder {name_or_path} is not a diffusers pipeline folder (no model_index.json)"
            )
        index = json.loads(index_file.read_text())
        class_name = str(index.get("_class_name", ""))
        transformer_file = folder / "transformer" / "config.json"
        if not transformer_file.is_file():
            raise ValueError(f"decoder {name_or_path} has no transformer/config.json")
        transformer = json.loads(transformer_file.read_text())
        transformer_class = str(transformer.get("_class_name", ""))
        if class_name.startswith("Flux") and transformer_class == "FluxTransformer2DModel":
            if "text_encoder" not in index or "text_encoder_2" not in index:
                raise ValueError(f"FLUX decoder {name_or_path} lacks text_encoder/text_encoder_2 entries")
            return cls(
                name=str(name_or_path),
                family="flux",
                pipeline_class=class_name,
                prompt_width=int(transformer.get("joint_attention_dim", 4096)),
                pooled_width=int(transformer.get("pooled_projection_dim", 768)),
                required_length=None,
                guidance_embeds=bool(transformer.get("guidance_embeds", False)),
            )
        if class_name == "CogVideoXPipeline" and transformer_class == "CogVideoXTransformer3DModel":
            return cls(
                name=str(name_or_path),
                family="cogvideox",
                pipeline_class=class_name,
                prompt_width=int(transformer.get("text_embed_dim", 4096)),
                pooled_width=None,
                required_length=int(transformer.get("max_text_seq_length", 226)),
                guidance_embeds=False,
            )
        raise ValueError(
            f"decoder {name_or_path} is a {class_name or 'unknown'} pipeline; supported: FluxPipeline "
            "(FLUX.1-dev/schnell and compatible) and CogVideoXPipeline (text-to-video)"
        )


def release(*objects: Any) -> None:
    """Drop hooks and cached GPU memory of released stages so the next stage gets the memory.

    The caller must drop its own references too; this only makes freeing prompt.
    """
    for obj in objects:
        remove_hooks = getattr(obj, "remove_all_hooks", None)
        if callable(remove_hooks):
            remove_hooks()
    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class DiffusionDecoder:
    """Stage-wise loading and calling of one stock decoder pipeline.

    Subclasses say which components each stage needs, how text is encoded with the pipeline's own
    encoders, and which keyword arguments carry the embeddings into the stock ``__call__``.
    """

    text_encoder_components: ClassVar[dict[str, tuple[str, ...]]] = {}
    """Encoder role ('pooled', 't5') -> the pipeline components it needs."""
    denoise_components: ClassVar[tuple[str, ...]] = ("transformer", "vae")

    def __init__(
        self,
        spec: DecoderSpec,
        device: torch.device,
        dtype: torch.dtype,
        offload: Offload = "none",
    ) -> None:
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"unknown offload mode {offload!r}; choose one of {', '.join(OFFLOAD_MODES)}")
        if offload != "none" and device.type == "cpu":
            raise ValueError(
                f"--offload {offload} moves weights between CPU and a GPU; it needs a GPU device"
            )
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.offload = offload

    # ---- loading -------------------------------------------------------------------------------

    @property
    def pipeline_cls(self) -> type[DiffusionPipeline]:
        raise NotImplementedError

    @property
    def all_components(self) -> tuple[str, ...]:
        roles = [c for parts in self.text_encoder_components.values() for c in parts]
        return (*dict.fromkeys(roles), *self.denoise_components)

    def load(self, components: Sequence[str]) -> DiffusionPipeline:
        """Load the stock pipeline with only ``components`` (plus its scheduler), placed per ``offload``."""
        pipe = self.build(components)
        pipe.set_progress_bar_config(disable=True)
        self.place(pipe)
        return pipe

    def build(self, components: Sequence[str]) -> DiffusionPipeline:
        """The stock pipeline with only ``components`` loaded (on the CPU), in ``dtype``."""
        skipped = {name: None for name in self.all_components if name not in components}
        folder = resolve_model_dir(self.spec.name, kind="diffusion decoder")
        return self.pipeline_cls.from_pretrained(folder, **{_dtype_kwarg(): self.dtype}, **skipped)

    def place(self, pipe: DiffusionPipeline) -> None:
        """Put the pipeline on the device, or install diffusers' offload hooks."""
        if self.offload == "model":
            pipe.enable_model_cpu_offload(device=self.device)
        elif self.offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)

    def components_for(self, roles: Sequence[str]) -> list[str]:
        """Pipeline components needed to encode text in the given roles ('pooled', 't5')."""
        return list(dict.fromkeys(c for role in roles for c in self.text_encoder_components[role]))

    # ---- settings ------------------------------------------------------------------------------

    def default_settings(self) -> dict[str, Any]:
        """Decoder settings that differ from the stock ``__call__`` defaults for this checkpoint."""
        return {}

    def text_bridge_length(self) -> int:
        """T5 tokens for a prompt the LVLM wrote (the decoder's own default)."""
        raise NotImplementedError

    # ---- encoding (text stage) -----------------------------------------------------------------

    def encode_text(
        self, pipe: DiffusionPipeline, texts: list[str], max_length: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """T5 embeddings ``[B, max_length, D]`` (padded as the decoder pads) and pooled ``[B, P]`` or None."""
        raise NotImplementedError

    def empty_conditioning(self, pipe: DiffusionPipeline) -> dict[str, torch.Tensor]:
        """What the decoder needs besides ``prompt_embeds`` when there is no prompt text:
        FLUX's pooled CLIP vector of ``""``; CogVideoX's negative embeddings (T5 of ``""``)."""
        raise NotImplementedError

    # ---- denoising -----------------------------------------------------------------------------

    def generate(
        self,
        pipe: DiffusionPipeline,
        embeds: dict[str, torch.Tensor],
        generators: list[torch.Generator],
        settings: dict[str, Any],
    ) -> list[Any]:
        """Run the stock pipeline on a batch of embeddings; one output per row."""
        raise NotImplementedError

    def _to_pipe(self, pipe: DiffusionPipeline, tensor: torch.Tensor) -> torch.Tensor:
        # With or without offload hooks the pipeline executes on self.device; asking the pipeline
        # (``_execution_device``) walks every module and costs milliseconds per call.
        return tensor.to(self.device, pipe.transformer.dtype)


class FluxDecoder(DiffusionDecoder):
    """FLUX.1-dev / schnell (any ``FluxPipeline``-compatible folder): images."""

    text_encoder_components: ClassVar[dict[str, tuple[str, ...]]] = {
        "pooled": ("text_encoder", "tokenizer"),
        "t5": ("text_encoder_2", "tokenizer_2"),
    }

    @property
    def pipeline_cls(self) -> type[DiffusionPipeline]:
        from diffusers import FluxPipeline

        return FluxPipeline

    def default_settings(self) -> dict[str, Any]:
        # schnell (no guidance embedding) is a 4-step model that ignores guidance; the stock
        # defaults (28 steps, 3.5) are dev's.
        if self.spec.guidance_embeds:
            return {}
        return {"num_inference_steps": 4, "guidance_scale": 0.0}

    def text_bridge_length(self) -> int:
        # FluxPipeline's default is 512; schnell was trained with 256 T5 tokens.
        return 512 if self.spec.guidance_embeds else 256

    def encode_text(
        self, pipe: DiffusionPipeline, texts: list[str], max_length: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        prompt_embeds, pooled, _ = pipe.encode_prompt(
            prompt=texts, device=self.device, max_sequence_length=max_length
        )
        return prompt_embeds, pooled

    def empty_conditioning(self, pipe: DiffusionPipeline) -> dict[str, torch.Tensor]:
        # encode_prompt always runs T5 too (9 GB for T5-XXL) although only CLIP's pooled vector of
        # "" is needed; its CLIP half is this method, so the vector is the same.
        return {"pooled_prompt_embeds": pipe._get_clip_prompt_embeds(prompt=[""], device=self.device)}

    def generate(
        self,
        pipe: DiffusionPipeline,
        embeds: dict[str, torch.Tensor],
        generators: list[torch.Generator],
        settings: dict[str, Any],
    ) -> list[Image.Image]:
        kwargs = {k: v for k, v in settings.items() if k != "num_frames" and v is not None}
        return pipe(
            prompt_embeds=self._to_pipe(pipe, embeds["prompt_embeds"]),
            pooled_prompt_embeds=self._to_pipe(pipe, embeds["pooled_prompt_embeds"]),
            generator=generators,
            **kwargs,
        ).images


class CogVideoXDecoder(DiffusionDecoder):
    """CogVideoX text-to-video (2B and 5B): frames. Prompt embeddings have the configured length."""

    text_encoder_components: ClassVar[dict[str, tuple[str, ...]]] = {"t5": ("text_encoder", "tokenizer")}

    @property
    def pipeline_cls(self) -> type[DiffusionPipeline]:
        from diffusers import CogVideoXPipeline

        return CogVideoXPipeline

    def text_bridge_length(self) -> int:
        assert self.spec.required_length is not None
        return self.spec.required_length

    def encode_text(
        self, pipe: DiffusionPipeline, texts: list[str], max_length: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        prompt_embeds, _ = pipe.encode_prompt(
            prompt=texts,
            do_classifier_free_guidance=False,
            max_sequence_length=max_length,
            device=self.device,
        )
        return prompt_embeds, None

    def empty_conditioning(self, pipe: DiffusionPipeline) -> dict[str, torch.Tensor]:
        # The stock pipeline's negative prompt for guidance is T5("") at full length.
        assert self.spec.required_length is not None
        negative, _ = self.encode_text(pipe, [""], self.spec.required_length)
        return {"negative_prompt_embeds": negative}

    def generate(
        self,
        pipe: DiffusionPipeline,
        embeds: dict[str, torch.Tensor],
        generators: list[torch.Generator],
        settings: dict[str, Any],
    ) -> list[list[Image.Image]]:
        kwargs = {k: v for k, v in settings.items() if v is not None}
        return pipe(
            prompt_embeds=self._to_pipe(pipe, embeds["prompt_embeds"]),
            negative_prompt_embeds=self._to_pipe(pipe, embeds["negative_prompt_embeds"]),
            generator=generators,
            **kwargs,
        ).frames


def load_decoder(
    spec: DecoderSpec, device: torch.device, dtype: torch.dtype, offload: Offload = "none"
) -> DiffusionDecoder:
    """The :class:`DiffusionDecoder` for a spec's family."""
    cls = {"flux": FluxDecoder, "cogvideox": CogVideoXDecoder}[spec.family]
    return cls(spec, device, dtype, offload)
