"""Run under ``torchrun`` (or plain python for one process) by tests/test_training_ddp.py.

Every process trains on the same global batches: step ``s`` uses samples ``8s .. 8s+7``; with two
processes rank ``r`` takes the half ``8s+4r .. 8s+4r+3``, with one process both halves are
accumulated. The aligner each rank ends with is written to ``OUT/rank{r}.safetensors``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from thinkdiff.data.feature_shards import FeatureShards
from thinkdiff.training.config import debug_lvlm
from thinkdiff.training.data import load_lvlm_tokenizer
from thinkdiff.training.trainer import Trainer

torch.set_num_threads(1)


class FixedBatches:
    def __init__(self, trainer: Trainer, root: Path) -> None:
        self.samples = list(FeatureShards(root))
        self.collate = trainer.data.collate
        self.rank = trainer.accelerator.process_index
        self.world = trainer.accelerator.num_processes
        self.step = 0

    def next_step(self):
        start = 8 * self.step
        self.step += 1
        halves = [self.samples[start + 4 * h : start + 4 * h + 4] for h in range(2)]
        mine = halves if self.world == 1 else [halves[self.rank]]
        return [self.collate(h) for h in mine]

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state.get("step", 0)


def main() -> None:
    feature_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    config = debug_lvlm().updated(
        data=[str(feature_dir)],
        output_dir=str(out / "run"),
        global_batch_size=8,
        micro_batch_size=4,
        max_steps=5,
        val_every=0,
        decode_every=0,
        save_every=100,
    )
    trainer = Trainer(config)
    assert load_lvlm_tokenizer(config.lvlm) is not None
    trainer.data = FixedBatches(trainer, feature_dir)
    trainer.fit(resume="never")
    state = {k: v.detach().cpu().contiguous() for k, v in trainer.unwrapped_aligner().state_dict().items()}
    save_file(state, str(out / f"rank{trainer.accelerator.process_index}.safetensors"))
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
