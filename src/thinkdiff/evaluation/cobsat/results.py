"""CoBSAT results: accuracy per task and shot with 95% Wilson intervals, tables beside the papers.

Accuracy of a (task, shot) cell is ``correct / n`` over the *selected* prompts: an image is
correct when both judge answers are right, and a prompt without an image (or not yet judged)
counts as wrong, as in the benchmark. The interval is the Wilson score interval at 95%
(z = 1.959964), which stays inside [0, 1] and behaves at 0 and n; ``n`` is always reported.
The average is the mean of the task accuracies (the papers' ``avg``); its interval pools the
prompts of all tasks (equal ``n`` per task makes the two the same estimate).

Files written by :func:`write_results` (all carry the judge and, for the llava-hf port, the port
sentence): ``cobsat-results.md``, ``.csv``, ``.json`` (everything needed to redo the table,
including which prompts were correct) and ``.png`` (bar chart).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from thinkdiff.evaluation.cobsat.generate import find_output, generation_settings
from thinkdiff.evaluation.cobsat.judge import JudgeInfo, read_judgements
from thinkdiff.evaluation.cobsat.presets import PUBLISHED_SETTINGS, setting_differences, settings_text
from thinkdiff.evaluation.cobsat.protocol import (
    COBSAT_INSTRUCTION,
    NUM_PROMPTS,
    TASK_COLUMN_ORDER,
    TASKS,
    build_prompts,
)
from thinkdiff.utils import atomic_write_bytes, atomic_write_text

__all__ = [
    "PUBLISHED",
    "CellResult",
    "CobsatResults",
    "compare_results",
    "load_results",
    "read_compared",
    "read_results_file",
    "score_records",
    "settings_lines",
    "wilson_interval",
    "write_results",
]

Z_95 = 1.959963984540054

# Published accuracies (LLaVA judge), each in the papers' column order
# (C-I B-I S-I A-I T-I | C-II B-II S-II A-II T-II), and the published average.
_P = tuple[tuple[float, ...] | None, float]
PUBLISHED: dict[int, dict[str, _P]] = {
    2: {
        "SEED-LLaMA": ((0.680, 0.348, 0.203, 0.182, 0.196, 0.287, 0.467, 0.297, 0.261, 0.163), 0.308),
        "Emu": ((0.065, 0.051, 0.057, 0.052, 0.078, 0.062, 0.109, 0.081, 0.092, 0.074), 0.072),
        "GILL": ((0.171, 0.054, 0.069, 0.063, 0.074, 0.010, 0.043, 0.024, 0.022, 0.040), 0.057),
        "ThinkDiff-LVLM": ((0.622, 0.349, 0.237, 0.459, 0.290, 0.511, 0.534, 0.340, 0.534, 0.292), 0.417),
        "ThinkDiff w/o masked training": (
            (0.548, 0.215, 0.105, 0.256, 0.187, 0.510, 0.338, 0.156, 0.325, 0.228),
            0.287,
        ),
        "ThinkDiff using input-token features": (
            (0.024, 0.004, 0.030, 0.011, 0.032, 0.007, 0.008, 0.012, 0.019, 0.011),
            0.016,
        ),
        "Text bridge, Qwen2-VL + FLUX.1-dev 256px (2026 follow-up; avg only)": (None, 0.537),
        "Text bridge + hint (2026 follow-up; avg only)": (None, 0.601),
        "Text bridge + QCD (2026 follow-up; avg only)": (None, 0.638),
        "Text bridge + hint + QCD (2026 follow-up, its method; avg only)": (None, 0.693),
        "Text bridge + hint + QCD, InternVL3 (2026 follow-up; avg only)": (None, 0.683),
    },
    4: {
        "SEED-LLaMA": ((0.482, 0.211, 0.141, 0.053, 0.122, 0.252, 0.076, 0.268, 0.207, 0.105), 0.192),
        "Emu": ((0.063, 0.018, 0.045, 0.048, 0.097, 0.037, 0.122, 0.109, 0.077, 0.088), 0.070),
        "GILL": ((0.106, 0.044, 0.041, 0.073, 0.087, 0.022, 0.059, 0.044, 0.032, 0.067), 0.058),
        "ThinkDiff-LVLM": ((0.638, 0.362, 0.254, 0.434, 0.317, 0.610, 0.590, 0.432, 0.664, 0.332), 0.463),
        "Text bridge, Qwen2-VL + FLUX.1-dev 256px (2026 follow-up; avg only)": (None, 0.614),
        "Text bridge + hint (2026 follow-up; avg only)": (None, 0.673),
        "Text bridge + QCD (2026 follow-up; avg only)": (None, 0.745),
        "Text bridge + hint + QCD (2026 follow-up, its method; avg only)": (None, 0.767),
        "Text bridge + hint + QCD, InternVL3 (2026 follow-up; avg only)": (None, 0.769),
    },
}
"""Published CoBSAT accuracies by shot and method: (ten task values in column order, or None; avg)."""


def wilson_interval(correct: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval for ``correct`` successes in ``n`` trials (95% by default).

    ``n = 0`` gives the uninformative ``(0.0, 1.0)``.
    """
    if not 0 <= correct <= n:
        raise ValueError(f"need 0 <= correct <= n, got correct={correct}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 and n the bound is exactly 0 or 1; rounding would leave 1e-17 or 0.9999999999999999.
    lo = 0.0 if correct == 0 else max(0.0, centre - half)
    hi = 1.0 if correct == n else min(1.0, centre + half)
    return lo, hi


@dataclass
class CellResult:
    """Accuracy of one (task, shot) cell over the selected prompts."""

    task_id: int
    shot: int
    n: int
    """Selected prompts (the denominator)."""
    correct: int
    judged: int
    """Prompts whose image was judged (both questions answered)."""
    missing: int
    """Prompts without an image: wrong."""
    pending: int
    """Prompts with an image but no complete judgement: wrong, and the results say incomplete."""
    detail_correct: int
    obj_correct: int
    correct_indices: list[int] = field(default_factory=list)
    """Prompt indices judged correct (to redo the table or compare runs prompt by prompt)."""

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.n)

    def to_dict(self) -> dict[str, Any]:
        lo, hi = self.interval
        return {**asdict(self), "task": TASKS[self.task_id].name, "accuracy": self.accuracy, "ci95": [lo, hi]}


