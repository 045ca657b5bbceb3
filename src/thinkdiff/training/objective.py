"""What the training loop optimises, behind one small interface.

The loop (:mod:`thinkdiff.training.trainer`) knows nothing of what it optimises: it builds the
frozen models every objective reads (:class:`FrozenModels`), hands them to an :class:`Objective`
class, and from then on asks the objective only for a micro-batch's loss, decoded samples to log,
and what to record in the exported model's ``thinkdiff.json``. The objectives a run can name
(``TrainConfig.objective``) are listed in :mod:`thinkdiff.training.objectives`, one line each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from thinkdiff.models.aligner import Aligner
    from thinkdiff.models.clip_vision import CLIPVisionFeatures
    from thinkdiff.models.proxy_decoder import ProxyT5Decoder
    from thinkdiff.training.config import TrainConfig


@dataclass
class FrozenModels:
    """The models a run reads and never trains, built once by the trainer."""

    proxy: ProxyT5Decoder
    """The proxy T5 decoder (its tokenizer also makes the training targets)."""
    vision: CLIPVisionFeatures | None
    """ThinkDiff-CLIP's vision tower; ``None`` for ThinkDiff-LVLM (features are stored)."""
    device: torch.device
    dtype: torch.dtype
    """The frozen models' dtype (bf16 on a GPU, fp32 on the CPU)."""


class Objective(Protocol):
    """One training objective: built from the config, a loss per micro-batch, what it records."""

    @classmethod
    def build(cls, config: TrainConfig, frozen: FrozenModels) -> Objective:
        """The objective of a run (loads whatever else it needs, e.g. a diffusion decoder)."""
        ...

    def loss(self, aligner: Aligner, batch: Any, step: int) -> torch.Tensor:
        """The scalar loss of one micro-batch already on the device; ``step`` may seed its noise."""
        ...

    def decode(self, aligner: Aligner, batch: Any, n: int) -> list[dict[str, str]]:
        """Up to ``n`` rows ``{key, input, target, decoded}``: what the aligned features say."""
        ...

    def record(self) -> dict[str, Any]:
        """What to save about the objective in the exported model's ``thinkdiff.json``."""
        ...
