"""Converting the authors' released checkpoints into a ThinkDiff model folder.

The release (``thinkdiff_lvlm.pth``, ``thinkdiff_clip.pth``) stores ``{'model': state_dict}`` whose
aligner tensors are::

    mm_projector.0.weight [hidden, in]   first Linear        -> fc1.weight
    mm_projector.0.bias   [hidden]                            -> fc1.bias
    mm_projector.2.weight [out, hidden]  second Linear (1 = GELU) -> fc2.weight
    mm_projector.2.bias   [out]                               -> fc2.bias
    mm_projector.3.weight [out]          T5 RMSNorm           -> final_norm.weight

The file is read with ``torch.load(weights_only=True)`` (no code runs). Everything else in it is
ignored with a warning; a missing, extra or mis-shaped aligner tensor is an error.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from thinkdiff.models.aligner import Aligner
from thinkdiff.models.bundle import INFO_FILE, ThinkDiffInfo, save_model
from thinkdiff.models.loading import TINY_PREFIX, resolve_model_dir
from thinkdiff.utils import file_sha256

__all__ = ["OFFICIAL_DEFAULTS", "aligner_from_official_state_dict", "convert_official_checkpoint"]

logger = logging.getLogger(__name__)

# Torch's weights-only refusal is several lines that end by suggesting to turn weights_only off, the
# one thing never to do with a file from the internet; these lines are dropped from what we show.
_TORCH_ADVICE = re.compile(r"weights_only|Weights only load failed|Check the documentation|file an issue")


def _load_refusal(checkpoint: Path, error: Exception) -> str:
    """One line saying why ``checkpoint`` cannot be read, without torch's advice to unpickle it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if isinstance(error, pickle.UnpicklingError):
        detail = next((line for line in lines if not _TORCH_ADVICE.search(line)), "unsupported pickle").rstrip(".")
        if "GLOBAL" in detail:  # the pickle names a class or function to call
            return (
                f"{checkpoint} holds pickled objects besides tensors ({detail}); they are never loaded, since "
                "unpickling them could run code: only a plain state dict of tensors can be converted"
            )
        return f"cannot read {checkpoint} as a torch checkpoint of plain tensors ({detail})"
    return f"cannot read {checkpoint} as a torch checkpoint ({type(error).__name__}: {lines[0] if lines else ''})"


PREFIX = "mm_projector."
KEY_MAP: dict[str, str] = {
    "0.weight": "fc1.weight",
    "0.bias": "fc1.bias",
    "2.weight": "fc2.weight",
    "2.bias": "fc2.bias",
    "3.weight": "final_norm.weight",
}

OFFICIAL_DEFAULTS: dict[str, dict[str, str]] = {
    "lvlm": {
        "source_model": "Qwen/Qwen2-VL-7B-Instruct",
        "proxy_t5": "google/flan-t5-xxl",
        "diffusion_decoder": "black-forest-labs/FLUX.1-dev",
    },
    "clip": {
        "source_model": "Salesforce/blip2-flan-t5-xxl",
        "proxy_t5": "google/flan-t5-xxl",
        "diffusion_decoder": "black-forest-labs/FLUX.1-dev",
    },
}
"""What the released checkpoints were trained with (see the reference notes)."""


def aligner_from_official_state_dict(state_dict: Mapping[str, Any]) -> tuple[Aligner, list[str]]:
    """Build an fp32 :class:`Aligner` from a released state dict; also return the ignored keys.

    Keys may carry one common prefix before ``mm_projector.`` (e.g. ``module.`` from DDP).
    """
    prefixes = {key[: key.index(PREFIX)] for key in state_dict if PREFIX in key}
    if not prefixes:
        raise ValueError(f"no {PREFIX}* tensors found: this is not a released ThinkDiff checkpoint")
    if len(prefixes) > 1:
        raise ValueError(f"{PREFIX}* tensors appear under several prefixes: {sorted(prefixes)}")
    prefix = prefixes.pop() + PREFIX
    ours = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
    ignored = sorted(key for key in state_dict if not key.startswith(prefix))

    missing = [prefix + k for k in KEY_MAP if k not in ours]
    unexpected = [prefix + k for k in ours if k not in KEY_MAP]
    if missing:
        raise ValueError(f"missing aligner tensors: {', '.join(missing)}")
    if unexpected:
        raise ValueError(
            f"unexpected aligner tensors (not Linear-GELU-Linear-RMSNorm): {', '.join(unexpected)}"
        )
    for key, value in ours.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise ValueError(f"{prefix}{key} is not a floating-point tensor ({type(value).__name__})")

    w1, w2 = ours["0.weight"], ours["2.weight"]
    if w1.ndim != 2 or w2.ndim != 2:
        raise ValueError(
            f"{prefix}0.weight and {prefix}2.weight must be 2-D, got {list(w1.shape)}, {list(w2.shape)}"
        )
    hidden, in_dim = w1.shape
    out_dim = w2.shape[0]
    expected = {
        "0.bias": (hidden,),
        "2.weight": (out_dim, hidden),
        "2.bias": (out_dim,),
        "3.weight": (out_dim,),
    }
    for key, shape in expected.items():
        if tuple(ours[key].shape) != shape:
            raise ValueError(
                f"{prefix}{key} has shape {list(ours[key].shape)}, expected {list(shape)} "
                f"(from {prefix}0.weight {list(w1.shape)} and {prefix}2.weight {list(w2.shape)})"
            )

    aligner = Aligner(in_dim, out_dim, hidden_dim=hidden if hidden != out_dim else None, norm="t5")
    # strict: every parameter of ours is set by exactly one released tensor.
    aligner.load_state_dict({ours_key: ours[k].float() for k, ours_key in KEY_MAP.items()}, strict=True)
    return aligner.eval(), ignored