@dataclass
class CobsatResults:
    """Every cell of one evaluated run, with who judged it."""

    label: str
    judge: JudgeInfo
    cells: dict[tuple[int, int], CellResult]
    """Keyed by ``(shot, task_id)``."""
    indices: list[int]
    clip: dict[tuple[int, int], CellResult] | None = None
    """The CLIP metric's cells, when it was run."""
    generation: list[dict[str, Any]] | None = None
    """How the images were made, from their sidecars (mode, model, QCD weight, hint, ...); ``None``
    when unknown (scored without the images folder, or another system's images)."""

    @property
    def shots(self) -> list[int]:
        return sorted({s for s, _ in self.cells})

    def tasks(self, shot: int) -> list[int]:
        """Tasks of ``shot`` in the papers' column order."""
        return [t for t in TASK_COLUMN_ORDER if (shot, t) in self.cells]

    def average(
        self, shot: int, cells: dict[tuple[int, int], CellResult] | None = None
    ) -> tuple[float, float, float, int]:
        """``(mean task accuracy, ci_low, ci_high, pooled n)`` for ``shot``."""
        cells = self.cells if cells is None else cells
        chosen = [cells[(shot, t)] for t in self.tasks(shot) if (shot, t) in cells]
        n = sum(c.n for c in chosen)
        lo, hi = wilson_interval(sum(c.correct for c in chosen), n)
        mean = sum(c.accuracy for c in chosen) / len(chosen) if chosen else float("nan")
        return mean, lo, hi, n

    @property
    def settings(self) -> dict[str, Any] | None:
        """The one generator record of the run's images (``None``: none recorded, or several)."""
        return dict(self.generation[0]) if self.generation and len(self.generation) == 1 else None

    @property
    def complete(self) -> bool:
        return all(c.pending == 0 for c in self.cells.values())

    def notes(self) -> list[str]:
        """The sentences every results file carries."""
        out = [
            f"Judge: {self.judge.name} ({self.judge.kind}, greedy, max_new_tokens={self.judge.max_new_tokens}, "
            f"{self.judge.dtype})."
        ]
        out += self.judge.notes
        out.append(
            "Accuracy = images with both judge answers right / selected prompts; a missing image counts as "
            "wrong. Intervals: 95% Wilson score interval; n = prompts per cell."
        )
        n_sel = len(self.indices)
        if n_sel != NUM_PROMPTS:
            out.append(
                f"Subset: {n_sel} of the {NUM_PROMPTS} prompts per task and shot (indices "
                f"{self.indices[0]}..{self.indices[-1]}); the papers use all {NUM_PROMPTS}."
            )
        for shot in self.shots:
            if len(self.tasks(shot)) != len(TASKS):
                out.append(
                    f"{shot}-shot: only {len(self.tasks(shot))} of 10 tasks; its avg is not the papers' avg."
                )
        for g in self.generation or []:
            shown = {k: "release" if k == "instruction" and v == COBSAT_INSTRUCTION else v for k, v in g.items()}
            out.append("Generated with " + ", ".join(f"{k}={v!r}" for k, v in shown.items() if v is not None) + ".")
        pending = sum(c.pending for c in self.cells.values())
        if pending:
            out.append(f"INCOMPLETE: {pending} images were not judged yet and count as wrong.")
        return out

    def to_dict(self) -> dict[str, Any]:
        shots = {}
        for shot in self.shots:
            mean, lo, hi, n = self.average(shot)
            shots[str(shot)] = {"average": mean, "average_ci95": [lo, hi], "n": n}
            if self.clip:
                shots[str(shot)]["clip_average"] = self.average(shot, self.clip)[0]
        return {
            "benchmark": "CoBSAT",
            "label": self.label,
            "judge": self.judge.to_dict(),
            "notes": self.notes(),
            "prompt_indices": self.indices,
            "column_order": [TASKS[t].name for t in TASK_COLUMN_ORDER],
            "summary": shots,
            "cells": [self.cells[k].to_dict() for k in sorted(self.cells)],
            "clip_cells": [self.clip[k].to_dict() for k in sorted(self.clip)] if self.clip else None,
            "generation": self.generation,
            "published": {
                str(s): {
                    m: {"tasks": list(v) if v else None, "average": a, "settings": _published_settings(m)}
                    for m, (v, a) in rows.items()
                }
                for s, rows in PUBLISHED.items()
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CobsatResults:
        """Rebuild from the JSON file (for tables comparing several runs); ``ValueError`` naming the
        field when one is damaged, so that nothing is drawn or written from it."""
        if not isinstance(d.get("label"), str):
            raise ValueError("'label' is not a string")
        indices = d.get("prompt_indices")
        if not _is_list_of(indices, _is_int) or not indices or not all(0 <= i < NUM_PROMPTS for i in indices):
            raise ValueError(
                f"'prompt_indices' is not a non-empty list of prompt indices 0..{NUM_PROMPTS - 1}"
            )
        generation = d.get("generation")
        if generation is not None and not _is_list_of(generation, _is_record):
            raise ValueError("'generation' is neither null nor a list of generator records (objects)")
        return cls(
            label=d["label"],
            judge=JudgeInfo.from_dict(d["judge"]),
            cells=_cells(d.get("cells"), "cells"),
            indices=list(indices),
            clip=_cells(d["clip_cells"], "clip_cells") if d.get("clip_cells") else None,
            generation=generation,
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_record(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) for k in value)


def _is_list_of(value: Any, check: Callable[[Any], bool]) -> bool:
    return isinstance(value, list) and all(check(v) for v in value)


def _cells(rows: Any, name: str) -> dict[tuple[int, int], CellResult]:
    """A results file's ``cells`` (or ``clip_cells``) checked: a non-empty list of cells of known
    tasks and shots whose counts are whole numbers."""
    counts = [f for f, kind in CellResult.__annotations__.items() if kind == "int"]
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"'{name}' is not a non-empty list of cells")
    cells = {}
    for n, row in enumerate(rows):
        if (
            not isinstance(row, dict)
            or not all(_is_int(row.get(f)) and row[f] >= 0 for f in counts)
            or row["task_id"] not in TASKS
            or not 1 <= row["shot"] <= 8
            or not _is_list_of(row.get("correct_indices", []), _is_int)
        ):
            raise ValueError(f"'{name}' entry {n} is not a cell (task_id, shot 1..8 and whole counts)")
        cells[(row["shot"], row["task_id"])] = CellResult(
            **{f: row[f] for f in counts}, correct_indices=list(row.get("correct_indices", []))
        )
    return cells


def score_records(
    records: dict[tuple[int, int, int, str], dict[str, Any]],
    images_dir: str | Path | None,
    *,
    tasks: Iterable[int] = tuple(TASKS),
    shots: Iterable[int] = (2, 4),
    indices: Iterable[int] = range(NUM_PROMPTS),
    kinds: Sequence[str] = ("detail", "obj"),
) -> dict[tuple[int, int], CellResult]:
    """Cells from judge records keyed like :func:`~thinkdiff.evaluation.cobsat.judge.read_judgements`.

    With ``images_dir``, a prompt whose image is absent is *missing* (and a stale record for it is
    ignored) and one whose image exists without a full set of records is *pending*; without it
    (``None``), every prompt lacking records is missing. Both count as wrong. ``kinds=("clip",)``
    scores the CLIP metric's records.
    """
    cells: dict[tuple[int, int], CellResult] = {}
    for p in build_prompts(list(tasks), list(shots), list(indices)):
        cell = cells.setdefault((p.shot, p.task_id), CellResult(p.task_id, p.shot, 0, 0, 0, 0, 0, 0, 0))
        cell.n += 1
        has_image = images_dir is None or find_output(images_dir, p) is not None
        recs = [records.get((p.shot, p.task_id, p.index, k)) for k in kinds]
        if not has_image:
            cell.missing += 1
            continue
        if any(r is None for r in recs):
            if images_dir is None:
                cell.missing += 1
            else:
                cell.pending += 1
            continue
        cell.judged += 1
        if kinds == ("clip",):
            ok_detail, ok_obj = recs[0]["check_detail"], recs[0]["check_obj"]  # type: ignore[index]
        else:
            ok_detail, ok_obj = recs[0]["check"], recs[1]["check"]  # type: ignore[index]
        cell.detail_correct += bool(ok_detail)
        cell.obj_correct += bool(ok_obj)
        if ok_detail and ok_obj:
            cell.correct += 1
            cell.correct_indices.append(p.index)
    return cells


def _fmt(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.3f}"


def _published_settings(method: str) -> dict[str, Any] | None:
    known = PUBLISHED_SETTINGS.get(method)
    return None if known is None else dict(known)


def _run_settings_text(r: CobsatResults) -> str:
    if r.settings is not None:
        return settings_text(r.settings)
    return "several settings" if r.generation else "settings not recorded"


def _published_settings_text(method: str, runs: Sequence[CobsatResults]) -> str:
    """The settings behind a published row, then where each compared run's differ: ``≠ run: size
    512 (256)`` (run's value, then the row's), or ``= run`` when all recorded settings agree."""
    published = PUBLISHED_SETTINGS.get(method)
    if published is None:
        return "another system"
    marks = []
    for r in runs:
        if r.settings is None:
            continue
        differences = setting_differences(r.settings, published)
        if differences:
            changed = ", ".join(f"{name} {_short(ours)} ({_short(theirs)})" for name, (ours, theirs) in differences.items())
            marks.append(f"≠ {r.label}: {changed}")
        else:
            marks.append(f"= {r.label}")
    return "; ".join([settings_text(published), *marks])


def _short(value: Any) -> str:
    if value == COBSAT_INSTRUCTION:
        return "release instruction"
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def settings_lines(results: Sequence[CobsatResults]) -> list[str]:
    """One line per compared run and per published row with known settings: the settings, and for
    a published row where each run's differ (what ``compare`` prints)."""
    lines = [f"{r.label}: {_run_settings_text(r)}" for r in results]
    shown = [m for m in PUBLISHED_SETTINGS if any(m in rows for rows in PUBLISHED.values())]
    lines += [f"{m} (published): {_published_settings_text(m, results)}" for m in shown]
    return lines


def _markdown(results: Sequence[CobsatResults], with_published: bool = True) -> str:
    lines = ["# CoBSAT results", ""]
    for r in results:
        lines += [f"**{r.label}**:", ""] + [f"- {note}" for note in r.notes()] + [""]
    if with_published:
        lines += ["## Settings", "", *[f"- {line}" for line in settings_lines(results)], ""]
    shots = sorted({s for r in results for s in r.shots})
    header = "| method | " + " | ".join(TASKS[t].name for t in TASK_COLUMN_ORDER) + " | avg | settings |"
    rule = "|---|" + "---:|" * (len(TASK_COLUMN_ORDER) + 1) + "---|"
    for shot in shots:
        lines += [f"## {shot}-shot accuracy", "", header, rule]
        for r in results:
            if shot not in r.shots:
                continue
            vals = [
                _fmt(r.cells[(shot, t)].accuracy) if (shot, t) in r.cells else "-" for t in TASK_COLUMN_ORDER
            ]
            lines.append(
                f"| **{r.label}** | " + " | ".join(vals) + f" | **{_fmt(r.average(shot)[0])}** | "
                f"{_run_settings_text(r)} |"
            )
        if with_published:
            for method, (vals, avg) in PUBLISHED.get(shot, {}).items():
                cells = [_fmt(v) for v in vals] if vals else ["-"] * len(TASK_COLUMN_ORDER)
                lines.append(
                    f"| {method} (published) | " + " | ".join(cells) + f" | {_fmt(avg)} | "
                    f"{_published_settings_text(method, results)} |"
                )
        lines.append("")
        for r in results:
            if shot not in r.shots:
                continue
            lines += [
                f"{shot}-shot, {r.label}: details",
                "",
                "| task | accuracy | 95% CI | n | judged | missing | pending | detail right | object right |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for t in r.tasks(shot):
                c = r.cells[(shot, t)]
                lo, hi = c.interval
                lines.append(
                    f"| {TASKS[t].name} | {_fmt(c.accuracy)} | [{lo:.3f}, {hi:.3f}] | {c.n} | {c.judged} | "
                    f"{c.missing} | {c.pending} | {c.detail_correct} | {c.obj_correct} |"
                )
            mean, lo, hi, n = r.average(shot)
            lines.append(f"| avg | {_fmt(mean)} | [{lo:.3f}, {hi:.3f}] | {n} | | | | | |")
            if r.clip:
                lines.append(
                    f"| CLIP metric avg (secondary) | {_fmt(r.average(shot, r.clip)[0])} | | | | | | | |"
                )
            lines.append("")
    return "\n".join(lines)


def _csv_rows(results: Sequence[CobsatResults], with_published: bool = True) -> list[list[Any]]:
    rows: list[list[Any]] = [
        [
            "method",
            "source",
            "shot",
            "task_id",
            "task",
            "accuracy",
            "ci95_low",
            "ci95_high",
            "n",
            "judged",
            "missing",
            "pending",
            "judge",
            "note",
            "settings",
        ]
    ]
    for r in results:
        note = " ".join(r.notes())
        settings = _run_settings_text(r)
        for shot in r.shots:
            for t in r.tasks(shot):
                c = r.cells[(shot, t)]
                lo, hi = c.interval
                rows.append(
                    [
                        r.label,
                        "this evaluation",
                        shot,
                        t,
                        TASKS[t].name,
                        f"{c.accuracy:.4f}",
                        f"{lo:.4f}",
                        f"{hi:.4f}",
                        c.n,
                        c.judged,
                        c.missing,
                        c.pending,
                        r.judge.name,
                        note,
                        settings,
                    ]
                )
            mean, lo, hi, n = r.average(shot)
            rows.append(
                [
                    r.label,
                    "this evaluation",
                    shot,
                    "",
                    "avg",
                    f"{mean:.4f}",
                    f"{lo:.4f}",
                    f"{hi:.4f}",
                    n,
                    "",
                    "",
                    "",
                    r.judge.name,
                    note,
                    settings,
                ]
            )
    if with_published:
        for shot, methods in PUBLISHED.items():
            for method, (vals, avg) in methods.items():
                settings = _published_settings_text(method, results)
                for t, v in zip(TASK_COLUMN_ORDER, vals or ()):
                    rows.append(
                        [
                            method,
                            "published",
                            shot,
                            t,
                            TASKS[t].name,
                            v,
                            "",
                            "",
                            1000,
                            "",
                            "",
                            "",
                            "LLaVA-1.5-13B (original code)",
                            "",
                            settings,
                        ]
                    )
                rows.append(
                    [
                        method,
                        "published",
                        shot,
                        "",
                        "avg",
                        avg,
                        "",
                        "",
                        "",
                        "",
                        "",
                        "",
                        "LLaVA-1.5-13B (original code)",
                        "",
                        settings,
                    ]
                )
    return rows


def _plot(results: Sequence[CobsatResults], with_published: bool = True) -> bytes:
    """The bar chart as PNG bytes (drawn in full before any file is written)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    shots = sorted({s for r in results for s in r.shots})
    fig, axes = plt.subplots(len(shots), 1, figsize=(13, 4.2 * len(shots)), squeeze=False)
    names = [TASKS[t].name for t in TASK_COLUMN_ORDER] + ["avg"]
    x = np.arange(len(names))
    for ax, shot in zip(axes[:, 0], shots):
        series: list[tuple[str, list[float], list[list[float]] | None]] = []
        for r in results:
            if shot not in r.shots:
                continue
            vals, errs = [], [[], []]
            for t in TASK_COLUMN_ORDER:
                c = r.cells.get((shot, t))
                acc = c.accuracy if c else float("nan")
                lo, hi = c.interval if c else (acc, acc)
                vals.append(acc)
                errs[0].append(max(acc - lo, 0) if c else 0)
                errs[1].append(max(hi - acc, 0) if c else 0)
            mean, lo, hi, _ = r.average(shot)
            vals.append(mean)
            errs[0].append(max(mean - lo, 0))
            errs[1].append(max(hi - mean, 0))
            series.append((r.label, vals, errs))
        if with_published:
            for method, (pv, avg) in PUBLISHED.get(shot, {}).items():
                if pv is not None:
                    series.append((f"{method} (published)", [*pv, avg], None))
        width = 0.8 / max(len(series), 1)
        for i, (label, vals, errs) in enumerate(series):
            ax.bar(x - 0.4 + (i + 0.5) * width, vals, width, label=label, yerr=errs, capsize=2 if errs else 0)
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.set_title(f"CoBSAT {shot}-shot (error bars: 95% Wilson)")
        ax.legend(fontsize=7, ncol=2)
    judges = "; ".join(sorted({f"{r.label}: judge {r.judge.name}" for r in results}))
    port = any(r.judge.kind == "llava" for r in results)
    footer = judges + (
        "\nLLaVA-1.5 judged through the transformers port (llava-hf), not the original LLaVA code: "
        "answers may shift slightly."
        if port
        else ""
    )
    fig.text(0.01, 0.005, footer, fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    return png.getvalue()


def write_results(
    results: CobsatResults | Sequence[CobsatResults],
    out_dir: str | Path,
    stem: str = "cobsat-results",
    with_published: bool = True,
    plot: bool = True,
) -> dict[str, Path]:
    """Write ``{stem}.md``, ``.csv``, ``.json`` (first run only when several) and ``.png`` into ``out_dir``.

    Every file is drawn in memory first and then written atomically, so a run that cannot be drawn
    writes nothing and an earlier file of the same name is never left half-written.
    """
    import io

    runs = [results] if isinstance(results, CobsatResults) else list(results)
    if not runs:
        raise ValueError("no results to write")
    table = io.StringIO(newline="")
    csv.writer(table).writerows(_csv_rows(runs, with_published))
    payload: Any = runs[0].to_dict() if len(runs) == 1 else {"runs": [r.to_dict() for r in runs]}
    drawn: dict[str, str | bytes] = {
        "md": _markdown(runs, with_published) + "\n",
        "csv": table.getvalue(),
        "json": json.dumps(payload, indent=1) + "\n",
    }
    if plot:
        drawn["png"] = _plot(runs, with_published)
    paths = {kind: Path(out_dir) / f"{stem}.{kind}" for kind in drawn}
    for kind, content in drawn.items():
        if isinstance(content, bytes):
            atomic_write_bytes(paths[kind], content)
        else:
            atomic_write_text(paths[kind], content)
    return paths


def load_results(
    results_dir: str | Path,
    images_dir: str | Path | None,
    label: str,
    *,
    tasks: Iterable[int] | None = None,
    shots: Iterable[int] | None = None,
    indices: Iterable[int] | None = None,
    judge_name: str | None = None,
) -> CobsatResults:
    """Build results from the judge logs under ``{results_dir}/judgements/`` (all shards merged).

    ``tasks``, ``shots`` and ``indices`` left ``None`` default to what the shards recorded they
    covered (their union), else to the full run. ``judge_name`` picks one judge's folder when
    several judged this run (by slug or name).
    """
    from thinkdiff.evaluation.cobsat.judge import judge_slug, recorded_selection

    base = Path(results_dir) / "judgements"
    folders = [
        d for d in sorted(base.glob("*")) if (d / "judge.json").is_file() and not d.name.startswith("clip--")
    ]
    if judge_name is not None:
        folders = [d for d in folders if d.name in (judge_name, judge_slug(judge_name))]
    if len(folders) != 1:
        found = ", ".join(d.name for d in folders) or "none"
        raise FileNotFoundError(
            f"need exactly one judge log folder under {base} (found: {found}); pass the judge name"
        )
    info = JudgeInfo.from_dict(json.loads((folders[0] / "judge.json").read_text()))
    recorded = recorded_selection(folders[0]) or (list(TASKS), [2, 4], list(range(NUM_PROMPTS)))
    tasks = recorded[0] if tasks is None else list(tasks)
    shots = recorded[1] if shots is None else list(shots)
    indices = recorded[2] if indices is None else list(indices)
    cells = score_records(read_judgements(folders[0]), images_dir, tasks=tasks, shots=shots, indices=indices)
    clip_dirs = sorted(base.glob("clip--*"))
    clip = (
        score_records(
            read_judgements(clip_dirs[0]),
            images_dir,
            tasks=tasks,
            shots=shots,
            indices=indices,
            kinds=("clip",),
        )
        if clip_dirs
        else None
    )
    generation = (
        None
        if images_dir is None
        else generation_settings(images_dir, build_prompts(list(tasks), list(shots), list(indices)))
    )
    return CobsatResults(
        label=label, judge=info, cells=cells, indices=indices, clip=clip, generation=generation or None
    )


def compare_results(
    json_paths: Sequence[str | Path],
    out_dir: str | Path,
    labels: Sequence[str] | None = None,
    with_published: bool = True,
) -> dict[str, Path]:
    """Side-by-side tables of several runs' ``cobsat-results.json`` (ablations, text-bridge vs lvlm),
    each published row with its settings and where the runs' differ (:func:`settings_lines`)."""
    runs = read_compared(json_paths, labels)
    return write_results(runs, out_dir, stem="cobsat-compare", with_published=with_published)


def read_compared(json_paths: Sequence[str | Path], labels: Sequence[str] | None = None) -> list[CobsatResults]:
    """Every results file read and checked (:func:`read_results_file`) before anything is written,
    relabelled with ``labels`` when given (one per file)."""
    if labels and len(labels) != len(json_paths):
        raise ValueError(f"{len(labels)} labels for {len(json_paths)} results files")
    runs = [read_results_file(p) for p in json_paths]
    for r, label in zip(runs, labels or ()):
        r.label = label
    return runs


def read_results_file(path: str | Path) -> CobsatResults:
    """A ``cobsat-results.json`` (or ``cobsat-compare``'s inputs) read back; ``FileNotFoundError`` or
    ``ValueError`` naming the file when it is missing or not a CoBSAT results file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path}")
    what = "a cobsat-results.json written by `thinkdiff eval cobsat score` or `report`"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path}: not JSON; expected {what}") from None
    if not isinstance(record, dict) or record.get("benchmark") != "CoBSAT":
        raise ValueError(f"{path}: not a CoBSAT results file; expected {what}")
    try:
        return CobsatResults.from_dict(record)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"{path}: a damaged CoBSAT results file ({type(error).__name__}: {error})") from None
