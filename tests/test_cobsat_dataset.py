"""CoBSAT dataset: the 500-image layout is checked on load (folder, parent folder or zip)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from thinkdiff.evaluation.cobsat import CobsatDataset, expected_image_paths, write_synthetic_dataset


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # As datasets.zip unpacks: a "datasets" folder holding the 50 theme folders.
    return write_synthetic_dataset(tmp_path_factory.mktemp("cobsat") / "datasets", size=8)


def test_expected_layout() -> None:
    paths = expected_image_paths()
    assert list(paths) == [
        "color_object",
        "background_animal",
        "style_object",
        "action_animal",
        "texture_object",
    ]
    assert sum(len(v) for v in paths.values()) == 500
    assert "color_object/red_car.jpg" not in paths["color_object"]
    assert "color_car/red_car.jpg" in paths["color_object"]
    assert "background_dog/park_dog.jpg" in paths["background_animal"]
    assert "style_car/3d_car.jpg" in paths["style_object"]


def test_load_folder_and_parent(synthetic: Path) -> None:
    assert CobsatDataset.load(synthetic).root == synthetic
    # The folder that holds "datasets/" works too.
    assert CobsatDataset.load(synthetic.parent).root == synthetic


def test_load_zip(synthetic: Path, tmp_path: Path) -> None:
    archive = tmp_path / "datasets.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(synthetic.rglob("*.jpg")):
            zf.write(path, f"datasets/{path.relative_to(synthetic)}")
        zf.writestr("__MACOSX/datasets/._junk", b"")
    ds = CobsatDataset.load(archive)
    assert ds.root == tmp_path / "datasets-unpacked" / "datasets"
    assert ds.image("color_car/red_car.jpg").is_file()
    # Second load reuses the extraction.
    assert CobsatDataset.load(archive).root == ds.root


def test_incomplete_dataset_is_a_clear_error(synthetic: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "datasets"
    shutil.copytree(synthetic, broken)
    (broken / "color_car" / "red_car.jpg").unlink()
    shutil.rmtree(broken / "style_leaf")
    with pytest.raises(FileNotFoundError) as err:
        CobsatDataset.load(broken)
    msg = str(err.value)
    assert "11 of 500 images missing" in msg
    assert "color_object: 1/100 images missing; missing files: color_car/red_car.jpg" in msg
    assert "style_object: 10/100 images missing; missing folders: style_leaf" in msg


def test_missing_path_and_non_zip(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        CobsatDataset.load(tmp_path / "nope")
    bogus = tmp_path / "datasets.zip"
    bogus.write_text("not a zip")
    with pytest.raises(ValueError, match="neither a folder nor a zip"):
        CobsatDataset.load(bogus)
    with pytest.raises(FileNotFoundError, match="500 of 500 images missing"):
        CobsatDataset.load(tmp_path)
