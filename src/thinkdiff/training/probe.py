"""One measured optimiser step of a calibration run: what the GPU check times on real decoders."""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from thinkdiff.training.config import TrainConfig
from thinkdiff.training.trainer import Trainer


def calibration_step(config: TrainConfig) -> dict[str, Any]:
    """Build the trainer for a calibration ``config`` and run ONE optimiser step (the GPU check).

    Returns the loss, the gradient norm, the step's seconds and the peak GPU memory in bytes (0 on
    the CPU). Nothing is written to the run folder.
    """
    if config.objective != "calibrate":
        raise ValueError(f"calibration_step needs objective='calibrate', got {config.objective!r}")
    trainer = Trainer(config)
    try:
        cuda = trainer.accelerator.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        batches = trainer.data.next_step()
        started = time.perf_counter()
        loss, grad_norm, applied = trainer.train_step(batches)
        if cuda:
            torch.cuda.synchronize()
        return {
            "loss": loss,
            "grad_norm": grad_norm,
            "applied": applied,
            "seconds": time.perf_counter() - started,
            "peak_memory": torch.cuda.max_memory_allocated() if cuda else 0,
            "finite": math.isfinite(loss),
        }
    finally:
        trainer.accelerator.end_training()
