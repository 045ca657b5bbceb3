"""The mini T5: the real T5 v1.1 / Flan-T5 architecture at width 128, trained on the world's captions.

It plays both of T5's parts in ThinkDiff: its encoder is the mini FLUX's text encoder (FLUX is
trained on its states), and its frozen decoder is the proxy that supervises the aligner. Two
objectives teach the decoder to read encoder states back into text:

- *span autoencoding* (70%): the input is a caption or a contiguous span of one, sometimes with one
  word replaced by ``<extra_id_0>``; the target is the span itself. Spans matter: ThinkDiff-LVLM's
  target is the text after a random cut.
- *continuation* (30%): the input is the first part of a caption followed by ``<extra_id_0>``; the
  target is the rest (ThinkDiff-CLIP's target is the second part of a caption).

The T5 is the world's *language* model: like a real T5, which has read every sentence of its
language, it trains on the captions of every cell, held-out ones included. What no component ever
sees is an *image* of a held-out cell (the decoder, the VLM and the vision encoder train on images
outside them).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
from transformers import T5Config, T5ForConditionalGeneration, T5TokenizerFast

from thinkdiff.miniworld.components.common import cosine_lr, save_losses
from thinkdiff.miniworld.text import save_t5_tokenizer, t5_tokenizer
from thinkdiff.miniworld.world import full_caption, random_caption, sample_scene, scene_rng, theme_caption

__all__ = ["T5_D_MODEL", "build_t5", "caption_batch", "reconstruction_accuracy", "train_t5"]

T5_D_MODEL = 128
"""Width of the mini T5 = FLUX's ``joint_attention_dim`` = the aligner's output width."""


def build_t5(vocab_size: int) -> T5ForConditionalGeneration:
    """A random mini T5 (gated-GELU, separate LM head, decoder starts from ``<pad>``)."""
    config = T5Config(
        vocab_size=vocab_size,
        d_model=T5_D_MODEL,
        d_kv=32,
        num_heads=4,
        d_ff=256,
        num_layers=2,
        num_decoder_layers=2,
        # T5's own 32 buckets: 8 exact distances per direction. With fewer, word order blurs and
        # the decoder swaps the object and background colours.
        relative_attention_num_buckets=32,
        relative_attention_max_distance=64,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    model = T5ForConditionalGeneration(config)
    # As in tiny/t5.py: transformers ties lm_head to the embedding at construction; Flan-T5 has
    # its own head, which from_pretrained keeps only when the saved tensors differ.
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * 0.05)
    return model


def caption_batch(rng: random.Random, batch_size: int) -> tuple[list[str], list[str]]:
    """(inputs, targets) of one T5 training batch (see the module docstring)."""
    inputs, targets = [], []
    for _ in range(batch_size):
        scene = sample_scene(rng, allow_held_out=True)
        # Half the captions name both colours: only those teach which colour is the object's
        # and which the background's (with partial captions alone the decoder learns to guess).
        words = (full_caption(scene) if rng.random() < 0.5 else random_caption(scene, rng)).split()
        if rng.random() < 0.3 and len(words) > 1:
            cut = rng.randint(1, len(words) - 1)
            inputs.append(" ".join(words[:cut]) + " <extra_id_0>")
            targets.append(" ".join(words[cut:]))
            continue
        if rng.random() < 0.3 and len(words) > 2:
            start = rng.randint(0, len(words) - 2)
            stop = rng.randint(start + 1, len(words))
            words = words[start:stop]
        target = " ".join(words)
        if rng.random() < 0.3 and len(words) > 1:
            words = list(words)
            words[rng.randrange(len(words))] = "<extra_id_0>"
        inputs.append(" ".join(words))
        targets.append(target)
    return inputs, targets


def train_t5(
    folder: Path, *, seed: int, steps: int, batch_size: int = 64, lr: float = 1e-3, progress: bool = True
) -> dict:
    """Train the mini T5 and save it (model + tokenizer) into ``folder``; returns its record."""
    from tqdm.auto import tqdm

    tokenizer = t5_tokenizer()
    torch.manual_seed(seed)
    # Embedding rows rounded up past the tokenizer, like the real T5 (32128 rows, 32100 tokens).
    model = build_t5(vocab_size=(len(tokenizer) + 31) // 32 * 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    rng = scene_rng("t5-train", seed)
    losses: list[float] = []
    started = time.perf_counter()
    model.train()
    for step in tqdm(range(steps), desc="mini T5", disable=not progress, dynamic_ncols=True):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=min(100, steps // 10 + 1))
        inputs, targets = caption_batch(rng, batch_size)
        enc = tokenizer(inputs, padding=True, return_tensors="pt")
        labels = tokenizer(targets, padding=True, return_tensors="pt")
        label_ids = labels.input_ids.masked_fill(labels.attention_mask == 0, -100)
        loss = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=label_ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - started
    model.eval()
    folder = Path(folder)
    model.save_pretrained(folder)
    save_t5_tokenizer(folder)
    record = {"steps": steps, "batch_size": batch_size, "seconds": round(seconds, 1)}
    save_losses(folder / "training.json", losses, **record)
    return record


@torch.no_grad()
def reconstruction_accuracy(
    model: T5ForConditionalGeneration, tokenizer: T5TokenizerFast, captions: list[str], batch_size: int = 256
) -> float:
    """Share of captions the decoder reproduces exactly (greedy) from the encoder's states."""
    correct = 0
    for start in range(0, len(captions), batch_size):
        chunk = captions[start : start + batch_size]
        enc = tokenizer(chunk, padding=True, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=16, do_sample=False, num_beams=1)
        decoded = tokenizer.batch_decode(out, skip_special_tokens=True)
        correct += sum(d.strip() == c for d, c in zip(decoded, chunk))
    return correct / max(1, len(captions))


def held_out_captions(scenes: list, seed: int = 0) -> dict[str, list[str]]:
    """Full captions and theme captions of scenes (for the fidelity measurement)."""
    return {
        "full": [full_caption(s) for s in scenes],
        "theme": [
            theme_caption(theme, s.shape, s.value(theme.split("_")[0]))
            for i, s in enumerate(scenes)
            for theme in ("color_shape", "background_shape", "texture_shape")[i % 3 : i % 3 + 1]
        ],
    }


def load_t5(folder: Path) -> tuple[T5ForConditionalGeneration, T5TokenizerFast]:
    """The trained mini T5 and its tokenizer (eval mode)."""
    from transformers import AutoTokenizer

    return T5ForConditionalGeneration.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
