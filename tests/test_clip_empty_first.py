"""The CLIP split lever: captions cut before their first word, so the image tokens carry all of it."""

from __future__ import annotations

import pytest
import torch

from thinkdiff.miniworld.text import t5_tokenizer
from thinkdiff.objectives import CLIPCaptionCollator, sample_rng, split_caption


def _samples(n: int) -> list[dict]:
    captions = ["a red striped star on a blue background", "a green moon", "an orange dotted heart"]
    return [
        {"key": f"k{i}", "pixel_values": torch.zeros(3, 8, 8), "caption": captions[i % len(captions)]}
        for i in range(n)
    ]


def test_default_keeps_the_released_cuts():
    samples = _samples(12)
    batch = CLIPCaptionCollator(t5_tokenizer(), seed=3)(samples)
    expected = [split_caption(s["caption"], sample_rng(3, 0, s["key"])) for s in samples]
    assert list(zip(batch.inputs, batch.target_texts)) == expected


def test_empty_first_asks_the_whole_caption_of_the_image():
    samples = _samples(200)
    everything = CLIPCaptionCollator(t5_tokenizer(), seed=3, empty_first=1.0)(samples)
    assert everything.inputs == [""] * 200
    assert everything.target_texts == [s["caption"] for s in samples]
    # The empty first part is T5's end token alone.
    assert everything.text_mask_BT.sum(1).tolist() == [1] * 200
    some = CLIPCaptionCollator(t5_tokenizer(), seed=3, empty_first=0.5)(samples)
    share = sum(first == "" for first in some.inputs) / 200
    assert 0.35 < share < 0.65


def test_config_refuses_a_rate_outside_zero_one():
    from thinkdiff.training.config import debug_clip

    config = debug_clip()
    config.clip_empty_first = 1.5
    with pytest.raises(ValueError, match="clip_empty_first"):
        config.validate()
