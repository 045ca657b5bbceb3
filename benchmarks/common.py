"""Shared by the benchmarks: Flan-T5-XXL's real dimensions and width-scaled copies of it."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from thinkdiff.models.proxy_decoder import ProxyT5Decoder

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


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules in ``dtype`` directly (a bf16 model never exists in fp32 first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def random_proxy_t5(
    device: torch.device | str, dtype: torch.dtype, scale: int = 1, num_decoder_layers: int | None = None
) -> ProxyT5Decoder:
    """The training proxy shaped like Flan-T5-XXL's decoder (widths / ``scale``), random weights.

    Built in place, in ``dtype`` on ``device``: 13 GB in bf16 on a GPU, no fp32 copy and no file.
    Like ``ProxyT5Decoder.from_pretrained`` it has no encoder blocks (only the encoder's final
    norm), no dropout and an LM head of its own: transformers ties every T5Config it builds, while
    the Flan-T5 checkpoints ship an untied head (6.50 B parameters, not 6.37 B).
    """
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    from thinkdiff.models.loading import resolve_tiny
    from thinkdiff.models.proxy_decoder import ProxyT5Decoder

    layers = num_decoder_layers if num_decoder_layers is not None else XXL["num_layers"]
    config = scaled_t5_config(scale, num_layers=0, num_decoder_layers=layers, dropout_rate=0.0, use_cache=False)
    with torch.device(device), default_dtype(dtype):
        t5 = T5ForConditionalGeneration(config)
        # std d_model^-0.5 keeps the logits near unit scale, so the loss starts near ln(vocab).
        head = torch.randn_like(t5.shared.weight) * config.d_model**-0.5
    t5.lm_head.weight = torch.nn.Parameter(head, requires_grad=False)
    t5.config.tie_word_embeddings = False
    # The offline kit's T5 tokenizer (ids within the real 32128 vocabulary) stands in for Flan-T5's.
    tokenizer = AutoTokenizer.from_pretrained(resolve_tiny("tiny:t5"))
    return ProxyT5Decoder(t5.eval(), tokenizer, dropout=False)


def write_scaled_lvlm(folder: Path, width: int) -> Path:
    """The tiny kit's Qwen2-VL tokenizer and config, its hidden size set to ``width``, no weights:
    what the LVLM variant's training reads of its LVLM (the tokenizer decodes the targets; the
    hidden size must be the features' width)."""
    import shutil

    from thinkdiff.models.loading import resolve_tiny

    kit = resolve_tiny("tiny:qwen2-vl")
    shutil.copytree(kit, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    config = json.loads((folder / "config.json").read_text())
    config.setdefault("text_config", {})["hidden_size"] = width
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder
