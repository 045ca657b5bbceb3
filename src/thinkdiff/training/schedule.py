"""Optimiser and learning-rate schedule as in the released configs.

AdamW (0.9, 0.999) with weight decay only on parameters of two or more dimensions (not on biases
or the norm weight); linear warm-up from ``warmup_start_lr`` to ``lr``, then cosine to ``min_lr``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from thinkdiff.training.config import TrainConfig


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(config.beta1, config.beta2),
    )


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate used for optimiser step ``step`` (0-based)."""
    if step < config.warmup_steps:
        return config.warmup_start_lr + (config.lr - config.warmup_start_lr) * step / config.warmup_steps
    decay_steps = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    # The schedule is a pure function of the step, so resuming needs no scheduler state.
    for group in optimizer.param_groups:
        group["lr"] = lr
