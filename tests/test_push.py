"""`thinkdiff push` publishes only files that really live in the model folder.

The audit's cases: a model card that is a symlink to /etc/passwd, weights symlinked to another run's
weights, a FIFO, a huge sparse file; each is refused in one line, exit 2, before anything is read
or uploaded (the Hub client is replaced by a recorder: the network is the one thing a test cannot
make small).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.test_model_card import small_model
from thinkdiff.cli import main
from thinkdiff.paths import UnsafePathError, confined_file


@pytest.fixture
def uploads(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, bytes]]:
    """What push would send: one ``{path_in_repo: bytes}`` per commit."""
    from huggingface_hub import HfApi

    sent: list[dict[str, bytes]] = []

    def create_commit(self, repo_id, operations, **kwargs):
        sent.append({op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations})

    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: None)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return sent


def _refused(capsys: pytest.CaptureFixture[str], *words: str) -> str:
    captured = capsys.readouterr()
    err = captured.err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert all(word in err for word in words), err
    assert "root:" not in captured.out + err  # /etc/passwd's first line never shows
    return err


def test_push_sends_exactly_the_model_files(tmp_path: Path, uploads, capsys) -> None:
    folder = small_model(tmp_path / "m")
    (folder / "notes.txt").write_text("private")
    assert main(["push", str(folder), "me/x"]) == 0
    assert list(uploads[0]) == [
        "README.md",
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "thinkdiff.json",
    ]
    assert all(data == (folder / name).read_bytes() for name, data in uploads[0].items())


def test_card_symlinked_to_etc_passwd_is_refused(tmp_path: Path, uploads, capsys) -> None:
    folder = small_model(tmp_path / "m")
    (folder / "README.md").unlink()
    (folder / "README.md").symlink_to("/etc/passwd")
    for extra in (["--dry-run"], []):
        assert main(["push", str(folder), "me/x", *extra]) == 2
        _refused(capsys, "README.md is a symlink", "/etc/passwd")
    assert uploads == []


def test_weights_symlinked_to_another_run_are_refused(tmp_path: Path, uploads, capsys) -> None:
    other = small_model(tmp_path / "other")
    folder = small_model(tmp_path / "m")
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    weights.symlink_to(other / weights.name)  # same shapes: it would load
    assert main(["push", str(folder), "me/x"]) == 2
    _refused(capsys, "diffusion_pytorch_model.safetensors is a symlink", str(other))
    assert uploads == []


def test_symlink_inside_the_folder_is_refused_too(tmp_path: Path, uploads, capsys) -> None:
    folder = small_model(tmp_path / "m")
    (folder / "README.md").unlink()
    (folder / "README.md").symlink_to("thinkdiff.json")
    assert main(["push", str(folder), "me/x", "--dry-run"]) == 2
    _refused(capsys, "is a symlink")


def test_special_and_huge_files_are_refused(tmp_path: Path, uploads, capsys) -> None:
    folder = small_model(tmp_path / "m")
    (folder / "README.md").unlink()
    os.mkfifo(folder / "README.md")  # reading it would block forever
    assert main(["push", str(folder), "me/x"]) == 2
    _refused(capsys, "README.md is not a regular file (a FIFO)")

    (folder / "README.md").unlink()
    with open(folder / "README.md", "wb") as f:
        f.truncate(3 << 30)  # sparse 3 GiB: costs no disk
    assert main(["push", str(folder), "me/x", "--dry-run"]) == 2
    _refused(capsys, "README.md is 3221225472 bytes")

    (folder / "README.md").unlink()
    (folder / "README.md").mkdir()
    assert main(["push", str(folder), "me/x"]) == 2
    _refused(capsys, "README.md is not a regular file (a folder)")
    assert uploads == []


def test_huge_weights_file_is_refused(tmp_path: Path, uploads, capsys) -> None:
    folder = small_model(tmp_path / "m")
    weights = folder / "diffusion_pytorch_model.safetensors"
    with open(weights, "ab") as f:
        f.truncate(weights.stat().st_size + (3 << 30))  # valid header, 3 GiB of trailing bytes
    assert main(["push", str(folder), "me/x"]) == 2
    _refused(capsys, "diffusion_pytorch_model.safetensors")
    assert uploads == []


def test_a_symlinked_model_folder_itself_is_fine(tmp_path: Path, uploads, capsys) -> None:
    folder = small_model(tmp_path / "m")
    (tmp_path / "link").symlink_to(folder)  # the user named the folder: following it is theirs to choose
    assert main(["push", str(tmp_path / "link"), "me/x"]) == 0
    assert set(uploads[0]) == {
        "README.md",
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "thinkdiff.json",
    }


@pytest.mark.parametrize("relative", ["../m/README.md", "/etc/passwd", "a/../README.md", ".", "", "x\0y"])
def test_confined_file_refuses_names_that_leave(tmp_path: Path, relative: str) -> None:
    folder = small_model(tmp_path / "m")
    with pytest.raises(UnsafePathError, match="not a plain file name"):
        confined_file(folder, relative)


def test_confined_file_refuses_a_symlinked_parent(tmp_path: Path) -> None:
    folder = small_model(tmp_path / "m")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "x.png").write_bytes(b"x")
    (folder / "job").symlink_to(tmp_path / "outside")
    with pytest.raises(UnsafePathError, match="job is a symlink"):
        confined_file(folder, "job/x.png")
    (folder / "real").mkdir()
    (folder / "real" / "x.png").write_bytes(b"x")
    assert confined_file(folder, "real/x.png") == (folder / "real" / "x.png").resolve()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        confined_file(folder, "real/y.png")


def test_a_hard_link_to_a_file_elsewhere_is_refused(tmp_path: Path, uploads, capsys) -> None:
    other = small_model(tmp_path / "other")
    folder = small_model(tmp_path / "m")
    (folder / "README.md").unlink()
    os.link(other / "README.md", folder / "README.md")  # as /etc/passwd could be, on its file system
    assert main(["push", str(folder), "me/x", "--dry-run"]) == 2
    _refused(capsys, "README.md has 2 hard links")
    assert uploads == []
