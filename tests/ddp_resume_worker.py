"""Run under ``torchrun --nproc_per_node 2`` by tests/test_training_ddp.py: a resume where each rank
has its own view of the run folder, as on nodes without a shared filesystem.

Rank ``r`` uses ``OUT/run-rank{r}`` as its run folder (only rank 0 writes checkpoints). ``first``
trains 6 of 9 steps (checkpoints at 3 and 6); ``resume`` continues to step 9 and writes the step it
resumed from and the final aligner to ``OUT/rank{r}.json`` / ``OUT/rank{r}.safetensors``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from thinkdiff.training.config import debug_lvlm
from thinkdiff.training.trainer import Trainer

torch.set_num_threads(1)


def main() -> None:
    feature_dir, out, phase = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    rank = int(__import__("os").environ["RANK"])
    config = debug_lvlm().updated(
        data=[str(feature_dir)],
        output_dir=str(out / f"run-rank{rank}"),
        global_batch_size=8,
        micro_batch_size=4,
        max_steps=9,
        val_every=0,
        decode_every=0,
        save_every=3,
        keep_last=5,
    )
    trainer = Trainer(config)
    try:
        if phase == "first":
            trainer.fit(resume="never", stop_after=6)
            return
        started = {"resumed": trainer.resume("auto"), "step": trainer.step}
        trainer.fit(resume="never")
        state = {k: v.detach().cpu().contiguous() for k, v in trainer.unwrapped_aligner().state_dict().items()}
        save_file(state, str(out / f"rank{rank}.safetensors"))
        (out / f"rank{rank}.json").write_text(json.dumps(started))
    finally:
        trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
