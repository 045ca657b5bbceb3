"""A tiny random Qwen2-VL / Qwen2.5-VL (model + tokenizer + processor) built offline.

The architecture follows the real checkpoints where it matters for the feature-extraction code:
real vision patching (patch 14, temporal patch 2, spatial merge 2), 3-D M-RoPE in the language model,
Qwen's special tokens and the real chat template (with ``add_vision_id``). Only the sizes are tiny:
text hidden size 64, 2 layers, and an image processor whose pixel budget turns a 56x56 image into
4 visual tokens and a 112x112 image into 16.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from thinkdiff.tiny.tokenizers import byte_level_bpe

if TYPE_CHECKING:
    from transformers import PreTrainedModel, Qwen2Tokenizer

__all__ = ["QWEN_CHAT_TEMPLATE", "QWEN_SPECIAL_TOKENS", "save_tiny_qwen_vl"]

# Qwen2's special tokens in their real order (ids 151643.. in the real vocabulary; 0.. here).
QWEN_SPECIAL_TOKENS: list[str] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The chat template shipped with Qwen/Qwen2-VL-7B-Instruct (and Qwen2.5-VL), verbatim.
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_KINDS = ("qwen2_vl", "qwen2_5_vl")
_VOCAB_SIZE = 640  # 14 specials + 256 bytes + merges learned on the tiny corpus
_TEXT_HIDDEN = 64
_MIN_PIXELS = 56 * 56  # -> at least 4 visual tokens per image
_MAX_PIXELS = 112 * 112  # -> at most 16 visual tokens per image


def qwen_tokenizer(
    vocab_size: int = _VOCAB_SIZE, corpus: list[str] | None = None, model_max_length: int = 32768
) -> Qwen2Tokenizer:
    """Qwen2 tokenizer (byte-level BPE trained on ``corpus``, default the tiny corpus) with Qwen's chat template."""
    from transformers import Qwen2Tokenizer

    trained = json.loads(byte_level_bpe(vocab_size, QWEN_SPECIAL_TOKENS, corpus).to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    # Instruct checkpoints stop on <|im_end|> and pad with <|endoftext|>.
    tokenizer = Qwen2Tokenizer(
        vocab=trained["vocab"],
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        # Like the real tokenizer: every Qwen token but <|endoftext|> is an "additional special token".
        extra_special_tokens=QWEN_SPECIAL_TOKENS[1:],
        model_max_length=model_max_length,
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def _text_config(vocab_size: int, ids: dict[str, int]) -> dict:
    return {
        "vocab_size": vocab_size,
        "hidden_size": _TEXT_HIDDEN,
        "intermediate_size": 2 * _TEXT_HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        # M-RoPE splits the rotary frequencies (head_dim / 2 of them) among (t, h, w).
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }


def _model(kind: str, vocab_size: int, ids: dict[str, int]) -> PreTrainedModel:
    """Random-weight Qwen2-VL or Qwen2.5-VL with the tiny sizes."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    token_ids = {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }
    vision_common = {
        "depth": 2,
        "num_heads": 2,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
    }
    if kind == "qwen2_vl":
        vision = vision_common | {"embed_dim": 32, "hidden_size": _TEXT_HIDDEN, "mlp_ratio": 2}
        config = Qwen2VLConfig(text_config=_text_config(vocab_size, ids), vision_config=vision, **token_ids)
        return Qwen2VLForConditionalGeneration(config)
    # 2.5: windowed attention in the vision tower except the listed full-attention blocks.
    vision = vision_common | {
        "hidden_size": 32,
        "intermediate_size": 64,
        "out_hidden_size": _TEXT_HIDDEN,
        "window_size": 56,
        "fullatt_block_indexes": [1],
    }
    config = Qwen2_5_VLConfig(text_config=_text_config(vocab_size, ids), vision_config=vision, **token_ids)
    return Qwen2_5_VLForConditionalGeneration(config)


def _save_processor(folder: Path, kind: str, tokenizer: Qwen2Tokenizer) -> None:
    """Write the processor's parts in the layout of the hub checkpoints (one file per part).

    ``Qwen2VLProcessor`` itself cannot be built here: its video processor needs torchvision, which
    does not work beside the CPU torch build. Like the hub's Qwen2-VL folders, the video processor
    then falls back to ``preprocessor_config.json`` wherever torchvision works, so ``AutoProcessor``
    loads the folder there; :func:`thinkdiff.models.lvlm.load_processor` loads it everywhere.
    """
    from transformers import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(min_pixels=_MIN_PIXELS, max_pixels=_MAX_PIXELS)
    image_processor.save_pretrained(folder)
    tokenizer.save_pretrained(folder)  # also writes chat_template.jinja
    processor_class = "Qwen2VLProcessor" if kind == "qwen2_vl" else "Qwen2_5_VLProcessor"
    (folder / "processor_config.json").write_text(
        json.dumps({"processor_class": processor_class}, indent=2) + "\n"
    )


def save_tiny_qwen_vl(path: Path, kind: str = "qwen2_vl", seed: int = 0) -> Path:
    """Write a tiny random Qwen2-VL (``kind="qwen2_vl"``) or Qwen2.5-VL (``"qwen2_5_vl"``) into ``path``.

    The model loads with ``AutoModelForImageTextToText.from_pretrained(path)``; the processor with
    ``AutoProcessor.from_pretrained(path)`` where torchvision works, and with
    :func:`thinkdiff.models.lvlm.load_processor` everywhere. Weights depend only on ``seed`` (the
    caller's RNG is left untouched). The folder is written beside ``path`` and renamed into place,
    so a reader never sees half of it; an existing ``path`` is replaced.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {_KINDS}")
    from transformers import GenerationConfig

    path = Path(path)
    tokenizer = qwen_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _model(kind, len(tokenizer), ids).eval()
    # Like the Instruct checkpoints: stop on <|im_end|> or <|endoftext|>, pad with <|endoftext|>.
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
    )

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        model.save_pretrained(tmp)
        _save_processor(tmp, kind, tokenizer)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only left on failure
    return path
