"""Stock diffusers decoders that take T5 prompt embeddings: FLUX.1, Chroma, PixArt-Sigma and Stable
Diffusion 3 / 3.5 (images); CogVideoX and LTX-Video (video).

ThinkDiff never modifies a decoder. Like ``FluxPriorReduxPipeline``, it computes ``prompt_embeds``
(and FLUX's ``pooled_prompt_embeds``) itself and hands them to an unmodified stock pipeline. The
parts of a decoder it needs are loaded in stages, each with only the components it uses:

- the *text* stage: the decoder's own text encoders (FLUX: CLIP for the pooled vector, T5 for text
  tokens; SD3: CLIP-L/G for its CLIP block and pooled vector, T5; the others: T5), called through
  the pipeline's own ``encode_prompt`` so that text embeddings equal what the decoder computes for
  a plain prompt;
- the *denoise* stage: transformer + VAE, given the finished embeddings.

:meth:`DecoderSpec.inspect` reads only the configs, so a width mismatch or an unsupported folder is
reported before any weights load. Every size (prompt width, pooled width, required prompt length)
comes from those configs.

A FLUX folder may also hold :data:`DECODER_DESCRIPTOR` (``thinkdiff_decoder.json``) for what its
configs cannot say. The mini world's FLUX, for one, has no VAE: it denoises pixel-unshuffled images
directly, and samples with 20 steps and true classifier-free guidance 3.0::

    {"latent_space": "pixels", "pixel_unshuffle": 2, "sample_size": 32, "max_sequence_length": 16,
     "defaults": {"num_inference_steps": 20, "true_cfg_scale": 3.0}}

Shapes: B batch, S text tokens, L prompt tokens, D prompt width (T5 d_model), P pooled width,
N packed image tokens, C packed channels, r the pixel-unshuffle factor.
"""

from __future__ import annotations

import functools
import gc
import inspect
import json
import logging
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F

from thinkdiff.models.loading import diffusers_files, resolve_model_dir
from thinkdiff.models.quantization import (
    Quantize,
    check_quantize,
    gguf_quantization,
    offload_conflict,
    pipeline_quantization,
)
from thinkdiff.pipelines.constants import DECODER_DESCRIPTOR, DEFAULT_DECODER, OFFLOAD_MODES, Offload

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from PIL import Image

__all__ = [
    "DECODER_CLASSES",
    "DECODER_DESCRIPTOR",
    "DEFAULT_DECODER",
    "KNOWN_DECODERS",
    "MAX_SEQUENCE_LENGTHS",
    "OFFLOAD_MODES",
    "ChromaDecoder",
    "CogVideoXDecoder",
    "DecoderSpec",
    "DiffusionDecoder",
    "FluxDecoder",
    "LTXVideoDecoder",
    "Offload",
    "PixArtSigmaDecoder",
    "StableDiffusion3Decoder",
    "TextEncoding",
    "call_defaults",
    "latents_to_pixels",
    "load_decoder",
    "pixels_to_latents",
    "release",
    "write_pixel_space_descriptor",
]

logger = logging.getLogger(__name__)


def _dtype_kwarg() -> str:
    # diffusers 0.42 renamed from_pretrained's ``torch_dtype`` to ``dtype`` (the old name warns).
    import diffusers
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype"


# Enough of a hub snapshot to read every config without downloading weights.
_CONFIG_FILES = [
    "model_index.json",
    "*/config.json",
    "scheduler/*.json",
    "tokenizer/tokenizer_config.json",
    DECODER_DESCRIPTOR,
]

Family = Literal["flux", "cogvideox", "chroma", "pixart-sigma", "sd3", "ltx-video"]

# The T5-reading pipelines beyond FLUX and CogVideoX: family -> (pipeline class, transformer
# class, the transformer config key that is the T5 prompt width).
_T5_FAMILIES: dict[str, tuple[str, str, str]] = {
    "chroma": ("ChromaPipeline", "ChromaTransformer2DModel", "joint_attention_dim"),
    "pixart-sigma": ("PixArtSigmaPipeline", "PixArtTransformer2DModel", "caption_channels"),
    "sd3": ("StableDiffusion3Pipeline", "SD3Transformer2DModel", "joint_attention_dim"),
    "ltx-video": ("LTXPipeline", "LTXVideoTransformer3DModel", "caption_channels"),
}

MAX_SEQUENCE_LENGTHS: dict[str, int] = {"chroma": 512, "pixart-sigma": 300, "sd3": 256, "ltx-video": 128}
"""T5 tokens each decoder was trained to read: the stock ``__call__``'s ``max_sequence_length``
default (a test checks them against the installed diffusers). No config file holds them."""

