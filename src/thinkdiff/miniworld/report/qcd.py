"""The query-contrastive baseline's rows on mini-CoBSAT (:mod:`thinkdiff.miniworld.qcd` measures them)."""

from __future__ import annotations

from typing import Any

from thinkdiff.miniworld.minicobsat import TASK_COLUMN_ORDER, build_prompts
from thinkdiff.miniworld.qcd import measure_qcd, qcd_markdown
from thinkdiff.miniworld.report.common import ReportConfig, SectionContext

__all__ = ["qcd_section_markdown", "run_qcd", "wants_qcd"]


def wants_qcd(config: ReportConfig) -> bool:
    """Whether the report measures this section (``--no-qcd`` skips it)."""
    return config.qcd


def run_qcd(ctx: SectionContext) -> dict[str, Any]:
    """The QCD section: ``{"qcd": ...}``."""
    config = ctx.config
    prompts = list(build_prompts(TASK_COLUMN_ORDER, config.shots, range(config.num_prompts)))
    lvlm_model = ctx.world.root / "thinkdiff" / "lvlm"
    return {"qcd": measure_qcd(ctx.world, prompts, lvlm_model, progress=config.progress, **config.sampling)}


def qcd_section_markdown(report: dict[str, Any]) -> list[str]:
    """The baseline's table, where the report measured it."""
    return qcd_markdown(report["qcd"]) if "qcd" in report else []
