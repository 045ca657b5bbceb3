"""A model folder's recorded models (``thinkdiff.json``) are found from wherever it is run.

``train`` records the source model and decoder as it was given them, often relative to where it
ran; the committed mini world records ``src/thinkdiff/miniworld/weights/...`` (the repository's
root). :func:`~thinkdiff.models.bundle.recorded_model` finds such a folder from the working
folder, above the model folder, or inside the installed package.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from thinkdiff.cli import main
from thinkdiff.miniworld.models import default_weights_dir
from thinkdiff.models import bundle
from thinkdiff.models.bundle import INFO_FILE, load_info, recorded_model
from thinkdiff.models.model_info import ThinkDiffInfo

WEIGHTS = default_weights_dir()
MODEL = WEIGHTS / "thinkdiff" / "no-split-calibrated"
needs_world = pytest.mark.skipif(
    not (WEIGHTS / "build.json").is_file(), reason="no committed mini-world weights"
)


def _items(folder: Path) -> list[str]:
    """An interleaved red, blue, ... prompt with two 32 px pictures written into ``folder``."""
    argv = []
    for word, color in (("red", (220, 20, 20)), ("blue", (20, 20, 220))):
        Image.new("RGB", (32, 32), color).save(folder / f"{word}.png")
        argv += ["--text", f"{word}: ", "--image", str(folder / f"{word}.png")]
    return [*argv, "--text", "green: ", "--seed", "0"]


def test_the_nearest_folder_wins_after_the_working_folder(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "train" / "runs" / "a" / "model"  # train ran in tmp_path/train
    for where in ("cwd", "train", "."):
        (tmp_path / where / "w" / "vlm").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    info = ThinkDiffInfo("lvlm", "w/vlm", "w/t5", "w/flux", 8, 8)

    monkeypatch.chdir(tmp_path / "cwd")  # found where it is run: used as given, as always
    assert recorded_model(model, info, "source_model") == "w/vlm"
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert recorded_model(model, info, "source_model") == str((tmp_path / "train" / "w" / "vlm").resolve())
    (tmp_path / "train" / "w" / "vlm").rmdir()
    assert recorded_model(model, info, "source_model") == str((tmp_path / "w" / "vlm").resolve())

    # What is no folder anywhere: a hub id or tiny kit name is a name; a path is an error.
    for name in ("Qwen/Qwen2-VL-7B-Instruct", "tiny:qwen2-vl"):
        assert recorded_model(model, dataclasses.replace(info, source_model=name), "source_model") == name
    for name in ("w/x/vlm", str(tmp_path / "gone"), "./vlm"):
        with pytest.raises(FileNotFoundError, match="pass --lvlm"):
            recorded_model(model, dataclasses.replace(info, source_model=name), "source_model")
    clip = dataclasses.replace(info, variant="clip", source_model="a/b/vision")
    with pytest.raises(FileNotFoundError, match="pass --vision"):
        recorded_model(model, clip, "source_model")


@needs_world
def test_generate_runs_the_committed_mini_world_from_another_folder(
    tmp_path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No --decoder or --lvlm: the folder's recorded models are found, and they are the ones the
    flags name (the same picture), with no 'not the model this aligner was trained on' warning."""
    assert not load_info(MODEL).diffusion_decoder.startswith("/")  # recorded relative to the build's folder
    monkeypatch.chdir(tmp_path)
    items = _items(tmp_path)
    named = ["--decoder", str(WEIGHTS / "flux"), "--lvlm", str(WEIGHTS / "vlm")]
    assert main(["generate", "--model", str(MODEL), *named, *items, "--out", "named.png"]) == 0
    with caplog.at_level("WARNING"):
        assert main(["generate", "--model", str(MODEL), *items, "--out", "found.png"]) == 0
    assert "not the model this aligner was trained on" not in caplog.text
    assert Image.open("found.png").tobytes() == Image.open("named.png").tobytes()
    components = json.loads(Path("found.json").read_text())["components"]
    assert components["decoder"] == str((WEIGHTS / "flux").resolve())
    assert components["lvlm"] == str((WEIGHTS / "vlm").resolve())


@needs_world
def test_a_folder_inside_the_installed_package_is_found_by_its_tail(
    tmp_path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Installed elsewhere (site-packages/thinkdiff/...), the mini world's model records
    ``src/thinkdiff/miniworld/weights/flux``: found as ``<package>/miniworld/weights/flux``."""
    from thinkdiff.commands.generate import check_aligner_source
    from thinkdiff.pipelines import ThinkDiffPipeline

    package = tmp_path / "site-packages" / "thinkdiff"
    weights = package / "miniworld" / "weights"
    for name in ("flux", "vlm", "thinkdiff/no-split-calibrated"):
        shutil.copytree(WEIGHTS / name, weights / name)
    model = weights / "thinkdiff" / "no-split-calibrated"
    info = load_info(model)
    assert "thinkdiff/miniworld/weights/" in info.source_model  # no ancestor of the copy holds it
    monkeypatch.setattr(bundle, "PACKAGE_DIR", package)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")

    pipe = ThinkDiffPipeline.from_pretrained(model, device="cpu")
    assert pipe.decoder_spec.name == str((weights / "flux").resolve())
    assert pipe.source_model == str((weights / "vlm").resolve())
    with caplog.at_level("WARNING"):
        check_aligner_source(info, pipe.source_model, flag="--lvlm", allow_other=False, model_folder=model)
    assert caplog.text == ""
    with caplog.at_level("WARNING"):  # the repository's copy is another folder than the one found
        check_aligner_source(info, str(WEIGHTS / "vlm"), flag="--lvlm", allow_other=False, model_folder=model)
    assert "not the model this aligner was trained on" in caplog.text

    monkeypatch.setattr(bundle, "PACKAGE_DIR", tmp_path / "another" / "thinkdiff")  # the tail is not there
    with pytest.raises(FileNotFoundError, match="pass --decoder"):
        ThinkDiffPipeline.from_pretrained(model, device="cpu")


@needs_world
def test_a_recorded_folder_found_nowhere_is_one_line_naming_it_the_folder_and_the_flag(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model = Path(shutil.copytree(MODEL, tmp_path / "model"))
    values = json.loads((model / INFO_FILE).read_text())
    values |= {"source_model": "gone/weights/vlm", "diffusion_decoder": "gone/weights/flux"}
    (model / INFO_FILE).write_text(json.dumps(values))
    monkeypatch.chdir(tmp_path)
    items = _items(tmp_path)
    for given, name, flag in (
        ([], "gone/weights/flux", "--decoder"),
        (["--decoder", str(WEIGHTS / "flux")], "gone/weights/vlm", "--lvlm"),
    ):
        assert main(["generate", "--model", str(model), *given, *items, "--out", "x.png"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        assert repr(name) in err and str(model / INFO_FILE) in err and f"pass {flag}" in err, err
        assert not (tmp_path / "x.png").exists()
