"""Inference: interleaved images + text -> prompt embeddings for stock diffusers decoders.

See :class:`ThinkDiffPipeline` (``from_pretrained``, ``encode``, ``__call__``), ``thinkdiff
generate`` and ``thinkdiff convert-official``. Names are imported on first use, so importing this
package (or :mod:`thinkdiff.pipelines.constants`) stays cheap for the command line.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "DECODER_DESCRIPTOR": "constants",
    "DEFAULT_DECODER": "constants",
    "DEFAULT_INSTRUCTION": "constants",
    "DEFAULT_LVLM": "constants",
    "DEFAULT_QCD_ALPHA": "constants",
    "HINT_INSTRUCTION": "constants",
    "MODES": "constants",
    "Mode": "constants",
    "OFFLOAD_MODES": "constants",
    "Offload": "constants",
    "Item": "requests",
    "PreparedRequest": "requests",
    "Request": "requests",
    "cobsat_items": "requests",
    "prepare_requests": "requests",
    "ChromaDecoder": "decoders",
    "CogVideoXDecoder": "decoders",
    "DecoderSpec": "decoders",
    "DiffusionDecoder": "decoders",
    "FluxDecoder": "decoders",
    "LTXVideoDecoder": "decoders",
    "PixArtSigmaDecoder": "decoders",
    "StableDiffusion3Decoder": "decoders",
    "TextEncoding": "decoders",
    "latents_to_pixels": "decoders",
    "pixels_to_latents": "decoders",
    "InferenceSettings": "settings",
    "SeededImageGenerator": "seeded",
    "ThinkDiffEmbeddings": "results",
    "ThinkDiffOutput": "results",
    "ThinkDiffPipeline": "pipeline_thinkdiff",
    "aligner_from_official_state_dict": "official",
    "convert_official_checkpoint": "official",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
