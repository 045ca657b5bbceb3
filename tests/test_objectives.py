"""The proxy objectives: the LVLM random split, its ablations, CLIP caption continuation."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoTokenizer

from thinkdiff import Aligner, ProxyT5Decoder
from thinkdiff.objectives import (
    CLIPCaptionCollator,
    LVLMSplitCollator,
    clean_caption,
    clip_decode,
    clip_loss,
    lvlm_decode,
    lvlm_loss,
    pad_features,
    split_caption,
)

H = 16  # VLM width used for hand-made features


@pytest.fixture(scope="module")
def proxy(tiny_models) -> ProxyT5Decoder:
    return ProxyT5Decoder.from_pretrained(tiny_models / "t5", with_encoder=True)


@pytest.fixture(scope="module")
def lvlm_tokenizer(tiny_models):
    return AutoTokenizer.from_pretrained(tiny_models / "qwen2-vl")


def make_sample(tokenizer, key: str, text: str, valid: int | None = None) -> dict:
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)
    sample = {"key": key, "token_ids": ids, "features": torch.randn(len(ids), H)}
    if valid is not None:
        mask = torch.zeros(len(ids), dtype=torch.bool)
        mask[:valid] = True
        sample["feature_mask"] = mask
    return sample


def test_split_boundaries_never_empty(lvlm_tokenizer, proxy) -> None:
    collator = LVLMSplitCollator(lvlm_tokenizer, proxy.tokenizer, max_split=5, seed=1)
    for length in (2, 3, 7, 40):
        cuts = {collator.cut(f"k{i}", length) for i in range(300)}
        assert min(cuts) == 1
        assert max(cuts) == min(length - 1, 5)  # every allowed cut occurs, none outside
    with pytest.raises(ValueError, match="needs at least 2"):
        collator.cut("short", 1)


def test_split_memory_and_target(lvlm_tokenizer, proxy) -> None:
    text = "a red car on a blue background with a small dog"
    sample = make_sample(lvlm_tokenizer, "s0", text)
    collator = LVLMSplitCollator(lvlm_tokenizer, proxy.tokenizer, seed=3)
    batch = collator([sample])
    cut = batch.splits[0]
    assert 1 <= cut < len(sample["token_ids"])
    torch.testing.assert_close(batch.features_BLH[0, :cut], sample["features"][:cut])
    expected_target = lvlm_tokenizer.decode(sample["token_ids"][cut:].tolist(), skip_special_tokens=True)
    assert batch.target_texts == [expected_target]
    labels = batch.labels_BT[0]
    assert labels[labels != -100][-1].item() == proxy.tokenizer.eos_token_id
    # Same seed and key: the same cut after a restart; another epoch may cut elsewhere.
    assert collator([sample]).splits == [cut]


def test_eos_mask_limits_split_and_target(lvlm_tokenizer, proxy) -> None:
    sample = make_sample(lvlm_tokenizer, "s1", "a red car on a blue background with a small dog", valid=4)
    batch = LVLMSplitCollator(lvlm_tokenizer, proxy.tokenizer, seed=0)([sample])
    assert 1 <= batch.splits[0] <= 3
    expected = lvlm_tokenizer.decode(
        sample["token_ids"][batch.splits[0] : 4].tolist(), skip_special_tokens=True
    )
    assert batch.target_texts == [expected]


def test_no_split_and_prompt_feature_ablations(lvlm_tokenizer, proxy) -> None:
    text = "a green apple on a wooden table"
    sample = make_sample(lvlm_tokenizer, "s2", text)
    sample["prompt_features"] = torch.randn(9, H)
    whole = lvlm_tokenizer.decode(sample["token_ids"].tolist(), skip_special_tokens=True)
    batch = LVLMSplitCollator(lvlm_tokenizer, proxy.tokenizer, split=False)([sample])
    assert batch.features_BLH.shape[1] == len(sample["token_ids"])
    assert batch.target_texts == [whole]
    batch = LVLMSplitCollator(lvlm_tokenizer, proxy.tokenizer, features="prompt")([sample])
    torch.testing.assert_close(batch.features_BLH[0], sample["prompt_features"])
    assert batch.target_texts == [whole]


def test_padding_and_mask(lvlm_tokenizer, proxy) -> None:
    features, mask = pad_features([torch.ones(2, H), torch.ones(5, H)])
    assert features.shape == (2, 5, H)
    assert mask.tolist() == [[True, True, False, False, False], [True] * 5]
    assert features[0, 2:].abs().sum() == 0
    samples = [
        make_sample(lvlm_tokenizer, f"p{i}", t)
        for i, t in enumerate(["a red car", "a big blue ball on the beach"])
    ]
    batch = LVLMSplitCollator(lvlm_tokenizer, proxy.tokenizer, split=False)(samples)
    assert 0.0 < batch.padding_fraction() < 1.0


def test_lvlm_loss_trains_aligner_and_decodes(lvlm_tokenizer, proxy) -> None:
    torch.manual_seed(0)
    texts = ["a red car on a blue background", "a small dog in the park", "a wooden chair in a cave"]
    samples = [make_sample(lvlm_tokenizer, f"t{i}", t) for i, t in enumerate(texts)]
    batch = LVLMSplitCollator(lvlm_tokenizer, proxy.tokenizer, seed=0)(samples)
    aligner = Aligner(H, proxy.d_model)
    aligner.init_norm_from_t5(proxy)
    optimizer = torch.optim.AdamW(aligner.parameters(), lr=3e-3)
    first = lvlm_loss(aligner, proxy, batch).item()
    for _ in range(40):
        loss = lvlm_loss(aligner, proxy, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first
    decoded = lvlm_decode(aligner, proxy, batch, max_new_tokens=8)
    assert len(decoded) == 3


def test_caption_cleaning_and_split() -> None:
    assert clean_caption('A "Red" car: (on) the #beach!!  ~now~.') == "a red car on the beach now"
    assert len(clean_caption(" ".join(["word"] * 80)).split()) == 50
    rng = random.Random(0)
    seen = set()
    for _ in range(200):
        first, second = split_caption("a b c d", rng)
        assert first and second and f"{first} {second}" == "a b c d"
        seen.add(len(first.split()))
    assert seen == {1, 2, 3}
    with pytest.raises(ValueError, match="fewer than 2 words"):
        split_caption("alone", rng)


def test_clip_objective_memory_concatenation(proxy) -> None:
    torch.manual_seed(0)
    collator = CLIPCaptionCollator(proxy.tokenizer, seed=0)
    samples = [
        {"key": "a", "pixel_values": torch.randn(3, 8, 8), "caption": "A red car on a blue background."},
        {"key": "b", "pixel_values": torch.randn(3, 8, 8), "caption": "a dog"},
    ]
    batch = collator(samples)
    assert batch.inputs[1] == "a" and batch.target_texts[1] == "dog"
    image_tokens = torch.randn(2, 65, 24)
    aligner = Aligner(24, proxy.d_model)
    from thinkdiff.objectives import clip_memory

    memory, mask = clip_memory(image_tokens, aligner, proxy, batch)
    assert memory.shape == (2, 65 + batch.text_ids_BT.shape[1], proxy.d_model)
    assert mask[:, :65].all()
    assert torch.equal(mask[:, 65:], batch.text_mask_BT)
    loss = clip_loss(image_tokens, aligner, proxy, batch)
    loss.backward()
    assert aligner.fc1.weight.grad is not None
    assert len(clip_decode(image_tokens, aligner, proxy, batch, max_new_tokens=4)) == 2
