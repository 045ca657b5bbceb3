"""`thinkdiff eval cobsat ablation`: every stage runs, outputs land where documented, reruns reuse work."""

from __future__ import annotations

import json

from transformers import AutoTokenizer

from thinkdiff.cli import main
from thinkdiff.evaluation.cobsat import write_synthetic_dataset

from .conftest import write_feature_folder


def test_input_tokens_then_text_bridge(tiny_env, tmp_path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_env / "qwen2-vl")
    features = write_feature_folder(tmp_path / "features", tokenizer, per_shard=8, prompt_features=True)
    dataset = write_synthetic_dataset(tmp_path / "datasets")
    out = tmp_path / "ablation"
    common = [
        "--features", str(features), "--preset", "debug-lvlm", "--dataset", str(dataset), "--out", str(out),
        "--train-args", "--max-steps 4 --val-every 0 --decode-every 0",
        "--tasks", "2", "--shots", "2", "--num-prompts", "2", "--steps", "2", "--size", "64",
        "--judge", "tiny:llava", "--max-new-tokens", "2",
    ]  # fmt: skip
    assert main(["eval", "cobsat", "ablation", "input-tokens", *common]) == 0
    info = json.loads((out / "runs" / "input-tokens" / "model" / "thinkdiff.json").read_text())
    assert info["features"] == "prompt"
    for variant in ("lvlm", "input-tokens"):
        assert len(list((out / "images" / variant).rglob("*.jpg"))) == 2
        assert (out / "results" / variant / "cobsat-results.json").is_file()
    compare = json.loads((out / "compare" / "cobsat-compare.json").read_text())
    assert "input-tokens" in json.dumps(compare)
    assert (out / "loss-curves.png").is_file()

    trained_at = (out / "runs" / "lvlm" / "model" / "thinkdiff.json").stat().st_mtime_ns
    assert main(["eval", "cobsat", "ablation", "text-bridge", *common]) == 0
    assert (out / "runs" / "lvlm" / "model" / "thinkdiff.json").stat().st_mtime_ns == trained_at  # reused
    sidecar = json.loads(next((out / "images" / "text-bridge").rglob("*.json")).read_text())
    assert sidecar["generator"]["mode"] == "text-bridge"


def test_qcd_variants_keep_their_own_qcd_weight_under_a_preset(tmp_path, capsys) -> None:
    """The qcd ablation's arms without QCD stay without it under --generate-preset tbdn (whose
    published weight is 0.5), the weight is recorded as an override of the preset, and the arms
    with QCD take the ablation's --qcd-alpha."""
    from thinkdiff.cli import build_parser
    from thinkdiff.commands.ablation import ABLATIONS, generate_argv

    base = ["eval", "cobsat", "ablation", "qcd", "--features", str(tmp_path), "--dataset", str(tmp_path)]
    for preset, alpha in ((["--generate-preset", "tbdn"], "0.25"), ([], "0.5")):
        args = build_parser().parse_args([*base, "--out", str(tmp_path / "out"), *preset, "--qcd-alpha", alpha])
        for variant in ABLATIONS["qcd"]:
            capsys.readouterr()
            argv = generate_argv(args, variant, tmp_path / "model", tmp_path / "images")
            assert main([*argv, "--dry-run"]) == 0
            resolved = json.loads(capsys.readouterr().out)
            want = float(alpha) if variant.name.endswith("qcd") else 0.0
            assert resolved["settings"]["qcd_alpha"] == want, (preset, variant.name)
            assert (resolved["settings"]["hint"] is not None) == ("hint" in variant.name)
            if preset and want != 0.5:
                assert resolved["overrides"]["qcd_alpha"] == {"preset": 0.5, "given": want}
