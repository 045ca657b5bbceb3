"""Converting the authors' released checkpoints ({'model': state_dict}, mm_projector.* keys)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from thinkdiff.cli import main
from thinkdiff.models.bundle import load_model
from thinkdiff.pipelines.official import aligner_from_official_state_dict, convert_official_checkpoint


def released_state(in_dim: int = 64, hidden: int = 40, out_dim: int = 32, seed: int = 0) -> dict:
    """A state dict laid out like the release: Linear, GELU (no weights), Linear, T5 RMSNorm."""
    g = torch.Generator().manual_seed(seed)
    return {
        "mm_projector.0.weight": torch.randn(hidden, in_dim, generator=g),
        "mm_projector.0.bias": torch.randn(hidden, generator=g),
        "mm_projector.2.weight": torch.randn(out_dim, hidden, generator=g),
        "mm_projector.2.bias": torch.randn(out_dim, generator=g),
        "mm_projector.3.weight": torch.rand(out_dim, generator=g) + 0.5,
    }


def released_forward(state: dict, x: torch.Tensor) -> torch.Tensor:
    """The released projector written out by hand (T5 RMSNorm: no mean, no bias, eps 1e-6)."""
    h = F.linear(x, state["mm_projector.0.weight"], state["mm_projector.0.bias"])
    h = F.linear(F.gelu(h), state["mm_projector.2.weight"], state["mm_projector.2.bias"])
    return state["mm_projector.3.weight"] * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


def write_release(path: Path, state: dict, **others) -> Path:
    torch.save({"model": state, **others}, path)
    return path


def test_round_trip_of_a_released_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = released_state()
    # The release also holds frozen-model tensors and training state: ignored with a warning.
    full = {**state, "llm.embed.weight": torch.zeros(3, 3)}
    ckpt = write_release(tmp_path / "thinkdiff_lvlm.pth", full, epoch=3, optimizer={"lr": 1e-4})
    with caplog.at_level(logging.WARNING):
        folder = convert_official_checkpoint(ckpt, tmp_path / "model", "lvlm")
    assert "ignoring top-level entries ['epoch', 'optimizer']" in caplog.text
    assert "ignoring 1 tensors outside the aligner (llm.embed.weight)" in caplog.text

    aligner, info = load_model(folder)
    assert (info.variant, info.in_dim, info.out_dim) == ("lvlm", 64, 32)
    assert (info.source_model, info.proxy_t5, info.diffusion_decoder) == (
        "Qwen/Qwen2-VL-7B-Instruct",
        "google/flan-t5-xxl",
        "black-forest-labs/FLUX.1-dev",
    )
    assert info.extra["converted_from"] == "thinkdiff_lvlm.pth" and len(info.extra["sha256"]) == 64
    assert aligner.fc1.out_features == 40  # hidden width read from the tensors
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(aligner(x), released_forward(state, x))
    for ours, theirs in (
        ("fc1.weight", "0.weight"),
        ("fc2.bias", "2.bias"),
        ("final_norm.weight", "3.weight"),
    ):
        assert torch.equal(aligner.state_dict()[ours], state[f"mm_projector.{theirs}"])


def test_clip_variant_and_prefixed_keys(tmp_path: Path, tiny_env: Path) -> None:
    state = {f"module.{k}": v for k, v in released_state(in_dim=48, hidden=32).items()}
    ckpt = write_release(tmp_path / "thinkdiff_clip.pth", state)
    folder = convert_official_checkpoint(
        ckpt, tmp_path / "clip", "clip", source_model="tiny:blip2-vision", diffusion_decoder="tiny:flux"
    )
    aligner, info = load_model(folder)
    assert (info.variant, info.source_model, aligner.in_dim, aligner.fc1.out_features) == (
        "clip",
        "tiny:blip2-vision",
        48,
        32,
    )


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("mm_projector.3.weight"), "missing aligner tensors: mm_projector.3.weight"),
        (lambda s: s.update({"mm_projector.2.bias": torch.zeros(7)}), r"mm_projector.2.bias has shape \[7\]"),
        (
            lambda s: s.update({"mm_projector.2.weight": torch.zeros(32, 41)}),
            r"mm_projector.2.weight has shape \[32, 41\], expected \[32, 40\]",
        ),
        (lambda s: s.update({"mm_projector.3.bias": torch.zeros(32)}), "unexpected aligner tensors"),
        (lambda s: s.update({"mm_projector.0.weight": torch.zeros(40)}), "must be 2-D"),
        (lambda s: s.clear() or s.update({"x": torch.zeros(1)}), "no mm_projector"),
    ],
)
def test_bad_state_dicts(edit, message: str) -> None:
    state = released_state(hidden=40)
    edit(state)
    with pytest.raises(ValueError, match=message):
        aligner_from_official_state_dict(state)


class NotAllowed:
    """Pickled objects other than tensors and containers must not load (weights_only)."""


class RunsCode:
    """A payload that would run a command when unpickled without weights_only."""

    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_a_pickle_is_refused_in_one_line_that_never_suggests_unpickling(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pth"
    torch.save({"model": RunsCode()}, evil)
    assert main(["convert-official", str(evil), str(tmp_path / "m"), "--variant", "lvlm"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "evil.pth holds pickled objects besides tensors" in err and "system" in err
    assert "weights_only" not in err and "Re-running" not in err
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "m").exists()


def test_bad_files_and_folders(tmp_path: Path, tiny_env: Path) -> None:
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        convert_official_checkpoint(tmp_path / "missing.pth", tmp_path / "out", "lvlm")
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": released_state(), "extra": NotAllowed()}, unsafe)
    with pytest.raises(ValueError, match=r"unsafe.pth holds pickled objects besides tensors \(.*NotAllowed"):
        convert_official_checkpoint(unsafe, tmp_path / "out", "lvlm")
    ckpt = write_release(tmp_path / "ok.pth", released_state(out_dim=16))
    with pytest.raises(ValueError, match="writes 16-wide embeddings but tiny:flux takes 32-wide"):
        convert_official_checkpoint(ckpt, tmp_path / "out", "lvlm", diffusion_decoder="tiny:flux")
    with pytest.raises(ValueError, match="reads 64-wide features but tiny:blip2-vision gives 48"):
        convert_official_checkpoint(ckpt, tmp_path / "out", "clip", source_model="tiny:blip2-vision")
    with pytest.raises(ValueError, match="variant must be"):
        convert_official_checkpoint(ckpt, tmp_path / "out", "dream")
    assert not (tmp_path / "out").exists()  # nothing left behind by any failure
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists"):
        convert_official_checkpoint(ckpt, tmp_path / "taken", "lvlm")
    with pytest.raises(ValueError, match="not a ThinkDiff model: not replacing it"):
        convert_official_checkpoint(ckpt, tmp_path / "taken", "lvlm", overwrite=True)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = write_release(tmp_path / "thinkdiff_lvlm.pth", released_state())
    assert main(["convert-official", str(ckpt), str(tmp_path / "m"), "--variant", "lvlm"]) == 0
    assert "ThinkDiff-LVLM aligner 64 -> 32" in capsys.readouterr().out
    assert json.loads((tmp_path / "m" / "thinkdiff.json").read_text())["variant"] == "lvlm"
    # Again without --overwrite: refused; with it: replaced.
    assert main(["convert-official", str(ckpt), str(tmp_path / "m"), "--variant", "lvlm"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert-official", str(ckpt), str(tmp_path / "m"), "--variant", "clip", "--overwrite"]) == 0
    assert json.loads((tmp_path / "m" / "thinkdiff.json").read_text())["variant"] == "clip"
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    assert main(["convert-official", str(broken), str(tmp_path / "b"), "--variant", "lvlm"]) == 2
    assert "cannot read" in capsys.readouterr().err and not (tmp_path / "b").exists()
