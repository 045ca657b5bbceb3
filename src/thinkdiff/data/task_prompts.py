"""Calibration data in the task's format: interleaved in-context prompts from an image-caption source.

ThinkDiff-LVLM is asked, at test time, prompts like CoBSAT's: an instruction, k images each with a
short text, and a final text whose picture the model must imagine. Describe data (one image, one
of the paper's 16 prompts, a sampled description) is the paper's proxy-stage data, but it differs
from what the aligner sees at test time (long sampled descriptions vs short task answers). This
module builds prompts of the task's layout from *any* image-caption source: consecutive samples
are grouped ``k + 1`` at a time; the first ``k`` become (image, short text) demonstrations, the last
one's short text is the final text, and its image is the target the answer should describe.
``thinkdiff extract-features --task-shots K`` has the LVLM answer these greedily (as at test time)
and stores the answer's features and text as usual (metadata: ``target_key``, ``caption``,
``shots``).

The source of calibration prompts must be disjoint from the benchmark evaluated later (at real
scale: not CoBSAT's images or words); the mini world builds them from training cells only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from thinkdiff.evaluation.cobsat.protocol import COBSAT_INSTRUCTION
from thinkdiff.pipelines.requests import cobsat_items

__all__ = ["TASK_INSTRUCTION", "TaskPrompt", "group_task_prompts", "interleaved_items", "short_text"]

TASK_INSTRUCTION = COBSAT_INSTRUCTION
"""The instruction of task-format prompts: ThinkDiff's CoBSAT instruction."""


def interleaved_items(texts: Sequence[str], images: Sequence[Any], instruction: str | None) -> list[Any]:
    """ThinkDiff's interleaved layout: instruction, ``"Word 1: red, "``, image, ``"\\n\\nWord 2: ..."``.

    ``texts`` has one more entry than ``images`` (the final text has no image); the same layout as
    :meth:`thinkdiff.evaluation.cobsat.protocol.CobsatPrompt.thinkdiff_items`.
    """
    if len(texts) != len(images) + 1:
        raise ValueError(f"{len(texts)} texts for {len(images)} images: need one text more than images")
    return cobsat_items(texts, images, instruction)


def short_text(caption: str, max_words: int = 0) -> str:
    """A caption's short text: its first ``max_words`` words (0: the whole caption), no final stop."""
    words = caption.strip().rstrip(".").split()
    return " ".join(words[:max_words] if max_words else words)


@dataclass(frozen=True)
class TaskPrompt:
    """One task-format prompt built from ``shots + 1`` consecutive source samples."""

    key: str
    """``{target_key}:task{shots}``."""
    shots: int
    items: list[Any]
    """The interleaved LVLM input (instruction, texts, PIL images)."""
    final_text: str
    target_key: str
    """The source key of the last sample, whose image the answer should describe."""
    target_caption: str


def group_task_prompts(
    samples: Iterable[Any],
    shots: Sequence[int],
    *,
    text_words: int = 0,
    instruction: str | None = TASK_INSTRUCTION,
) -> Iterator[TaskPrompt]:
    """Task prompts from a stream of ``ImageCaptionSample`` (``key``, ``image``, ``caption``).

    Prompt ``j`` takes the next ``shots[j % len(shots)] + 1`` samples; a trailing group too short
    for its prompt is dropped.
    """
    if not shots or any(k < 1 for k in shots):
        raise ValueError(f"task shots must be >= 1, got {list(shots)}")
    group: list[Any] = []
    j = 0
    for sample in samples:
        group.append(sample)
        k = shots[j % len(shots)]
        if len(group) < k + 1:
            continue
        texts = [short_text(s.caption, text_words) for s in group]
        target = group[-1]
        yield TaskPrompt(
            key=f"{target.key}:task{k}",
            shots=k,
            items=interleaved_items(texts, [s.image for s in group[:-1]], instruction),
            final_text=texts[-1],
            target_key=target.key,
            target_caption=target.caption,
        )
        group, j = [], j + 1