KNOWN_DECODERS: tuple[str, ...] = (
    "FluxPipeline (FLUX.1-dev/schnell and compatible)",
    "CogVideoXPipeline (text-to-video)",
    "ChromaPipeline",
    "PixArtSigmaPipeline",
    "StableDiffusion3Pipeline (SD3 / SD3.5)",
    "LTXPipeline (LTX-Video)",
)
"""What :meth:`DecoderSpec.inspect` accepts (named in its error for any other pipeline)."""

# Sampling settings a descriptor may set, with their types (checked when it is read).
_DESCRIPTOR_SETTINGS: dict[str, type] = {
    "num_inference_steps": int,
    "guidance_scale": float,
    "true_cfg_scale": float,
}
_DESCRIPTOR_KEYS = ("latent_space", "pixel_unshuffle", "sample_size", "max_sequence_length", "defaults")


@dataclass(frozen=True)
class DecoderSpec:
    """What a decoder folder is, read from its configs alone (no weights are loaded)."""

    name: str
    """As given: a folder, a hub id or ``tiny:<component>``; what the full load resolves."""
    family: Family
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
    max_length: int | None = None
    """The most prompt tokens the decoder reads (Chroma 512, PixArt-Sigma 300, SD3 256 after its
    CLIP block, LTX-Video 128: the stock ``max_sequence_length``); longer prompts are cut with a
    warning. ``None``: no limit (FLUX) or a required length (CogVideoX)."""
    prefix_length: int = 0
    """SD3: the CLIP tokens (the CLIP tokenizer's ``model_max_length``, 77) before the T5 ones."""
    latent_space: Literal["vae", "pixels"] = "vae"
    """``pixels``: the folder has no VAE; its transformer denoises pixel-unshuffled images (FLUX
    only, said by the descriptor)."""
    pixel_unshuffle: int | None = None
    """Pixel space: r, the factor folding r x r pixel blocks into channels before FLUX's 2x2 packing."""
    sample_size: int | None = None
    """The decoder's native image size in pixels, its default height and width (descriptor)."""
    max_sequence_length: int | None = None
    """T5 tokens of the decoder's own text prompts, used in text-bridge mode (descriptor)."""
    defaults: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    """Sampling settings of this checkpoint (``num_inference_steps``, ``guidance_scale``,
    ``true_cfg_scale``) from the descriptor; they override the built-in defaults. Read-only (the
    spec is frozen); left out of the hash, which the other fields decide."""

    @property
    def kind(self) -> Literal["image", "video"]:
        return "video" if self.family in ("cogvideox", "ltx-video") else "image"

    @classmethod
    def inspect(cls, name_or_path: str | Path, *, descriptor: Mapping[str, Any] | None = None) -> DecoderSpec:
        """Read ``model_index.json`` and the transformer config of a decoder; no weights.

        ``descriptor``: check this descriptor as if it were the FLUX folder's
        :data:`DECODER_DESCRIPTOR` (how one is checked before it is written).

        Raises ``FileNotFoundError`` when the decoder cannot be found and ``ValueError`` when it is
        not one of :data:`KNOWN_DECODERS`, when a FLUX folder without a VAE has no
        descriptor, or when the descriptor holds a bad value.
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
                **_read_descriptor(folder, index, transformer, descriptor),
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
        for family, (pipeline, model, width_key) in _T5_FAMILIES.items():
            if class_name == pipeline and transformer_class == model:
                if family == "sd3":
                    return cls._inspect_sd3(name_or_path, folder, index, transformer)
                return cls(
                    name=str(name_or_path),
                    family=family,
                    pipeline_class=class_name,
                    prompt_width=int(transformer[width_key]),
                    pooled_width=None,
                    required_length=None,
                    guidance_embeds=False,
                    max_length=MAX_SEQUENCE_LENGTHS[family],
                )
        raise ValueError(
            f"decoder {name_or_path} is a {class_name or 'unknown'} pipeline (transformer "
            f"{transformer_class or 'unknown'}); known decoders: {', '.join(KNOWN_DECODERS)}"
        )

    @classmethod
    def _inspect_sd3(
        cls, name: str | Path, folder: Path, index: Mapping[str, Any], transformer: Mapping[str, Any]
    ) -> DecoderSpec:
        """SD3 / SD3.5: the CLIP-L/G widths must fit the prompt width and make the pooled width."""
        clip_widths, projection_widths = [], []
        for component in ("text_encoder", "text_encoder_2"):
            config_file = folder / component / "config.json"
            if component not in index or not config_file.is_file():
                raise ValueError(f"SD3 decoder {name} lacks {component}/config.json (its CLIP-L/G)")
            config = json.loads(config_file.read_text())
            clip_widths.append(int(config["hidden_size"]))
            projection_widths.append(int(config.get("projection_dim", config["hidden_size"])))
        width, pooled = int(transformer["joint_attention_dim"]), int(transformer["pooled_projection_dim"])
        if sum(clip_widths) > width or sum(projection_widths) != pooled:
            raise ValueError(
                f"SD3 decoder {name}: CLIP widths {clip_widths} (projections {projection_widths}) do not fit "
                f"joint_attention_dim {width} and pooled_projection_dim {pooled}"
            )
        tokenizer_config = folder / "tokenizer" / "tokenizer_config.json"
        clip_tokens = 77  # StableDiffusion3Pipeline's fallback without a tokenizer
        if tokenizer_config.is_file():
            clip_tokens = int(json.loads(tokenizer_config.read_text()).get("model_max_length", 77))
        return cls(
            name=str(name),
            family="sd3",
            pipeline_class=str(index["_class_name"]),
            prompt_width=width,
            pooled_width=pooled,
            required_length=None,
            guidance_embeds=False,
            max_length=MAX_SEQUENCE_LENGTHS["sd3"],
            prefix_length=clip_tokens,
        )


def _read_descriptor(
    folder: Path,
    index: Mapping[str, Any],
    transformer: Mapping[str, Any],
    given: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The :class:`DecoderSpec` fields a FLUX folder's descriptor (or ``given`` in its place) sets,
    checked against its configs."""
    path = folder / DECODER_DESCRIPTOR
    # diffusers writes an absent component as [null, null] in model_index.json.
    has_vae = any(index.get("vae") or [])
    if given is None and not path.is_file():
        if not has_vae:
            raise ValueError(
                f'FLUX decoder {folder} has no VAE ("vae": [null, null] in model_index.json) and no '
                f"{DECODER_DESCRIPTOR} saying how its transformer sees images; add one, e.g. "
                '{"latent_space": "pixels", "pixel_unshuffle": 2, "sample_size": 32}'
            )
        return {}
    if given is not None:
        data: Any = dict(given)
    else:
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_DESCRIPTOR_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; known: {', '.join(_DESCRIPTOR_KEYS)}")

    def positive_int(key: str) -> int | None:
        value = data.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{path}: {key} must be a positive integer, got {value!r}")
        return value

    latent_space = data.get("latent_space", "vae")
    if latent_space not in ("vae", "pixels"):
        raise ValueError(f"{path}: latent_space must be 'vae' or 'pixels', got {latent_space!r}")
    fields: dict[str, Any] = {
        "latent_space": latent_space,
        "pixel_unshuffle": positive_int("pixel_unshuffle"),
        "sample_size": positive_int("sample_size"),
        "max_sequence_length": positive_int("max_sequence_length"),
    }
    limit = FluxDecoder.max_t5_tokens
    if fields["max_sequence_length"] is not None and fields["max_sequence_length"] > limit:
        raise ValueError(f"{path}: max_sequence_length must be at most {limit} (FluxPipeline's limit)")
    r, size = fields["pixel_unshuffle"], fields["sample_size"]
    if latent_space == "vae":
        if not has_vae:
            raise ValueError(f"{path}: latent_space 'vae' but {folder} has no VAE")
        if r is not None:
            raise ValueError(f"{path}: pixel_unshuffle applies to latent_space 'pixels' only")
    else:
        if has_vae:
            raise ValueError(f"{path}: latent_space 'pixels' but {folder} has a VAE")
        if r is None or size is None:
            raise ValueError(f"{path}: latent_space 'pixels' needs pixel_unshuffle and sample_size")
        # RGB pixels unshuffled by r, then FLUX's 2x2 packing: 4 * 3 * r * r channels per token.
        channels = int(transformer.get("in_channels", 64))
        if channels != 12 * r * r:
            raise ValueError(
                f"{path}: pixel_unshuffle {r} gives {12 * r * r} packed channels but the transformer "
                f"takes {channels}"
            )
        if size % (2 * r):
            raise ValueError(
                f"{path}: sample_size {size} must be a multiple of 2 * pixel_unshuffle = {2 * r}"
            )
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise ValueError(f"{path}: defaults must be a JSON object, got {defaults!r}")
    for key, value in defaults.items():
        kind = _DESCRIPTOR_SETTINGS.get(key)
        if kind is None:
            raise ValueError(
                f"{path}: defaults.{key} is not a setting; known: {', '.join(_DESCRIPTOR_SETTINGS)}"
            )
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        if kind is int and not (numeric and isinstance(value, int) and value >= 1):
            raise ValueError(f"{path}: defaults.{key} must be a positive integer, got {value!r}")
        if kind is float and not (numeric and value >= 0):
            raise ValueError(f"{path}: defaults.{key} must be a number >= 0, got {value!r}")
    fields["defaults"] = MappingProxyType(dict(defaults))
    return fields


