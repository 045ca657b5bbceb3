"""Checkpoints: written atomically, kept to the last K, loaded strictly, never executing code.

A checkpoint is a folder ``checkpoints/step-0000100/`` holding ``aligner.safetensors`` and the
trainer state (optimiser, step, counters, RNG states, data position, config) as
``trainer_state.safetensors`` (its tensors) + ``trainer_state.json`` (everything else, with the
tensors referred to by name). Neither format can run code when read, so a run folder someone hands
you is as safe to resume as your own. Checkpoints of earlier versions (``trainer_state.pt``) are
read with ``torch.load(weights_only=True)`` allowing only the numpy types of an RNG state; a
pickle that needs anything else is refused. A checkpoint is written under a temporary name and
renamed, so every ``step-*`` folder that exists is complete.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from thinkdiff.models.bundle import WEIGHTS_FILE
from thinkdiff.models.state_dicts import read_state_dict_strictly
from thinkdiff.utils import atomic_path

_STEP_DIR = re.compile(r"^step-(\d+)$")
ALIGNER_FILE = "aligner.safetensors"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
LEGACY_STATE = "trainer_state.pt"
_STATE_KEYS = ("step", "skipped_steps", "optimizer", "rng", "data", "world_size", "config")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: Path, step: int, aligner: nn.Module, trainer_state: dict[str, Any], keep_last: int
) -> Path:
    """Write ``checkpoints/step-{step}`` atomically, then delete all but the newest ``keep_last``."""
    target = Path(output_dir) / "checkpoints" / f"step-{step:07d}"
    tree, tensors = encode_state(trainer_state)
    with atomic_path(target) as tmp:
        tmp.mkdir(parents=True)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in aligner.state_dict().items()},
            str(tmp / ALIGNER_FILE),
        )
        save_file(tensors, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps(tree, indent=1) + "\n")
    for old in checkpoint_dirs(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target


# ---- the trainer state as JSON + safetensors ------------------------------------------------------
# JSON holds the structure; tensors and numpy arrays are stored in safetensors and referred to by
# name. Tuples and dicts with non-string keys (the optimiser's parameter ids) get a marker object.
_TENSOR, _ARRAY, _TUPLE, _DICT = "__tensor__", "__ndarray__", "__tuple__", "__dict__"
_MARKERS = (_TENSOR, _ARRAY, _TUPLE, _DICT)


def encode_state(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split ``state`` (dicts, lists, tuples, numbers, strings, tensors, numpy arrays) into a JSON
    tree and the tensors it refers to."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            name = f"t{len(tensors)}"
            tensors[name] = value.detach().cpu().contiguous().clone()
            return {_TENSOR: name}
        if isinstance(value, np.ndarray):
            name = f"t{len(tensors)}"
            tensors[name] = torch.from_numpy(np.ascontiguousarray(value).copy())
            return {_ARRAY: name}
        if isinstance(value, tuple):
            return {_TUPLE: [encode(v) for v in value]}
        if isinstance(value, list):
            return [encode(v) for v in value]
        if isinstance(value, dict):
            if all(isinstance(k, str) and k not in _MARKERS for k in value):
                return {k: encode(v) for k, v in value.items()}
            return {_DICT: [[encode(k), encode(v)] for k, v in value.items()]}
        if isinstance(value, np.generic):
            return value.item()
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot store a {type(value).__name__} in a trainer state")

    return encode(state), tensors


def decode_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_state`; ``ValueError`` for anything it would not have written."""

    def decode(value: Any) -> Any:
        if isinstance(value, list):
            return [decode(v) for v in value]
        if not isinstance(value, dict):
            return value
        marker = [k for k in _MARKERS if k in value]
        if not marker:
            return {k: decode(v) for k, v in value.items()}
        if len(value) != 1:
            raise ValueError(f"malformed entry {sorted(value)}")
        kind, inner = marker[0], value[marker[0]]
        if kind in (_TENSOR, _ARRAY):
            if not isinstance(inner, str) or inner not in tensors:
                raise ValueError(f"refers to tensor {inner!r}, which is not in {STATE_TENSORS}")
            return tensors[inner] if kind == _TENSOR else tensors[inner].numpy()
        if not isinstance(inner, list):
            raise ValueError(f"malformed {kind} entry")
        if kind == _TUPLE:
            return tuple(decode(v) for v in inner)
        if not all(isinstance(pair, list) and len(pair) == 2 for pair in inner):
            raise ValueError(f"malformed {kind} entry")
        return {_hashable(decode(k)): decode(v) for k, v in inner}

    return decode(tree)


