"""What decides the content of a feature folder: the instruction prompts and the sampling
(:class:`ExtractionSettings`; a rerun into the same folder must use the same values)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DESCRIPTION_PROMPTS", "ExtractionSettings", "recorded_model_name"]

# The paper's instruction prompts (appendix B), some adapted from LLaVA; one is drawn per image.
# "photo's" has a straight apostrophe as in LLaVA's list (the PDF typesets it curly).
DESCRIPTION_PROMPTS: tuple[str, ...] = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
    "Generate a prompt that can recreate the image in a 2D diffusion model.",
    "Provide a descriptive prompt to reproduce the given image using a diffusion model.",
    "Create a prompt suitable for a 2D diffusion model to generate the same image.",
    "Summarize the visual details as a prompt for a 2D diffusion model.",
    "Write a clear prompt to guide a 2D diffusion model in recreating the image.",
)


@dataclass
class ExtractionSettings:
    """What decides the content of the feature shards (a rerun must use the same values)."""

    prompts: tuple[str, ...] = DESCRIPTION_PROMPTS
    """Instruction prompts; one is drawn per image, seeded by ``seed`` and the sample key."""
    temperature: float = 0.6
    """Sampling temperature (the released pre-processing)."""
    top_p: float = 0.9
    """Nucleus sampling mass."""
    max_new_tokens: int = 64
    """Most tokens generated per image (64 in the paper)."""
    seed: int = 0
    """Seed of the prompt choice and of the sampling (per input shard and batch)."""
    prompt_features: bool = False
    """Also store the prompt tokens' features (the paper's input-tokens ablation)."""
    samples_per_shard: int = 1000
    """Slice size for folder and manifest sources (a tar file is always one shard)."""
    task_shots: tuple[int, ...] = ()
    """Task-format mode (:mod:`thinkdiff.data.task_prompts`): group consecutive samples into
    interleaved prompts of these many demonstrations (cycled); empty: describe each image."""
    task_text_words: int = 0
    """Task-format mode: words of each caption kept as its short text (0: the whole caption)."""
    greedy: bool = False
    """Decode greedily (as at test time) instead of sampling."""
    qcd_alpha: float = 0.0
    """Query-contrastive decoding weight (:mod:`thinkdiff.models.qcd`; contrast: the prompt without
    its last text: the image alone, or a task prompt without its final word); 0 samples plainly. The
    hf engine only."""
    hint: str | None = None
    """Task-format mode: a sentence appended to the task instruction (``HINT_INSTRUCTION`` is ours)."""

    def __post_init__(self) -> None:
        self.prompts = tuple(self.prompts)
        self.task_shots = tuple(self.task_shots)
        if any(k < 1 for k in self.task_shots) or self.task_text_words < 0:
            raise ValueError("task_shots must be >= 1 and task_text_words >= 0")
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise ValueError("prompts must be a non-empty list of non-empty strings")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if self.qcd_alpha < 0:
            raise ValueError(f"qcd_alpha must be >= 0, got {self.qcd_alpha}")
        if self.hint is not None and not (self.task_shots and self.hint.strip()):
            raise ValueError("hint applies to the task-format mode (task_shots) and must be a non-empty sentence")

    def prompt_for(self, key: str) -> str:
        """The prompt of one sample: fixed by ``seed`` and the key, whatever the order or rank."""
        return random.Random(f"{self.seed}:{key}").choice(self.prompts)

    def batch_seed(self, shard_index: int, batch_index: int) -> int:
        """Sampling seed of one batch: a redone shard samples exactly the same tokens."""
        return random.Random(f"{self.seed}:{shard_index}:{batch_index}").getrandbits(62)


def recorded_model_name(model: str | Path) -> str:
    """How an LVLM is recorded in ``extraction.json``: a local folder by its absolute path (so that
    a resume from elsewhere matches), a hub id or ``tiny:`` name as it is."""
    return str(Path(model).expanduser().resolve()) if Path(model).expanduser().is_dir() else str(model)
