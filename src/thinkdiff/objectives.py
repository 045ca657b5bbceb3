"""The proxy training objectives of ThinkDiff-LVLM and ThinkDiff-CLIP.

Both objectives hand aligned features to the frozen T5 decoder as cross-attention memory and score
the text it should read back with cross-entropy (paper eqs. 2 and 4):

- **LVLM random split** (section 3.3): the LVLM's generated tokens and their features are cut at a
  random point; the features *before* the cut are the memory and the generated text *after* the
  cut is the target, which breaks the one-to-one "shortcut mapping" between features and tokens.
  As released: ``split = randint(1, min(L - 1, max_split))``; the target tokens are decoded with
  the LVLM tokenizer and re-tokenised for T5 with EOS. ``split=False`` is the paper's ablation
  without masked training (memory = all features, target = all text); ``features="prompt"`` is the
  ablation that uses the prompt ("input") tokens' features instead of the generated ones.
- **CLIP caption continuation** (section 3.4): memory = aligned image tokens followed by the T5
  encoder states of the caption's first part; target = the caption's second part.

Collators run on CPU in data-loader workers (they only need tokenizers); the loss functions run on
the training device. Each sample's random cut is drawn from an RNG seeded by (seed, epoch, key), so
a resumed run makes exactly the same cuts without saving any RNG state.

Shapes: B batch, L feature tokens, H VLM width, M memory tokens, T target tokens, D T5 d_model.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from thinkdiff.models.aligner import Aligner
from thinkdiff.models.proxy_decoder import ProxyT5Decoder

logger = logging.getLogger(__name__)

DEFAULT_MAX_SPLIT = 128
DEFAULT_MAX_TARGET_TOKENS = 128
CLIP_MAX_CAPTION_WORDS = 50
CLIP_MAX_TEXT_TOKENS = 32
_CAPTION_STRIP = re.compile(r'[.!"()*#:;~]')


def sample_rng(seed: int, epoch: int, key: str) -> random.Random:
    """An RNG for one sample, identical on every rank, worker and restart."""
    return random.Random(f"{seed}:{epoch}:{key}")


def random_cut(seed: int, epoch: int, key: str, length: int, max_split: int) -> int:
    """The released code's cut ``randint(1, min(length - 1, max_split))``, drawn per sample."""
    if length < 2:
        raise ValueError(f"sample {key!r} has {length} generated token(s); the random split needs at least 2")
    return sample_rng(seed, epoch, key).randint(1, min(length - 1, max_split))


@dataclass(frozen=True)
class CutLength:
    """Bucketing key for feature batches: a sample's memory length under the random split.

    Memory = ``features[:cut]`` and target = ``tokens[cut:]``, so samples of similar cut also have
    similar targets: batching them together removes most padding on both sides.
    """

    seed: int
    max_split: int
    split: bool = True

    @property
    def fingerprint(self) -> str:
        return f"cut:{self.seed}:{self.max_split}:{self.split}"

    def __call__(self, key: str, length: int, epoch: int) -> int:
        if not self.split or length < 2:
            return length
        return random_cut(self.seed, epoch, key, length, self.max_split)


def t5_target_ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int) -> torch.Tensor:
    """T5 label ids ``[B, T]``: EOS appended by the tokenizer, truncated, padding set to -100."""
    enc = tokenizer(list(texts), max_length=max_length, truncation=True, padding=True, return_tensors="pt")
    return enc.input_ids.masked_fill(enc.attention_mask == 0, -100)


