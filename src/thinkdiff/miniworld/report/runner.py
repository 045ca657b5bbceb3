"""Running the report's sections: two lanes side by side, each section saved the moment it finishes.

``report.json`` grows: after each section its keys, its wall seconds and its name in
``"sections"`` are written (atomically), and its PNGs are already drawn. A rerun of the same
command into the same folder skips the finished sections and runs the rest; other settings (or
another build of the models) are refused in one line, since the finished numbers would no longer
belong to them. When every section is in, the report's derived parts (claims, the calibration
cost, the loss curves, ``report.md``) are written from ``report.json``.

Adding a section: a module with ``run_<name>(ctx) -> dict`` (and a Markdown part for
:mod:`~thinkdiff.miniworld.report.markdown`), and one :class:`Section` line in :data:`SECTIONS`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path
from typing import Any

import torch

from thinkdiff.miniworld.report.ablation import run_ablation
from thinkdiff.miniworld.report.calibration import calibration_cost
from thinkdiff.miniworld.report.claims import claims
from thinkdiff.miniworld.report.clip import run_clip
from thinkdiff.miniworld.report.clip_claims import run_clip_claims
from thinkdiff.miniworld.report.common import (
    RESULT_NEUTRAL,
    ReportConfig,
    Section,
    SectionContext,
    jsonable,
)
from thinkdiff.miniworld.report.fidelity import run_fidelity
from thinkdiff.miniworld.report.lvlm import finish_lvlm, run_lvlm, run_lvlm_calibrated
from thinkdiff.miniworld.report.markdown import render_markdown
from thinkdiff.miniworld.report.plots import plot_losses
from thinkdiff.miniworld.report.premise import run_premise
from thinkdiff.miniworld.report.qcd import run_qcd, wants_qcd
from thinkdiff.utils import atomic_write_text

__all__ = ["SECTIONS", "write_report"]

logger = logging.getLogger(__name__)

A, B = "a", "b"
SECTIONS: tuple[Section, ...] = (
    Section("ablation_training", run_ablation, A),
    Section("lvlm", run_lvlm, A),
    Section("premise", run_premise, A),
    Section("clip_claims", run_clip_claims, A),
    Section("fidelity", run_fidelity, B),
    Section("lvlm_calibrated", run_lvlm_calibrated, B),
    Section("qcd", run_qcd, B, wanted=wants_qcd),
    Section("clip", run_clip, B),
)
"""The report's sections in two lanes of about equal work on the committed world (seconds of its
full run on the idle 2-core machine, one thread each: a = 132 + 741 + 668 + 510 = 2051, b = 112 +
1308 + 523 + 173 = 2116). Each seeds what it draws, so no number depends on which process runs it
or on what ran before it; ``lvlm`` needs the aligners ``ablation_training`` leaves, so it follows
it in its lane."""


def write_report(
    models_dir: Path, out_dir: Path, config: ReportConfig, *, redo: Sequence[str] = ()
) -> dict[str, Any]:
    """Measure every section not yet in ``out_dir/report.json`` and write the report folder; returns
    report.json (``report.md`` and the PNGs beside it).

    ``redo``: sections of the existing report to measure again, e.g. after retraining the component
    they measure; the models' ``build.json`` may then differ from the report's, and the report
    records the new one and, under ``"redone"``, what was measured again."""
    from thinkdiff.miniworld.budgets import BuildConfig
    from thinkdiff.miniworld.models import MiniWorld

    started = time.perf_counter()
    models_dir, out_dir = Path(models_dir), Path(out_dir)
    world = MiniWorld(models_dir)
    build_record = json.loads((models_dir / "build.json").read_text())
    report = _start_or_resume(out_dir, config, build_record, _redo_names(redo))
    previous = report["seconds"].pop("total", 0.0)  # a resumed report's earlier runs
    ctx = SectionContext(world, config, BuildConfig(**build_record["config"]), out_dir)
    wanted = [s for s in SECTIONS if s.wanted(config)]
    todo = [s for s in wanted if s.name not in report["sections"]]
    if len(todo) < len(wanted):
        logger.info("miniworld report: resuming in %s; finished: %s", out_dir, ", ".join(report["sections"]))
    done = len(wanted) - len(todo)

    def finished(section: Section, result: dict[str, Any], seconds: float) -> None:
        nonlocal done
        done += 1
        report.update(jsonable(result))
        report["seconds"][section.name] = seconds
        report["sections"].append(section.name)
        report["seconds"]["total"] = round(previous + time.perf_counter() - started, 1)
        _save(out_dir, report)
        logger.info(
            "miniworld report: %s done in %.0f s (%d of %d sections)",
            section.name,
            seconds,
            done,
            len(wanted),
        )

    if config.threads >= 2 and len({s.lane for s in todo}) > 1:
        _run_two_lanes(todo, ctx, max(1, config.threads // 2), len(wanted), finished)
    else:
        torch.set_num_threads(config.threads)
        for section in todo:
            finished(section, *_run_section(section, ctx, config.threads, done + 1, len(wanted)))

    _finish(report, models_dir, out_dir, build_record)
    report["seconds"]["total"] = round(previous + time.perf_counter() - started, 1)
    _save(out_dir, report)
    atomic_write_text(out_dir / "report.md", render_markdown(report))
    return report


def _run_section(
    section: Section, ctx: SectionContext, threads: int, k: int, n: int
) -> tuple[dict[str, Any], float]:
    """One section (in a worker process, or here); its report keys and wall seconds."""
    torch.set_num_threads(threads)
    logger.info("miniworld report: section %d of %d: %s", k, n, section.name)
    t0 = time.perf_counter()
    result = section.run(ctx)
    return result, round(time.perf_counter() - t0, 1)


def _run_two_lanes(todo: list[Section], ctx: SectionContext, threads: int, n: int, finished) -> None:
    """Each lane's sections in order, the two lanes in two forked one-thread processes; a section's
    result is saved as soon as it arrives. Fork happens before any torch op has run here."""
    from thinkdiff.miniworld.build import two_processes

    lanes: dict[str, list[Section]] = {}
    for section in todo:
        lanes.setdefault(section.lane, []).append(section)
    k = n - len(todo)
    with two_processes() as ex:
        running: dict[Future, Section] = {}

        def submit_next(lane: str) -> None:
            nonlocal k
            if lanes[lane]:
                section = lanes[lane].pop(0)
                k += 1
                running[ex.submit(_run_section, section, ctx, threads, k, n)] = section

        for lane in list(lanes):
            submit_next(lane)
        failure: BaseException | None = None
        while running:
            ready, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in ready:
                section = running.pop(future)
                try:
                    result = future.result()
                except Exception as exc:  # the other lane's running section is still saved
                    failure = failure or exc
                    continue
                finished(section, *result)
                if failure is None:
                    submit_next(section.lane)
        if failure is not None:
            raise failure


def _redo_names(redo: Sequence[str]) -> set[str]:
    """The sections to measure again (``ValueError`` for a name that is not a section)."""
    names = [s.name for s in SECTIONS]
    unknown = sorted(set(redo) - set(names))
    if unknown:
        raise ValueError(f"--redo: no section named {', '.join(unknown)} (the sections: {', '.join(names)})")
    chosen = set(redo)
    if "lvlm" in chosen:  # its proxy-only half replaces the merged table: the calibrated half comes too
        chosen.add("lvlm_calibrated")
    return chosen


def _start_or_resume(
    out_dir: Path, config: ReportConfig, build_record: dict[str, Any], redo: set[str]
) -> dict[str, Any]:
    """A new report, or the one in ``out_dir`` if it was started with the same settings and models
    (other models too when ``redo`` names sections to measure again)."""
    settings = dataclasses.asdict(config)
    path = out_dir / "report.json"
    if redo and not path.is_file():
        raise ValueError(f"--redo: {path} does not exist (run the report once first)")
    if path.is_file():
        saved = json.loads(path.read_text())
        differ = [
            f"{k}: {saved['config'].get(k)!r} -> {v!r}"
            for k, v in json.loads(json.dumps(settings)).items()
            if k not in RESULT_NEUTRAL and saved.get("config", {}).get(k) != v
        ]
        build_changed = saved.get("build") != build_record
        if build_changed and not redo:
            differ.append("the models folder's build.json")
        if differ:
            raise ValueError(
                f"{path} was written with other settings ({'; '.join(differ)}); rerun with the same "
                "settings or write the report to a new folder"
            )
        saved.setdefault("sections", [])
        if redo:
            saved["sections"] = [name for name in saved["sections"] if name not in redo]
            saved.setdefault("redone", []).append({"sections": sorted(redo), "build_changed": build_changed})
            saved["build"] = build_record
        return saved
    out_dir.mkdir(parents=True, exist_ok=True)
    return {"config": settings, "build": build_record, "seconds": {}, "sections": []}


def _finish(report: dict[str, Any], models_dir: Path, out_dir: Path, build_record: dict[str, Any]) -> None:
    """The parts read from finished sections: the LVLM table made whole, the reasoning ceiling
    beside the fidelity rows, the calibration cost, the claims, the component loss curves."""
    finish_lvlm(report, out_dir)
    report["fidelity"]["vlm_cobsat_text"] = report["lvlm"]["tables"]["vlm text answer"]
    report["calibration_cost"] = calibration_cost(build_record)
    report["claims"] = jsonable(claims(report["lvlm"]))
    plot_losses(models_dir, out_dir / "component_losses.png")


def _save(out_dir: Path, report: dict[str, Any]) -> None:
    atomic_write_text(out_dir / "report.json", json.dumps(jsonable(report), indent=1) + "\n")
