"""The offline tiny-model kit: every component ThinkDiff touches, tiny, random, in hub format.

Each folder is written with the real classes' ``save_pretrained``, so the same
``from_pretrained`` code that loads the hub checkpoints loads these; nothing is downloaded.
:func:`make_tiny_models` writes the whole kit; the ``save_tiny_*`` builders write one component.
The widths that must agree across components are listed in :data:`TINY_DIMS`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from thinkdiff.tiny.blip2 import BLIP2_VISION_HIDDEN, save_tiny_blip2_vision
from thinkdiff.tiny.cogvideox import COGVIDEOX_MAX_TEXT_SEQ_LENGTH, save_tiny_cogvideox
from thinkdiff.tiny.flux import CLIP_TEXT_HIDDEN, save_tiny_flux
from thinkdiff.tiny.llava import save_tiny_llava
from thinkdiff.tiny.t5 import T5_D_MODEL, T5_VOCAB_SIZE, save_tiny_t5
from thinkdiff.tiny.t5_decoders import (
    SD3_CLIP_G_HIDDEN,
    SD3_CLIP_L_HIDDEN,
    save_tiny_chroma,
    save_tiny_ltx_video,
    save_tiny_pixart_sigma,
    save_tiny_sd3,
)
from thinkdiff.tiny.tokenizers import T5_EOS_ID, T5_PAD_ID, T5_SPM_VOCAB_SIZE, T5_UNK_ID
from thinkdiff.utils import atomic_path, atomic_write_text

__all__ = [
    "COMPONENTS",
    "TINY_DIMS",
    "make_tiny_models",
    "save_tiny_blip2_vision",
    "save_tiny_chroma",
    "save_tiny_cogvideox",
    "save_tiny_flux",
    "save_tiny_llava",
    "save_tiny_ltx_video",
    "save_tiny_pixart_sigma",
    "save_tiny_qwen2_5_vl",
    "save_tiny_qwen2_vl",
    "save_tiny_sd3",
    "save_tiny_t5",
]

QWEN_HIDDEN = 64

TINY_DIMS: dict[str, int] = {
    # The T5 width is the prompt space the aligner writes into: all three must agree.
    "t5_d_model": T5_D_MODEL,
    "flux_joint_attention_dim": T5_D_MODEL,
    "cogvideox_text_embed_dim": T5_D_MODEL,
    "chroma_joint_attention_dim": T5_D_MODEL,
    "pixart_caption_channels": T5_D_MODEL,
    "sd3_joint_attention_dim": T5_D_MODEL,
    "ltx_caption_channels": T5_D_MODEL,
    # SD3's pooled vector = pooled CLIP-L + CLIP-G; its CLIP block is their states side by side.
    "sd3_pooled_projection_dim": SD3_CLIP_L_HIDDEN + SD3_CLIP_G_HIDDEN,
    # FLUX's pooled prompt embedding = CLIP text width.
    "flux_pooled_projection_dim": CLIP_TEXT_HIDDEN,
    "cogvideox_max_text_seq_length": COGVIDEOX_MAX_TEXT_SEQ_LENGTH,
    # Aligner input widths.
    "qwen_hidden": QWEN_HIDDEN,
    "blip2_vision_hidden": BLIP2_VISION_HIDDEN,
    "blip2_vision_tokens": 257,  # 224 px / patch 14 = 16x16 patches + CLS
    # T5 vocabulary: embedding rows > tokenizer length, as in the real checkpoints.
    "t5_vocab_size": T5_VOCAB_SIZE,
    "t5_tokenizer_len": T5_SPM_VOCAB_SIZE + 100,
    "t5_pad_id": T5_PAD_ID,
    "t5_eos_id": T5_EOS_ID,
    "t5_unk_id": T5_UNK_ID,
}
"""Dimensions and ids that must agree between the tiny components (and that tests rely on)."""


def save_tiny_qwen2_vl(path: Path, seed: int = 0) -> Path:
    """Write a tiny Qwen2-VL (see :mod:`thinkdiff.tiny.qwen`) into ``path``."""
    from thinkdiff.tiny.qwen import save_tiny_qwen_vl

    return save_tiny_qwen_vl(path, kind="qwen2_vl", seed=seed)


def save_tiny_qwen2_5_vl(path: Path, seed: int = 0) -> Path:
    """Write a tiny Qwen2.5-VL (see :mod:`thinkdiff.tiny.qwen`) into ``path``."""
    from thinkdiff.tiny.qwen import save_tiny_qwen_vl

    return save_tiny_qwen_vl(path, kind="qwen2_5_vl", seed=seed)


COMPONENTS: dict[str, Callable[[Path, int], Path]] = {
    "qwen2-vl": save_tiny_qwen2_vl,
    "qwen2.5-vl": save_tiny_qwen2_5_vl,
    "t5": save_tiny_t5,
    "flux": save_tiny_flux,
    "blip2-vision": save_tiny_blip2_vision,
    "cogvideox": save_tiny_cogvideox,
    "llava": save_tiny_llava,
    "chroma": save_tiny_chroma,
    "pixart-sigma": save_tiny_pixart_sigma,
    "sd3": save_tiny_sd3,
    "ltx-video": save_tiny_ltx_video,
}
"""Component name (= subfolder) -> builder ``(path, seed) -> path``."""


def make_tiny_models(root: Path, seed: int = 0) -> dict[str, Path]:
    """Write every tiny component into ``root/<name>`` and a ``root/manifest.json``; return name -> folder.

    Each component is built in a temporary folder beside its target and renamed into place, so an
    interrupted run never leaves a half-written component; a rerun replaces what is there.
    """
    from transformers.utils import logging as hf_logging

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    # One "Writing model shards" bar per save is noise at this size.
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        paths: dict[str, Path] = {}
        for name, build in COMPONENTS.items():
            with atomic_path(root / name) as tmp:
                tmp.mkdir()  # builders write into an existing folder
                build(tmp, seed)
            paths[name] = root / name
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()

    manifest = {
        "seed": seed,
        "dims": TINY_DIMS,
        "components": {name: {"path": name, **_describe(path)} for name, path in paths.items()},
    }
    atomic_write_text(root / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return paths


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _describe(folder: Path) -> dict[str, Any]:
    """Class names and key widths of a saved component, read back from its own files."""
    index = _read_json(folder / "model_index.json")
    if index:  # a diffusers pipeline: model_index.json maps component -> [library, class]
        classes = {"pipeline": index["_class_name"]}
        classes |= {k: v[1] for k, v in index.items() if isinstance(v, list) and v[1] is not None}
        dims = {}
        transformer = _read_json(folder / "transformer" / "config.json")
        for key in (
            "joint_attention_dim",
            "pooled_projection_dim",
            "text_embed_dim",
            "max_text_seq_length",
            "caption_channels",
        ):
            if key in transformer:
                dims[key] = transformer[key]
        # The T5 is text_encoder_3 in SD3, text_encoder_2 in FLUX, text_encoder elsewhere.
        t5 = next(name for name in ("text_encoder_3", "text_encoder_2", "text_encoder") if name in index)
        text_encoder = _read_json(folder / t5 / "config.json")
        dims["t5_d_model"] = text_encoder.get("d_model")
        return {"classes": classes, "dims": dims}

    config = _read_json(folder / "config.json")
    classes = {"model": config.get("architectures", [None])[0]}
    tokenizer = _read_json(folder / "tokenizer_config.json")
    if tokenizer:
        classes["tokenizer"] = tokenizer.get("tokenizer_class")
    processor = _read_json(folder / "processor_config.json")
    if processor.get("processor_class"):
        classes["processor"] = processor["processor_class"]
    image_processor = _read_json(folder / "preprocessor_config.json") or processor.get("image_processor", {})
    if image_processor.get("image_processor_type"):
        classes["image_processor"] = image_processor["image_processor_type"]
    text = config.get("text_config", config)
    dims = {
        "model_type": config.get("model_type"),
        "hidden_size": text.get("hidden_size", text.get("d_model")),
    }
    if "vocab_size" in text:
        dims["vocab_size"] = text["vocab_size"]
    return {"classes": classes, "dims": dims}
