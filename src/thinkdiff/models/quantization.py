"""Quantized low-VRAM modes for the LVLM and the decoder's transformer, through the libraries' own configs.

``--quantize`` (:data:`QUANTIZE_MODES`):

- ``none``: the weights in the pipeline's dtype (bf16 on a GPU);
- ``nf4``: bitsandbytes 4-bit NormalFloat (``transformers.BitsAndBytesConfig`` for the LVLM,
  ``diffusers.BitsAndBytesConfig`` for the transformer), compute in the pipeline's dtype. CUDA only;
- ``int8``: torchao int8 weight-only (``TorchAoConfig(Int8WeightOnlyConfig())``). Runs on the CPU
  too (tested there), where it saves memory but not time;
- ``fp8``: torchao fp8 weight-only (``Float8WeightOnlyConfig``). Needs a CUDA GPU of compute
  capability 8.9 or newer (Ada, Hopper).

The decoder's transformer and its T5 encoder (T5-XXL: 9.5 GB in bf16, loaded for extra text,
guidance negatives and text-bridge) get their configs through ``diffusers.PipelineQuantizationConfig``
(``quant_mapping={"transformer": <diffusers config>, "text_encoder_2": <transformers config>}``);
CLIP and the VAE stay as they are. A GGUF transformer file (``--transformer-file x.gguf``) is
loaded with the transformer class's ``from_single_file`` and ``GGUFQuantizationConfig`` and passed
to the stock pipeline instead (``--quantize`` then applies to the LVLM and T5).

:func:`check_quantize` says in one line why a mode cannot run here (no CUDA for bitsandbytes, no
torchao, an older GPU for fp8) before any weights load, and :func:`offload_conflict` why a
quantization cannot be offloaded the way ``--offload`` asks.
"""

from __future__ import annotations

import importlib
import importlib.util
import struct
from pathlib import Path
from typing import Any, Literal

import torch

from thinkdiff.pipelines.constants import QUANTIZE_MODES

__all__ = [
    "QUANTIZE_MODES",
    "Quantize",
    "check_gguf_file",
    "check_quantize",
    "diffusers_quantization",
    "gguf_mismatch",
    "gguf_quantization",
    "offload_conflict",
    "pipeline_quantization",
    "transformers_quantization",
]

Quantize = Literal["none", "nf4", "int8", "fp8"]
"""One of :data:`QUANTIZE_MODES` (defined with the CLI's other names in ``pipelines.constants``)."""

_INSTALL = "pip install 'thinkdiff[quantize]'"


