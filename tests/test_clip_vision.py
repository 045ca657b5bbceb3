"""ThinkDiff-CLIP image tokens: pooling, token counts, loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from thinkdiff.models.clip_vision import CLIPVisionFeatures, pool_patch_tokens


def test_pooling_equals_2x2_average_on_hand_made_grid() -> None:
    grid = torch.arange(16.0).reshape(4, 4)  # one channel, a 4x4 patch grid
    cls = torch.tensor([[[100.0]]])
    tokens = torch.cat([cls, grid.reshape(1, 16, 1)], dim=1)
    pooled = pool_patch_tokens(tokens)
    assert pooled.shape == (1, 5, 1)
    assert pooled[0, 0, 0] == 100.0  # CLS kept as is
    expected = torch.tensor([[2.5, 4.5], [10.5, 12.5]])  # means of each 2x2 block
    torch.testing.assert_close(pooled[0, 1:, 0].reshape(2, 2), expected)


def test_pooling_random_grid_matches_avg_pool() -> None:
    tokens = torch.randn(2, 1 + 256, 7)
    pooled = pool_patch_tokens(tokens)
    grid = tokens[:, 1:].transpose(1, 2).reshape(2, 7, 16, 16)
    expected = F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
    assert pooled.shape == (2, 65, 7)
    torch.testing.assert_close(pooled[:, 1:], expected)


def test_pooling_rejects_bad_grids() -> None:
    with pytest.raises(ValueError, match="square grid"):
        pool_patch_tokens(torch.randn(1, 1 + 15, 4))
    with pytest.raises(ValueError, match="not divisible"):
        pool_patch_tokens(torch.randn(1, 1 + 9, 4))


def test_tiny_blip2_vision_gives_65_tokens(tiny_models) -> None:
    vision = CLIPVisionFeatures.from_pretrained(tiny_models / "blip2-vision")
    assert vision.num_tokens == 65
    tokens = vision(torch.randn(2, 3, 224, 224))
    assert tokens.shape == (2, 65, vision.hidden_size)
    assert all(not p.requires_grad for p in vision.parameters())
    with pytest.raises(ValueError, match=r"\[batch, 3, 224, 224\]"):
        vision(torch.randn(1, 3, 112, 112))


def test_loads_vision_tower_out_of_full_blip2_checkpoint(tmp_path) -> None:
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    config = Blip2Config(
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        qformer_config={
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "encoder_hidden_size": 16,
        },
        text_config={
            "model_type": "t5",
            "d_model": 16,
            "d_kv": 4,
            "num_heads": 2,
            "d_ff": 32,
            "num_layers": 1,
            "vocab_size": 64,
        },
        num_query_tokens=4,
    )
    torch.manual_seed(0)
    full = Blip2ForConditionalGeneration(config).eval()
    full.save_pretrained(tmp_path / "blip2")
    vision = CLIPVisionFeatures.from_pretrained(tmp_path / "blip2")
    pixels = torch.randn(1, 3, 224, 224)
    expected = pool_patch_tokens(full.vision_model(pixel_values=pixels).last_hidden_state)
    torch.testing.assert_close(vision(pixels), expected)
