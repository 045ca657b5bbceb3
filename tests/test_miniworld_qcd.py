"""The query-contrastive baseline's rows in the miniature world, on the committed weights (quick)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from thinkdiff.miniworld.minicobsat import TASK_COLUMN_ORDER, build_prompts
from thinkdiff.miniworld.models import MiniWorld, default_weights_dir
from thinkdiff.miniworld.qcd import BASELINE, LVLM_QCD, TEXT_ROWS, measure_qcd, qcd_markdown
from thinkdiff.miniworld.stats import paired_test

STEPS = 2


@pytest.fixture(scope="module")
def world() -> MiniWorld:
    return MiniWorld(default_weights_dir())


@pytest.fixture(scope="module")
def measured(world):
    prompts = list(build_prompts(TASK_COLUMN_ORDER, (2,), range(2)))
    return prompts, measure_qcd(world, prompts, world.root / "thinkdiff" / "lvlm", progress=False, steps=STEPS)


def test_rows_tables_and_paired_tests(world, measured) -> None:
    from thinkdiff.miniworld.experiments import prompt_seed, run_vlm

    prompts, section = measured
    assert list(section["outcomes"]) == [*TEXT_ROWS, LVLM_QCD]
    baseline = section["outcomes"][BASELINE]
    # The plain row is the report's text bridge: greedy answer -> mini T5 -> mini FLUX -> judge.
    runs = run_vlm(world, prompts, progress=False)
    images = world.images_from_embeds(
        [world.text_embeds([r.answer or " "])[0] for r in runs], [prompt_seed(p) for p in prompts], steps=STEPS
    )
    assert baseline == [v.matches(p.target) for v, p in zip(world.judge.read(images), prompts)]
    for name, outcomes in section["outcomes"].items():
        average = section["tables"][name]["2"]["average"]
        assert (average["correct"], average["n"]) == (sum(outcomes), len(prompts))
    for test in section["tests"]:
        expected = paired_test(section["outcomes"][test["row"]], baseline)
        assert (test["a_only"], test["b_only"], test["p_value"]) == (
            expected.a_only,
            expected.b_only,
            expected.p_value,
        )
    assert section["n_per_task"] == 2


def test_qcd_rows_decode_against_the_prompt_without_its_query(world, measured) -> None:
    """The QCD answers are the VLM's greedy answers under the contrast, here differing from plain ones."""
    from thinkdiff.miniworld.experiments import run_vlm

    prompts, section = measured
    plain = run_vlm(world, prompts, progress=False)
    qcd = run_vlm(world, prompts, progress=False, qcd_alpha=section["alpha"])
    strong = run_vlm(world, prompts, progress=False, qcd_alpha=4.0)
    table = section["text_answers"]["VLM answer + QCD"]["2"]["average"]
    assert table["correct"] == sum(r.text_correct for r in qcd) and table["n"] == len(prompts)
    assert any(a.answer != b.answer for a, b in zip(plain, strong))
    # The features of a QCD answer are the full prompt's states of its tokens.
    assert all(torch.isfinite(r.features_NH).all() for r in qcd)


def test_markdown_section_and_report_hook(measured) -> None:
    from thinkdiff.miniworld.report import render_markdown

    _, section = measured
    lines = "\n".join(qcd_markdown(section))
    for name in [*TEXT_ROWS, LVLM_QCD]:
        assert f"| {name} |" in lines
    committed = json.loads((default_weights_dir().parent / "measured" / "report.json").read_text())
    committed["qcd"] = json.loads(json.dumps(section))  # as report.json stores it
    markdown = render_markdown(committed)
    assert "## The strongest training-free baseline" in markdown
    assert markdown.index("## The strongest training-free baseline") < markdown.index("## The paper's claims")
    assert np.isfinite([t["p_value"] for t in section["tests"]]).all()
