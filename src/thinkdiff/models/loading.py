"""Finding model folders and choosing dtypes: shared by every loader in the package.

A model is named by a local folder, a hub id, or ``tiny:<component>`` for the offline tiny random
kit (built once into ``$THINKDIFF_TINY_DIR``, default ``~/.cache/thinkdiff/tiny-models``). Folders
are used as they are; hub ids go through ``huggingface_hub`` (which honours ``HF_HUB_OFFLINE`` and
the local cache). Every name goes through the same ``from_pretrained`` code afterwards.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

TINY_PREFIX = "tiny:"


def tiny_models_dir() -> Path:
    """Where ``tiny:<component>`` names are built and found."""
    default = Path.home() / ".cache" / "thinkdiff" / "tiny-models"
    return Path(os.environ.get("THINKDIFF_TINY_DIR", default)).expanduser()


def resolve_tiny(name: str) -> Path:
    """The folder of tiny component ``name`` (``tiny:t5`` -> ``.../tiny-models/t5``), built if missing."""
    from thinkdiff.tiny import COMPONENTS, make_tiny_models

    component = name.removeprefix(TINY_PREFIX)
    if component not in COMPONENTS:
        raise ValueError(
            f"unknown tiny component {name!r}; known: {', '.join(TINY_PREFIX + c for c in COMPONENTS)}"
        )
    root = tiny_models_dir()
    root.mkdir(parents=True, exist_ok=True)
    # Several ranks may ask at once: one builds, the others wait for it.
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "manifest.json").is_file():
            make_tiny_models(root)
    return root / component


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on GPU (the released code's choice for frozen towers), fp32 on CPU."""
    import torch

    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def can_be_hub_id(name: str) -> bool:
    """Whether ``name`` has the shape of a hub id (``org/name``), not of a path (``./x``, ``/x``,
    ``~/x``, ``a/b/c``)."""
    return not name.startswith((".", "/", "~")) and name.count("/") == 1


TOKENIZER_FILES = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
"""Hub files enough to build a tokenizer or processor, for when the weights are not needed."""


