"""Tiny T5 models: the proxy decoder (flan-t5 style) and the T5 text encoders of FLUX and CogVideoX."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import T5Config, T5EncoderModel, T5ForConditionalGeneration

from thinkdiff.tiny.tokenizers import T5_EOS_ID, T5_PAD_ID, save_t5_tokenizer

__all__ = ["T5_D_MODEL", "T5_VOCAB_SIZE", "save_tiny_t5", "tiny_t5_config", "tiny_t5_encoder"]

T5_D_MODEL = 32
"""Width of every tiny T5 (proxy decoder, FLUX text_encoder_2, CogVideoX text encoder)."""

T5_VOCAB_SIZE = 384
"""Embedding rows of the tiny T5 models. Larger than the tokenizer (324 tokens), like the real
models (32128 rows for 32100 tokens): code must not assume the two are equal."""


def tiny_t5_config(**overrides: object) -> T5Config:
    """A T5 v1.1 / flan-t5 style config at tiny width (gated-GELU, untied embeddings, dropout 0.1)."""
    kwargs: dict[str, object] = {
        "vocab_size": T5_VOCAB_SIZE,
        "d_model": T5_D_MODEL,
        "d_kv": 8,
        "num_heads": 4,
        "d_ff": 64,
        "num_layers": 2,
        "num_decoder_layers": 2,
        # Few buckets: sequences in tests are short; the real models use 32 / 128.
        "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 32,
        "dropout_rate": 0.1,
        "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False,
        "pad_token_id": T5_PAD_ID,
        "eos_token_id": T5_EOS_ID,
        # T5 starts decoding from <pad>.
        "decoder_start_token_id": T5_PAD_ID,
    }
    kwargs.update(overrides)
    return T5Config(**kwargs)


def tiny_t5_encoder(seed: int = 0) -> T5EncoderModel:
    """A random tiny ``T5EncoderModel`` (T5 v1.1 family, like FLUX's ``text_encoder_2``)."""
    torch.manual_seed(seed)
    return T5EncoderModel(tiny_t5_config()).eval()


def save_tiny_t5(path: Path, seed: int = 0) -> Path:
    """Write a tiny flan-t5 style ``T5ForConditionalGeneration`` and its tokenizer into ``path``.

    Like flan-t5: gated-GELU, dropout 0.1, decoder starts from <pad> (id 0), a separate ``lm_head``
    and no rescaling of decoder outputs (``config.scale_decoder_outputs`` is False).

    The encoder's ``final_layer_norm.weight`` is drawn uniformly from [0.5, 1.5] instead of the
    all-ones init, so a test can tell whether the aligner's norm was copied from it.
    """
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(tiny_t5_config())
    # transformers 5.x forces ``tie_word_embeddings=True`` on every T5 (the v1.1 "untied" flag
    # survives only as ``scale_decoder_outputs=False``), so the new model's lm_head *is* the input
    # embedding. flan-t5 checkpoints store a separate lm_head, which from_pretrained keeps untied
    # because the two tensors differ; give the tiny one its own lm_head too (T5's init for an
    # untied head: N(0, 1)) so the kit goes through the same path.
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight))
    with torch.no_grad():
        model.encoder.final_layer_norm.weight.uniform_(0.5, 1.5)
    path = Path(path)
    model.save_pretrained(path)
    save_t5_tokenizer(path)
    return path
