"""Reading part of a checkpoint: only the tensors under one prefix, converted one at a time.

Used where a small tower lives inside a large checkpoint (BLIP-2's vision model inside a 12B
BLIP-2 with Flan-T5-XXL): the rest of the file is never read into memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open


def checkpoint_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder: safetensors if present, else PyTorch pickles."""
    for pattern, index_name in (
        ("*.safetensors", "model.safetensors.index.json"),
        ("*.bin", "pytorch_model.bin.index.json"),
    ):
        index = folder / index_name
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"checkpoint {folder} lacks shard(s) named in {index_name}: {', '.join(missing)}"
                )
            return [folder / n for n in names]
        files = sorted(folder.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(f"no *.safetensors or *.bin weights in {folder}")


def load_prefixed_state_dict(folder: Path, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors whose names start with ``prefix``, with the prefix removed, cast to ``dtype``."""
    state: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(folder):
        if file.suffix == ".safetensors":
            try:
                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                        if name.startswith(prefix):
                            state[name[len(prefix) :]] = f.get_tensor(name).to(dtype)
            except SafetensorError as exc:
                raise ValueError(f"corrupt checkpoint shard {file}: {exc}") from exc
        else:
            try:
                tensors = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            except Exception as exc:  # pickle and zip errors differ by torch version
                raise ValueError(f"corrupt checkpoint shard {file}: {exc}") from exc
            for name, tensor in tensors.items():
                if name.startswith(prefix):
                    state[name[len(prefix) :]] = tensor.to(dtype)
    if not state:
        raise ValueError(f"checkpoint {folder} has no tensors under {prefix!r}")
    return state


def read_state_dict_strictly(module: torch.nn.Module, path: Path, what: str = "weights") -> dict[str, torch.Tensor]:
    """Read a safetensors file meant for ``module`` and check it tensor by tensor, without loading it.

    A missing file, a truncated or foreign file, and a missing, unexpected or mis-shaped tensor are a
    ``ValueError`` naming the file and every such tensor.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {path} do not exist")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"cannot read {what} {path} (truncated or not safetensors): {exc}") from exc
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: {list(state[k].shape)} vs {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{what} {path} do not fit: missing {missing or 'none'}, "
            f"unexpected {unexpected or 'none'}, wrong shapes {wrong or 'none'}"
        )
    return state
