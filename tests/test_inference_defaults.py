"""A model folder's inference defaults (``thinkdiff.json``'s ``inference``): library < folder < flag.

On the miniature world's committed folders, whose aligners were trained on greedy, EOS-terminated
answers: a bare ``thinkdiff generate --model FOLDER`` draws what the app draws.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from thinkdiff.cli import main
from thinkdiff.miniworld.models import MiniWorld, default_weights_dir
from thinkdiff.models.bundle import load_info
from thinkdiff.models.model_info import ThinkDiffInfo
from thinkdiff.pipelines import InferenceSettings
from thinkdiff.pipelines.inference_defaults import FROM_FOLDER, FROM_GIVEN, FROM_LIBRARY, resolve_settings

WEIGHTS = default_weights_dir()
METHOD = WEIGHTS / "thinkdiff" / "no-split-calibrated"


def info(**inference) -> ThinkDiffInfo:
    return ThinkDiffInfo("lvlm", "vlm", "t5", "flux", 8, 8, inference=inference)


def test_the_folder_overrides_the_library_and_a_flag_overrides_the_folder() -> None:
    settings, sources = resolve_settings(
        InferenceSettings(), info(num_tokens=17, greedy=True), {"num_tokens": 5}
    )
    assert (settings.num_tokens, settings.greedy, settings.stop_at_eos) == (
        5,
        True,
        InferenceSettings().stop_at_eos,
    )
    assert (sources["num_tokens"], sources["greedy"], sources["stop_at_eos"]) == (
        FROM_GIVEN,
        FROM_FOLDER,
        FROM_LIBRARY,
    )
    # A flag left out (None) is no choice.
    settings, sources = resolve_settings(InferenceSettings(), info(num_tokens=17), {"num_tokens": None})
    assert settings.num_tokens == 17 and sources["num_tokens"] == FROM_FOLDER


def test_an_unknown_inference_key_is_named() -> None:
    with pytest.raises(ValueError, match=r"thinkdiff.json: unknown inference settings \['num_token'\]"):
        resolve_settings(InferenceSettings(), info(num_token=17))


def test_the_mini_worlds_folders_carry_how_they_were_trained_to_run() -> None:
    expected = MiniWorld(WEIGHTS).inference_settings()
    for folder in sorted((WEIGHTS / "thinkdiff").iterdir()):
        got = load_info(folder).inference
        assert got == {"num_tokens": expected.num_tokens, "stop_at_eos": True, "greedy": True}, folder.name


def test_a_bare_generate_draws_what_the_app_draws(tmp_path) -> None:
    pytest.importorskip("gradio", reason="the app extra: pip install -e '.[app]'")
    from thinkdiff.app import AppConfig, Backend, GenerateOptions

    backend = Backend(AppConfig(out_dir=tmp_path / "app"))
    example = backend.example("Background-I", 2, 0)
    (app,) = backend.generate(example["items"], GenerateOptions(seed=3))
    argv = [
        "generate",
        "--model",
        str(METHOD),
        "--decoder",
        str(WEIGHTS / "flux"),
        "--lvlm",
        str(WEIGHTS / "vlm"),
    ]
    for item in example["items"]:
        argv += ["--text", item] if isinstance(item, str) else ["--image", str(item)]
    assert main([*argv, "--seed", "3", "--out", str(tmp_path / "bare.png")]) == 0
    bare = json.loads((tmp_path / "bare.json").read_text())
    assert bare["lvlm_text"] == app.sidecar["lvlm_text"] and bare["settings"] == app.sidecar["settings"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "bare.png")), np.asarray(Image.open(app.path)))
    sources = bare["conditioning_sources"]
    assert sources["num_tokens"] == sources["greedy"] == sources["stop_at_eos"] == FROM_FOLDER
    # A flag still wins, and the sidecar says so.
    assert (
        main([*argv, "--num-tokens", "3", "--no-greedy", "--seed", "3", "--out", str(tmp_path / "flag.png")])
        == 0
    )
    flagged = json.loads((tmp_path / "flag.json").read_text())
    assert flagged["conditioning"]["num_tokens"] == 3 and not flagged["conditioning"]["greedy"]
    assert (
        flagged["conditioning_sources"]["num_tokens"]
        == flagged["conditioning_sources"]["greedy"]
        == FROM_GIVEN
    )


def test_eval_cobsat_without_a_preset_runs_the_folder_as_it_is_meant_to(capsys) -> None:
    base = ["eval", "cobsat", "generate", "--dry-run", "--mode", "lvlm", "--model", str(METHOD)]
    assert main(base) == 0
    run = json.loads(capsys.readouterr().out)
    assert run["settings"]["num_tokens"] == 17 and run["settings"]["greedy"] and run["settings"]["stop_at_eos"]
    assert run["from_model_folder"] == ["greedy", "num_tokens", "stop_at_eos"]
    assert main([*base, "--num-tokens", "40"]) == 0  # a flag wins
    run = json.loads(capsys.readouterr().out)
    assert run["settings"]["num_tokens"] == 40 and "num_tokens" not in run["from_model_folder"]
    # A preset is a published row's settings: the folder's decoding does not change it.
    assert main(["eval", "cobsat", "generate", "--dry-run", "--preset", "release", "--model", str(METHOD)]) == 0
    run = json.loads(capsys.readouterr().out)
    assert run["settings"]["num_tokens"] == 128 and not run["settings"]["greedy"] and "from_model_folder" not in run
