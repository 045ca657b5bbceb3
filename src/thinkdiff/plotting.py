"""Line plots written atomically as PNG (loss curves of runs and ablations)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from thinkdiff.utils import atomic_path


def plot_curves(
    curves: dict[str, Sequence[tuple[float, float]]], path: Path, *, xlabel: str, ylabel: str, title: str = ""
) -> None:
    """One line per named list of ``(x, y)`` points; empty curves are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in curves.items():
        if points:
            ax.plot(*zip(*points), label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:  # removes the temporary file when the write fails
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