def _hashable(key: Any) -> Any:
    if isinstance(key, (dict, list)):
        raise ValueError(f"a {type(key).__name__} cannot be a dict key")
    return key


# ---- reading -------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """A checkpoint read and checked in full, before anything of it is applied."""

    folder: Path
    aligner_state: dict[str, torch.Tensor]
    trainer_state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.trainer_state["step"])


def read_aligner_weights(aligner: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """Read aligner weights and check them against ``aligner`` (names and shapes), without applying
    them: a missing, unexpected or mis-shaped tensor, or an unreadable file, is a ``CheckpointError``."""
    try:
        return read_state_dict_strictly(aligner, Path(path), what="aligner weights")
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc


def load_aligner_weights(aligner: nn.Module, path: Path) -> None:
    """Load aligner weights strictly: a missing, unexpected or mis-shaped tensor is a ``ValueError``."""
    aligner.load_state_dict(read_aligner_weights(aligner, path), strict=True)


def init_aligner_weights(aligner: nn.Module, folder: str | Path) -> None:
    """Start from a trained aligner model folder (what ``thinkdiff train`` exports)."""
    weights = Path(folder) / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"init_aligner {folder} is not an aligner model folder (no {weights.name})")
    load_aligner_weights(aligner, weights)


def read_trainer_state(folder: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint folder, read without running any code from it."""
    folder = Path(folder)
    if (folder / STATE_JSON).is_file():
        path = folder / STATE_JSON
        try:
            tree = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise CheckpointError(f"cannot read trainer state {path} (truncated or not ours): {exc}") from exc
        tensors_path = folder / STATE_TENSORS
        try:
            tensors = load_file(str(tensors_path))
        except (OSError, SafetensorError, ValueError) as exc:
            raise CheckpointError(
                f"cannot read trainer state {tensors_path} (missing, truncated or not safetensors): {exc}"
            ) from exc
        try:
            state = decode_state(tree, tensors)
        except (ValueError, TypeError, RecursionError) as exc:
            raise CheckpointError(f"trainer state {path} is not one this code wrote: {exc}") from exc
    elif (folder / LEGACY_STATE).is_file():
        path = folder / LEGACY_STATE
        state = _read_legacy_state(path)
    else:
        raise CheckpointError(f"{folder} is not a complete checkpoint: it has no {STATE_JSON}")
    if not isinstance(state, dict) or (missing := [k for k in _STATE_KEYS if k not in state]):
        raise CheckpointError(f"trainer state {path} lacks {missing if isinstance(state, dict) else _STATE_KEYS}")
    if not all(isinstance(state[k], int) for k in ("step", "skipped_steps", "world_size")):
        raise CheckpointError(f"trainer state {path}: step, skipped_steps and world_size must be integers")
    if not all(isinstance(state[k], dict) for k in ("optimizer", "rng", "data", "config")):
        raise CheckpointError(f"trainer state {path}: optimizer, rng, data and config must be mappings")
    return state


def _read_legacy_state(path: Path) -> dict[str, Any]:
    """A ``trainer_state.pt`` of an earlier version: only tensors, containers, numbers and the
    numpy types of an RNG state may be in it (``weights_only=True``); anything else is refused."""
    from numpy._core.multiarray import _reconstruct

    allowed = [
        _reconstruct,
        (_reconstruct, "numpy.core.multiarray._reconstruct"),  # pickled by numpy < 2
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),
    ]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling, zip and EOF errors differ by torch version
        reason = str(exc).strip().splitlines()
        unsafe = [line.strip() for line in reason if "GLOBAL" in line or "Unsupported" in line]
        detail = (unsafe or reason or [type(exc).__name__])[0][:300]
        raise CheckpointError(
            f"refused trainer state {path}: it is not a plain tensor checkpoint "
            f"(truncated, or it would run code): {detail}"
        ) from exc


def read_checkpoint(folder: Path, aligner: nn.Module) -> Checkpoint:
    """Read and check a whole checkpoint (aligner weights against ``aligner``, trainer state);
    nothing is applied. ``CheckpointError`` names the file and the problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist (or is not a folder)")
    if (folder / "checkpoints").is_dir() and not (folder / ALIGNER_FILE).exists():
        raise CheckpointError(
            f"{folder} is a run folder, not a checkpoint: pass one of {folder / 'checkpoints'}/step-*, "
            f"or --output-dir {folder} --resume auto"
        )
    aligner_state = read_aligner_weights(aligner, folder / ALIGNER_FILE)
    return Checkpoint(folder, aligner_state, read_trainer_state(folder))