def convert_official_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    variant: str,
    *,
    source_model: str | None = None,
    proxy_t5: str | None = None,
    diffusion_decoder: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Turn a released ``.pth`` into a model folder for ``ThinkDiffPipeline`` / ``thinkdiff generate``.

    ``source_model``, ``proxy_t5`` and ``diffusion_decoder`` default to the release's models
    (:data:`OFFICIAL_DEFAULTS`). Raises ``FileNotFoundError`` / ``ValueError`` on bad input; the
    folder is written atomically, so a failed conversion leaves nothing behind.
    """
    if variant not in OFFICIAL_DEFAULTS:
        raise ValueError(f"variant must be 'lvlm' or 'clip', got {variant!r}")
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    if out_dir.exists() and not overwrite:
        raise ValueError(f"{out_dir} already exists (pass overwrite=True / --overwrite to replace it)")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / INFO_FILE).is_file():
        raise ValueError(f"{out_dir} is a non-empty folder that is not a ThinkDiff model: not replacing it")

    try:
        # weights_only: a checkpoint from the internet must not run code when it is read.
        loaded = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise ValueError(_load_refusal(checkpoint, error)) from error
    if not isinstance(loaded, Mapping):
        raise ValueError(
            f"{checkpoint} holds a {type(loaded).__name__}, expected a dict with a 'model' state dict"
        )
    if "model" in loaded:
        state_dict = loaded["model"]
        others = sorted(str(k) for k in loaded if k != "model")
        if others:
            logger.warning("%s: ignoring top-level entries %s", checkpoint.name, others)
        if not isinstance(state_dict, Mapping):
            raise ValueError(
                f"{checkpoint}: 'model' holds a {type(state_dict).__name__}, expected a state dict"
            )
    else:
        state_dict = loaded  # a bare state dict: accepted, the aligner keys decide
    aligner, ignored = aligner_from_official_state_dict(state_dict)
    if ignored:
        shown = ", ".join(ignored[:5]) + (", ..." if len(ignored) > 5 else "")
        logger.warning(
            "%s: ignoring %d tensors outside the aligner (%s)", checkpoint.name, len(ignored), shown
        )

    defaults = OFFICIAL_DEFAULTS[variant]
    source_model = source_model or defaults["source_model"]
    diffusion_decoder = diffusion_decoder or defaults["diffusion_decoder"]
    _check_local_widths(aligner, variant, source_model, diffusion_decoder)
    info = ThinkDiffInfo(
        variant=variant,
        source_model=source_model,
        proxy_t5=proxy_t5 or defaults["proxy_t5"],
        diffusion_decoder=diffusion_decoder,
        in_dim=aligner.in_dim,
        out_dim=aligner.out_dim,
        features="generated",
        # The release's decoding: exactly 128 sampled tokens (temperature 0.6, top-p 0.9).
        inference={"num_tokens": 128, "stop_at_eos": False, "greedy": False, "temperature": 0.6, "top_p": 0.9},
        extra={
            "converted_from": checkpoint.name,
            "sha256": file_sha256(checkpoint),
            "ignored_tensors": len(ignored),
        },
    )
    return save_model(out_dir, aligner, info)


def _is_local(name: str) -> bool:
    return name.startswith(TINY_PREFIX) or Path(name).expanduser().is_dir()


def _check_local_widths(aligner: Aligner, variant: str, source_model: str, decoder: str) -> None:
    """Compare the aligner's widths with the source model and decoder when they are on disk.

    Hub ids are not fetched here (conversion works offline); ``thinkdiff generate`` checks them.
    """
    import json

    from thinkdiff.pipelines.decoders import DecoderSpec

    if _is_local(source_model):
        config = json.loads(
            (resolve_model_dir(source_model, kind="source model") / "config.json").read_text()
        )
        section = config.get("vision_config" if variant == "clip" else "text_config", config)
        width = section.get("hidden_size")
        if width is not None and width != aligner.in_dim:
            raise ValueError(
                f"the checkpoint's aligner reads {aligner.in_dim}-wide features but {source_model} gives {width}"
            )
    if _is_local(decoder):
        spec = DecoderSpec.inspect(decoder)
        if spec.prompt_width != aligner.out_dim:
            raise ValueError(
                f"the checkpoint's aligner writes {aligner.out_dim}-wide embeddings but {decoder} takes "
                f"{spec.prompt_width}-wide ones"
            )
