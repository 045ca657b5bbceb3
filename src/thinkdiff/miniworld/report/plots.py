"""The report's figures: component loss curves, the norm ablation, accuracy bars, example grids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from thinkdiff.miniworld.minicobsat import MINI_TASKS, TASK_COLUMN_ORDER

__all__ = ["plot_clip_examples", "plot_examples", "plot_losses", "plot_lvlm", "plot_norm"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(models_dir: Path, path: Path) -> None:
    from thinkdiff.miniworld.components.common import smooth

    plt = _plt()
    names = ["t5", "flux", "vlm", "vision"]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3))
    for ax, name in zip(axes, names):
        record = models_dir / name / "training.json"
        if record.is_file():
            losses = json.loads(record.read_text())["losses"]
            ax.plot(losses, alpha=0.3, lw=0.5)
            ax.plot(smooth(losses), lw=1.5)
            ax.set_yscale("log")
        ax.set_title(f"mini {name}")
        ax.set_xlabel("step")
    axes[0].set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_norm(curves: dict[str, list[list[float]]], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = {"t5": "RMSNorm, T5 init (ours)", "default": "RMSNorm, default init", "none": "no RMSNorm"}
    for key, points in curves.items():
        if points:
            ax.plot(*zip(*points), label=labels[key])
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("proxy T5 cross-entropy")
    ax.set_title("Aligner norm ablation (paper Fig. 7)")
    if any(curves.values()):
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_lvlm(lvlm: dict[str, Any], path: Path) -> None:
    plt = _plt()
    tables = lvlm["tables"]
    shots = sorted({int(s) for t in tables.values() for s in t})
    fig, axes = plt.subplots(1, len(shots), figsize=(7 * len(shots), 4), squeeze=False)
    names = list(tables)
    for ax, shot in zip(axes[0], shots):
        cols = [MINI_TASKS[t].name for t in TASK_COLUMN_ORDER] + ["average"]
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            vals = [tables[name][str(shot)][c]["accuracy"] for c in cols]
            ax.bar(np.arange(len(cols)) + i * width, vals, width, label=name)
        ax.set_xticks(np.arange(len(cols)) + 0.4 - width / 2)
        ax.set_xticklabels(cols, rotation=30)
        ax.set_ylim(0, 1)
        ax.set_title(f"mini-CoBSAT, {shot}-shot")
    axes[0][0].set_ylabel("judge accuracy")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_examples(prompts: list[Any], images: dict[str, np.ndarray], path: Path) -> None:
    """A grid: each prompt's context images, then each method's image for it."""
    plt = _plt()
    if not prompts:
        return
    max_shot = max(p.shot for p in prompts)
    cols = max_shot + len(images)
    fig, axes = plt.subplots(len(prompts), cols, figsize=(1.3 * cols, 1.45 * len(prompts)), squeeze=False)
    for row, prompt in enumerate(prompts):
        context = prompt.context_images()
        for c in range(cols):
            ax = axes[row][c]
            ax.axis("off")
            if c < prompt.shot:
                ax.imshow(context[c])
                ax.set_title(prompt.x_items[c], fontsize=6)
            elif c >= max_shot:
                name = list(images)[c - max_shot]
                ax.imshow(images[name][row])
                ax.set_title(name if row == 0 else "", fontsize=6)
        axes[row][0].text(
            -40,
            16,
            f"{prompt.task.short_name}\n{prompt.x_items[-1]}?\n-> {prompt.target_caption}",
            fontsize=5,
            ha="right",
            va="center",
        )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_clip_examples(ex: dict[str, Any], path: Path) -> None:
    plt = _plt()
    rows = [("input A", ex["inputs_a"]), ("A -> image", ex["image"]), ("A + text", ex["image_text"]),
            ("input B", ex["inputs_b"]), ("A + B", ex["pairs"])]  # fmt: skip
    n = len(ex["inputs_a"])
    fig, axes = plt.subplots(len(rows), n, figsize=(1.2 * n, 1.3 * len(rows)), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(n):
            axes[r][c].imshow(images[c])
            axes[r][c].axis("off")
            if r == 2:
                axes[r][c].set_title(ex["texts"][c], fontsize=4)
        axes[r][0].text(-4, 16, label, fontsize=6, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