def check_quantize(mode: str, device: torch.device) -> None:
    """Raise ``ValueError`` (one line) when ``mode`` cannot run on ``device`` with what is installed."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(QUANTIZE_MODES)}")
    if mode == "none":
        return
    if mode == "nf4":
        if device.type != "cuda":
            raise ValueError(
                "--quantize nf4 uses bitsandbytes, which needs a CUDA GPU; without one use --quantize int8 "
                "(torchao, runs on the CPU too)"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError(f"--quantize nf4 needs bitsandbytes: {_INSTALL}")
        return
    if importlib.util.find_spec("torchao") is None:
        raise ValueError(f"--quantize {mode} needs torchao: {_INSTALL}")
    if mode == "fp8":
        if device.type != "cuda":
            raise ValueError("--quantize fp8 needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper)")
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise ValueError(
                f"--quantize fp8 needs compute capability 8.9 or newer (Ada, Hopper); this GPU has "
                f"{major}.{minor}: use --quantize int8 or nf4"
            )


def offload_conflict(mode: str, offload: str, gguf: bool = False) -> str | None:
    """Why the decoder's weights quantized with ``mode`` (or loaded from a GGUF file) cannot be
    offloaded with ``offload`` (one line); ``None`` where they can.

    Sequential offload is accelerate's ``cpu_offload``, which moves every weight to the meta device
    and back by rebuilding it from its class: a bitsandbytes 4-bit weight is then quantized again
    from its packed bytes ("Blockwise quantization only supports 16/32-bit floats, but got
    torch.uint8"; bitsandbytes will not support it), and a ``GGUFParameter`` is rebuilt without its
    quantization type (``KeyError: None``). accelerate moves torchao weights as they are (tested on
    the CPU), and model and group offload move whole tensors, as diffusers documents with
    quantized models: those combinations are accepted.
    """
    if offload != "sequential":
        return None
    instead = "use --offload model or group"
    if mode == "nf4":
        return (
            "--quantize nf4 cannot run with --offload sequential: accelerate's per-module offload re-quantizes "
            f"bitsandbytes 4-bit weights; {instead}, or --quantize int8"
        )
    if gguf:
        return (
            "--transformer-file (GGUF) cannot run with --offload sequential: accelerate's per-module offload "
            f"rebuilds GGUF weights without their quantization type; {instead}"
        )
    return None


def _torchao_config(mode: str) -> Any:
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    # version 2: the tensor subclasses torchao keeps (version 1 is deprecated and warns on every layer).
    return Int8WeightOnlyConfig(version=2) if mode == "int8" else Float8WeightOnlyConfig()


def _library_quantization(library: str, mode: str, compute_dtype: torch.dtype) -> Any:
    """``library``'s (transformers' or diffusers') own config for ``mode``; ``None`` for ``none``.
    Both libraries name them alike and take the same arguments."""
    if mode == "none":
        return None
    module = importlib.import_module(library)
    if mode == "nf4":
        return module.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
        )
    return module.TorchAoConfig(_torchao_config(mode))


def transformers_quantization(mode: str, compute_dtype: torch.dtype) -> Any:
    """The ``quantization_config`` for a transformers model (the LVLM, T5); ``None`` for ``none``."""
    return _library_quantization("transformers", mode, compute_dtype)


def diffusers_quantization(mode: str, compute_dtype: torch.dtype) -> Any:
    """The ``quantization_config`` for a diffusers model (the decoder's transformer); ``None`` for ``none``."""
    return _library_quantization("diffusers", mode, compute_dtype)


def pipeline_quantization(
    mode: str,
    compute_dtype: torch.dtype,
    diffusers_components: tuple[str, ...] = ("transformer",),
    transformers_components: tuple[str, ...] = (),
) -> Any:
    """``diffusers.PipelineQuantizationConfig`` for a stock pipeline's ``from_pretrained``: the
    ``diffusers_components`` (the transformer) with a diffusers config, the
    ``transformers_components`` (the T5 encoder) with a transformers one; ``None`` for ``none`` or
    no component."""
    if mode == "none" or not (diffusers_components or transformers_components):
        return None
    from diffusers.quantizers import PipelineQuantizationConfig

    mapping = {name: diffusers_quantization(mode, compute_dtype) for name in diffusers_components}
    mapping |= {name: transformers_quantization(mode, compute_dtype) for name in transformers_components}
    return PipelineQuantizationConfig(quant_mapping=mapping)


GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # what the gguf package reads (version 1 used 32-bit counts)
_GGUF_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, metadata key count
_GGUF_SMALLEST_ENTRY = 16  # bytes of the shortest key/value or tensor-info record


def check_gguf_file(path: str | Path) -> None:
    """Raise ``ValueError`` (one line naming ``path``) unless it is a whole GGUF file of tensors.

    Read before diffusers sees it (whose errors on a text file or a cut-off download are
    tracebacks): the magic and version, counts that fit the file, and, with the ``gguf`` package
    diffusers loads it with, the metadata and tensor table parsed and every tensor's data inside
    the file. Nothing but the header and the tables is read.
    """
    path = Path(path)
    flag = f"--transformer-file {path}"
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(_GGUF_HEADER.size)
    if head[:4] != GGUF_MAGIC:
        raise ValueError(f"{flag} is not a GGUF file (it starts with {head[:4]!r}, not {GGUF_MAGIC!r})")
    if len(head) < _GGUF_HEADER.size:
        raise ValueError(f"{flag} is cut off: {size} bytes, shorter than a GGUF header")
    _, version, tensors, keys = _GGUF_HEADER.unpack(head)
    if version not in GGUF_VERSIONS:
        raise ValueError(f"{flag} is GGUF version {version}; diffusers reads versions 2 and 3")
    if tensors == 0 or (tensors + keys) * _GGUF_SMALLEST_ENTRY > size:
        raise ValueError(f"{flag}: its header lists {tensors} tensors and {keys} metadata keys, which a "
                         f"{size}-byte file cannot hold (damaged or cut off)")
    if importlib.util.find_spec("gguf") is None:
        raise ValueError(f"--transformer-file needs the gguf package: {_INSTALL}")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path, "r")
        end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    except Exception as exc:  # the reader raises ValueError, IndexError, struct.error, ... on bad tables
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{flag} is damaged or cut off ({size} bytes; its tables do not read: {detail})") from exc
    if end > size:
        raise ValueError(f"{flag} is cut off: its tensors end at byte {end}, the file has {size}")


def gguf_mismatch(path: str | Path, expected: dict[str, tuple[int, ...]], model: str) -> str:
    """One line saying how the GGUF file at ``path`` differs from ``model``, whose tensors are
    ``expected`` (name -> shape, from its config): tensors it lacks, tensors the model has no
    place for, and shapes that differ, each counted with a first example. Used when
    ``from_single_file`` fails on a whole GGUF file, which is then a GGUF of another model (its
    errors are an ``IndexError`` in a key converter or a shape mismatch deep in loading)."""
    from gguf import GGUFReader

    found = {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in GGUFReader(path, "r").tensors}
    extra = [name for name in found if name not in expected]
    missing = [name for name in expected if name not in found]
    shapes = [name for name in found if name in expected and found[name] != expected[name]]
    parts = []
    if extra:
        parts.append(f"{len(extra)} of its {len(found)} tensors are not in the transformer (e.g. {extra[0]})")
    if missing:
        parts.append(f"{len(missing)} of the transformer's {len(expected)} tensors are not in it (e.g. {missing[0]})")
    if shapes:
        name = shapes[0]
        parts.append(
            f"{len(shapes)} tensors have other shapes (e.g. {name}: {found[name]} in the file, {expected[name]} "
            "in the config)"
        )
    differences = "; ".join(parts) or "its tensors have the config's names and shapes, but diffusers cannot load it"
    return f"--transformer-file {path} is not a GGUF of {model}: {differences}"


def gguf_quantization(compute_dtype: torch.dtype) -> Any:
    """``GGUFQuantizationConfig`` for a transformer loaded with ``from_single_file`` from a ``.gguf`` file."""
    from diffusers import GGUFQuantizationConfig

    return GGUFQuantizationConfig(compute_dtype=compute_dtype)
