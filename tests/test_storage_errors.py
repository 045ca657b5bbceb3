"""A full disk, an exceeded quota or a read-only folder: one line naming the path, exit 2, no debris.

The full-disk and read-only cases run on a real, tiny tmpfs (mounted here when the tests run as
root; skipped otherwise); the quota case, which needs a quota-enabled file system, raises the
error the kernel would (``EDQUOT``) from inside the shard writer, mid-write.
"""

from __future__ import annotations

import errno
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import SafetensorError

from tests.test_generate_cli import make_model
from thinkdiff.cli import main
from thinkdiff.data import feature_shards
from thinkdiff.data.feature_shards import FeatureShardWriter
from thinkdiff.storage import storage_failure


def test_storage_failure_reads_every_form() -> None:
    assert (
        storage_failure(OSError(errno.ENOSPC, "No space left on device")).reason == "no space left on device"
    )
    assert storage_failure(OSError(errno.EDQUOT, "Disk quota exceeded", "/q/x")).filename == "/q/x"
    rust = SafetensorError("Error while serializing: I/O error: Read-only file system (os error 30)")
    assert storage_failure(rust).reason == "read-only file system"
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise AttributeError("'_idat' object has no attribute 'fileno'")  # noqa: B904 - as PIL does
    except AttributeError as chained:
        assert storage_failure(chained).reason == "no space left on device"
    assert storage_failure(OSError(errno.EACCES, "Permission denied")) is None
    assert storage_failure(ValueError("9 (os error 2) [Errno 5]")) is None


def _one_line(capsys: pytest.CaptureFixture[str], *words: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("thinkdiff")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(word in lines[0] for word in words), lines[0]
    return lines[0]


def _debris(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith((".tmp", ".old")) or ".tmp." in p.name)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 48 KiB tmpfs (needs root); unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _images(folder: Path, n: int = 6) -> Path:
    folder.mkdir()
    for i in range(n):
        Image.new("RGB", (32, 32), (40 * i, 100, 200)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a picture number {i}")
    return folder


EXTRACT = [
    "--model",
    "tiny:qwen2-vl",
    "--max-new-tokens",
    "8",
    "--samples-per-shard",
    "2",
    "--no-progress",
    "--seed",
    "0",
]


def test_extract_features_on_a_full_disk(tiny_env, small_disk: Path, tmp_path: Path, capsys) -> None:
    source = _images(tmp_path / "src")
    out = small_disk / "features"
    assert main(["extract-features", "--source", str(source), "--out", str(out), *EXTRACT]) == 2
    _one_line(capsys, "no space left on device", str(out))
    assert _debris(small_disk) == []
    kept = {p.name: p.read_bytes() for p in out.glob("shard-*")}
    assert kept and not all(f"shard-{i:06d}.json" in kept for i in range(3))  # some, not all

    # The rerun on the same full disk fails the same way and keeps what was complete.
    assert main(["extract-features", "--source", str(source), "--out", str(out), *EXTRACT]) == 2
    _one_line(capsys, "no space left on device")
    assert {p.name: p.read_bytes() for p in out.glob("shard-*")} == kept and _debris(small_disk) == []

    # With room again, the rerun completes and matches a run that never ran out of space.
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    assert main(["extract-features", "--source", str(source), "--out", str(out), *EXTRACT]) == 0
    reference = tmp_path / "reference"
    assert main(["extract-features", "--source", str(source), "--out", str(reference), *EXTRACT]) == 0
    capsys.readouterr()
    for path in reference.glob("shard-*.safetensors"):
        assert (out / path.name).read_bytes() == path.read_bytes()


def test_generate_and_convert_on_a_read_only_disk(tiny_env, small_disk: Path, tmp_path: Path, capsys) -> None:
    from tests.test_pipeline_official import released_state, write_release

    model = make_model(tmp_path / "m", "lvlm")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    args = ["--model", str(model), "--text", "a red car", "--height", "64", "--width", "64", "--steps", "2"]
    assert main(["generate", *args, "--out", str(small_disk / "o" / "x.png")]) == 2
    _one_line(capsys, "read-only file system", str(small_disk / "o"), "write to a writable folder")
    release = write_release(tmp_path / "thinkdiff_lvlm.pth", released_state())
    assert main(["convert-official", str(release), str(small_disk / "m"), "--variant", "lvlm"]) == 2
    _one_line(capsys, "read-only file system", str(small_disk / "m"))


def test_generate_on_a_full_disk_names_the_output(tiny_env, small_disk: Path, tmp_path: Path, capsys) -> None:
    model = make_model(tmp_path / "m", "lvlm")
    (small_disk / "filler").write_bytes(b"\0" * (44 << 10))
    out = small_disk / "x.png"
    args = ["--model", str(model), "--text", "a red car", "--height", "64", "--width", "64", "--steps", "2"]
    assert main(["generate", *args, "--out", str(out)]) == 2
    _one_line(capsys, f"no space left on device: {out}", "free some space")
    assert _debris(small_disk) == [] and not out.exists()


def test_abort_on_a_full_disk_raises_nothing_more(small_disk: Path) -> None:
    writer = FeatureShardWriter(small_disk, 0)
    with pytest.raises(OSError) as caught:  # fills the disk sample by sample
        for i in range(1000):
            writer.add(f"k{i}", torch.arange(64), torch.randn(64, 64), text="x" * 200)
    assert caught.value.errno == errno.ENOSPC
    writer.abort()  # the buffered bytes cannot be flushed either: closing must not raise
    assert list(small_disk.iterdir()) == []


def test_quota_mid_write_is_one_line(
    tiny_env, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real_append = feature_shards._StreamingSafetensors.append

    def append_until_quota(self, rows_NH: torch.Tensor) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        real_append(self, rows_NH)

    monkeypatch.setattr(feature_shards._StreamingSafetensors, "append", append_until_quota)
    out = tmp_path / "features"
    assert (
        main(["extract-features", "--source", str(_images(tmp_path / "src")), "--out", str(out), *EXTRACT])
        == 2
    )
    _one_line(capsys, f"disk quota exceeded: {out}", "free some of your quota")
    assert _debris(out) == []
    assert json.loads((out / "shard-000000.json").read_text())["num_samples"] == 2
    assert not (out / "shard-000001.json").exists() and not (out / "shard-000001.safetensors").exists()


def test_train_on_a_full_disk(feature_dir: Path, small_disk: Path, capsys) -> None:
    run = small_disk / "run"
    args = ["train", "--preset", "debug-lvlm", "--data", str(feature_dir), "--output-dir", str(run)]
    assert main([*args, "--max-steps", "4", "--save-every", "2"]) == 2
    line = _one_line(capsys, f"no space left on device: {run}", "free some space")
    assert line.startswith("thinkdiff train: error: ")
    assert _debris(small_disk) == []
