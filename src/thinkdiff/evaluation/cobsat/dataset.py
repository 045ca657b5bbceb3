"""The CoBSAT image set on disk: locate it (folder or ``datasets.zip``), check it, write a fake one.

Layout (the hub's ``datasets.zip`` unpacks to a ``datasets/`` folder)::

    datasets/{detail}_{obj_item}/{detail_item}_{obj_item}.jpg   e.g. color_car/red_car.jpg

Five themes x 10 object folders x 10 images = 500 images. Other files (the captions' CSVs, macOS
metadata) are ignored.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

from thinkdiff.evaluation.cobsat.protocol import ITEMS, THEMES

__all__ = ["CobsatDataset", "expected_image_paths", "write_synthetic_dataset"]

_MAX_LISTED = 20


def expected_image_paths() -> dict[str, list[str]]:
    """The 500 dataset-relative image paths, grouped by theme (100 each)."""
    out: dict[str, list[str]] = {}
    for theme in THEMES:
        detail_cat, obj_cat = theme.split("_")
        out[theme] = [
            f"{detail_cat}_{obj}/{detail}_{obj}.jpg" for obj in ITEMS[obj_cat] for detail in ITEMS[detail_cat]
        ]
    return out


def _find_root(folder: Path) -> Path:
    """The folder that directly holds the ``{detail}_{obj}`` folders (``folder`` or its ``datasets/``)."""
    probe = "color_leaf"
    if (folder / probe).is_dir():
        return folder
    if (folder / "datasets" / probe).is_dir():
        return folder / "datasets"
    # Nothing recognisable: validate ``folder`` itself so the error lists what is missing there.
    return folder / "datasets" if (folder / "datasets").is_dir() else folder


def _extract_zip(zip_path: Path, extract_dir: Path) -> Path:
    # Extract only the image members we expect; a marker file makes a finished extraction reusable.
    marker = extract_dir / ".thinkdiff-extracted"
    if not marker.exists():
        wanted = {p for paths in expected_image_paths().values() for p in paths}
        with zipfile.ZipFile(zip_path) as zf:
            members = [
                m
                for m in zf.namelist()
                if not m.startswith("__MACOSX") and m.removeprefix("datasets/") in wanted
            ]
            zf.extractall(extract_dir, members)
        marker.write_text(str(zip_path.resolve()) + "\n")
    return _find_root(extract_dir)


@dataclass(frozen=True)
class CobsatDataset:
    """A checked CoBSAT image folder. Build it with :meth:`load`."""

    root: Path
    """The folder holding the 50 ``{detail}_{obj}`` folders."""

    @classmethod
    def load(cls, path: str | Path, extract_dir: str | Path | None = None) -> CobsatDataset:
        """Open and check the dataset at ``path``: the unpacked folder (or its parent) or ``datasets.zip``.

        A zip is extracted once to ``extract_dir`` (default: ``{zip stem}-unpacked`` beside it).
        Raises ``FileNotFoundError`` naming every missing theme folder and file (first few).
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"CoBSAT dataset not found: {path}")
        if path.is_file():
            if not zipfile.is_zipfile(path):
                raise ValueError(f"{path} is neither a folder nor a zip archive")
            root = _extract_zip(
                path, Path(extract_dir) if extract_dir else path.with_name(f"{path.stem}-unpacked")
            )
        else:
            root = _find_root(path)
        dataset = cls(root=root)
        dataset.check()
        return dataset

    def check(self) -> None:
        """Raise ``FileNotFoundError`` unless all 500 expected images are present."""
        problems: list[str] = []
        n_missing = 0
        for theme, paths in expected_image_paths().items():
            missing = [p for p in paths if not (self.root / p).is_file()]
            if not missing:
                continue
            n_missing += len(missing)
            folders = sorted({p.split("/")[0] for p in missing if not (self.root / p.split("/")[0]).is_dir()})
            files = [p for p in missing if p.split("/")[0] not in folders]
            line = f"{theme}: {len(missing)}/100 images missing"
            if folders:
                line += f"; missing folders: {', '.join(folders)}"
            if files:
                listed = ", ".join(files[:_MAX_LISTED]) + (" ..." if len(files) > _MAX_LISTED else "")
                line += f"; missing files: {listed}"
            problems.append(line)
        if problems:
            raise FileNotFoundError(
                f"incomplete CoBSAT dataset at {self.root} ({n_missing} of 500 images missing; expected "
                "{detail}_{obj}/{detail_item}_{obj_item}.jpg from datasets.zip): " + " | ".join(problems)
            )

    def image(self, relpath: str) -> Path:
        """Absolute path of a dataset-relative image path."""
        return self.root / relpath


def write_synthetic_dataset(root: str | Path, size: int = 16) -> Path:
    """Write a fake dataset in the benchmark's layout: 500 small solid-colour JPEGs. For tests and demos.

    Colours are a deterministic function of the file name, so images differ from one another.
    Returns the folder to pass to :meth:`CobsatDataset.load`.
    """
    import zlib

    from PIL import Image

    root = Path(root)
    for paths in expected_image_paths().values():
        for rel in paths:
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            h = zlib.crc32(rel.encode())
            Image.new("RGB", (size, size), (h & 255, (h >> 8) & 255, (h >> 16) & 255)).save(target)
    return root
