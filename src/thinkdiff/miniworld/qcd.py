"""The strongest training-free baseline in the miniature world: query-contrastive decoding and a hint.

:func:`measure_qcd` puts the published follow-up's four text-bridge variants on mini-CoBSAT (the
VLM writes the answer, the mini T5 encodes it, the mini FLUX draws it): plain, with the hint
appended to the instruction, with query-contrastive decoding (:mod:`thinkdiff.models.qcd`: the
contrast prompt drops the last ``"Word k: x, "``), and both; and ThinkDiff-LVLM on the features of
the QCD answer (taken from the full prompt). Every row is judged on the same prompts and seeds as
the plain text bridge and compared with it prompt by prompt (McNemar's exact test). The VLM
decodes greedily, as everywhere in the report, so QCD here is the contrast's argmax.

The mini VLM has its own prompt format: the fixed sentences of the protocol (the CoBSAT
instruction, ``Word k: ``, ``Picture k: ``) are single phrase tokens (:mod:`thinkdiff.miniworld.text`),
and it was trained on exactly those. The hint (:data:`~thinkdiff.pipelines.constants.HINT_INSTRUCTION`)
follows the instruction token as byte-level BPE pieces of words it never trained on; it refers to
the layout the world's prompts share with CoBSAT's (the last ``Word k`` is the query, the images
carry the shared attribute). So the hint rows measure what an unseen sentence does to this VLM,
not whether it follows the hint: a real Qwen2-VL reads English, this one reads its training text.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from thinkdiff.miniworld.minicobsat import MINI_TASKS, TASK_COLUMN_ORDER, MiniPrompt
from thinkdiff.miniworld.stats import cell, paired_test
from thinkdiff.pipelines.constants import DEFAULT_QCD_ALPHA, HINT_INSTRUCTION

__all__ = ["BASELINE", "LVLM_QCD", "TEXT_ROWS", "measure_qcd", "outcome_table", "qcd_markdown"]

logger = logging.getLogger(__name__)

BASELINE = "text bridge"
"""The row every other row is tested against."""
TEXT_ROWS: dict[str, tuple[bool, bool]] = {
    BASELINE: (False, False),
    "text bridge + hint": (True, False),
    "text bridge + QCD": (False, True),
    "text bridge + hint + QCD": (True, True),
}
"""The text-bridge rows as (hint, QCD)."""
LVLM_QCD = "lvlm + QCD"
"""ThinkDiff-LVLM's aligner on the features of the QCD answer."""


@torch.no_grad()
def measure_qcd(
    world,
    prompts: Sequence[MiniPrompt],
    lvlm_model: str | Path,
    *,
    alpha: float = DEFAULT_QCD_ALPHA,
    hint: str = HINT_INSTRUCTION,
    progress: bool = True,
    **sampling: Any,
) -> dict[str, Any]:
    """Judge the four text-bridge rows and lvlm + QCD on ``prompts``; paired tests vs the text bridge.

    ``lvlm_model``: the ThinkDiff-LVLM model folder whose aligner reads the QCD features;
    ``sampling``: the mini FLUX's ``steps`` and ``cfg``. Returns ``alpha``, ``hint``, ``tables``
    (row -> shot -> task / ``average`` / ``held-out targets`` cells), ``text_answers`` (the VLM's
    text answers judged by parsing, per decoding), ``tests`` (each row against the text bridge, per
    shot and pooled), and the prompt-level ``outcomes``.
    """
    from thinkdiff.miniworld.experiments import aligner_method, run_vlm, score_lvlm_methods
    from thinkdiff.miniworld.models import DrawnImages
    from thinkdiff.models.bundle import load_model

    prompts = list(prompts)
    text_cache: dict[str, torch.Tensor] = {}

    def text_states(run) -> torch.Tensor:
        if run.answer not in text_cache:
            text_cache[run.answer] = world.text_embeds([run.answer or " "])[0]
        return text_cache[run.answer]

    outcomes: dict[str, list[bool]] = {}
    text_answers: dict[str, list[bool]] = {}
    qcd_runs = None
    drawn = DrawnImages()  # most answers are the same with and without the hint or QCD
    for name, (with_hint, with_qcd) in TEXT_ROWS.items():
        runs = run_vlm(
            world,
            prompts,
            progress=progress,
            qcd_alpha=alpha if with_qcd else 0.0,
            hint=hint if with_hint else None,
        )
        text_answers[name.replace("text bridge", "VLM answer")] = [r.text_correct for r in runs]
        correct, _ = score_lvlm_methods(
            world, runs, {name: text_states}, progress=progress, drawn=drawn, **sampling
        )
        outcomes[name] = correct[name]
        if with_qcd and not with_hint:
            qcd_runs = runs
    assert qcd_runs is not None
    aligner, _ = load_model(lvlm_model)
    correct, _ = score_lvlm_methods(
        world, qcd_runs, {LVLM_QCD: aligner_method(aligner)}, progress=progress, **sampling
    )
    outcomes[LVLM_QCD] = correct[LVLM_QCD]

    shots = sorted({p.shot for p in prompts})
    tests = []
    for name in outcomes:
        if name == BASELINE:
            continue
        for shot in [*shots, None]:
            keep = [i for i, p in enumerate(prompts) if shot is None or p.shot == shot]
            a, b = [outcomes[name][i] for i in keep], [outcomes[BASELINE][i] for i in keep]
            test = paired_test(a, b)
            tests.append(
                {"row": name, "shot": shot, "accuracy": float(np.mean(a)), "baseline_accuracy": float(np.mean(b)),
                 "a_only": test.a_only, "b_only": test.b_only, "p_value": test.p_value}
            )  # fmt: skip
    return {
        "alpha": alpha,
        "hint": hint,
        "n_per_task": len(prompts) // max(1, len(shots) * len({p.task_id for p in prompts})),
        "tables": {name: outcome_table(o, prompts) for name, o in outcomes.items()},
        "text_answers": {name: outcome_table(o, prompts) for name, o in text_answers.items()},
        "tests": tests,
        "outcomes": {k: [bool(x) for x in v] for k, v in outcomes.items()},
    }


