"""The miniature world's two tokenizers, built locally and deterministically.

- The mini T5 gets a word-level sentencepiece (unigram) vocabulary: every caption word is one piece
  (``▁red``), with single characters as a fallback so that any text still encodes. This is the
  ``T5TokenizerFast`` layout of the real checkpoints (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, sentinels
  ``<extra_id_N>`` at the top).
- The mini Qwen2-VL gets Qwen2's byte-level BPE, trained on the world's captions, prompts and
  instructions, with Qwen's special tokens and chat template (see :mod:`thinkdiff.tiny.qwen`).
  The fixed sentences of the protocol (the system prompt, the world's CoBSAT instruction, the 16
  description prompts, ``Picture k: ``, ``Word k: ``) are *added tokens*, one id each, matched in
  the raw text like any added token: the prompts keep their exact wording while a 4-shot sequence
  stays under 80 tokens, which is what makes training on a CPU affordable.

The world's instruction (:data:`MINI_INSTRUCTION`) is the release's without its closing blank line:
the VLM was trained on it before the blank line was found. The VLM's folder records it
(:data:`thinkdiff.models.lvlm.PROMPT_FILE`), so the prompt code renders this world's prompts with
it and its measured numbers stay those of the prompts it learnt.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import TYPE_CHECKING

from thinkdiff.data.extraction import DESCRIPTION_PROMPTS
from thinkdiff.miniworld.world import COLORS, SHAPES, TEXTURES, caption

if TYPE_CHECKING:
    from transformers import Qwen2Tokenizer, T5TokenizerFast

__all__ = [
    "CAPTION_WORDS",
    "MINI_INSTRUCTION",
    "PHRASE_TOKENS",
    "T5_EXTRA_IDS",
    "VLM_VOCAB_SIZE",
    "qwen_tokenizer",
    "t5_tokenizer",
    "vlm_corpus",
]

CAPTION_WORDS: tuple[str, ...] = ("a", "an", "on", "background", *COLORS, *SHAPES, *TEXTURES)
"""Every word a caption of the world can contain."""
T5_EXTRA_IDS = 8
"""Sentinels of the mini T5 (the real T5 has 100); ``<extra_id_0>`` masks words in training."""
VLM_VOCAB_SIZE = 768
"""Byte-level BPE size asked of the trainer (14 specials + 256 bytes + merges; the small corpus
runs out of merges before it); the phrase tokens come on top."""
MINI_INSTRUCTION = (
    "I give you several words and pictures. First, please analyse what the next picture is. "
    "Then give me a detailed diffusion prompt to describe the next picture. Please only provide "
    "me the detailed prompt and start the answer with 'Create an image'."
)
"""The instruction the mini VLM was trained to read: the release's (``DEFAULT_INSTRUCTION``)
without its closing blank line, one added token."""
_FALLBACK_CHARS = string.ascii_lowercase + string.digits + ".,:;!?'\"-()/"
PHRASE_TOKENS: tuple[str, ...] = (
    "You are a helpful assistant.",
    MINI_INSTRUCTION,
    *DESCRIPTION_PROMPTS,
    *(f"Picture {k}: " for k in range(1, 9)),
    *(f"Word {k}: " for k in range(1, 10)),
)
"""Whole sentences that the mini VLM's tokenizer maps to one id each (see the module docstring)."""


def t5_tokenizer() -> T5TokenizerFast:
    """A T5 tokenizer whose pieces are the caption words (plus a character fallback)."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(f"▁{w}", -1.0) for w in CAPTION_WORDS]
    # Characters cost far more than words, so the unigram model only falls back to them for
    # words outside the world (e.g. a VLM that misspells).
    vocab += [("▁", -8.0)] + [(c, -10.0) for c in _FALLBACK_CHARS]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(T5_EXTRA_IDS))]
    return T5TokenizerFast(vocab=vocab, extra_ids=T5_EXTRA_IDS, model_max_length=64)


def vlm_corpus() -> list[str]:
    """Text the VLM tokenizer is trained on: captions, instructions, prompts, CoBSAT word items."""
    lines = [MINI_INSTRUCTION] * 20 + list(DESCRIPTION_PROMPTS) * 4 + ["You are a helpful assistant."] * 4
    for i, shape in enumerate(SHAPES):
        for j, colour in enumerate(COLORS):
            texture = TEXTURES[(i + j) % len(TEXTURES)]
            background = COLORS[(j + 3) % len(COLORS)]
            lines.append(caption(shape, colour, texture, background))
            lines.append(caption(shape, colour))
            lines.append(caption(shape, texture=texture))
            lines.append(caption(shape, background=background))
    # After a phrase token a word starts without its space: bare forms need merges too.
    lines += ["system", "user", "assistant"] * 20
    for word in (*COLORS, *SHAPES, *TEXTURES):
        lines += [f"{word}, "] * 4
    return lines


def qwen_tokenizer() -> Qwen2Tokenizer:
    """Qwen2's tokenizer (byte-level BPE) over a vocabulary trained on :func:`vlm_corpus`, plus the
    protocol's fixed sentences as single added tokens."""
    from tokenizers import AddedToken

    from thinkdiff.tiny.qwen import qwen_tokenizer as build_qwen_tokenizer

    tokenizer = build_qwen_tokenizer(VLM_VOCAB_SIZE, vlm_corpus(), model_max_length=4096)
    tokenizer.add_tokens([AddedToken(p, normalized=False, special=False) for p in PHRASE_TOKENS])
    return tokenizer


def save_t5_tokenizer(folder: Path) -> Path:
    """Write :func:`t5_tokenizer` into ``folder`` (loads with ``AutoTokenizer.from_pretrained``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    t5_tokenizer().save_pretrained(folder)
    return folder
