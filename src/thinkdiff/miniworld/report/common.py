"""What every section of the report shares: its settings, what a section receives, how numbers print.

A section is a function ``run(ctx) -> dict`` whose dict holds the report keys it measured (merged
into ``report.json`` when it finishes) and an optional Markdown renderer; the runner
(:mod:`~thinkdiff.miniworld.report.runner`) lists them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from thinkdiff.miniworld.sampler import DEFAULT_CFG, DEFAULT_STEPS

__all__ = ["ReportConfig", "Section", "SectionContext", "always", "jsonable", "pct", "quick_report_config"]


@dataclasses.dataclass
class ReportConfig:
    """What the report measures, and how much of it."""

    num_prompts: int = 100
    """First N prompts of the 1000-prompt list, per task and shot."""
    shots: tuple[int, ...] = (2, 4)
    steps: int = DEFAULT_STEPS
    cfg: float = DEFAULT_CFG
    fidelity_n: int = 300
    clip_n: int = 200
    retrain: bool = True
    """Train the ablation aligners (no split, input tokens, norm default/none); else skip them."""
    transfer_train: int = 3000
    """Captions the oracle aligners of the premise test learn from."""
    transfer_n: int = 200
    """Held-out captions the premise test draws (half from held-out cells)."""
    transfer_steps: int = 400
    """Training steps of each oracle aligner of the premise test."""
    transfer_calibration_steps: int = 600
    """Calibration steps of the premise test's T5-states aligner after its proxy stage (0: none)."""
    transfer_noise: str = "teacher"
    """Noisy inputs of that calibration ('teacher' or 'pure')."""
    qcd: bool = True
    """Measure the query-contrastive baseline's rows (:mod:`thinkdiff.miniworld.qcd`)."""
    threads: int = 2
    """Two or more: the report's two lanes of sections run in two forked processes."""
    progress: bool = True

    @property
    def sampling(self) -> dict[str, Any]:
        """The mini FLUX sampler's settings, as :meth:`MiniWorld.images_from_embeds` takes them."""
        return {"steps": self.steps, "cfg": self.cfg}


def quick_report_config(**changes: Any) -> ReportConfig:
    """Small counts for a ``--quick`` world: every section runs (the test suite's report)."""
    counts = {
        "num_prompts": 2, "steps": 2, "fidelity_n": 8, "clip_n": 4, "retrain": False, "transfer_train": 64,
        "transfer_n": 4, "transfer_steps": 2, "transfer_calibration_steps": 2,
    }  # fmt: skip
    return ReportConfig(**{**counts, **changes})


RESULT_NEUTRAL = frozenset({"threads", "progress"})
"""Report settings that do not change a number: a resumed report may differ in these."""


@dataclasses.dataclass
class SectionContext:
    """What a section measures with: the world, the settings, the build's budgets, the report folder."""

    world: Any
    """The :class:`~thinkdiff.miniworld.models.MiniWorld` (components load on first use)."""
    config: ReportConfig
    build_config: Any
    """The :class:`~thinkdiff.miniworld.budgets.BuildConfig` the world was built with."""
    out_dir: Path


def always(config: ReportConfig) -> bool:
    """Every report measures this section."""
    return True


@dataclasses.dataclass(frozen=True)
class Section:
    """One resumable part of the report."""

    name: str
    run: Callable[[SectionContext], dict[str, Any]]
    """Measures; returns the ``report.json`` keys it adds (JSON-able). Writes its own PNGs."""
    lane: str
    """Sections of one lane run one after another; the two lanes run side by side."""
    wanted: Callable[[ReportConfig], bool] = always
    """Whether the settings ask for this section (a module-level function: sections are pickled)."""


def pct(x: float) -> str:
    """An accuracy as the report prints it."""
    return f"{x:.3f}"


def jsonable(x: Any) -> Any:
    """``x`` with numpy values and tuples turned into what ``json`` writes."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.floating | np.integer):
        return x.item()
    return x
