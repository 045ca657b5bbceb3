"""Checkpoints: written atomically, kept to the last K, loaded strictly.

A checkpoint is a folder ``checkpoints/step-0000100/`` holding ``aligner.safetensors`` and
``trainer_state.pt`` (optimiser, step, counters, RNG states, data position). It is written under a
temporary name and renamed, so every ``step-*`` folder that exists is complete.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from thinkdiff.utils import atomic_path

_STEP_DIR = re.compile(r"^step-(\d+)$")


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
    with atomic_path(target) as tmp:
        tmp.mkdir(parents=True)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in aligner.state_dict().items()},
            str(tmp / "aligner.safetensors"),
        )
        torch.save(trainer_state, tmp / "trainer_state.pt")
    for old in checkpoint_dirs(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_aligner_weights(aligner: nn.Module, path: Path) -> None:
    """Load aligner weights strictly: a missing, unexpected or mis-shaped tensor is a ``ValueError``."""
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"cannot read aligner weights {path}: {exc}") from exc
    expected = aligner.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: {list(state[k].shape)} vs {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"checkpoint {path} does not fit this aligner: missing {missing or 'none'}, "
            f"unexpected {unexpected or 'none'}, wrong shapes {wrong or 'none'}"
        )
    aligner.load_state_dict(state, strict=True)


def load_checkpoint(folder: Path, aligner: nn.Module) -> dict[str, Any]:
    """Load a checkpoint's aligner weights (strictly) and return its trainer state."""
    folder = Path(folder)
    if not (folder / "aligner.safetensors").is_file() or not (folder / "trainer_state.pt").is_file():
        raise FileNotFoundError(
            f"{folder} is not a complete checkpoint (aligner.safetensors + trainer_state.pt)"
        )
    load_aligner_weights(aligner, folder / "aligner.safetensors")
    # The state holds optimiser tensors, numbers and RNG states written by this code: not arbitrary pickles.
    return torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=False)
