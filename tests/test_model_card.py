"""Model cards on every exported folder, and `thinkdiff push` (dry run and failures, offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from tests.test_pipeline_official import released_state, write_release
from thinkdiff.cli import main
from thinkdiff.models.aligner import Aligner
from thinkdiff.models.bundle import ThinkDiffInfo, save_model
from thinkdiff.models.model_card import hub_base_models
from thinkdiff.pipelines.official import convert_official_checkpoint
from thinkdiff.training.config import debug_lvlm
from thinkdiff.training.trainer import train


def small_model(folder: Path, **info_fields) -> Path:
    torch.manual_seed(0)
    fields = {
        "variant": "lvlm",
        "source_model": "Qwen/Qwen2-VL-7B-Instruct",
        "proxy_t5": "google/flan-t5-xxl",
        "diffusion_decoder": "black-forest-labs/FLUX.1-dev",
        "in_dim": 8,
        "out_dim": 4,
        **info_fields,
    }
    return save_model(folder, Aligner(8, 4), ThinkDiffInfo(**fields))


def test_card_metadata_names_only_hub_models(tmp_path: Path) -> None:
    folder = small_model(
        tmp_path / "m",
        proxy_t5="tiny:t5",
        diffusion_decoder=str(tmp_path),  # a local folder is not a Hub base model
        extra={"steps": 7, "measured": {"cobsat_4shot": 0.5}},
    )
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "thinkdiff"
    assert card.data.pipeline_tag == "text-to-image"
    assert card.data.base_model == ["Qwen/Qwen2-VL-7B-Instruct"]
    assert "thinkdiff-lvlm" in card.data.tags
    assert getattr(card.data, "license", None) is None  # left for the user
    assert "| `steps` | 7 |" in card.text and "| `cobsat_4shot` | 0.5 |" in card.text
    assert "# ThinkDiff-LVLM aligner" in card.text


def test_base_models_are_deduplicated() -> None:
    info = ThinkDiffInfo("clip", "Salesforce/blip2-flan-t5-xxl", "google/flan-t5-xxl", "google/flan-t5-xxl", 8, 4)
    assert hub_base_models(info) == ["Salesforce/blip2-flan-t5-xxl", "google/flan-t5-xxl"]


def test_trained_folder_card_states_training(feature_dir: Path, tmp_path: Path) -> None:
    config = debug_lvlm().updated(
        data=[str(feature_dir)], val_data=[str(feature_dir)], output_dir=str(tmp_path / "run"),
        max_steps=4, log_every=2, val_every=2, save_every=4, decode_every=0,
    )
    result = train(config, resume="never")
    info = json.loads((result.model_dir / "thinkdiff.json").read_text())["extra"]
    assert info["steps"] == 4 and info["data"] == [str(feature_dir)]
    assert info["final_train_loss"] == pytest.approx(sum(result.losses[-2:]) / 2, rel=1e-5)
    assert info["final_val_loss"] is not None
    text = (result.model_dir / "README.md").read_text()
    assert f"| `final_train_loss` | {info['final_train_loss']} |" in text


def test_converted_folder_card(tmp_path: Path) -> None:
    ckpt = write_release(tmp_path / "thinkdiff_lvlm.pth", released_state())
    folder = convert_official_checkpoint(ckpt, tmp_path / "model", "lvlm", source_model="Qwen/Qwen2-VL-7B-Instruct",
                                         diffusion_decoder="black-forest-labs/FLUX.1-dev")
    card = ModelCard.load(folder / "README.md")
    assert "black-forest-labs/FLUX.1-dev" in card.data.base_model
    assert "| `converted_from` | thinkdiff_lvlm.pth |" in card.text


def test_push_dry_run_lists_exactly_the_model_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = small_model(tmp_path / "m")
    (folder / "notes.txt").write_text("private")  # never uploaded
    assert main(["push", str(folder), "me/thinkdiff-test", "--dry-run"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.split("--- README.md ---")[0].splitlines()[1:]]
    assert listed == ["README.md", "config.json", "diffusion_pytorch_model.safetensors", "thinkdiff.json"]
    assert out.split("--- README.md ---\n")[1] == (folder / "README.md").read_text()


@pytest.mark.parametrize(
    ("make", "repo", "message"),
    [
        (lambda p: p, "me/x", "is not a ThinkDiff model folder"),
        (lambda p: small_model(p / "m"), "not-a-repo-id", "owner/name"),
    ],
)
def test_push_refuses_bad_input(tmp_path: Path, capsys, make, repo: str, message: str) -> None:
    folder = make(tmp_path)
    assert main(["push", str(folder), repo, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_push_offline_is_one_line(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = small_model(tmp_path / "m")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert main(["push", str(folder), "me/x"]) == 2
    err = capsys.readouterr().err
    assert "upload to me/x failed" in err and len(err.strip().splitlines()) == 1
