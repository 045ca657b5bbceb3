"""The miniature world's ThinkDiff models as a reader meets them: the method first, then the ablations.

Each model folder under ``thinkdiff/`` gets one line saying what it is (derived from how the build
made it, not written by hand) and, for the committed weights, its measured score read from the
committed report (``measured/report.json``), so that a page or a demo never hard-codes a number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = ["SCORE_SHOT", "WorldModel", "committed_report", "measured_report", "text_bridge_score", "world_models"]

SCORE_SHOT = 2
"""The mini-CoBSAT shot count whose average accuracy is each model's score."""


@dataclass(frozen=True)
class WorldModel:
    """One ThinkDiff model folder of a mini world."""

    folder: Path
    variant: str
    """lvlm or clip."""
    role: Literal["method", "ablation"]
    summary: str
    """What it is, in one line."""
    score: float | None
    """Mini-CoBSAT accuracy at :data:`SCORE_SHOT` shots (average of the six tasks), or ``None``
    when the report has none for it (another world's folder, or an image-to-image CLIP model)."""
    score_text: str
    """The measured score as a reader reads it ("" when there is none)."""

    @property
    def name(self) -> str:
        return self.folder.name


def committed_report() -> dict[str, Any] | None:
    """The committed measured report (``measured/report.json``), or ``None`` when it is absent."""
    path = Path(__file__).resolve().parent / "measured" / "report.json"
    return json.loads(path.read_text()) if path.is_file() else None


def measured_report(root: Path) -> dict[str, Any] | None:
    """The committed measured report when ``root`` holds the committed weights, else ``None``."""
    from thinkdiff.miniworld.models import default_weights_dir

    if Path(root).resolve() != default_weights_dir().resolve():
        return None
    return committed_report()


def text_bridge_score(root: Path) -> float | None:
    """The text bridge's mini-CoBSAT accuracy at :data:`SCORE_SHOT` shots (the committed report's)."""
    report = measured_report(root)
    return (
        None
        if report is None
        else report["lvlm"]["tables"]["text bridge"][str(SCORE_SHOT)]["average"]["accuracy"]
    )


def world_models(root: Path) -> list[WorldModel]:
    """Every model folder under ``root/thinkdiff``: the method (the calibrated aligner ``make demo``
    draws with, or the proxy-only ``lvlm`` in a world without it) first, then the ablations, best
    measured score first."""
    from thinkdiff.miniworld.build import (
        CALIBRATION_RUNS,
        CLIP_LEVER,
        DEMO_CALIBRATED,
        calibrated_dir,
        clip_lever_dir,
    )
    from thinkdiff.miniworld.report.clip_claims import aligner_folders

    root = Path(root)
    report = measured_report(root)
    # The report's clip_claims row of each ThinkDiff-CLIP folder: its preservation task scores it.
    clip_rows = {folder.name: row for row, folder in aligner_folders(root).items()}
    tables = report["lvlm"]["tables"] if report else {}
    runs = {calibrated_dir(root, name).name: name for name in CALIBRATION_RUNS}
    method = calibrated_dir(root, DEMO_CALIBRATED).name
    folders = sorted(f for f in (root / "thinkdiff").iterdir() if (f / "thinkdiff.json").is_file())
    if method not in {f.name for f in folders}:
        method = "lvlm"
    models = []
    for folder in folders:
        info = json.loads((folder / "thinkdiff.json").read_text())
        extra = info.get("extra", {})
        steps = extra.get("steps")
        table: str | None
        if folder.name in runs:
            run = CALIBRATION_RUNS[runs[folder.name]]
            changes = ", ".join(f"{k} {v}" for k, v in run.overrides.items())
            summary = (
                f"calibrated with the decoder in the loop from the '{run.start}' proxy aligner"
                + (f", {steps} steps" if steps else "")
                + (f"; changed: {changes}" if changes else "")
            )
            table = f"calibrated {runs[folder.name]}"
        elif folder.name == "lvlm":
            summary = "ThinkDiff-LVLM trained against the proxy T5 only (the paper's recipe, no calibration)"
            table = "lvlm"
        elif folder.name == "clip":
            summary = "ThinkDiff-CLIP (image features) trained against the proxy T5 only"
            table = None
        elif folder.name == "clip-calibrated":
            summary = "ThinkDiff-CLIP calibrated with the decoder in the loop" + (
                f", {steps} steps" if steps else ""
            )
            table = None
        elif folder.name == clip_lever_dir(root).name:
            summary = (
                "ThinkDiff-CLIP trained against the proxy T5 only, split lever: "
                f"clip_empty_first {extra.get('clip_empty_first')}"
            )
            table = None
        elif folder.name == calibrated_dir(root, CLIP_LEVER).name:
            summary = (
                f"ThinkDiff-CLIP calibrated with the decoder in the loop from the split lever "
                f"(clip_empty_first {extra.get('clip_empty_first')})" + (f", {steps} steps" if steps else "")
            )
            table = None
        else:
            summary = "a ThinkDiff model folder of this world"
            table = None
        score, score_text = _score(report, tables, table, clip_rows.get(folder.name))
        role: Literal["method", "ablation"] = "method" if folder.name == method else "ablation"
        models.append(WorldModel(folder, info.get("variant", "lvlm"), role, summary, score, score_text))
    # Unscored (another world's) folders: ThinkDiff-LVLM before ThinkDiff-CLIP, then by name.
    return sorted(
        models,
        key=lambda m: (
            m.role != "method",
            -(m.score if m.score is not None else -1.0),
            m.variant != "lvlm",
            m.name,
        ),
    )


def _score(
    report: dict[str, Any] | None, tables: dict[str, Any], table: str | None, row: str | None
) -> tuple[float | None, str]:
    shot = str(SCORE_SHOT)
    if table is not None and shot in tables.get(table, {}):
        accuracy = tables[table][shot]["average"]["accuracy"]
        return accuracy, f"mini-CoBSAT {shot}-shot {accuracy:.3f}"
    claims = (report or {}).get("clip_claims", {})
    if row is not None and row in claims.get("tasks", {}).get("preservation", {}):
        kept = claims["tasks"]["preservation"][row]
        per = claims.get("preservation_by_attribute", {}).get(row, {})
        attributes = ", ".join(f"{a} {cell['accuracy']:.2f}" for a, cell in per.items())
        return None, (
            f"image in: all four attributes kept {kept['accuracy']:.2f} ({kept['n']} images)"
            + (f"; {attributes}" if attributes else "")
        )
    return None, ""
