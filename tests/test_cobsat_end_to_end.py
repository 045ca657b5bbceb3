"""The whole CoBSAT loop on the tiny kit: a ThinkDiff model generates, the tiny LLaVA judges, tables come out."""

from __future__ import annotations

import json

import torch

from thinkdiff.cli import main
from thinkdiff.evaluation.cobsat import write_synthetic_dataset
from thinkdiff.models.aligner import Aligner
from thinkdiff.models.bundle import ThinkDiffInfo, save_model


def test_generate_then_score(tiny_env, tmp_path) -> None:
    dataset = write_synthetic_dataset(tmp_path / "datasets")
    torch.manual_seed(0)
    model = save_model(
        tmp_path / "model",
        Aligner(64, 32),
        ThinkDiffInfo("lvlm", "tiny:qwen2-vl", "tiny:t5", "tiny:flux", in_dim=64, out_dim=32),
    )
    images = tmp_path / "images"
    selection = ["--tasks", "1", "--shots", "2", "--prompt-range", "0:2"]
    generate = [
        "eval",
        "cobsat",
        "generate",
        "--mode",
        "lvlm",
        "--model",
        str(model),
        "--dataset",
        str(dataset),
    ]
    assert main([*generate, *selection, "--out", str(images), "--steps", "2", "--size", "64"]) == 0
    written = sorted(images.rglob("*.jpg"))
    assert len(written) == 2
    sidecar = json.loads(written[0].with_suffix(".json").read_text())
    assert sidecar["generator"]["mode"] == "lvlm" and sidecar["seed"] == 123
    assert isinstance(sidecar["output"]["lvlm_text"], str) and sidecar["output"]["height"] == 64

    score = [
        "eval",
        "cobsat",
        "score",
        "--images",
        str(images),
        "--judge",
        "tiny:llava",
        "--max-new-tokens",
        "3",
    ]
    assert main([*score, *selection, "--out", str(tmp_path / "results")]) == 0
    results = json.loads((tmp_path / "results" / "cobsat-results.json").read_text())
    assert results["judge"]
    assert (tmp_path / "results" / "cobsat-results.md").is_file()
