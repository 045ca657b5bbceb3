"""A trained ThinkDiff model folder: the aligner plus ``thinkdiff.json`` saying what it connects.

Layout (what ``thinkdiff train`` exports and ``thinkdiff generate --model`` reads)::

    model/
      config.json                            aligner config (diffusers ConfigMixin)
      diffusion_pytorch_model.safetensors    aligner weights
      thinkdiff.json                         variant, source model, proxy T5, decoder, dims
      README.md                              model card with Hub metadata (rendered from thinkdiff.json)

``thinkdiff.json`` records the source model, proxy T5 and decoder as ``train`` was given them;
:func:`recorded_model` finds a recorded relative folder again from wherever the model is run.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

from thinkdiff.models.aligner import Aligner
from thinkdiff.models.loading import TINY_PREFIX, can_be_hub_id
from thinkdiff.models.model_card import CARD_FILE, render_model_card
from thinkdiff.models.model_info import INFO_FILE, ThinkDiffInfo
from thinkdiff.utils import atomic_path, atomic_write_text

__all__ = [
    "INFO_FILE", "PACKAGE_DIR", "WEIGHTS_FILE", "ThinkDiffInfo", "load_info", "load_model", "recorded_model",
    "save_model",
]  # fmt: skip


def save_model(folder: str | Path, aligner: Aligner, info: ThinkDiffInfo) -> Path:
    """Write the aligner, its ``thinkdiff.json`` and its model card atomically into ``folder``."""
    if (aligner.in_dim, aligner.out_dim) != (info.in_dim, info.out_dim):
        raise ValueError(
            f"aligner dims {aligner.in_dim}->{aligner.out_dim} disagree with info {info.in_dim}->{info.out_dim}"
        )
    folder = Path(folder)
    with atomic_path(folder) as tmp:
        aligner.save_pretrained(tmp)
        atomic_write_text(tmp / INFO_FILE, json.dumps(dataclasses.asdict(info), indent=2) + "\n")
        atomic_write_text(tmp / CARD_FILE, render_model_card(info))
    return folder


def load_info(folder: str | Path) -> ThinkDiffInfo:
    """Read ``thinkdiff.json`` of a model folder, with clear errors for missing or bad files."""
    path = Path(folder) / INFO_FILE
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"ThinkDiff model folder {folder} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a ThinkDiff model folder: it has no {INFO_FILE}")
    try:
        values = json.loads(path.read_text())
        return ThinkDiffInfo(**values)
    except (json.JSONDecodeError, TypeError) as exc:
        raise ValueError(f"{path} is not a valid ThinkDiff model description: {exc}") from exc


def load_model(folder: str | Path) -> tuple[Aligner, ThinkDiffInfo]:
    """Load the aligner (fp32, eval mode) and its description from a model folder."""
    info = load_info(folder)
    aligner = _load_aligner(Path(folder))
    if (aligner.in_dim, aligner.out_dim) != (info.in_dim, info.out_dim):
        raise ValueError(
            f"{folder}: aligner weights are {aligner.in_dim}->{aligner.out_dim} but {INFO_FILE} says "
            f"{info.in_dim}->{info.out_dim}"
        )
    return aligner, info


WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def _load_aligner(folder: Path) -> Aligner:
    """The aligner of a model folder, loaded strictly: a missing, unexpected, truncated or
    mis-shaped tensor, or a bad ``config.json``, is a ``ValueError`` naming the file."""
    from thinkdiff.models.state_dicts import read_state_dict_strictly

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} is not a ThinkDiff model folder: it has no config.json")
    try:
        aligner = Aligner.from_config(Aligner.load_config(folder))
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{config_path} is not a valid aligner config: {exc}") from exc
    state = read_state_dict_strictly(aligner, folder / WEIGHTS_FILE, what="aligner weights")
    aligner.load_state_dict(state, strict=True)
    return aligner.eval()


PACKAGE_DIR = Path(__file__).resolve().parents[1]
"""The ``thinkdiff`` package folder, wherever it is installed: recorded folders inside the package
(the mini world's weights) are found again under it."""


def recorded_model(
    folder: str | Path, info: ThinkDiffInfo, field: Literal["source_model", "diffusion_decoder"]
) -> str:
    """The model that the ``thinkdiff.json`` of model folder ``folder`` names in ``field``, as a
    name to load from here.

    ``train`` records the names it was given, so a relative folder is relative to where it ran.
    Such a name is looked for (1) in the working folder, as given; else (2) in each folder above
    the model folder, nearest first (train usually runs in an ancestor of its output); else (3)
    inside the installed package, by its part after a ``thinkdiff`` folder
    (``src/thinkdiff/miniworld/weights/flux`` -> ``<package>/miniworld/weights/flux``). A folder
    found by (2) or (3) is returned as its real path; a hub id or ``tiny:`` name that is no folder,
    as it is.

    Raises ``FileNotFoundError`` naming the recorded name, the model folder and the flag that names
    the model instead, for a recorded folder (a path that cannot be a hub id) found nowhere.
    """
    name = getattr(info, field)
    path = Path(name).expanduser()
    if name.startswith(TINY_PREFIX) or path.exists():
        return name
    if not path.is_absolute():
        above = [parent / path for parent in Path(folder).resolve().parents]
        parts = path.parts
        tails = [parts[i + 1 :] for i in range(len(parts) - 1) if parts[i] == PACKAGE_DIR.name]
        inside = [PACKAGE_DIR.joinpath(*tail) for tail in tails]
        for candidate in above + inside:
            if candidate.is_dir():
                return str(candidate.resolve())
    if can_be_hub_id(name):
        return name
    flag = "--decoder" if field == "diffusion_decoder" else "--vision" if info.variant == "clip" else "--lvlm"
    kind = "diffusion decoder" if field == "diffusion_decoder" else "source model"
    raise FileNotFoundError(
        f"{kind} {name!r} recorded in {Path(folder) / INFO_FILE} is not a folder here, above the model folder "
        f"or in the installed package: pass {flag} with its folder or hub id"
    )
