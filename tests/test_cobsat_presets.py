"""CoBSAT presets: the published rows' settings, --dry-run, recorded overrides, compare's settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from thinkdiff.cli import main
from thinkdiff.evaluation.cobsat.presets import resolve_settings, setting_differences

RELEASE_INSTRUCTION_END = "start the answer with 'Create an image'.\n\n"


def _dry_run(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    capsys.readouterr()
    assert main(["eval", "cobsat", "generate", *argv, "--dry-run"]) == 0
    return json.loads(capsys.readouterr().out)  # the whole output is one JSON object


@pytest.fixture()
def no_models(monkeypatch: pytest.MonkeyPatch) -> None:
    from thinkdiff.pipelines import ThinkDiffPipeline

    def refuse(*args, **kwargs):
        raise AssertionError("--dry-run loaded a model")

    monkeypatch.setattr(ThinkDiffPipeline, "from_pretrained", refuse)


def test_presets_resolve_to_the_published_settings(capsys: pytest.CaptureFixture[str], no_models: None) -> None:
    """Each preset's whole --dry-run object: every setting of the published configuration, the
    ones the mode and decoder imply included (EOS, the pooled CLIP vector, FLUX's T5 length)."""
    from thinkdiff.pipelines.constants import DEFAULT_INSTRUCTION

    paper = {"lvlm": "Qwen/Qwen2-VL-7B-Instruct", "decoder": "black-forest-labs/FLUX.1-dev"}
    common = {**paper, "instruction": DEFAULT_INSTRUCTION, "hint": None, "num_tokens": 128, "steps": 28}
    common |= {"guidance": 3.5, "seed": 123}
    assert _dry_run(capsys, "--preset", "release") == {
        "preset": "release",
        "published_rows": ["ThinkDiff-LVLM"],
        "settings": {
            **common, "mode": "lvlm", "greedy": False, "temperature": 0.6, "top_p": 0.9, "qcd_alpha": 0.0,
            "stop_at_eos": False, "pooled": 'CLIP of ""', "t5_max_length": None, "size": 512,
        },
        "overrides": {},
    }  # fmt: skip
    assert _dry_run(capsys, "--preset", "tbdn") == {
        "preset": "tbdn",
        "published_rows": ["Text bridge + hint + QCD (2026 follow-up, its method; avg only)"],
        "settings": {
            **common, "mode": "text-bridge", "greedy": True, "temperature": 0.7, "top_p": 0.9, "qcd_alpha": 0.5,
            "stop_at_eos": True, "pooled": "CLIP of the text", "t5_max_length": 512, "size": 256,
        },
        "overrides": {},
    }  # fmt: skip
    assert RELEASE_INSTRUCTION_END in DEFAULT_INSTRUCTION
    # Another mode beside a preset changes what it implies too.
    bridged = _dry_run(capsys, "--preset", "release", "--mode", "text-bridge")["settings"]
    assert (bridged["stop_at_eos"], bridged["pooled"], bridged["t5_max_length"]) == (True, "CLIP of the text", 512)


def test_flux_dev_reads_the_t5_length_the_tbdn_preset_states() -> None:
    """FLUX.1-dev (distilled guidance, no descriptor) reads the LVLM's text up to the preset's T5 length."""
    import torch

    from thinkdiff.evaluation.cobsat.presets import FLUX_DEV_T5_TOKENS
    from thinkdiff.pipelines.decoders.flux import FluxDecoder
    from thinkdiff.pipelines.decoders.spec import DecoderSpec

    # FLUX.1-dev's own configs: T5-XXL width 4096, CLIP-L pooled width 768, distilled guidance.
    spec = DecoderSpec(
        name="black-forest-labs/FLUX.1-dev", family="flux", pipeline_class="FluxPipeline", prompt_width=4096,
        pooled_width=768, required_length=None, guidance_embeds=True,
    )  # fmt: skip
    assert FluxDecoder(spec, torch.device("cpu"), torch.float32).text_bridge_length() == FLUX_DEV_T5_TOKENS


def test_flags_override_a_preset_and_the_override_is_recorded(
    capsys: pytest.CaptureFixture[str], no_models: None
) -> None:
    out = _dry_run(capsys, "--preset", "tbdn", "--steps", "10", "--size", "256", "--no-greedy", "--hint")
    assert (out["settings"]["steps"], out["settings"]["greedy"]) == (10, False)
    # --size 256 repeats the preset: not an override; the bare --hint is our sentence.
    assert set(out["overrides"]) == {"steps", "greedy", "hint"}
    assert out["overrides"]["steps"] == {"preset": 28, "given": 10}
    plain = _dry_run(capsys, "--mode", "text-bridge", "--steps", "10")
    assert plain["preset"] is None and plain["overrides"] == {} and plain["settings"]["steps"] == 10


def test_bad_settings_are_one_line(capsys: pytest.CaptureFixture[str], no_models: None) -> None:
    for argv, message in (
        (["--preset", "tbdn", "--mode", "clip"], "clip uses none"),
        (["--preset", "release", "--top-p", "0"], "--top-p 0.0 must be in (0, 1]"),
        (["--preset", "release", "--steps", "0"], "--steps 0 must be >= 1"),
        ([], "give --mode or --preset"),
        (["--preset", "release"], "--dataset is required"),
    ):
        capsys.readouterr()
        dry = [] if "--dataset" in message else ["--dry-run"]
        assert main(["eval", "cobsat", "generate", *argv, *dry]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_settings("paper", {})


def test_setting_differences() -> None:
    from thinkdiff.evaluation.cobsat.presets import PRESETS, UNKNOWN

    tbdn = PRESETS["tbdn"].settings
    assert setting_differences(tbdn, tbdn) == {}
    run = {**tbdn, "size": 512, "temperature": 0.1, "lvlm": None}
    # Greedy: temperature is moot; an unrecorded LVLM is not a difference.
    assert setting_differences(run, tbdn) == {"size": (512, 256)}
    assert setting_differences({"size": 512}, {"size": UNKNOWN}) == {}  # an unknown setting differs from nothing
    assert setting_differences({"steps": 28}, PRESETS["release"].settings) == {}


def test_generate_records_settings_and_compare_shows_them(
    tiny_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from thinkdiff.evaluation.cobsat import write_synthetic_dataset

    dataset = write_synthetic_dataset(tmp_path / "datasets")
    images = tmp_path / "images"
    selection = ["--tasks", "1", "--shots", "2", "--prompt-range", "0:2"]
    generate = ["eval", "cobsat", "generate", "--preset", "tbdn", "--lvlm", "tiny:qwen2-vl", "--decoder", "tiny:flux"]
    fast = ["--steps", "1", "--size", "64", "--num-tokens", "4"]
    assert main([*generate, *selection, *fast, "--dataset", str(dataset), "--out", str(images)]) == 0
    sidecar = json.loads(next(images.rglob("*.json")).read_text())["generator"]
    assert sidecar["preset"] == "tbdn" and sidecar["greedy"] is True and sidecar["qcd_alpha"] == 0.5
    assert sidecar["instruction"].endswith(RELEASE_INSTRUCTION_END)
    assert set(sidecar["overrides"]) == {"lvlm", "decoder", "steps", "size", "num_tokens"}
    assert sidecar["lvlm"] == "tiny:qwen2-vl"
    assert (sidecar["stop_at_eos"], sidecar["pooled"]) == (True, "CLIP of the text")

    score = ["eval", "cobsat", "score", "--images", str(images), "--judge", "tiny:llava", "--max-new-tokens", "3"]
    assert main([*score, *selection, "--out", str(tmp_path / "results")]) == 0
    capsys.readouterr()
    results = tmp_path / "results" / "cobsat-results.json"
    assert main(["eval", "cobsat", "compare", str(results), "--labels", "tiny", "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out.splitlines()
    method = next(line for line in printed if line.startswith("Text bridge + hint + QCD (2026 follow-up, its method"))
    assert "greedy" in method and "256 px" in method
    assert "≠ tiny: lvlm 'tiny:qwen2-vl' ('Qwen/Qwen2-VL-7B-Instruct')" in method
    assert "size 64 (256)" in method and "steps 1 (28)" in method and "qcd_alpha" not in method
    release = next(line for line in printed if line.startswith("ThinkDiff-LVLM (published)"))
    assert "mode 'text-bridge' ('lvlm')" in release and "greedy True (False)" in release
    assert "exactly 128 tokens" in release and "temperature" not in release.split("≠")[1]
    seed = [line for line in printed if line.startswith("SEED-LLaMA")]
    assert seed == []  # another system: no settings to show
    md = (tmp_path / "cmp" / "cobsat-compare.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| ThinkDiff-LVLM (published) |"))
    assert row.rstrip(" |").endswith(release.split(": ", 1)[1])
    assert "| SEED-LLaMA (published) |" in md and "another system" in md


def test_compare_refuses_a_file_that_is_not_a_results_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = {
        "config.json": json.dumps({"label": "x"}),
        "list.json": "[1, 2]",
        "text.json": "not json",
        "damaged.json": json.dumps({"benchmark": "CoBSAT", "label": "x"}),
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        capsys.readouterr()
        assert main(["eval", "cobsat", "compare", str(tmp_path / name), "--out", str(tmp_path / "cmp")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and name in err[0] and "Traceback" not in err[0], err
        assert not (tmp_path / "cmp").exists()


def _results_record() -> dict:
    """A real results file's record: two cells of one task, judged by a named judge."""
    from thinkdiff.evaluation.cobsat.judge import JudgeInfo
    from thinkdiff.evaluation.cobsat.results import CellResult, CobsatResults

    cells = {(2, 1): CellResult(1, 2, 2, 1, 2, 0, 0, 1, 2, [0]), (4, 1): CellResult(1, 4, 2, 0, 2, 0, 0, 1, 1)}
    judge = JudgeInfo("tiny:llava", "llava", 3, "float32")
    return CobsatResults("run", judge, cells, [0, 1], generation=[{"mode": "lvlm", "size": 512}]).to_dict()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("generation", "ab"),
        ("generation", [1]),
        ("prompt_indices", []),
        ("prompt_indices", ["0"]),
        ("cells", []),
        ("cells", [{"task_id": 1, "shot": 2}]),
        ("cells", [{**_results_record()["cells"][0], "task_id": 99}]),
        ("clip_cells", [7]),
        ("label", 5),
    ],
)
def test_compare_refuses_a_damaged_field_before_writing_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str, value: object
) -> None:
    """A results file of the right kind with one damaged field: one line naming the file and the
    field, exit 2, and no output written (not even the ones a good file beside it would give)."""
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(_results_record()))
    bad.write_text(json.dumps({**_results_record(), field: value}))
    capsys.readouterr()
    assert main(["eval", "cobsat", "compare", str(good), str(bad), "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and repr(field) in err[0], err
    assert not (tmp_path / "cmp").exists()
    # The same file undamaged is drawn and written whole.
    assert main(["eval", "cobsat", "compare", str(good), "--out", str(tmp_path / "cmp")]) == 0
    assert sorted(p.suffix for p in (tmp_path / "cmp").iterdir()) == [".csv", ".json", ".md", ".png"]


def test_published_rows_settings_agree_with_their_names() -> None:
    """A row named "+ hint" used a hint whose sentence is unknown; every other row used none. Compare
    shows it so, and marks a run without a hint as differing from a "+ hint" row only."""
    from thinkdiff.evaluation.cobsat.presets import PUBLISHED_SETTINGS, SOME_HINT, settings_text
    from thinkdiff.pipelines.constants import HINT_INSTRUCTION

    assert any("+ hint" in row for row in PUBLISHED_SETTINGS)
    for row, settings in PUBLISHED_SETTINGS.items():
        named = "+ hint" in row
        assert settings["hint"] == (SOME_HINT if named else None), row
        assert ("no hint" in settings_text(settings)) != named, row
        plain, hinted = {**settings, "hint": None}, {**settings, "hint": HINT_INSTRUCTION}
        assert setting_differences(plain, settings) == ({"hint": (None, SOME_HINT)} if named else {}), row
        assert ("hint" in setting_differences(hinted, settings)) != named, row
