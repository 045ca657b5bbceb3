"""``make demo``'s mini-world grid and the README figure it draws (from the committed weights)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from thinkdiff.cli import main
from thinkdiff.miniworld.demo import GRID_RULE, grid_prompts
from thinkdiff.miniworld.minicobsat import MINI_TASKS
from thinkdiff.miniworld.models import default_weights_dir

ROOT = Path(__file__).resolve().parents[1]
FIGURE_COMMAND = "thinkdiff demo --figure docs/figure-miniworld.png"

pytestmark = pytest.mark.skipif(
    not (default_weights_dir() / "build.json").is_file(), reason="no committed mini-world weights"
)


def test_the_grid_rule_takes_one_prompt_of_every_task() -> None:
    prompts = grid_prompts()
    assert sorted(task for task, _, _ in prompts) == sorted(t.name for t in MINI_TASKS.values())
    assert len({(shot, index) for _, shot, index in prompts}) == 1  # the same shot and index everywhere


def test_the_readme_figure_command_runs_and_says_what_it_shows(tmp_path, capsys) -> None:
    readme = (ROOT / "README.md").read_text()
    assert FIGURE_COMMAND in readme and "docs/figure-miniworld.png" in readme
    figure = tmp_path / "figure.png"
    threads = torch.get_num_threads()
    try:
        assert main(["demo", "--figure", str(figure)]) == 0
    finally:
        torch.set_num_threads(threads)  # the demo sets its own thread count
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert first.startswith("the grid shows 6 mini-CoBSAT prompt(s)") and GRID_RULE in first
    # The counts in the one line are the rows' verdicts.
    thinkdiff, bridge = map(int, re.search(r"draws (\d)/6 right, the text bridge (\d)/6", first).groups())
    rows = [line for line in out.splitlines() if "-shot prompt" in line]
    assert len(rows) == 6
    assert thinkdiff == sum("ThinkDiff CORRECT" in r for r in rows)
    assert bridge == sum("text bridge CORRECT" in r for r in rows)
    with Image.open(figure) as image:  # one row a prompt: taller than wide
        assert image.height > image.width > 500
    assert "measured over all of mini-CoBSAT" in out


def test_the_figure_command_refuses_a_non_png_in_one_line(tmp_path, capsys) -> None:
    assert main(["demo", "--figure", str(tmp_path / "figure.jpg")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--figure" in err and not (tmp_path / "figure.jpg").exists()


def test_make_demo_says_what_each_part_shows(tiny_env, tmp_path, capsys) -> None:
    threads = torch.get_num_threads()
    try:
        assert main(["-v", "demo", "--out", str(tmp_path / "demo")]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    # -v reaches every stage: each is a whole command line that sets up its own logging.
    stages = [line for line in out.splitlines() if line.startswith("== ") and ": thinkdiff " in line]
    assert len(stages) >= 3 and all(": thinkdiff -v " in line for line in stages), stages
    assert "the grid shows 6 mini-CoBSAT prompt(s)" in out and (tmp_path / "demo" / "miniworld" / "demo.png").is_file()
    # ThinkDiff-CLIP beside it, before the tiny kit.
    assert out.index("ThinkDiff-CLIP (clip-calibrated): one image in") < out.index("Part 2: the tiny random kit")
    assert (tmp_path / "demo" / "miniworld" / "clip.png").is_file()
    # The tiny kit's part says, in its own output, that its text is random and its image noise.
    part2 = out[out.index("Part 2: the tiny random kit") :]
    assert "Its text is random tokens and its image is noise" in part2
    assert "LVLM text for the generation (random weights: random tokens)" in part2
    assert "generated image (random weights: noise)" in part2


def test_the_clip_example_says_what_the_judge_reads_and_what_was_measured(tmp_path) -> None:
    import json

    import numpy as np

    from thinkdiff.miniworld.demo import clip_example_scene, run_clip_example
    from thinkdiff.miniworld.models import MiniWorld
    from thinkdiff.miniworld.world import ATTRIBUTES

    threads = torch.get_num_threads()
    try:
        result = run_clip_example(out_dir=tmp_path)
    finally:
        torch.set_num_threads(threads)
    scene, verdict, summary = clip_example_scene(), result["verdict"], result["summary"]
    for name in ATTRIBUTES:
        assert result["kept"][name] == (verdict.value(name) == getattr(scene, name))
        assert f"{name} {verdict.value(name)} ({'kept' if result['kept'][name] else 'lost'})" in summary
    # The verdict is the judge's reading of the picture written (its right half, at 1/4 size).
    with Image.open(result["path"]) as image:
        pair = np.asarray(image.resize((image.width // 4, image.height // 4), Image.NEAREST))
    drawn = pair[:, pair.shape[1] // 2 :]
    assert MiniWorld(default_weights_dir()).judge.read([drawn])[0] == verdict
    # The measured line is the committed report's.
    report = json.loads((ROOT / "src/thinkdiff/miniworld/measured/report.json").read_text())["clip_calibrated"]
    assert f"measured over {report['n']} renders: all four attributes kept {report['image']['all']:.3f}" in summary
