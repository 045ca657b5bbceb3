"""`thinkdiff push` publishes only files that really live in the model folder.

The audit's cases: a model card that is a symlink to /etc/passwd, weights symlinked to another run's
weights, a FIFO, a huge sparse file; each is refused in one line, exit 2, before anything is read
or uploaded (the Hub client is replaced by a recorder: the network is the one thing a test cannot
make small).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.test_model_card import small_model
from thinkdiff.cli import main
from thinkdiff.paths import UnsafePathError, confined_file, read_confined_file


@pytest.fixture
def uploads(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, bytes]]:
    """What push would send: one ``{path_in_repo: bytes}`` per commit."""
    from huggingface_hub import HfApi

    sent: list[dict[str, bytes]] = []

    def create_commit(self, repo_id, operations, **kwargs):
        sent.append({op.path_in_repo: _bytes_of(op.path_or_fileobj) for op in operations})

    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: None)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return sent


def _bytes_of(path_or_fileobj: object) -> bytes:
    """What huggingface_hub would read from a CommitOperationAdd's source (a path, bytes or a file)."""
    if isinstance(path_or_fileobj, bytes):
        return path_or_fileobj
    if isinstance(path_or_fileobj, (str, Path)):
        return Path(path_or_fileobj).read_bytes()
    return path_or_fileobj.read()


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


def _swap_for_passwd(path: Path, passwd: Path) -> None:
    """Replace ``path`` by a symlink to ``passwd`` atomically, as a writer racing push would."""
    link = path.with_name(path.name + ".swap")
    link.symlink_to(passwd)
    os.replace(link, path)


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_file_swapped_for_a_symlink_after_the_check_is_not_what_is_sent(
    tmp_path: Path, uploads, capsys, monkeypatch: pytest.MonkeyPatch, dry_run: bool
) -> None:
    """The race: every file passes the check, then README.md becomes a symlink to a password file
    while the aligner loads. What is printed and sent must be the card that was checked."""
    import thinkdiff.models.bundle as bundle

    folder = small_model(tmp_path / "m")
    card = (folder / "README.md").read_bytes()
    passwd = tmp_path / "passwd"
    passwd.write_text("root:x:0:0:root:/root:/bin/bash\n")
    real_load = bundle.load_model

    def load_then_swap(where):
        _swap_for_passwd(folder / "README.md", passwd)  # after every file was checked
        return real_load(where)

    monkeypatch.setattr(bundle, "load_model", load_then_swap)
    assert main(["push", str(folder), "me/x", *(["--dry-run"] if dry_run else [])]) == 0
    out = capsys.readouterr().out
    assert "root:" not in out
    if dry_run:
        assert card.decode() in out
    else:
        assert uploads[0]["README.md"] == card
    assert (folder / "README.md").is_symlink()  # the swap did happen


def test_read_confined_file_reads_the_file_it_checked(tmp_path: Path) -> None:
    """Swapping the file for a symlink between the kind check and the open: the open refuses it."""
    from thinkdiff import paths

    folder = small_model(tmp_path / "m")
    (tmp_path / "passwd").write_text("root:x:0:0\n")
    real_stat = os.stat

    def stat_then_swap(name, *args, **kwargs):
        info = real_stat(name, *args, **kwargs)
        if name == "README.md":
            _swap_for_passwd(folder / "README.md", tmp_path / "passwd")
        return info

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(paths.os, "stat", stat_then_swap)
        with pytest.raises(UnsafePathError, match=r"README\.md is a symlink"):
            read_confined_file(folder, "README.md")
    assert read_confined_file(folder, "thinkdiff.json") == (folder / "thinkdiff.json").read_bytes()


def test_a_symlink_target_cannot_forge_output_lines(tmp_path: Path, uploads, capsys) -> None:
    folder = small_model(tmp_path / "m")
    (folder / "README.md").unlink()
    (folder / "README.md").symlink_to("nowhere)\nuploaded 4 files to https://huggingface.co/me/x\n(\x1b[2J")
    assert main(["push", "--dry-run", str(folder), "me/x"]) == 2
    err = _refused(capsys, "README.md is a symlink", "\\nuploaded 4 files")
    assert "\x1b" not in err
    with pytest.raises(UnsafePathError) as caught:
        confined_file(folder, "README.md")
    assert "\n" not in str(caught.value)


def test_a_folder_name_with_a_newline_stays_one_line(tmp_path: Path, uploads, capsys) -> None:
    folder = small_model(tmp_path / "m\nuploaded 4 files")
    (folder / "README.md").unlink()
    (folder / "README.md").symlink_to("/etc/passwd")
    assert main(["push", "--dry-run", str(folder), "me/x"]) == 2
    _refused(capsys, "m\\nuploaded 4 files/README.md is a symlink")


@pytest.mark.parametrize("repo_id", ["../x", "me/x?y#z", "me/x y", "a/b/c", "me/", "me/.x", "x" * 97])
def test_repository_ids_the_hub_would_refuse_are_refused_first(
    tmp_path: Path, uploads, capsys, repo_id: str
) -> None:
    folder = small_model(tmp_path / "m")
    assert main(["push", "--dry-run", str(folder), repo_id]) == 2
    _refused(capsys, f"repository id {repo_id!r}")
    assert main(["push", "--dry-run", str(tmp_path / "missing"), repo_id]) == 2  # before the folder is read
    _refused(capsys, f"repository id {repo_id!r}")
    assert uploads == []


def test_local_paths_are_published_by_their_last_name_only(tmp_path: Path, uploads, capsys) -> None:
    home = tmp_path / "home" / "alice"
    folder = small_model(
        tmp_path / "m",
        source_model=str(home / "models" / "Qwen2-VL-7B-Instruct"),
        extra={"init_aligner": str(home / "runs" / "a" / "model"), "data": [str(home / "feat" / "task")], "steps": 3},
    )
    kept = (folder / "thinkdiff.json").read_bytes()
    assert main(["push", "--dry-run", str(folder), "me/x"]) == 0
    out = capsys.readouterr().out
    assert f"local paths published by their last name only ({folder} keeps them whole):" in out
    assert f"  {home / 'runs' / 'a' / 'model'} -> model" in out
    card = out.split("--- README.md ---\n", 1)[1]
    assert str(home) not in card and "`Qwen2-VL-7B-Instruct`" in card and "| `init_aligner` | model |" in card

    assert main(["push", str(folder), "me/x"]) == 0
    sent = uploads[0]
    assert all(str(tmp_path).encode() not in data for data in sent.values())
    info = json.loads(sent["thinkdiff.json"])
    assert info["source_model"] == "Qwen2-VL-7B-Instruct" and info["extra"]["data"] == ["task"]
    assert info["proxy_t5"] == "google/flan-t5-xxl"  # a hub id is published whole
    assert info["extra"]["steps"] == 3
    assert (folder / "thinkdiff.json").read_bytes() == kept  # the local folder keeps its record
