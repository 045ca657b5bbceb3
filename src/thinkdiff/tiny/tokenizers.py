"""Tokenizers for the tiny offline kit, trained locally on a small caption-like corpus.

Nothing here touches a hub: the byte-level BPE (GPT-2 / Qwen / Llama-3 style) is trained with the
``tokenizers`` library, CLIP's BPE by a small trainer of its own (:func:`_train_bpe`), and the T5
tokenizer is a sentencepiece unigram model trained with ``sentencepiece``, all on
:data:`TINY_CORPUS`, deterministically (tested: the same files from run to run).
"""

from __future__ import annotations

import collections
import functools
import itertools
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from thinkdiff.evaluation.cobsat.protocol import ITEMS, shown

__all__ = [
    "T5_EOS_ID",
    "T5_PAD_ID",
    "T5_SPM_VOCAB_SIZE",
    "T5_UNK_ID",
    "TINY_CORPUS",
    "byte_level_bpe",
    "save_clip_tokenizer",
    "save_t5_tokenizer",
]

# T5 conventions (google/t5-v1_1-*, google/flan-t5-*): the decoder start token is <pad>.
T5_PAD_ID = 0
T5_EOS_ID = 1
T5_UNK_ID = 2
T5_SPM_VOCAB_SIZE = 224
"""Pieces of the tiny sentencepiece model; the tokenizer adds 100 ``<extra_id_N>`` (324 tokens).
As large as the small corpus allows (sentencepiece refuses more than ~245)."""

# CoBSAT's vocabulary (colours, objects, animals, styles, actions, backgrounds, textures), as shown in text.
COLORS, OBJECTS, ANIMALS, STYLES, ACTIONS, BACKGROUNDS, TEXTURES = (
    [shown(word) for word in ITEMS[theme]]
    for theme in ("color", "object", "animal", "style", "action", "background", "texture")
)

