"""Small helpers shared by the component trainers: schedules, EMA, loss logs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from thinkdiff.utils import atomic_write_text

__all__ = ["Ema", "cosine_lr", "save_losses", "smooth"]


def cosine_lr(step: int, total: int, peak: float, warmup: int, floor: float = 0.05) -> float:
    """Linear warm-up to ``peak``, then cosine decay to ``floor * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


class Ema:
    """Exponential moving average of a model's parameters (the weights that get saved)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        # Warm-up of the decay: early weights are noise, an average over them is worse.
        decay = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict(self.shadow, strict=True)


def smooth(values: list[float], window: int = 50) -> list[float]:
    """Running mean over the last ``window`` values (for logs and plots)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def save_losses(path: Path, losses: list[float], **info: object) -> None:
    """Write a component's loss curve and timings as JSON (read by the report)."""
    atomic_write_text(path, json.dumps({"losses": [round(x, 5) for x in losses], **info}) + "\n")
