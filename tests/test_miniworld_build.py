"""A reduced miniature world: the build trains every component, the report measures them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def quick_world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    from thinkdiff.miniworld.build import build, quick_config

    root = tmp_path_factory.mktemp("miniworld")
    config = quick_config(seed=0)
    config.threads = 1
    return root, build(root, config, progress=False)


def _falls(losses: list[float], k: int = 5) -> bool:
    return float(np.mean(losses[-k:])) < float(np.mean(losses[:k]))


def test_quick_build_trains_every_component(quick_world):
    root, record = quick_world
    for name in ("t5", "flux", "vlm", "vision"):
        losses = json.loads((root / name / "training.json").read_text())["losses"]
        assert _falls(losses), f"{name} loss did not fall: {losses[:5]} ... {losses[-5:]}"
    rows = [
        json.loads(line)
        for line in (root / "work" / "runs" / "lvlm" / "metrics.jsonl").read_text().splitlines()
    ]
    aligner_losses = [r["loss"] for r in rows if "loss" in r]
    assert _falls(aligner_losses, k=2), aligner_losses
    assert set(record["seconds"]) >= {
        "judge",
        "t5",
        "flux",
        "vlm",
        "vision",
        "lvlm_aligner",
        "clip_aligner",
        "total",
    }
    assert (root / ".gitignore").read_text() == "work/\n"
    # Calibration: every calibrated aligner, from task-format data of training cells.
    from thinkdiff.data.feature_shards import FeatureShards
    from thinkdiff.miniworld.build import CALIBRATION_RUNS, calibrated_dir, quick_config
    from thinkdiff.models.bundle import load_model

    quick = quick_config()
    for name in [*CALIBRATION_RUNS, "clip"]:
        _, info = load_model(calibrated_dir(root, name))
        assert info.extra["objective"] == "calibrate", name
        budget = quick.clip_calib_steps if name == "clip" else quick.calib_steps
        if name != "clip" and CALIBRATION_RUNS[name].lever:
            budget = quick.calib_lever_steps  # each lever beside the default recipe at this budget
        assert info.extra["steps"] == budget, name
    assert set(record["calibration_seconds"]) >= {f"calibrate {n}" for n in CALIBRATION_RUNS}
    # The split lever: proxy and calibrated at the default's budgets, the lever recorded in each.
    from thinkdiff.miniworld.build import CLIP_EMPTY_FIRST, CLIP_LEVER, clip_lever_dir

    lever_budgets = {
        clip_lever_dir(root): quick.clip_steps,
        calibrated_dir(root, CLIP_LEVER): quick.clip_calib_steps,
    }
    for folder, budget in lever_budgets.items():
        _, info = load_model(folder)
        assert info.variant == "clip" and info.extra["steps"] == budget, folder
        assert info.extra["clip_empty_first"] == CLIP_EMPTY_FIRST, folder
        assert info.inference, folder
    assert "clip_empty_first" not in load_model(root / "thinkdiff" / "clip")[1].extra
    assert record["seconds"]["clip_lever_aligner"] > 0
    assert f"calibrate {CLIP_LEVER}" in record["calibration_seconds"]
    task = FeatureShards(root / "work" / "features" / "task")
    assert {m["shots"] for m in task.metadata(0)} == {2, 4}
    words = (root / "work" / "task-source").glob("*.txt")
    assert all(p.read_text().strip() for p in words)


def test_built_components_load_with_the_project_loaders(quick_world):
    import torch
    from diffusers import FluxPipeline

    from thinkdiff.miniworld.models import MiniWorld
    from thinkdiff.models.bundle import load_model
    from thinkdiff.models.clip_vision import CLIPVisionFeatures
    from thinkdiff.models.lvlm import LVLMFeatureExtractor
    from thinkdiff.models.proxy_decoder import ProxyT5Decoder

    root, _ = quick_world
    extractor = LVLMFeatureExtractor.from_pretrained(root / "vlm", device="cpu")
    proxy = ProxyT5Decoder.from_pretrained(root / "t5", device="cpu")
    pipe = FluxPipeline.from_pretrained(root / "flux", vae=None)
    vision = CLIPVisionFeatures.from_pretrained(root / "vision", device="cpu")
    _, info = load_model(root / "thinkdiff" / "lvlm")
    assert info.in_dim == extractor.hidden_size and info.out_dim == proxy.d_model
    assert pipe.transformer.config.joint_attention_dim == proxy.d_model
    assert vision.num_tokens == 17
    world = MiniWorld(root)
    images = world.images_from_text(["a red star", "a striped moon on a blue background"], [0, 1], steps=2)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    # The CLIP stub gives every text the same (zero) pooled embedding, as the decoder was trained.
    _, pooled, _ = pipe.encode_prompt(prompt=["a red star"], prompt_2=None, max_sequence_length=16)
    assert torch.count_nonzero(pooled) == 0


def test_built_aligner_folders_carry_the_worlds_decoding(quick_world):
    """Every aligner folder a build writes (LVLM, CLIP, calibrated) records in its thinkdiff.json
    how the world runs it, so a bare ``generate --model`` on a rebuilt world draws as the app does."""
    from thinkdiff.miniworld.models import MiniWorld
    from thinkdiff.models.bundle import load_info

    root, _ = quick_world
    expected = MiniWorld(root).inference_settings()
    folders = sorted((root / "thinkdiff").iterdir())
    assert {load_info(f).variant for f in folders} == {"lvlm", "clip"}
    for folder in folders:
        assert load_info(folder).inference == {
            "num_tokens": expected.num_tokens,
            "stop_at_eos": True,
            "greedy": True,
        }, folder.name


# What a build writes that records its own run (wall times, the folder it was built in).
# An aligner's model card (README.md) renders its thinkdiff.json (a calibrated one names its start's path).
_RUN_RECORDS = {"build.json", "training.json", "thinkdiff.json", "README.md"}


def _file_digests(root: Path) -> dict[str, str]:
    import hashlib

    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and "work" not in path.relative_to(root).parts and path.name not in _RUN_RECORDS
    }


def test_a_second_build_from_the_same_seed_is_identical(quick_world, tmp_path):
    """Every weight, config and tokenizer file, byte for byte (one thread, as the fixture builds)."""
    from thinkdiff.miniworld.build import build, quick_config

    root, _ = quick_world
    config = quick_config(seed=0)
    config.threads = 1
    build(tmp_path, config, progress=False)
    first, second = _file_digests(root), _file_digests(tmp_path)
    assert sum(name.endswith(".safetensors") for name in first) >= 15  # calibrated aligners included
    assert sum(name.endswith("tokenizer.json") for name in first) >= 3
    assert first == second


def test_judge_training_is_deterministic():
    import torch

    from thinkdiff.miniworld.judge import train_judge

    torch.set_num_threads(1)
    a, _ = train_judge(seed=3, num_train=64, steps=2, batch_size=16, progress=False)
    b, _ = train_judge(seed=3, num_train=64, steps=2, batch_size=16, progress=False)
    for (k, va), vb in zip(a.net.state_dict().items(), b.net.state_dict().values()):
        assert torch.equal(va, vb), k


def test_report_numbers_come_from_the_evaluation(quick_world, tmp_path, monkeypatch):
    """Every accuracy is computed from judged outcomes: make the judge accept everything and the
    image rows read 1.0, while the text answers (parsed, not judged) keep their own value."""
    from thinkdiff.miniworld.judge import Verdict
    from thinkdiff.miniworld.premise import TRANSFER_CEILING, TRANSFER_MAPPED, TRANSFER_SOURCES
    from thinkdiff.miniworld.report import ReportConfig, write_report

    root, _ = quick_world
    monkeypatch.setattr(Verdict, "matches", lambda self, target: True)
    config = ReportConfig(
        num_prompts=2,
        shots=(2,),
        steps=2,
        fidelity_n=12,
        clip_n=4,
        retrain=False,
        transfer_train=64,
        transfer_n=4,
        transfer_steps=2,
        transfer_calibration_steps=2,
        threads=1,
        progress=False,
    )
    report = write_report(root, tmp_path, config)
    tables, outcomes = report["lvlm"]["tables"], report["lvlm"]["outcomes"]
    for name, table in tables.items():
        average = table["2"]["average"]
        assert average["correct"] == sum(outcomes[name]) and average["n"] == len(outcomes[name]) == 12
    for name in ("ground-truth caption", "text bridge", "lvlm", "untrained"):
        assert tables[name]["2"]["average"]["accuracy"] == 1.0
    assert report["premise"]["n"] == 4
    rows = report["premise"]["rows"]
    mapped = [TRANSFER_MAPPED.format(source=source) for source in TRANSFER_SOURCES]
    from thinkdiff.miniworld.premise import TRANSFER_CALIBRATED

    calibrated = TRANSFER_CALIBRATED.format(source=TRANSFER_SOURCES[0])
    assert set(rows) == {TRANSFER_CEILING, *TRANSFER_SOURCES, *mapped, calibrated}
    assert rows[calibrated]["all"] == 1.0 and rows[calibrated]["calibration_steps"] == 2
    for name in (
        "calibrated lvlm",
        "calibrated no split",
        "calibrated input tokens",
        "calibrated lvlm regress",
    ):
        assert tables[name]["2"]["average"]["accuracy"] == 1.0, name
    assert report["clip_calibrated"]["image"]["all"] == 1.0
    # The split lever's rows beside the default's, on the same inputs, per attribute too.
    from thinkdiff.miniworld.report.clip_claims import CALIBRATED, LEVER_CALIBRATED, LEVER_PROXY_ONLY

    claims = report["clip_claims"]
    for task in ("preservation", "image + text", "composition"):
        if task != "composition":  # judged by `matches`; composition compares values itself
            assert claims["tasks"][task][LEVER_CALIBRATED]["accuracy"] == 1.0, task
        assert claims["tasks"][task][LEVER_PROXY_ONLY]["n"] == 4, task
        assert f"{LEVER_CALIBRATED} vs {CALIBRATED}" in claims["paired"][task], task
    by_attribute = claims["preservation_by_attribute"]
    assert set(by_attribute) == set(claims["tasks"]["preservation"])
    assert all(c["n"] == 4 for cells in by_attribute.values() for c in cells.values())
    assert set(claims["preservation_by_attribute_paired"][f"{LEVER_CALIBRATED} vs {CALIBRATED}"]) == {
        "shape",
        "color",
        "background",
        "texture",
    }
    assert "## Calibration: the decoder in the loop" in (tmp_path / "report.md").read_text()
    for source, fitted in zip(TRANSFER_SOURCES, mapped, strict=True):
        # The map is fitted to the T5 states, so it moves the features towards them.
        assert rows[fitted]["cosine"] > rows[source]["cosine"]
        assert np.isfinite(rows[source]["linear_r2"])
    markdown = (tmp_path / "report.md").read_text()
    text_avg = tables["vlm text answer"]["2"]["average"]["accuracy"]
    assert "| vlm text answer |" in markdown and f"{text_avg:.3f}" in markdown
    assert "## The premise, tested" in markdown
    for png in (
        "component_losses.png",
        "norm_ablation.png",
        "lvlm_accuracy.png",
        "examples_lvlm.png",
        "examples_clip.png",
    ):
        assert (tmp_path / png).stat().st_size > 1000, png
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["lvlm"]["tables"] == json.loads(json.dumps(tables))


def _report_command(root: Path, out: Path, *extra: str) -> list[str]:
    import sys

    # --quick: small counts, and every section runs (premise, CLIP, QCD, both LVLM halves).
    command = ["miniworld", "report", str(root), str(out), "--quick", "--no-progress"]
    return [sys.executable, "-m", "thinkdiff.cli", *command, *extra]


def _numbers(report: dict, path: str = "") -> dict[str, object]:
    """Every number, flag and text of a report by its path, except wall times and what records the run."""
    if isinstance(report, dict):
        out: dict[str, object] = {}
        for key, value in report.items():
            if "seconds" in key or key in ("sections", "config", "build", "redone"):
                continue
            out.update(_numbers(value, f"{path}/{key}"))
        return out
    if isinstance(report, list):
        out = {}
        for i, value in enumerate(report):
            out.update(_numbers(value, f"{path}[{i}]"))
        return out
    return {path: report}


def _same_numbers(a: dict, b: dict) -> None:
    """Every accuracy cell (and outcome, count, verdict) equal; real-valued diagnostics (cosines, R²,
    losses, RMS) to 1e-5, since LAPACK's least squares may round differently from run to run."""
    na, nb = _numbers(a), _numbers(b)
    assert na.keys() == nb.keys()
    loose = ("cosine", "linear_r2", "final_loss", "rms", "p_value", "ratio")
    for path, value in na.items():
        other = nb[path]
        if isinstance(value, float) and path.rsplit("/", 1)[-1].startswith(loose):
            assert other == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), path
        elif isinstance(value, float) and value != value:
            assert other != other, path
        else:
            assert value == other, path


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pids: list[int]) -> bool:
    """Whether any of ``pids`` still runs (a zombie waiting to be reaped counts as gone)."""
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            return True
    return False


