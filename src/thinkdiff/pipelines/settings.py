"""How the pipeline computes the conditioning: :class:`InferenceSettings` (the decoder's own
settings, size, steps and guidance, are arguments of each call)."""

from __future__ import annotations

from dataclasses import dataclass

from thinkdiff.pipelines.constants import DEFAULT_INSTRUCTION

__all__ = ["InferenceSettings"]


@dataclass
class InferenceSettings:
    """How the conditioning is computed (decoder settings are arguments of the call)."""

    instruction: str | None = DEFAULT_INSTRUCTION
    """Put before the items in lvlm and text-bridge modes (``None``: no instruction). Not added again
    when the items already start with it; dropped from the items in clip mode."""
    num_tokens: int = 128
    """lvlm: exactly this many tokens are generated (EOS ignored) unless ``stop_at_eos``;
    text-bridge: at most this many."""
    stop_at_eos: bool = False
    """lvlm: generate at most ``num_tokens`` tokens and stop at EOS; the features of the tokens up
    to and including EOS are aligned. The paper's release generates exactly ``num_tokens``
    (False); a model whose aligner was trained on EOS-terminated answers needs True."""
    greedy: bool = False
    """Decode greedily (lvlm and text-bridge) instead of sampling with ``temperature``/``top_p``."""
    temperature: float = 0.6
    """LVLM sampling temperature (unused when ``greedy``)."""
    top_p: float = 0.9
    """LVLM nucleus sampling mass (unused when ``greedy``)."""
    text_max_length: int = 128
    """T5 tokens for the text of clip mode and the extra text of lvlm mode (FLUX). CogVideoX gets
    whatever is left of its fixed prompt length after the aligned tokens."""
    max_images: int = 16
    """Most images per request."""
    max_pixels: int | None = None
    """Caps the LVLM's image resolution (``None``: the checkpoint's own setting)."""
    encoder_batch_size: int = 1
    """Requests per LVLM ``generate`` call (images per vision-tower call in clip mode). Above 1 the
    LVLM samples a batch from one RNG stream, so a request's text then depends on its batch
    companions; 1 keeps every request reproducible on its own."""
    decoder_batch_size: int = 1
    """Requests per decoder call. Each row has its own ``torch.Generator``, so batching does not
    change the noise; only requests with equal settings and prompt length are batched."""
    qcd_alpha: float = 0.0
    """lvlm and text-bridge: query-contrastive decoding weight ``a`` (:mod:`thinkdiff.models.qcd`):
    each step samples from ``(1 + a) * logits(full input) - a * logits(input without its last text
    item)``; 0 (default) samples plainly, 0.5 is the published setting. A request may override it."""
    hint: str | None = None
    """lvlm and text-bridge: a sentence appended to the instruction (``HINT_INSTRUCTION`` is ours:
    the last word is the key clue, the shared attribute comes from the pictures); ``None``: none.
    A request may switch it on or off."""

    def __post_init__(self) -> None:
        for name in (
            "num_tokens",
            "text_max_length",
            "max_images",
            "encoder_batch_size",
            "decoder_batch_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.qcd_alpha < 0:
            raise ValueError(f"qcd_alpha must be >= 0, got {self.qcd_alpha}")
        if self.hint is not None and (not self.hint.strip() or self.instruction is None):
            raise ValueError("hint must be a non-empty sentence, appended to an instruction (not None)")
