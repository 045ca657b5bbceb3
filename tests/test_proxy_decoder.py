"""The proxy T5 decoder: loads only what it needs, stays frozen, and matches stock T5."""

from __future__ import annotations

import pytest
import torch
from transformers import T5ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput

from thinkdiff import Aligner, ProxyT5Decoder


@pytest.fixture(scope="module")
def proxy(tiny_models) -> ProxyT5Decoder:
    return ProxyT5Decoder.from_pretrained(tiny_models / "t5")


def test_decoder_only_load_skips_encoder_blocks(proxy, tiny_models) -> None:
    full = T5ForConditionalGeneration.from_pretrained(tiny_models / "t5")
    names = {n for n, _ in proxy.t5.named_parameters()}
    assert not any(n.startswith("encoder.block") for n in names)
    assert "encoder.final_layer_norm.weight" in names
    assert proxy.t5.config.num_decoder_layers == full.config.num_decoder_layers
    torch.testing.assert_close(proxy.encoder_final_norm_weight, full.encoder.final_layer_norm.weight)
    assert not proxy.has_encoder


def test_loss_equals_stock_t5(proxy, tiny_models) -> None:
    full = T5ForConditionalGeneration.from_pretrained(tiny_models / "t5").eval()
    torch.manual_seed(0)
    memory = torch.randn(2, 5, proxy.d_model)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    labels = torch.tensor([[5, 6, 7, 1], [8, 9, 1, -100]])
    expected = full(
        encoder_outputs=BaseModelOutput(last_hidden_state=memory), attention_mask=mask, labels=labels
    ).loss
    torch.testing.assert_close(proxy.loss(memory, mask, labels), expected)


def test_frozen_eval_and_aligner_learns(proxy) -> None:
    assert all(not p.requires_grad for p in proxy.parameters())
    proxy.train()  # what a trainer does; without dropout asked for, T5 stays in eval mode
    assert not proxy.t5.training
    torch.manual_seed(0)
    aligner = Aligner(16, proxy.d_model)
    aligner.init_norm_from_t5(proxy)
    features = torch.randn(4, 6, 16)
    mask = torch.ones(4, 6, dtype=torch.bool)
    labels = torch.randint(3, 300, (4, 5))
    labels[:, -1] = 1
    optimizer = torch.optim.AdamW(aligner.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        loss = proxy.loss(aligner(features), mask, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(p.grad is None for p in proxy.parameters())
    assert all(p.grad is not None for p in aligner.parameters())
    assert losses[-1] < 0.5 * losses[0]


def test_dropout_option_reproduces_released_behaviour(tiny_models) -> None:
    proxy = ProxyT5Decoder.from_pretrained(tiny_models / "t5", dropout=True)
    assert proxy.t5.config.dropout_rate == pytest.approx(0.1)
    proxy.train()
    assert proxy.t5.training
    memory = torch.randn(1, 4, proxy.d_model)
    mask = torch.ones(1, 4, dtype=torch.bool)
    labels = torch.tensor([[5, 6, 1]])
    torch.manual_seed(0)
    a = proxy.loss(memory, mask, labels)
    b = proxy.loss(memory, mask, labels)
    assert not torch.equal(a, b)  # dropout active
    proxy.eval()
    torch.testing.assert_close(proxy.loss(memory, mask, labels), proxy.loss(memory, mask, labels))


def test_encoder_loaded_on_request(tiny_models, proxy) -> None:
    full = T5ForConditionalGeneration.from_pretrained(tiny_models / "t5").eval()
    with_encoder = ProxyT5Decoder.from_pretrained(tiny_models / "t5", with_encoder=True)
    ids = with_encoder.tokenizer(["a red car on a blue background"], return_tensors="pt")
    torch.testing.assert_close(
        with_encoder.encode(ids.input_ids, ids.attention_mask), full.encoder(**ids).last_hidden_state
    )
    with pytest.raises(ValueError, match="loaded without its encoder"):
        proxy.encode(ids.input_ids, ids.attention_mask)


def test_generate_text_and_memory_checks(proxy) -> None:
    memory = torch.randn(2, 3, proxy.d_model)
    mask = torch.ones(2, 3, dtype=torch.bool)
    texts = proxy.generate_text(memory, mask, max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    with pytest.raises(ValueError, match="the T5 d_model"):
        proxy.loss(torch.randn(2, 3, proxy.d_model + 4), mask, torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="does not match memory"):
        proxy.loss(memory, torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 2, dtype=torch.long))


def test_bf16_load_keeps_no_fp32_weights(tiny_models) -> None:
    proxy = ProxyT5Decoder.from_pretrained(tiny_models / "t5", dtype=torch.bfloat16)
    assert {p.dtype for p in proxy.parameters()} == {torch.bfloat16}


def test_unknown_model_is_clear(tmp_path, tiny_models) -> None:
    with pytest.raises(FileNotFoundError, match="neither an existing folder nor a hub id"):
        ProxyT5Decoder.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="not a T5 encoder-decoder"):
        ProxyT5Decoder.from_pretrained(tiny_models / "blip2-vision")


def test_activation_checkpointing_gives_the_same_gradients(tiny_models) -> None:
    torch.manual_seed(0)
    memory = torch.randn(2, 5, 32)
    mask = torch.ones(2, 5, dtype=torch.bool)
    labels = torch.tensor([[5, 6, 7, 1], [8, 9, 1, -100]])
    grads, calls = [], []
    for checkpointing in (False, True):
        proxy = ProxyT5Decoder.from_pretrained(tiny_models / "t5")
        if checkpointing:
            proxy.enable_activation_checkpointing()
        proxy.train()
        assert proxy.t5.training == checkpointing  # HF checkpoints only in training mode; dropout is p=0
        count = [0]
        proxy.t5.decoder.block[0].layer[0].register_forward_hook(
            lambda *_, count=count: count.__setitem__(0, count[0] + 1)
        )
        leaf = memory.clone().requires_grad_(True)
        proxy.loss(leaf, mask, labels).backward()
        grads.append(leaf.grad)
        calls.append(count[0])
    torch.testing.assert_close(grads[0], grads[1])
    assert calls == [1, 2]  # with checkpointing the block runs again in the backward pass
