"""Finding model folders and choosing dtypes: shared by every loader in the package.

A model is named by a local folder or a hub id. Folders are used as they are; hub ids go through
``huggingface_hub`` (which honours ``HF_HUB_OFFLINE`` and the local cache), so the same code path
loads the offline tiny kit and real checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on GPU (the released code's choice for frozen towers), fp32 on CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def resolve_model_dir(name_or_path: str | Path, kind: str = "model") -> Path:
    """Return a local folder for ``name_or_path``: the folder itself, or a hub snapshot.

    Raises ``FileNotFoundError`` naming the model when it is neither a folder nor reachable on the hub.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{kind} folder {path} has no config.json or model_index.json")
        return path
    if path.exists():
        raise FileNotFoundError(f"{kind} {path} is a file, expected a model folder or a hub id")
    text = str(name_or_path)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise FileNotFoundError(f"{kind} {text!r} is neither an existing folder nor a hub id like 'org/name'")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, ignore_patterns=_unneeded_files(text)))
    except Exception as exc:  # the hub client raises many types; the user needs one message
        raise FileNotFoundError(
            f"could not find {kind} {text!r} locally or on the hub ({type(exc).__name__}: {exc})"
        ) from exc


def _unneeded_files(repo_id: str) -> list[str]:
    """Skip other frameworks' weights, and pickled weights when safetensors are there (T5-XXL has both)."""
    from huggingface_hub import HfApi

    ignore = ["*.msgpack", "*.h5", "*.ot", "*.onnx", "*.onnx_data", "*.tflite"]
    if any(f.endswith(".safetensors") for f in HfApi().list_repo_files(repo_id)):
        ignore += ["*.bin", "*.pt", "*.pth"]
    return ignore