def test_a_killed_report_resumes_with_the_same_numbers(quick_world, tmp_path):
    """Sections are saved as they finish: a run killed mid-way keeps them (and its two workers die
    with it), the same command resumes at the unfinished ones, and every number equals an
    uninterrupted run's (in one process)."""
    import os
    import signal
    import subprocess
    import time

    from thinkdiff.miniworld.report import SECTIONS

    root, _ = quick_world
    n = len(SECTIONS)  # --quick measures every section
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_report_command(root, whole, "--threads", "1"), check=True, env=env, capture_output=True)
    reference = json.loads((whole / "report.json").read_text())
    assert len(reference["sections"]) == n and "lvlm_calibrated" not in reference

    run = subprocess.Popen(
        _report_command(root, killed, "--threads", "2"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    record = killed / "report.json"
    while run.poll() is None and not (
        record.is_file() and len(json.loads(record.read_text())["sections"]) >= 2
    ):
        time.sleep(0.2)
    workers = _children(run.pid)
    run.send_signal(signal.SIGKILL)
    run.wait()
    deadline = time.time() + 10
    while _alive(workers) and time.time() < deadline:
        time.sleep(0.2)
    assert len(workers) == 2 and not _alive(workers)  # the workers die with the report
    kept = json.loads(record.read_text())
    assert 2 <= len(kept["sections"]) < n, kept["sections"]
    for name in kept["sections"]:
        assert name in kept["seconds"]

    changed = subprocess.run(
        _report_command(root, killed, "--threads", "1", "--steps", "3"),
        env=env,
        capture_output=True,
        text=True,
    )
    assert (
        changed.returncode == 2 and "other settings" in changed.stderr and "steps: 2 -> 3" in changed.stderr
    )
    assert "Traceback" not in changed.stderr
    assert json.loads(record.read_text()) == kept  # the refused run wrote nothing

    resumed = subprocess.run(
        _report_command(root, killed, "--threads", "2"), check=True, env=env, capture_output=True, text=True
    )
    assert "resuming" in resumed.stderr and f"({n} of {n} sections)" in resumed.stderr
    for name in kept["sections"]:
        assert f": {name} done" not in resumed.stderr, name  # a finished section is not measured again
    final = json.loads(record.read_text())
    assert final["sections"][: len(kept["sections"])] == kept["sections"]
    _same_numbers(reference, final)
    assert (killed / "report.md").read_text().count("## ") == (whole / "report.md").read_text().count("## ")

    # Measuring one section again (as after retraining the component it measures).
    redone = subprocess.run(
        _report_command(root, killed, "--threads", "1", "--redo", "clip"),
        check=True,
        env=env,
        capture_output=True,
        text=True,
    )
    assert ": clip done" in redone.stderr and redone.stderr.count(" done in ") == 1
    again = json.loads(record.read_text())
    assert again["sections"][-1] == "clip" and again["redone"] == [
        {"sections": ["clip"], "build_changed": False}
    ]
    _same_numbers(reference, again)

    # A report folder copied without its work folder (as the committed one is): measuring a section
    # again keeps the LVLM example figure, whose drawn images are gone, instead of redrawing it empty.
    figure = (killed / "examples_lvlm.png").read_bytes()
    shutil.rmtree(killed / "work")
    subprocess.run(
        _report_command(root, killed, "--threads", "1", "--redo", "clip"), check=True, env=env, capture_output=True
    )
    assert (killed / "examples_lvlm.png").read_bytes() == figure

    unknown = subprocess.run(
        _report_command(root, killed, "--redo", "nonsense"), env=env, capture_output=True, text=True
    )
    assert unknown.returncode == 2 and "no section named nonsense" in unknown.stderr


def test_drawn_images_are_reused_not_sampled_again(quick_world):
    """The text bridge where the answer is the caption, a decoding whose answer did not change: an
    image asked for twice is drawn once, and is the same image."""
    from thinkdiff.miniworld.models import DrawnImages, MiniWorld

    root, _ = quick_world
    world = MiniWorld(root)
    asked: list[int] = []
    draw = world.images_from_embeds

    def counting(embeds, seeds, **sampling):
        asked.append(len(embeds))
        return draw(embeds, seeds, **sampling)

    world.images_from_embeds = counting  # type: ignore[method-assign]
    a, b = world.text_embeds(["a red star", "a blue moon on a green background"])
    drawn = DrawnImages()
    first = drawn.draw(world, [a, b, a], [0, 1, 0], steps=2, cfg=3.0)
    assert asked == [2] and np.array_equal(first[0], first[2])
    again = drawn.draw(world, [b, a, a], [1, 0, 5], steps=2, cfg=3.0)
    assert asked == [2, 1]  # only (a, seed 5) is new
    assert np.array_equal(again[0], first[1]) and np.array_equal(again[1], first[0])
    drawn.draw(world, [a], [0], steps=3, cfg=3.0)
    assert asked == [2, 1, 1]  # other sampler settings are another image


def test_the_catalogue_names_the_split_lever(quick_world):
    from thinkdiff.miniworld.build import CLIP_EMPTY_FIRST
    from thinkdiff.miniworld.catalogue import world_models

    root, _ = quick_world
    summaries = {m.name: m.summary for m in world_models(root)}
    for name in ("clip-empty-first", "clip-empty-first-calibrated"):
        assert "split lever" in summaries[name], summaries[name]
        assert f"clip_empty_first {CLIP_EMPTY_FIRST}" in summaries[name], summaries[name]
    assert "split lever" not in summaries["clip"] + summaries["clip-calibrated"]


def test_the_catalogue_scores_every_clip_folder_from_its_clip_claims_row():
    """Each committed ThinkDiff-CLIP folder, the split lever's included, reads its preservation row
    of the committed report's clip_claims (all four attributes, then each one)."""
    from thinkdiff.miniworld.catalogue import committed_report, world_models
    from thinkdiff.miniworld.models import default_weights_dir

    claims = committed_report()["clip_claims"]
    rows = {
        "clip": "ThinkDiff-CLIP proxy-only",
        "clip-calibrated": "ThinkDiff-CLIP calibrated",
        "clip-empty-first": "ThinkDiff-CLIP proxy-only, split lever",
        "clip-empty-first-calibrated": "ThinkDiff-CLIP calibrated, split lever",
    }
    texts = {m.name: m.score_text for m in world_models(default_weights_dir()) if m.variant == "clip"}
    assert set(texts) == set(rows)
    for name, row in rows.items():
        kept = claims["tasks"]["preservation"][row]
        assert texts[name].startswith(
            f"image in: all four attributes kept {kept['accuracy']:.2f} ({kept['n']} images); "
        ), texts[name]
        colour = claims["preservation_by_attribute"][row]["color"]["accuracy"]
        assert f"color {colour:.2f}" in texts[name], texts[name]
