"""The paper's proxy objective as a training objective: the frozen T5 decoder reads the aligned
features back (ThinkDiff-LVLM's random split, ThinkDiff-CLIP's caption continuation; the losses
themselves are in :mod:`thinkdiff.objectives`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from thinkdiff.objectives import CLIPBatch, LVLMBatch, clip_decode, clip_loss, lvlm_decode, lvlm_loss

if TYPE_CHECKING:
    from thinkdiff.models.aligner import Aligner
    from thinkdiff.training.config import TrainConfig
    from thinkdiff.training.objective import FrozenModels


class ProxyObjective:
    """Cross-entropy of the frozen proxy T5 decoder reading the target text from the aligned features."""

    def __init__(self, frozen: FrozenModels) -> None:
        self.frozen = frozen

    @classmethod
    def build(cls, config: TrainConfig, frozen: FrozenModels) -> ProxyObjective:
        return cls(frozen)

    def image_tokens(self, batch: CLIPBatch) -> torch.Tensor:
        """ThinkDiff-CLIP: the vision tower's tokens of the batch's images (what the aligner reads)."""
        assert self.frozen.vision is not None
        return self.frozen.vision(batch.pixel_values_BCHW)

    def loss(self, aligner: Aligner, batch: LVLMBatch | CLIPBatch, step: int) -> torch.Tensor:
        if isinstance(batch, CLIPBatch):
            return clip_loss(self.image_tokens(batch), aligner, self.frozen.proxy, batch)
        return lvlm_loss(aligner, self.frozen.proxy, batch)

    def decode(self, aligner: Aligner, batch: LVLMBatch | CLIPBatch, n: int) -> list[dict[str, str]]:
        proxy = self.frozen.proxy
        if isinstance(batch, CLIPBatch):
            texts = clip_decode(self.image_tokens(batch), aligner, proxy, batch)
            inputs = batch.inputs
        else:
            texts = lvlm_decode(aligner, proxy, batch)
            inputs = [""] * len(texts)
        return [
            {"key": k, "input": i, "target": t, "decoded": d}
            for k, i, t, d in list(zip(batch.keys, inputs, batch.target_texts, texts))[:n]
        ]

    def record(self) -> dict[str, Any]:
        return {"objective": "proxy"}