def write_pixel_space_descriptor(
    folder: str | Path,
    *,
    pixel_unshuffle: int,
    sample_size: int,
    max_sequence_length: int | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> Path:
    """Write :data:`DECODER_DESCRIPTOR` for a pixel-space FLUX folder (no VAE); returns its path.

    The folder must already hold the saved pipeline. The descriptor is checked against it before
    anything is written, so a bad one raises ``ValueError`` and leaves the folder as it was.
    """
    from thinkdiff.utils import atomic_write_text

    data: dict[str, Any] = {
        "latent_space": "pixels",
        "pixel_unshuffle": pixel_unshuffle,
        "sample_size": sample_size,
    }
    if max_sequence_length is not None:
        data["max_sequence_length"] = max_sequence_length
    data["defaults"] = dict(defaults or {})
    text = json.dumps(data, indent=2) + "\n"
    DecoderSpec.inspect(folder, descriptor=json.loads(text))  # exactly what the file will hold
    path = Path(folder) / DECODER_DESCRIPTOR
    atomic_write_text(path, text)
    return path


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


def release(loaded: MutableMapping[str, Any], *keys: str) -> None:
    """Take ``keys`` out of ``loaded``, drop their offload hooks, and free their memory.

    The models are popped here, so that nothing of them is left when the CUDA cache is emptied:
    with a reference still held, their memory would stay in PyTorch's cache (reserved, seen by
    nvidia-smi) during the next stage. ``loaded`` must hold the last references; the caller must
    drop its own (local variables included) before calling.
    """
    for key in keys:
        obj = loaded.pop(key, None)
        remove_hooks = getattr(obj, "remove_all_hooks", None)
        if callable(remove_hooks):
            remove_hooks()
        # The bound method holds the model too: both names go before the collection.
        del obj, remove_hooks
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@functools.lru_cache(maxsize=16)
def call_defaults(pipeline_cls: type) -> Mapping[str, inspect.Parameter]:
    """The stock ``__call__``'s parameters (their defaults are the stock settings)."""
    return inspect.signature(pipeline_cls.__call__).parameters


@dataclass
class TextEncoding:
    """B texts encoded by a decoder's own text encoders, as its ``encode_prompt`` returns them."""

    embeds: torch.Tensor
    """[B, S, D]: T5 states, padded to S as the decoder pads its prompts."""
    mask: torch.Tensor | None = None
    """[B, S]: the attention mask the decoder takes with them, in its own dtype (Chroma, PixArt,
    LTX-Video); ``None`` for decoders that attend to every token (FLUX, SD3, CogVideoX)."""
    pooled: torch.Tensor | None = None
    """[B, P]: the pooled CLIP vector (FLUX: CLIP-L; SD3: CLIP-L and CLIP-G side by side)."""
    prefix: torch.Tensor | None = None
    """[B, K, D]: SD3's CLIP-L/G block (77 tokens, zero-padded to D) that goes before the T5 tokens."""

    def attended(self) -> torch.Tensor:
        """``mask`` as bool (True: attended), every token where the decoder takes no mask; same
        leading shape as ``embeds`` (a batch or one row)."""
        return torch.ones(self.embeds.shape[:-1], dtype=torch.bool) if self.mask is None else self.mask.bool()


class DiffusionDecoder:
    """Stage-wise loading and calling of one stock decoder pipeline.

    Subclasses say which components each stage needs, how text is encoded with the pipeline's own
    encoders, and which keyword arguments carry the embeddings into the stock ``__call__``.
    """

    text_encoder_components: ClassVar[dict[str, tuple[str, ...]]] = {}
    """Encoder role ('pooled' or 'clip', 't5') -> the pipeline components it needs."""
    empty_roles: ClassVar[tuple[str, ...]] = ()
    """Encoder roles :meth:`empty_conditioning` needs (none: it loads nothing)."""
    conditioning_names: ClassVar[tuple[str, ...]] = ("prompt_embeds",)
    """The stock ``__call__`` arguments that carry a prompt; each has a ``negative_`` twin."""
    cfg_setting: ClassVar[str | None] = None
    """The setting that turns on guidance by a negative prompt when above 1 (FLUX's
    ``true_cfg_scale``; ``guidance_scale`` for Chroma, PixArt-Sigma, SD3 and LTX-Video); the
    negative is then the decoder's T5 of ``""`` at the prompt's length. ``None``: CogVideoX, whose
    fixed-length negative is part of :meth:`empty_conditioning`."""
    sized_settings: ClassVar[tuple[str, ...]] = ("height", "width")
    """Settings whose stock default the loaded pipeline derives from its configs (:meth:`stock_setting`)."""

    def __init__(
        self,
        spec: DecoderSpec,
        device: torch.device,
        dtype: torch.dtype,
        offload: Offload = "none",
        quantize: Quantize = "none",
        transformer_file: str | Path | None = None,
    ) -> None:
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"unknown offload mode {offload!r}; choose one of {', '.join(OFFLOAD_MODES)}")
        conflict = offload_conflict(quantize, offload, gguf=transformer_file is not None)
        if conflict is not None:  # before the device checks: no device makes it run
            raise ValueError(conflict)
        if offload != "none" and device.type == "cpu":
            raise ValueError(
                f"--offload {offload} moves weights between CPU and a GPU; it needs a GPU device"
            )
        check_quantize(quantize, device)
        if transformer_file is not None:
            transformer_file = Path(transformer_file)
            if transformer_file.suffix != ".gguf":
                raise ValueError(f"--transformer-file {transformer_file}: expected a .gguf file")
            if not transformer_file.is_file():
                raise FileNotFoundError(f"--transformer-file {transformer_file}: no such file")
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.offload = offload
        self.quantize = quantize
        """The quantization of the transformer and the T5 encoder (:mod:`thinkdiff.models.quantization`)."""
        self.transformer_file = transformer_file
        """A GGUF transformer file loaded in place of the folder's transformer weights (``quantize``
        then applies to the T5 encoder only)."""

    # ---- loading -------------------------------------------------------------------------------

    @property
    def pipeline_cls(self) -> type[DiffusionPipeline]:
        raise NotImplementedError

    @property
    def denoise_components(self) -> tuple[str, ...]:
        """Components of the denoise stage."""
        return ("transformer", "vae")

    @property
    def absent_components(self) -> tuple[str, ...]:
        """Components the folder does not have (``None`` in ``model_index.json``); always passed as ``None``."""
        return ()

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
        skipped.update(dict.fromkeys(self.absent_components))
        # From the hub, only the loaded components' subfolders (not FLUX.1-dev's root copies).
        files = diffusers_files(self._config_folder, skipped=skipped, extra=[DECODER_DESCRIPTOR])
        folder = resolve_model_dir(self.spec.name, kind="diffusion decoder", files=files)
        kwargs: dict[str, Any] = {_dtype_kwarg(): self.dtype}
        kwargs.update(self._quantization_kwargs(folder, components))
        return self.pipeline_cls.from_pretrained(folder, **kwargs, **skipped)

    def _quantization_kwargs(self, folder: Path, components: Sequence[str]) -> dict[str, Any]:
        """``from_pretrained`` arguments that quantize the loaded transformer and T5 encoder: a
        ``PipelineQuantizationConfig`` (``--quantize``) and, with a GGUF file, the transformer itself
        loaded from it (the file is quantized already); none otherwise."""
        kwargs: dict[str, Any] = {}
        transformer = "transformer" in components
        if transformer and self.transformer_file is not None:
            import diffusers

            name = json.loads((folder / "transformer" / "config.json").read_text())["_class_name"]
            kwargs["transformer"] = getattr(diffusers, name).from_single_file(
                str(self.transformer_file),
                config=str(folder),
                subfolder="transformer",
                quantization_config=gguf_quantization(self.dtype),
                **{_dtype_kwarg(): self.dtype},
            )
        t5 = [c for c in self.text_encoder_components.get("t5", ())[:1] if c in components]
        config = pipeline_quantization(
            self.quantize,
            self.dtype,
            diffusers_components=("transformer",) if transformer and self.transformer_file is None else (),
            transformers_components=tuple(t5),
        )
        if config is not None:
            kwargs["quantization_config"] = config
        return kwargs

    def place(self, pipe: DiffusionPipeline) -> None:
        """Put the pipeline on the device, or install diffusers' offload hooks."""
        if self.offload == "model":
            pipe.enable_model_cpu_offload(device=self.device)
        elif self.offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=self.device)
        elif self.offload == "group":
            # Blocks stream to the GPU as they run, the next one copied while one computes: the
            # offload diffusers recommends for video transformers.
            pipe.enable_group_offload(
                onload_device=self.device,
                offload_device=torch.device("cpu"),
                offload_type="block_level",
                num_blocks_per_group=1,
                use_stream=True,
            )
        else:
            pipe.to(self.device)

    def components_for(self, roles: Sequence[str]) -> list[str]:
        """Pipeline components needed to encode text in the given roles ('pooled', 'clip', 't5')."""
        return list(dict.fromkeys(c for role in roles for c in self.text_encoder_components[role]))

    def text_roles(self, needs_t5: bool) -> list[str]:
        """Encoder roles a call loads: those of :meth:`empty_conditioning`, and T5 when text is encoded."""
        return list(dict.fromkeys([*self.empty_roles, *(["t5"] if needs_t5 else [])]))

    # ---- settings ------------------------------------------------------------------------------

    def default_settings(self) -> dict[str, Any]:
        """Decoder settings that differ from the stock ``__call__`` defaults for this checkpoint."""
        return {}

    def stock_setting(self, pipe: DiffusionPipeline, name: str) -> Any:
        """The stock default of a :attr:`sized_settings` entry, as the stock ``__call__`` derives it."""
        # FluxPipeline, ChromaPipeline and StableDiffusion3Pipeline: the first lines of __call__.
        return pipe.default_sample_size * pipe.vae_scale_factor

    max_side: ClassVar[int] = 4096
    """The largest height or width :meth:`check_size` takes: 4x the 1024 px most of these decoders
    were trained at. The stock pipelines set none; past it a typo (``--width 100000``) would run
    out of memory only after minutes of loading."""

    def size_step(self) -> tuple[int, str]:
        """The multiple every height and width must be, and why (the stock pipeline fails, or makes
        another size, otherwise); ``(1, "")``: any size."""
        return 1, ""

    def largest_side(self) -> tuple[int, str]:
        """The largest height or width the decoder makes, and why."""
        return self.max_side, "a sanity bound, 4x the 1024 px these decoders were trained at"

    def check_size(
        self, height: int | None, width: int | None, where: str, names: tuple[str, str] = ("height", "width")
    ) -> None:
        """Raise ``ValueError`` for an image size the decoder cannot make: below or not a multiple of
        :meth:`size_step`, or above :meth:`largest_side`. ``where`` names the input (may be empty),
        ``names`` the two sizes as the user wrote them (``--height``, ``--width``)."""
        step, why = self.size_step()
        largest, limit = self.largest_side()
        prefix, reason = f"{where}: " if where else "", f" ({why})" if why else ""
        for name, value in zip(names, (height, width), strict=True):
            if value is None:
                continue
            if value < step:
                raise ValueError(
                    f"{prefix}{name} {value} is below {step}, the smallest size decoder {self.spec.name} makes{reason}"
                )
            if value % step:
                raise ValueError(f"{prefix}{name} {value} is not a multiple of {step} (decoder {self.spec.name}: {why})")
            if value > largest:
                raise ValueError(
                    f"{prefix}{name} {value} is above {largest}, the largest size decoder {self.spec.name} makes ({limit})"
                )

    @functools.cached_property
    def _config_folder(self) -> Path:
        """The decoder's folder with its configs (from the hub: the config files only), resolved once."""
        return resolve_model_dir(self.spec.name, kind="diffusion decoder", files=_CONFIG_FILES)

    def _component_config(self, component: str) -> dict[str, Any]:
        """``<component>/config.json`` of the decoder folder; ``{}`` where there is none."""
        path = self._config_folder / component / "config.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def _vae_step(self, patch: int, then: str) -> tuple[int, str]:
        """:meth:`size_step` of a latent decoder: the VAE's downscaling (as the stock pipelines
        compute it, 8 without a VAE config) times the transformer's ``patch`` x ``patch`` tokens."""
        blocks = self._component_config("vae").get("block_out_channels")
        scale = 2 ** (len(blocks) - 1) if blocks else 8
        return scale * patch, f"its autoencoder downscales by {scale}, then {then}"

    def _patched_vae_step(self) -> tuple[int, str]:
        """:meth:`_vae_step` of a transformer that takes ``patch_size`` x ``patch_size`` latent patches."""
        patch = int(self._component_config("transformer").get("patch_size", 2))
        return self._vae_step(patch, f"the transformer takes {patch}x{patch} patches")

    def text_bridge_length(self) -> int:
        """T5 tokens for a prompt the LVLM wrote (the decoder's own default)."""
        if self.spec.max_length is None:
            raise NotImplementedError
        return self.spec.max_length

    @property
    def attention_mask_dtype(self) -> torch.dtype | None:
        """The dtype of the attention mask the stock ``encode_prompt`` returns; ``None``: no mask."""
        return None

    # ---- encoding (text stage) -----------------------------------------------------------------

    def encode_text(self, pipe: DiffusionPipeline, texts: list[str], max_length: int) -> TextEncoding:
        """The decoder's own encoding of ``texts``: T5 states ``[B, max_length, D]`` and what goes with them."""
        raise NotImplementedError

    def empty_conditioning(self, pipe: DiffusionPipeline | None) -> dict[str, torch.Tensor]:
        """What the decoder needs besides ``prompt_embeds`` when there is no prompt text:
        FLUX's pooled CLIP vector of ``""``; SD3's CLIP block and pooled vector of ``""`` (``prefix``,
        ``pooled_prompt_embeds``); CogVideoX's negative embeddings (T5 of ``""``); nothing for
        Chroma, PixArt-Sigma and LTX-Video (``pipe`` is then ``None``)."""
        return {}

    # ---- denoising -----------------------------------------------------------------------------

    def guided(self, settings: Mapping[str, Any]) -> bool:
        """Whether these settings guide with a negative prompt (see :attr:`cfg_setting`)."""
        if self.cfg_setting is None:
            return True
        scale = settings.get(self.cfg_setting)
        if scale is None:
            scale = call_defaults(self.pipeline_cls)[self.cfg_setting].default
        return scale > 1

    def call_kwargs(
        self, pipe: DiffusionPipeline, embeds: Mapping[str, torch.Tensor], settings: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Keyword arguments of the stock ``__call__``: the settings and the embeddings on the device.

        ``embeds`` holds :attr:`conditioning_names` and, for guidance, their ``negative_`` twins
        (dropped when the settings do not guide).
        """
        kwargs = {k: v for k, v in settings.items() if v is not None}
        if self.guided(kwargs):
            missing = [f"negative_{n}" for n in self.conditioning_names if f"negative_{n}" not in embeds]
            if missing:
                what = f"{self.cfg_setting} > 1" if self.cfg_setting else f"{self.spec.pipeline_class}"
                raise ValueError(f"{what} needs {', '.join(missing)}")
        else:
            embeds = {k: v for k, v in embeds.items() if not k.startswith("negative_")}
        for name, tensor in embeds.items():
            # Masks keep the dtype the stock encode_prompt gives them; embeddings take the transformer's.
            kwargs[name] = tensor.to(self.device) if name.endswith("mask") else self._to_pipe(pipe, tensor)
        return kwargs

    def generate(
        self,
        pipe: DiffusionPipeline,
        embeds: dict[str, torch.Tensor],
        generators: list[torch.Generator],
        settings: dict[str, Any],
    ) -> list[Any]:
        """Run the stock pipeline on a batch of embeddings; one output (image, or list of frames) per row."""
        out = pipe(**self.call_kwargs(pipe, embeds, settings), generator=generators)
        return out.frames if self.spec.kind == "video" else out.images

    def _to_pipe(self, pipe: DiffusionPipeline, tensor: torch.Tensor) -> torch.Tensor:
        # With or without offload hooks the pipeline executes on self.device; asking the pipeline
        # (``_execution_device``) walks every module and costs milliseconds per call.
        return tensor.to(self.device, pipe.transformer.dtype)

    # ---- calibration: the decoder in the training loop ----------------------------------------
    # Calibration (thinkdiff.training.calibration) trains the aligner through the frozen denoiser:
    # it needs one differentiable model call and the noise process, nothing of the sampler. The
    # defaults below are rectified flow (FLUX, SD3, Chroma, LTX); a decoder with another process
    # (e.g. epsilon prediction) overrides add_noise / euler_step.

    def calibration_conditioning(
        self, pipe: DiffusionPipeline, text: str | None, max_length: int | None
    ) -> dict[str, torch.Tensor]:
        """One sample's conditioning as :meth:`velocity` takes it (batch dimension 1): the
        teacher's ``prompt_embeds`` of ``text`` with the decoder's other keys, or, with
        ``text=None``, only the other keys, those that go with aligned features at inference
        (FLUX: the pooled CLIP vector of ``""``). ``max_length=None``: the text at its own token
        count (no padding); else padded or cut to ``max_length`` as the text bridge does."""
        raise NotImplementedError(f"{type(self).__name__} does not support calibration yet")

    def latent_shape(self, pipe: DiffusionPipeline, height: int, width: int) -> tuple[int, ...]:
        """Shape of one sample's latents (FLUX: packed tokens x channels) at a pixel size."""
        raise NotImplementedError(f"{type(self).__name__} does not support calibration yet")

    def image_latents(self, pipe: DiffusionPipeline, images_BHWC: np.ndarray) -> torch.Tensor:
        """Clean latents ``[B, *latent_shape]`` of uint8 images (the 'source' noisy inputs)."""
        raise NotImplementedError(f"{type(self).__name__} does not support calibration yet")

    def velocity(
        self,
        pipe: DiffusionPipeline,
        latents: torch.Tensor,
        sigmas_B: torch.Tensor,
        conditioning: Mapping[str, torch.Tensor],
        height: int,
        width: int,
    ) -> torch.Tensor:
        """The denoiser's output on ``latents`` at noise levels ``sigmas_B`` in [0, 1] (1 = pure
        noise), conditioned on ``conditioning`` (``prompt_embeds [B, L, D]`` plus the decoder's other
        keys); same shape as ``latents``. One transformer call, differentiable in the conditioning
        (the transformer's own weights stay frozen). Guidance-distilled models get their default
        guidance; no classifier-free guidance (one pass)."""
        raise NotImplementedError(f"{type(self).__name__} does not support calibration yet")

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, sigmas_B: torch.Tensor) -> torch.Tensor:
        """``x_sigma`` of the forward process: rectified flow ``(1 - sigma) x0 + sigma noise``."""
        s = sigmas_B.reshape(-1, *[1] * (clean.ndim - 1)).to(clean.dtype)
        return (1 - s) * clean + s * noise

    def euler_step(
        self, latents: torch.Tensor, output: torch.Tensor, sigma: float, sigma_next: float
    ) -> torch.Tensor:
        """One sampler step from ``sigma`` to ``sigma_next`` given :meth:`velocity`'s output."""
        return latents + (sigma_next - sigma) * output

    def flow_target(self, clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What :meth:`velocity` should output on :meth:`add_noise`'s result (flow matching)."""
        return noise - clean

    def _calibration_length(self, pipe: DiffusionPipeline, text: str, max_length: int | None) -> int:
        """T5 tokens of a teacher text: ``max_length``, or the text's own count within the limit."""
        if max_length is not None:
            return max_length
        tokenizer = getattr(pipe, self.text_encoder_components["t5"][1])
        count = len(tokenizer(text).input_ids)
        return count if self.spec.max_length is None else min(count, self.spec.max_length)

    def _encode_images(self, pipe: DiffusionPipeline, images_BHWC: np.ndarray, *, video: bool = False) -> torch.Tensor:
        """The VAE's latents (a posterior sample) of uint8 images, unscaled; ``video``: each image as a
        one-frame clip ``[B, 3, 1, H, W]``."""
        if getattr(pipe, "vae", None) is None:
            raise ValueError("'source' noisy inputs need the decoder's VAE loaded")
        x = torch.as_tensor(np.asarray(images_BHWC)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if video:
            x = x[:, :, None]
        with torch.no_grad():
            return pipe.vae.encode(x.to(self.device, pipe.vae.dtype)).latent_dist.sample()

    def _vae_latents(self, pipe: DiffusionPipeline, images_BHWC: np.ndarray) -> torch.Tensor:
        """Scaled VAE latents ``[B, C, h, w]`` of uint8 images (SD3, PixArt-Sigma, Chroma before packing)."""
        z = self._encode_images(pipe, images_BHWC)
        return (z - (pipe.vae.config.shift_factor or 0.0)) * pipe.vae.config.scaling_factor


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
    max_t5_tokens: ClassVar[int] = 512
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


class _MaskedT5Decoder(DiffusionDecoder):
    """A decoder that reads T5 states with an attention mask and nothing else (Chroma, PixArt-Sigma,
    LTX-Video). Its guidance is classifier-free guidance on ``guidance_scale`` with a negative
    prompt: ThinkDiff passes T5 of ``""`` at the prompt's length, with the decoder's own mask."""

    text_encoder_components: ClassVar[dict[str, tuple[str, ...]]] = {"t5": ("text_encoder", "tokenizer")}
    conditioning_names: ClassVar[tuple[str, ...]] = ("prompt_embeds", "prompt_attention_mask")
    cfg_setting: ClassVar[str | None] = "guidance_scale"

    def calibration_conditioning(
        self, pipe: DiffusionPipeline, text: str | None, max_length: int | None
    ) -> dict[str, torch.Tensor]:
        # Aligned features need nothing else: every token is attended (the mask defaults to ones).
        if text is None:
            return {}
        encoded = self.encode_text(pipe, [text], self._calibration_length(pipe, text, max_length))
        assert encoded.mask is not None
        return {"prompt_embeds": encoded.embeds, "prompt_attention_mask": encoded.mask}

    def _calibration_mask(self, conditioning: Mapping[str, torch.Tensor], prompt_BLD: torch.Tensor) -> torch.Tensor:
        """The conditioning's mask on the device, or all ones (aligned features) in the stock dtype."""
        mask = conditioning.get("prompt_attention_mask")
        if mask is None:
            dtype = self.attention_mask_dtype
            mask = torch.ones(prompt_BLD.shape[:2], dtype=dtype if dtype is not None else torch.bool)
        return mask.expand(prompt_BLD.shape[0], -1).to(self.device)


class ChromaDecoder(_MaskedT5Decoder):
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


class _UnpackedLatents(DiffusionDecoder):
    """Calibration latents as the VAE gives them, ``[C, H / f, W / f]`` (SD3, PixArt-Sigma)."""

    def latent_shape(self, pipe: DiffusionPipeline, height: int, width: int) -> tuple[int, ...]:
        scale = pipe.vae_scale_factor
        return (int(pipe.transformer.config.in_channels), height // scale, width // scale)

    def image_latents(self, pipe: DiffusionPipeline, images_BHWC: np.ndarray) -> torch.Tensor:
        return self._vae_latents(pipe, images_BHWC)


class PixArtSigmaDecoder(_UnpackedLatents, _MaskedT5Decoder):
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


class LTXVideoDecoder(_MaskedT5Decoder):
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


class StableDiffusion3Decoder(_UnpackedLatents):
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


DECODER_CLASSES: dict[str, type[DiffusionDecoder]] = {
    "flux": FluxDecoder,
    "cogvideox": CogVideoXDecoder,
    "chroma": ChromaDecoder,
    "pixart-sigma": PixArtSigmaDecoder,
    "sd3": StableDiffusion3Decoder,
    "ltx-video": LTXVideoDecoder,
}
"""Decoder family (:attr:`DecoderSpec.family`) -> its :class:`DiffusionDecoder`."""


def load_decoder(
    spec: DecoderSpec,
    device: torch.device,
    dtype: torch.dtype,
    offload: Offload = "none",
    quantize: Quantize = "none",
    transformer_file: str | Path | None = None,
) -> DiffusionDecoder:
    """The :class:`DiffusionDecoder` for a spec's family."""
    return DECODER_CLASSES[spec.family](spec, device, dtype, offload, quantize, transformer_file)
