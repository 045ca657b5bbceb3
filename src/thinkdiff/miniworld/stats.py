"""Scoring helpers: accuracy tables with Wilson intervals, and paired comparisons of two methods."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from thinkdiff.evaluation.cobsat.results import wilson_interval

__all__ = ["Cell", "PairedTest", "cell", "paired_test"]


@dataclass
class Cell:
    """An accuracy with its 95% Wilson interval."""

    correct: int
    n: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.n)

    def to_dict(self) -> dict[str, float | int]:
        lo, hi = self.interval
        return {"accuracy": self.accuracy, "correct": self.correct, "n": self.n, "ci95": [lo, hi]}

    def __str__(self) -> str:
        return f"{self.accuracy:.3f}"


def cell(outcomes: Sequence[bool]) -> Cell:
    return Cell(sum(bool(x) for x in outcomes), len(outcomes))


@dataclass
class PairedTest:
    """McNemar's exact test on the same prompts: who is right where the other is wrong."""

    a_only: int
    b_only: int
    p_value: float

    @property
    def difference(self) -> int:
        return self.a_only - self.b_only


def paired_test(a: Sequence[bool], b: Sequence[bool]) -> PairedTest:
    """Two-sided exact binomial test on the discordant pairs of two aligned outcome lists."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes differ in length: {len(a)} vs {len(b)}")
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    n = a_only + b_only
    if n == 0:
        return PairedTest(0, 0, 1.0)
    k = min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return PairedTest(a_only, b_only, min(1.0, 2 * tail))
