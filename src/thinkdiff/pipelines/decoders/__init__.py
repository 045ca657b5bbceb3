"""Stock diffusers decoders that take T5 prompt embeddings: FLUX.1, Chroma, PixArt-Sigma and Stable
Diffusion 3 / 3.5 (images); CogVideoX and LTX-Video (video).

One module per family, each a :class:`DiffusionDecoder` subclass over the shared interface
(:mod:`.base`) and what a folder is (:mod:`.spec`, read from its configs alone). This module is
the index: adding a family is adding its module and its line in :data:`DECODER_CLASSES` (and
teaching :meth:`DecoderSpec.inspect` the pipeline class its ``model_index.json`` names).
"""

from __future__ import annotations

from pathlib import Path

import torch

from thinkdiff.models.quantization import Quantize
from thinkdiff.pipelines.constants import DECODER_DESCRIPTOR, DEFAULT_DECODER, OFFLOAD_MODES, Offload
from thinkdiff.pipelines.decoders.base import DiffusionDecoder, TextEncoding, call_defaults, release
from thinkdiff.pipelines.decoders.chroma import ChromaDecoder
from thinkdiff.pipelines.decoders.cogvideox import CogVideoXDecoder
from thinkdiff.pipelines.decoders.flux import FluxDecoder, latents_to_pixels, pixels_to_latents
from thinkdiff.pipelines.decoders.ltx_video import LTXVideoDecoder
from thinkdiff.pipelines.decoders.pixart_sigma import PixArtSigmaDecoder
from thinkdiff.pipelines.decoders.sd3 import StableDiffusion3Decoder
from thinkdiff.pipelines.decoders.spec import (
    KNOWN_DECODERS,
    MAX_SEQUENCE_LENGTHS,
    DecoderSpec,
    write_pixel_space_descriptor,
)

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