def resolve_model_dir(
    name_or_path: str | Path,
    kind: str = "model",
    files: list[str] | None = None,
    *,
    tensors: Callable[[str], bool] | None = None,
) -> Path:
    """Return a local folder for ``name_or_path``: the folder itself, or a hub snapshot.

    ``files`` limits a hub download to matching file names (e.g. :data:`TOKENIZER_FILES`, or
    :func:`diffusers_files`). ``tensors`` limits it to the weight shards that hold a tensor it
    accepts (by name, read from the checkpoint's ``*.index.json``), plus the small files: the
    folder returned is then a view of the snapshot whose index names only those shards (see
    :func:`partial_view`). A local folder is used as it is.

    Raises ``FileNotFoundError`` naming the model when it is neither a folder nor reachable on the hub.
    """
    if str(name_or_path).startswith(TINY_PREFIX):
        return resolve_tiny(str(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{kind} folder {path} has no config.json or model_index.json")
        return path
    if path.exists():
        raise FileNotFoundError(f"{kind} {path} is a file, expected a model folder or a hub id")
    text = str(name_or_path)
    if not can_be_hub_id(text):
        raise FileNotFoundError(f"{kind} {text!r} is neither an existing folder nor a hub id like 'org/name'")
    from huggingface_hub import snapshot_download

    try:
        if files is not None:
            return Path(snapshot_download(text, allow_patterns=files))
        if tensors is not None:
            # The index first (with the configs), then only the shards it names for these tensors.
            small = Path(snapshot_download(text, allow_patterns=TOKENIZER_FILES))
            shards = shards_holding(small, tensors)
            if shards is not None:
                return partial_view(Path(snapshot_download(text, allow_patterns=TOKENIZER_FILES + shards)), shards)
        return Path(snapshot_download(text, ignore_patterns=_unneeded_files(text)))
    except Exception as exc:  # the hub client raises many types; the user needs one message
        raise FileNotFoundError(
            f"could not find {kind} {text!r} locally or on the hub ({type(exc).__name__}: {exc})"
        ) from exc


_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")  # preferred first


def shards_holding(folder: Path, wanted: Callable[[str], bool]) -> list[str] | None:
    """The weight shards of a checkpoint layout that hold a tensor ``wanted`` accepts.

    Read from the first index file of :data:`_INDEX_FILES` in ``folder`` (safetensors preferred,
    the loaders' own order); ``None`` (the whole checkpoint is needed) when there is no index or
    when it names no wanted tensor (e.g. a standalone vision model under other names).
    """
    for name in _INDEX_FILES:
        index = folder / name
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            shards = sorted({shard for key, shard in weight_map.items() if wanted(key)})
            return shards or None
    return None


def partial_view(snapshot: Path, shards: list[str]) -> Path:
    """A folder that links the small files of ``snapshot`` and the given ``shards`` only, with an
    index naming only those shards: loaders (``from_pretrained`` included) open every shard of
    an index, and the hub snapshot itself must stay as downloaded.

    The view is a temporary folder of symlinks, removed when the process exits.
    """
    import atexit
    import shutil
    import tempfile

    view = Path(tempfile.mkdtemp(prefix=f"thinkdiff-{snapshot.name[:12]}-"))
    atexit.register(shutil.rmtree, view, ignore_errors=True)
    keep = set(shards)
    for path in snapshot.rglob("*"):
        relative = path.relative_to(snapshot)
        if path.is_dir() or relative.name in _INDEX_FILES:
            continue
        if relative.suffix in (".safetensors", ".bin") and str(relative) not in keep:
            continue
        (view / relative).parent.mkdir(parents=True, exist_ok=True)
        (view / relative).symlink_to(path.resolve())
    for name in _INDEX_FILES:
        if (snapshot / name).is_file():
            index = json.loads((snapshot / name).read_text())
            index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v in keep}
            (view / name).write_text(json.dumps(index))
    return view


def diffusers_files(folder: Path, skipped: Iterable[str] = (), extra: Iterable[str] = ()) -> list[str]:
    """Hub file patterns of a diffusers pipeline: ``model_index.json``, ``extra`` and the subfolder
    of every component it names except ``skipped`` (those passed as ``None`` to ``from_pretrained``).

    ``folder`` holds at least the pipeline's ``model_index.json``. Root-level files, such as
    FLUX.1-dev's single-file copies of its transformer and VAE (``flux1-dev.safetensors``,
    ``ae.safetensors``), are left out, as are the subfolders of skipped components.
    """
    index = json.loads((folder / "model_index.json").read_text())
    # diffusers writes an absent component as [null, null].
    present = {name for name, value in index.items() if not name.startswith("_") and any(value or [])}
    loaded = sorted(present - set(skipped))
    return ["model_index.json", *extra, *(f"{name}/*" for name in loaded)]


def _unneeded_files(repo_id: str) -> list[str]:
    """Skip other frameworks' weights, and pickled weights when safetensors are there (T5-XXL has both)."""
    from huggingface_hub import HfApi

    ignore = ["*.msgpack", "*.h5", "*.ot", "*.onnx", "*.onnx_data", "*.tflite"]
    try:
        names = HfApi().list_repo_files(repo_id)
    except Exception:  # HF_HUB_OFFLINE, no network, hub down: the listing the download cached
        # Offline, snapshot_download checks the cached snapshot against that listing with these
        # very patterns, so they must be the ones the download used (.bin left out beside
        # safetensors), or a complete cached T5-XXL reads as incomplete.
        try:
            # (huggingface_hub versions without it keep no listing, so check nothing against one.)
            from huggingface_hub import get_cached_repo_tree

            names = [entry.path for entry in get_cached_repo_tree(repo_id)]
        except Exception:  # nothing cached to check against; snapshot_download says what is missing
            return ignore
    if any(f.endswith(".safetensors") for f in names):
        ignore += ["*.bin", "*.pt", "*.pth"]
    return ignore
