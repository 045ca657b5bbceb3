"""What a trained aligner connects: the ``thinkdiff.json`` beside its weights.

Its own module so that the model folder (:mod:`thinkdiff.models.bundle`, which writes and reads it)
and the model card (:mod:`thinkdiff.models.model_card`, which is rendered from it) both stand on it
without standing on each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

INFO_FILE = "thinkdiff.json"


@dataclass
class ThinkDiffInfo:
    """What a trained aligner connects; stored as ``thinkdiff.json`` beside the weights.

    Models are named as ``train`` was given them (a hub id, ``tiny:`` name, or folder, perhaps
    relative to where it ran); :func:`thinkdiff.models.bundle.recorded_model` finds a recorded
    folder again from wherever the model is run.
    """

    variant: str
    """'lvlm' or 'clip'."""
    source_model: str
    """The LVLM (lvlm) or BLIP-2 vision model (clip) whose features the aligner reads."""
    proxy_t5: str
    """The T5 whose decoder supervised training."""
    diffusion_decoder: str
    """The decoder the aligner was meant for (its T5 prompt width must equal the aligner output)."""
    in_dim: int
    out_dim: int
    features: str = "generated"
    """'generated' token features, or 'prompt' for the input-token ablation."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance: training steps, config summary, conversion source."""
    inference: dict[str, Any] = field(default_factory=dict)
    """How the model is meant to be run: :class:`~thinkdiff.pipelines.InferenceSettings` fields
    (``num_tokens``, ``stop_at_eos``, ``greedy``, ``temperature``, ``top_p``, ...) that the
    pipeline, ``generate``, the app and ``eval`` use unless a flag overrides them. Empty: the
    library's defaults (the paper's release)."""

    def __post_init__(self) -> None:
        if self.variant not in ("lvlm", "clip"):
            raise ValueError(f"{INFO_FILE}: variant must be 'lvlm' or 'clip', got {self.variant!r}")