_OPENERS = ["a photo of", "an image of", "a picture of", "create an image of", "describe"]
_ACTION_VERBS = {
    "swim": "swimming",
    "sleep": "sleeping",
    "sing": "singing",
    "run": "running",
    "read": "reading",
    "fly": "flying",
    "eat": "eating",
    "drink": "drinking",
    "cry": "crying",
    "angry": "looking angry",
}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _build_corpus() -> list[str]:
    """Caption-like sentences cycling through the vocabulary lists in lock-step (no RNG needed).

    Different list lengths and strides make the combinations vary while staying deterministic.
    """
    lines: list[str] = []
    for i in range(300):
        color = COLORS[i % 10]
        obj = OBJECTS[(i * 3) % 10]
        animal = ANIMALS[(i * 7) % 10]
        style = STYLES[(i // 3) % 10]
        action = ACTIONS[(i * 9 + 1) % 10]
        bg = BACKGROUNDS[(i // 2 + i) % 10]
        texture = TEXTURES[(i * 3 + i // 10) % 10]
        opener = _OPENERS[i % len(_OPENERS)]
        kind = i % 6
        if kind == 0:
            line = f"{opener} {_article(color)} {color} {obj} on a {bg} background."
        elif kind == 1:
            line = f"{opener} {_article(animal)} {animal} {_ACTION_VERBS[action]} in the {bg}."
        elif kind == 2:
            line = f"{_article(style).capitalize()} {style} style {animal}, {color} and {texture}!"
        elif kind == 3:
            line = f"Create an image: {i % 10} {color} {obj}s made of {texture}; {style} style."
        elif kind == 4:
            line = f"Describe the {animal}? It is {color}, with a {texture} {obj} (number {i % 10})."
        else:
            line = f'Word {i % 10}: {color}, "{_article(obj)} {obj}" near a {animal} at the {bg}.'
        lines.append(line)
    # Every vocabulary word standing alone, lower and capitalised, so each gets a compact piece.
    for word in itertools.chain(COLORS, OBJECTS, ANIMALS, STYLES, ACTIONS, BACKGROUNDS, TEXTURES):
        lines.append(f"{word} {word.capitalize()}")
    lines.append("0 1 2 3 4 5 6 7 8 9 . , ! ? : ; ' \" ( ) - _ / + = * # % & @")
    return lines


TINY_CORPUS: list[str] = _build_corpus()
"""A few hundred short English caption-like sentences, generated deterministically."""


def byte_level_bpe(vocab_size: int, special_tokens: list[str], corpus: list[str] | None = None) -> Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 / Qwen style) on ``corpus`` (default: :data:`TINY_CORPUS`).

    Special tokens get ids ``0 .. len(special_tokens) - 1`` in the given order, then the 256 byte
    symbols, then the learned merges; so every string is encodable (no unknown token is needed).
    ``vocab_size`` counts the special tokens and must be at least ``len(special_tokens) + 256``.
    Training is single-threaded, hence deterministic.
    """
    n_min = len(special_tokens) + 256
    if vocab_size < n_min:
        raise ValueError(
            f"vocab_size={vocab_size} is below {n_min} (256 bytes + {len(special_tokens)} specials)"
        )
    tok = Tokenizer(models.BPE())
    # GPT-2 style: bytes mapped to printable unicode, spaces carried as the "Ġ" prefix.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False like Qwen2: offsets keep the leading space of a word.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The rayon thread pool could reorder equal-count merges; a single iterator + sorted alphabet
    # keeps the result identical from run to run.
    tok.train_from_iterator(list(corpus if corpus is not None else TINY_CORPUS), trainer=trainer)
    return tok


@functools.lru_cache(maxsize=4)
def _train_sentencepiece(vocab_size: int) -> tuple[tuple[str, float], ...]:
    """Train a T5-style unigram model on :data:`TINY_CORPUS`; its ``(piece, score)`` pairs in id order.

    Cached: the kit writes the same tokenizer into several components.
    """
    with tempfile.TemporaryDirectory() as tmp:
        return tuple(_train_sentencepiece_in(TINY_CORPUS, vocab_size, Path(tmp)))


def _train_sentencepiece_in(corpus: list[str], vocab_size: int, workdir: Path) -> list[tuple[str, float]]:
    import sentencepiece as spm

    text_file = workdir / "corpus.txt"
    text_file.write_text("\n".join(corpus) + "\n", encoding="utf-8")
    prefix = workdir / "spiece"
    # The trainer samples sentences with a global seed; fixing it keeps the vocabulary stable.
    spm.set_random_generator_seed(0)
    spm.SentencePieceTrainer.train(
        input=str(text_file),
        model_prefix=str(prefix),
        model_type="unigram",
        vocab_size=vocab_size,
        # T5 ids: <pad>=0, </s>=1, <unk>=2, no <s>.
        pad_id=T5_PAD_ID,
        eos_id=T5_EOS_ID,
        unk_id=T5_UNK_ID,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        character_coverage=1.0,
        # Digits split one by one and bytes as fallback-free chars, like the T5 vocab.
        split_digits=True,
        num_threads=1,
        minloglevel=2,
    )
    proc = spm.SentencePieceProcessor(model_file=str(prefix) + ".model")
    return [(proc.id_to_piece(i), float(proc.get_score(i))) for i in range(proc.get_piece_size())]


def save_t5_tokenizer(path: str | Path, extra_ids: int = 100, vocab_size: int = T5_SPM_VOCAB_SIZE) -> Path:
    """Write a T5 tokenizer (sentencepiece unigram trained on :data:`TINY_CORPUS`) into ``path``.

    Ids follow T5: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then the learned pieces, then
    ``<extra_id_{extra_ids-1}>`` ... ``<extra_id_0>`` at the top of the vocabulary (total
    ``vocab_size + extra_ids``). Loads with ``AutoTokenizer.from_pretrained(path)`` and
    ``T5TokenizerFast.from_pretrained(path)``.
    """
    from transformers import T5TokenizerFast

    path = Path(path)
    vocab = list(_train_sentencepiece(vocab_size))
    # Like the real T5 vocab, sentinels sit at the top in reverse: <extra_id_0> has the largest id.
    # (Given a ``vocab``, transformers would otherwise append them as added tokens in forward order.)
    vocab += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(extra_ids))]
    # transformers 5.x ignores ``vocab_file`` in the constructor: the vocabulary must be passed as
    # (piece, score) pairs.
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=extra_ids, model_max_length=512)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path)
    return path


def save_clip_tokenizer(path: str | Path, vocab_size: int = 600, model_max_length: int = 77) -> Path:
    """Write a CLIP tokenizer (BPE with ``</w>`` word ends, trained on :data:`TINY_CORPUS`) into ``path``.

    Ids: ``<|startoftext|>`` 0 (bos), ``<|endoftext|>`` 1 (eos, pad and unk, as in OpenAI CLIP),
    then the byte alphabet, then merges. Every byte also exists in its word-final ``</w>`` form, so
    any text encodes without unknown tokens. Loads with ``CLIPTokenizer.from_pretrained(path)``.
    """
    from transformers import CLIPTokenizer

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    # CLIP's own normalizer and pre-tokenizer (lowercase, its split regex, byte-level), taken from a
    # throwaway CLIPTokenizer so the two cannot drift apart.
    reference = CLIPTokenizer(vocab={bos: 0, eos: 1}, merges=[]).backend_tokenizer
    words: collections.Counter[tuple[str, ...]] = collections.Counter()
    for line in TINY_CORPUS:
        for word, _ in reference.pre_tokenizer.pre_tokenize_str(reference.normalizer.normalize_str(line)):
            words[(*word[:-1], word[-1] + "</w>")] += 1
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    word_ends = sorted({w[-1] for w in words})
    merges = _train_bpe(words, vocab_size - 2 - len(alphabet) - len(word_ends))
    pieces = [bos, eos, *alphabet, *word_ends, *("".join(m) for m in merges)]
    pieces += [c + "</w>" for c in alphabet if c + "</w>" not in set(word_ends)]
    vocab = {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path)
    return path


def _train_bpe(words: collections.Counter[tuple[str, ...]], num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE training on symbol sequences with their counts: ``num_merges`` merges, each the most
    frequent adjacent pair, ties broken by the pair itself.

    Used where the ``tokenizers`` trainer is not reproducible: with an end-of-word suffix it orders
    equal-count merges differently from run to run.
    """
    words = collections.Counter(words)
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for word, count in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += count
        if not pairs:
            break  # every word is a single symbol: nothing left to merge
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged: collections.Counter[tuple[str, ...]] = collections.Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i : i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges
