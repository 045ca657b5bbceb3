"""What a decoder folder is, read from its configs alone: :class:`DecoderSpec` and the FLUX
descriptor (:data:`DECODER_DESCRIPTOR`) for what a folder's configs cannot say.

:meth:`DecoderSpec.inspect` reads only the configs, so a width mismatch or an unsupported folder is
reported before any weights load. Every size (prompt width, pooled width, required prompt length)
comes from those configs.

A FLUX folder may also hold :data:`DECODER_DESCRIPTOR` (``thinkdiff_decoder.json``). The mini
world's FLUX, for one, has no VAE: it denoises pixel-unshuffled images directly, and samples with 20
steps and true classifier-free guidance 3.0::

    {"latent_space": "pixels", "pixel_unshuffle": 2, "sample_size": 32, "max_sequence_length": 16,
     "defaults": {"num_inference_steps": 20, "true_cfg_scale": 3.0}}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from thinkdiff.models.loading import resolve_model_dir
from thinkdiff.pipelines.constants import DECODER_DESCRIPTOR
from thinkdiff.utils import atomic_write_text

# Enough of a hub snapshot to read every config without downloading weights.
CONFIG_FILES = [
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


FLUX_MAX_T5_TOKENS = 512
"""The longest T5 prompt FLUX.1 was trained with (``FluxPipeline.check_inputs`` refuses a longer
``max_sequence_length``)."""


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
        folder = resolve_model_dir(name_or_path, kind="diffusion decoder", files=CONFIG_FILES)
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
    limit = FLUX_MAX_T5_TOKENS
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
