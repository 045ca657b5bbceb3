"""Shared by the benchmarks: Flan-T5-XXL's real dimensions and width-scaled copies of it."""

from __future__ import annotations

XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 32128}
"""google/flan-t5-xxl (and t5-v1_1-xxl, FLUX.1's text encoder family)."""

QWEN2VL_7B_HIDDEN = 3584


def scaled_t5_config(scale: int, **overrides: object):
    """A gated-GELU T5 shaped like Flan-T5-XXL with widths divided by ``scale`` (layers, vocab real)."""
    from transformers import T5Config

    kwargs: dict[str, object] = {
        "d_model": XXL["d_model"] // scale,
        "d_ff": XXL["d_ff"] // scale,
        "d_kv": XXL["d_kv"],
        "num_heads": XXL["num_heads"] // scale,
        "num_layers": XXL["num_layers"],
        "num_decoder_layers": XXL["num_layers"],
        "vocab_size": XXL["vocab_size"],
        "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False,
        "decoder_start_token_id": 0,
    }
    kwargs.update(overrides)
    return T5Config(**kwargs)