def pad_features(features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``[L_i, H]`` tensors to ``[B, max L, H]`` and return them with a bool mask ``[B, L]``."""
    if not features:
        raise ValueError("cannot pad an empty list of features")
    width = features[0].shape[-1]
    length = max(f.shape[0] for f in features)
    out_BLH = torch.empty(len(features), length, width, dtype=features[0].dtype)
    if torch.utils.data.get_worker_info() is not None:
        # In a data-loader worker, pad straight into shared memory: otherwise the whole batch is
        # copied once more to be sent to the trainer (halves read throughput at real dims).
        out_BLH.share_memory_()
    out_BLH.zero_()
    mask_BL = torch.zeros(len(features), length, dtype=torch.bool)
    for i, f in enumerate(features):
        if f.ndim != 2 or f.shape[-1] != width:
            raise ValueError(f"feature {i} has shape {list(f.shape)}, expected [tokens, {width}]")
        out_BLH[i, : f.shape[0]] = f
        mask_BL[i, : f.shape[0]] = True
    return out_BLH, mask_BL


# ----------------------------------------------------------------------------- ThinkDiff-LVLM
@dataclass
class LVLMBatch:
    """A collated ThinkDiff-LVLM batch (memory features still in the VLM's space)."""

    features_BLH: torch.Tensor
    mask_BL: torch.Tensor
    labels_BT: torch.Tensor
    target_texts: list[str]
    keys: list[str]
    splits: list[int]
    token_ids: list[list[int]] = field(default_factory=list)
    """The LVLM's token ids of each target (calibration's per-position regression aligns them)."""

    def to(self, device: torch.device | str) -> LVLMBatch:
        return LVLMBatch(
            self.features_BLH.to(device, non_blocking=True),
            self.mask_BL.to(device, non_blocking=True),
            self.labels_BT.to(device, non_blocking=True),
            self.target_texts,
            self.keys,
            self.splits,
            self.token_ids,
        )

    def padding_fraction(self) -> float:
        """Share of memory and target positions that are padding (compute spent on nothing)."""
        real = self.mask_BL.sum().item() + (self.labels_BT != -100).sum().item()
        return 1.0 - real / (self.mask_BL.numel() + self.labels_BT.numel())


class LVLMSplitCollator:
    """Collate feature-shard samples into memory + target for the proxy objective.

    A sample is a dict with ``key``, ``features`` ``[N, H]``, ``token_ids`` ``[N]`` and, for the
    input-token ablation, ``prompt_features`` ``[P, H]``; an optional ``feature_mask`` ``[N]``
    marks valid tokens (those up to an early EOS) and an optional ``epoch`` varies the cuts.

    Args:
        lvlm_tokenizer: decodes generated token ids to text.
        t5_tokenizer: re-tokenises the target text for the proxy T5.
        split: the paper's random masked training; ``False`` is the no-split ablation.
        max_split: upper bound of the cut (128 in the released code).
        max_target_tokens: T5 target length cap (128 in the released code).
        features: ``"generated"`` (the method) or ``"prompt"`` (the input-token ablation: memory
            = prompt-token features, target = the whole generated text).
        seed: base seed of the per-sample cuts.
    """

    def __init__(
        self,
        lvlm_tokenizer: PreTrainedTokenizerBase,
        t5_tokenizer: PreTrainedTokenizerBase,
        *,
        split: bool = True,
        max_split: int = DEFAULT_MAX_SPLIT,
        max_target_tokens: int = DEFAULT_MAX_TARGET_TOKENS,
        features: Literal["generated", "prompt"] = "generated",
        seed: int = 0,
    ) -> None:
        if max_split < 1:
            raise ValueError(f"max_split must be >= 1, got {max_split}")
        if features not in ("generated", "prompt"):
            raise ValueError(f"features must be 'generated' or 'prompt', got {features!r}")
        self.lvlm_tokenizer = lvlm_tokenizer
        self.t5_tokenizer = t5_tokenizer
        self.split = split
        self.max_split = max_split
        self.max_target_tokens = max_target_tokens
        self.features = features
        self.seed = seed

    def cut(self, key: str, length: int, epoch: int = 0) -> int:
        """Where sample ``key`` of ``length`` valid tokens is cut: memory ``[:cut]``, target ``[cut:]``."""
        if not self.split or self.features == "prompt":
            return length
        return random_cut(self.seed, epoch, key, length, self.max_split)

    def __call__(self, samples: Sequence[dict[str, Any]]) -> LVLMBatch:
        memories, targets, keys, cuts, target_ids_list = [], [], [], [], []
        for sample in samples:
            token_ids = torch.as_tensor(sample["token_ids"])
            length = int(sample["feature_mask"].sum()) if "feature_mask" in sample else token_ids.shape[0]
            if self.split and self.features == "generated" and length < 2:
                # Generation stopped at once: nothing to split. Rare; dropped rather than crash a run.
                logger.warning(
                    "dropping sample %r: %d generated token(s) cannot be split", sample["key"], length
                )
                continue
            cut = self.cut(sample["key"], length, sample.get("epoch", 0))
            if self.features == "prompt":
                memory = sample["prompt_features"]
                if "prompt_mask" in sample:
                    memory = memory[sample["prompt_mask"].bool()]
                target_ids = token_ids[:length]
            else:
                memory = sample["features"][:cut]
                target_ids = token_ids[cut:length] if self.split else token_ids[:length]
            memories.append(memory)
            target_ids_list.append(target_ids.tolist())
            targets.append(self.lvlm_tokenizer.decode(target_ids_list[-1], skip_special_tokens=True))
            keys.append(sample["key"])
            cuts.append(cut)
        if not memories:
            raise ValueError(f"no usable sample in batch {[s['key'] for s in samples]}")
        features_BLH, mask_BL = pad_features(memories)
        labels_BT = t5_target_ids(self.t5_tokenizer, targets, self.max_target_tokens)
        return LVLMBatch(features_BLH, mask_BL, labels_BT, targets, keys, cuts, target_ids_list)


def lvlm_loss(aligner: Aligner, proxy: ProxyT5Decoder, batch: LVLMBatch) -> torch.Tensor:
    """Cross-entropy of the target text decoded by the frozen T5 from the aligned features."""
    memory_BLD = aligner(batch.features_BLH)
    return proxy.loss(memory_BLD, batch.mask_BL, batch.labels_BT)


@torch.no_grad()
def lvlm_decode(
    aligner: Aligner, proxy: ProxyT5Decoder, batch: LVLMBatch, max_new_tokens: int = 64
) -> list[str]:
    """Greedy T5 text from the aligned memory: what the alignment tells the decoder."""
    return proxy.generate_text(aligner(batch.features_BLH), batch.mask_BL, max_new_tokens)


# ----------------------------------------------------------------------------- ThinkDiff-CLIP
def clean_caption(text: str, max_words: int = CLIP_MAX_CAPTION_WORDS) -> str:
    """Lowercase, drop the characters ``.!"()*#:;~``, keep at most ``max_words`` words."""
    return " ".join(_CAPTION_STRIP.sub("", text.lower()).split()[:max_words])


def split_caption(caption: str, rng: random.Random) -> tuple[str, str]:
    """Cut a cleaned caption at a random word boundary into two non-empty parts."""
    words = caption.split()
    if len(words) < 2:
        raise ValueError(
            f"caption {caption!r} has fewer than 2 words; it cannot be split into input and target"
        )
    cut = rng.randint(1, len(words) - 1)
    return " ".join(words[:cut]), " ".join(words[cut:])


@dataclass
class CLIPBatch:
    """A collated ThinkDiff-CLIP batch."""

    pixel_values_BCHW: torch.Tensor
    text_ids_BT: torch.Tensor
    text_mask_BT: torch.Tensor
    labels_BT: torch.Tensor
    inputs: list[str]
    target_texts: list[str]
    keys: list[str]

    def to(self, device: torch.device | str) -> CLIPBatch:
        return CLIPBatch(
            self.pixel_values_BCHW.to(device, non_blocking=True),
            self.text_ids_BT.to(device, non_blocking=True),
            self.text_mask_BT.to(device, non_blocking=True),
            self.labels_BT.to(device, non_blocking=True),
            self.inputs,
            self.target_texts,
            self.keys,
        )


class CLIPCaptionCollator:
    """Collate ``{key, pixel_values [3, S, S], caption}`` samples for caption continuation."""

    def __init__(
        self,
        t5_tokenizer: PreTrainedTokenizerBase,
        *,
        max_text_tokens: int = CLIP_MAX_TEXT_TOKENS,
        seed: int = 0,
        empty_first: float = 0.0,
    ) -> None:
        self.t5_tokenizer = t5_tokenizer
        self.max_text_tokens = max_text_tokens
        self.seed = seed
        # Fraction of captions whose first part is empty: the image tokens alone carry the input.
        self.empty_first = empty_first

    def __call__(self, samples: Sequence[dict[str, Any]]) -> CLIPBatch:
        firsts, seconds, kept = [], [], []
        for sample in samples:
            caption = clean_caption(sample["caption"])
            if len(caption.split()) < 2:
                logger.warning("dropping sample %r: caption %r is too short to split", sample["key"], caption)
                continue
            rng = sample_rng(self.seed, sample.get("epoch", 0), sample["key"])
            # Drawn only when asked for, so that the default keeps the released cuts exactly.
            if self.empty_first and rng.random() < self.empty_first:
                first, second = "", caption
            else:
                first, second = split_caption(caption, rng)
            firsts.append(first)
            seconds.append(second)
            kept.append(sample)
        if not kept:
            raise ValueError(f"no usable caption in batch {[s['key'] for s in samples]}")
        samples = kept
        enc = self.t5_tokenizer(
            firsts, max_length=self.max_text_tokens, truncation=True, padding=True, return_tensors="pt"
        )
        return CLIPBatch(
            pixel_values_BCHW=torch.stack([s["pixel_values"] for s in samples]),
            text_ids_BT=enc.input_ids,
            text_mask_BT=enc.attention_mask.bool(),
            labels_BT=t5_target_ids(self.t5_tokenizer, seconds, self.max_text_tokens),
            inputs=firsts,
            target_texts=seconds,
            keys=[s["key"] for s in samples],
        )


def clip_memory(
    image_tokens_BND: torch.Tensor, aligner: Aligner, proxy: ProxyT5Decoder, batch: CLIPBatch
) -> tuple[torch.Tensor, torch.Tensor]:
    """Memory = aligned image tokens, then T5 encoder states of the caption's first part."""
    return aligned_clip_memory(aligner(image_tokens_BND), proxy, batch)


def aligned_clip_memory(
    aligned_BND: torch.Tensor, proxy: ProxyT5Decoder, batch: CLIPBatch
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`clip_memory` from image tokens already through the aligner."""
    image_BND = aligned_BND.to(proxy.dtype)
    text_BTD = proxy.encode(batch.text_ids_BT, batch.text_mask_BT)
    image_mask_BN = torch.ones(image_BND.shape[:2], dtype=torch.bool, device=image_BND.device)
    memory = torch.cat([image_BND, text_BTD.to(image_BND.device)], dim=1)
    mask = torch.cat([image_mask_BN, batch.text_mask_BT.to(image_BND.device)], dim=1)
    return memory, mask


def clip_loss(
    image_tokens_BND: torch.Tensor, aligner: Aligner, proxy: ProxyT5Decoder, batch: CLIPBatch
) -> torch.Tensor:
    """Cross-entropy of the caption's second part given the image tokens and the first part."""
    memory, mask = clip_memory(image_tokens_BND, aligner, proxy, batch)
    return proxy.loss(memory, mask, batch.labels_BT)


@torch.no_grad()
def clip_decode(
    image_tokens_BND: torch.Tensor,
    aligner: Aligner,
    proxy: ProxyT5Decoder,
    batch: CLIPBatch,
    max_new_tokens: int = 32,
) -> list[str]:
    """Greedy T5 continuation of each caption's first part given the image."""
    memory, mask = clip_memory(image_tokens_BND, aligner, proxy, batch)
    return proxy.generate_text(memory, mask, max_new_tokens)