def outcome_table(outcomes: Sequence[bool], prompts: Sequence[MiniPrompt]) -> dict[str, dict[str, Any]]:
    """Cells of one row: shot -> task name / ``average`` / ``held-out targets`` -> cell dict."""
    table: dict[str, dict[str, Any]] = {}
    for shot in sorted({p.shot for p in prompts}):
        pairs = [(o, p) for o, p in zip(outcomes, prompts, strict=True) if p.shot == shot]
        row = {
            MINI_TASKS[t].name: cell([o for o, p in pairs if p.task_id == t]).to_dict()
            for t in TASK_COLUMN_ORDER
            if any(p.task_id == t for _, p in pairs)
        }
        row["average"] = cell([o for o, _ in pairs]).to_dict()
        row["held-out targets"] = cell([o for o, p in pairs if p.held_out_target]).to_dict()
        table[str(shot)] = row
    return table


def qcd_markdown(section: dict[str, Any]) -> list[str]:
    """The report's section on the baseline (every number read from ``section``)."""
    lines = [
        "",
        "## The strongest training-free baseline: query-contrastive decoding and a hint",
        "",
        "The published follow-up improves the text bridge with two inference-time changes: a hint "
        "appended to the instruction, and query-contrastive decoding (QCD): each step decodes "
        f"(1 + a) * logits(prompt) - a * logits(prompt without its last word), a = {section['alpha']} "
        "(greedy here). *lvlm + QCD*: ThinkDiff-LVLM's aligner on the features of the QCD answer, "
        'from the full prompt. Hint: "' + section["hint"] + '"; the mini VLM never saw it in training '
        "(its fixed sentences are single tokens), so the hint rows measure an unseen sentence, not "
        "instruction following. Paired test: McNemar's exact test against the plain text bridge on "
        f"the same prompts and seeds (n = {section['n_per_task']} prompts per task and shot).",
        "",
    ]
    tests = {(t["row"], t["shot"]): t for t in section["tests"]}
    for shot in next(iter(section["tables"].values())):
        names = [
            n
            for n in next(iter(section["tables"].values()))[shot]
            if n not in ("average", "held-out targets")
        ]
        cols = [*names, "average", "vs text bridge"]
        lines += [f"### {shot}-shot", "", "| row | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for name, table in section["tables"].items():
            row = table[shot]
            avg = row["average"]
            cells = [f"{row[c]['accuracy']:.3f}" for c in names]
            cells.append(f"**{avg['accuracy']:.3f}** [{avg['ci95'][0]:.2f}, {avg['ci95'][1]:.2f}]")
            test = tests.get((name, int(shot)))
            cells.append(
                "-" if test is None else f"{test['a_only']} vs {test['b_only']}, p={test['p_value']:.2g}"
            )
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Both shots pooled, against the plain text bridge:", "", "| row | accuracy | text bridge | discordant | p |",
              "|---|---|---|---|---|"]  # fmt: skip
    for t in section["tests"]:
        if t["shot"] is None:
            lines.append(
                f"| {t['row']} | {t['accuracy']:.3f} | {t['baseline_accuracy']:.3f} | "
                f"{t['a_only']} vs {t['b_only']} | {t['p_value']:.2g} |"
            )
    lines += ["", "The VLM's text answers under each decoding (parsed, not drawn): "
              + "; ".join(f"{name} " + " / ".join(f"{s}-shot {table[s]['average']['accuracy']:.3f}" for s in table)
                          for name, table in section["text_answers"].items()) + ".", ""]  # fmt: skip
    return lines
