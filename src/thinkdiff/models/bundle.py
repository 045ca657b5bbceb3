"""A trained ThinkDiff model folder: the aligner plus ``thinkdiff.json`` saying what it connects.

Layout (what ``thinkdiff train`` exports and ``thinkdiff generate --model`` reads)::

    model/
      config.json                            aligner config (diffusers ConfigMixin)
      diffusion_pytorch_model.safetensors    aligner weights
      thinkdiff.json                         variant, source model, proxy T5, decoder, dims
      README.md                              model card with Hub metadata (rendered from thinkdiff.json)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from thinkdiff.models.aligner import Aligner
from thinkdiff.models.model_card import CARD_FILE, render_model_card
from thinkdiff.models.model_info import INFO_FILE, ThinkDiffInfo
from thinkdiff.utils import atomic_path, atomic_write_text

__all__ = ["INFO_FILE", "WEIGHTS_FILE", "ThinkDiffInfo", "load_info", "load_model", "save_model"]


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
