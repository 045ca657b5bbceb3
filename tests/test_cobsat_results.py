"""CoBSAT scoring: Wilson intervals, accuracy from fixed judge answers, missing images, result files."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from PIL import Image

from thinkdiff.evaluation.cobsat import (
    LLAVA_PORT_NOTE,
    CobsatResults,
    JudgeInfo,
    build_prompts,
    compare_results,
    judge_cobsat,
    load_results,
    output_path,
    read_judgements,
    score_records,
    wilson_interval,
    write_results,
)


def test_wilson_interval_known_values() -> None:
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(10, 10)
    assert lo == pytest.approx(0.7225, abs=1e-4) and hi == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    # The protocol's sizing: 50 prompts near p = 0.4 gives about +-0.13 (half-width ~ 2 sigma).
    lo, hi = wilson_interval(20, 50)
    assert 0.12 < (hi - lo) / 2 < 0.14
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


class ScriptedJudge:
    """Replies from a fixed script keyed by (task_id, prompt index, question kind)."""

    def __init__(self, script: dict[tuple[int, int, str], str]) -> None:
        self.script = script
        self.info = JudgeInfo("scripted-llava", "llava", 512, "float16", [LLAVA_PORT_NOTE])
        self.calls = 0

    def answer(self, images: Sequence[Path], questions: Sequence[str]) -> list[str]:
        self.calls += 1
        out = []
        for image, question in zip(images, questions):
            task_id = int(image.parent.name.removeprefix("task_"))
            index = int(image.stem.split("_")[0])
            kind = "obj" if question.startswith("What is the main object") else "detail"
            out.append(self.script[(task_id, index, kind)])
        return out


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, Path, ScriptedJudge]:
    """Images for tasks 1 and 3, 2-shot, prompts 0..9 (task 1's prompt 9 missing), and a script."""
    images, results = tmp_path / "images", tmp_path / "results"
    script: dict[tuple[int, int, str], str] = {}
    for p in build_prompts([1, 3], [2], range(10)):
        path = output_path(images, p)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not (p.task_id == 1 and p.index == 9):
            Image.new("RGB", (8, 8), (p.index * 20, 0, 0)).save(path)
        labels = p.true_labels
        detail, obj = f"Answer: {labels['detail']}", f"({labels['obj']})"
        if p.task_id == 1 and p.index == 5:
            obj = "1 and 2"  # parses to 12: invalid, wrong
        if p.task_id == 1 and p.index == 6:
            detail = obj = "none"
        if p.task_id == 3 and p.index % 2 == 1:
            detail = "0"  # invalid
        script[(p.task_id, p.index, "detail")] = detail
        script[(p.task_id, p.index, "obj")] = obj
    return images, results, ScriptedJudge(script)


def test_accuracy_and_intervals_from_fixed_answers(run: tuple[Path, Path, ScriptedJudge]) -> None:
    images, results_dir, judge = run
    report = judge_cobsat(
        judge, images, results_dir, tasks=[1, 3], shots=[2], indices=range(10), batch_size=3
    )
    assert report.missing_images == 1 and report.asked == 38 and report.reused == 0

    results = load_results(results_dir, images, "scripted", tasks=[1, 3], shots=[2], indices=range(10))
    c1, c3 = results.cells[(2, 1)], results.cells[(2, 3)]
    # Task 1: 0-4, 7, 8 right; 5 (invalid obj), 6 ("none") wrong; 9 missing = wrong.
    assert (c1.n, c1.correct, c1.judged, c1.missing, c1.pending) == (10, 7, 9, 1, 0)
    assert c1.correct_indices == [0, 1, 2, 3, 4, 7, 8]
    assert (c1.detail_correct, c1.obj_correct) == (8, 7)
    assert c1.accuracy == pytest.approx(0.7)
    assert c1.interval == pytest.approx(wilson_interval(7, 10))
    assert (c3.n, c3.correct, c3.judged) == (10, 5, 10)
    mean, lo, hi, n = results.average(2)
    assert mean == pytest.approx(0.6) and n == 20
    assert (lo, hi) == pytest.approx(wilson_interval(12, 20))

    # Every question and reply is in the log, with the parsed answer.
    records = read_judgements(results_dir / "judgements" / "scripted-llava")
    assert len(records) == 38
    r = records[(2, 1, 5, "obj")]
    assert r["reply"] == "1 and 2" and r["answer"] == -1 and r["check"] is False
    assert records[(2, 3, 0, "detail")]["question"].startswith("What is the background (of the main object)")


def test_resume_skips_finished_questions(run: tuple[Path, Path, ScriptedJudge]) -> None:
    images, results_dir, judge = run
    judge_cobsat(judge, images, results_dir, tasks=[1], shots=[2], indices=range(5), batch_size=4)
    calls = judge.calls
    report = judge_cobsat(
        judge, images, results_dir, tasks=[1, 3], shots=[2], indices=range(10), batch_size=4
    )
    assert report.reused == 10 and report.asked == 28
    again = judge_cobsat(judge, images, results_dir, tasks=[1, 3], shots=[2], indices=range(10), batch_size=4)
    assert again.asked == 0 and again.reused == 38
    assert judge.calls == calls + 7  # ceil(28 / 4) batches, none on the third run
    # A regenerated image is judged again.
    p = next(build_prompts([3], [2], [4]))
    Image.new("RGB", (8, 8), (1, 2, 3)).save(output_path(images, p))
    assert judge_cobsat(judge, images, results_dir, tasks=[3], shots=[2], indices=range(10)).asked == 2


def test_missing_and_pending_count_as_wrong(run: tuple[Path, Path, ScriptedJudge]) -> None:
    images, results_dir, judge = run
    judge_cobsat(judge, images, results_dir, tasks=[1], shots=[2], indices=range(10))
    results = load_results(results_dir, images, "partial", tasks=[1, 3], shots=[2], indices=range(10))
    c3 = results.cells[(2, 3)]
    assert (c3.n, c3.correct, c3.pending, c3.missing) == (10, 0, 10, 0)
    assert not results.complete
    assert any(note.startswith("INCOMPLETE: 10 images") for note in results.notes())
    # Deleting a judged image makes it missing (its stale record is ignored).
    p = next(build_prompts([1], [2], [0]))
    output_path(images, p).unlink()
    results = load_results(results_dir, images, "x", tasks=[1], shots=[2], indices=range(10))
    assert (results.cells[(2, 1)].missing, results.cells[(2, 1)].correct) == (2, 6)
    # Without an images folder, prompts lacking records are missing.
    cells = score_records({}, None, tasks=[1], shots=[2], indices=range(4))
    assert (cells[(2, 1)].missing, cells[(2, 1)].accuracy) == (4, 0.0)


def test_result_files_state_the_judge_and_redo_the_table(
    run: tuple[Path, Path, ScriptedJudge], tmp_path: Path
) -> None:
    images, results_dir, judge = run
    judge_cobsat(judge, images, results_dir, tasks=[1, 3], shots=[2], indices=range(10))
    results = load_results(results_dir, images, "scripted", tasks=[1, 3], shots=[2], indices=range(10))
    paths = write_results(results, results_dir)
    assert set(paths) == {"md", "csv", "json", "png"}
    md = paths["md"].read_text()
    assert LLAVA_PORT_NOTE in md and "Judge: scripted-llava" in md
    assert "Wilson" in md and "Subset: 10 of the 1000 prompts" in md
    header = next(line for line in md.splitlines() if line.startswith("| method |"))
    assert header.split(" | ")[1:6] == ["Color-I", "Background-I", "Style-I", "Action-I", "Texture-I"]
    assert "| ThinkDiff-LVLM (published) | 0.622 | 0.349 |" in md
    assert "| **scripted** | 0.700 | 0.500 | - |" in md
    csv_text = paths["csv"].read_text()
    assert LLAVA_PORT_NOTE in csv_text and "SEED-LLaMA" in csv_text
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    payload = json.loads(paths["json"].read_text())
    assert LLAVA_PORT_NOTE in payload["notes"] and payload["judge"]["name"] == "scripted-llava"
    again = CobsatResults.from_dict(payload)
    assert again.cells[(2, 1)].correct_indices == [0, 1, 2, 3, 4, 7, 8]
    assert again.average(2) == pytest.approx(results.average(2))

    other = tmp_path / "other.json"
    other.write_text(paths["json"].read_text())
    compared = compare_results([paths["json"], other], tmp_path / "cmp", labels=["lvlm", "text-bridge"])
    cmp_md = compared["md"].read_text()
    assert "| **lvlm** |" in cmp_md and "| **text-bridge** |" in cmp_md
    with pytest.raises(ValueError, match="labels"):
        compare_results([other], tmp_path / "cmp", labels=["a", "b"])
