"""The aligner: shapes, norm choices, the norm copy from T5, save/load, misuse."""

from __future__ import annotations

import pytest
import torch

from thinkdiff import Aligner, ProxyT5Decoder
from thinkdiff.models.aligner import T5RMSNorm


def test_shapes_and_hidden_default() -> None:
    aligner = Aligner(in_dim=12, out_dim=8)
    assert aligner.fc1.out_features == 8  # hidden defaults to out
    assert aligner(torch.randn(3, 5, 12)).shape == (3, 5, 8)
    assert Aligner(12, 8, hidden_dim=20)(torch.randn(2, 12)).shape == (2, 8)


def test_t5_rmsnorm_matches_formula() -> None:
    norm = T5RMSNorm(6, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0))
    x = torch.randn(4, 6) * 3 + 1  # a mean far from zero: T5's norm must not subtract it
    expected = torch.arange(1.0, 7.0) * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x), expected)


def test_norm_choices() -> None:
    x = torch.randn(2, 3, 10) * 50
    out_default = Aligner(10, 8, norm="default")(x)
    torch.testing.assert_close(out_default.pow(2).mean(-1), torch.ones(2, 3), rtol=1e-4, atol=1e-4)
    none = Aligner(10, 8, norm="none")
    assert isinstance(none.final_norm, torch.nn.Identity)
    torch.testing.assert_close(none(x), none.fc2(none.act(none.fc1(x))))
    with pytest.raises(ValueError, match="unknown aligner norm"):
        Aligner(10, 8, norm="layernorm")


def test_norm_copied_from_t5(tiny_models) -> None:
    proxy = ProxyT5Decoder.from_pretrained(tiny_models / "t5")
    weight = proxy.encoder_final_norm_weight
    assert not torch.allclose(weight, torch.ones_like(weight))  # the kit makes it non-trivial
    aligner = Aligner(64, proxy.d_model)
    aligner.init_norm_from_t5(proxy)
    torch.testing.assert_close(aligner.final_norm.weight.detach(), weight)
    # A full T5ForConditionalGeneration works as a source too.
    other = Aligner(64, proxy.d_model)
    other.init_norm_from_t5(proxy.t5)
    torch.testing.assert_close(other.final_norm.weight.detach(), weight)


def test_norm_copy_misuse(tiny_models) -> None:
    proxy = ProxyT5Decoder.from_pretrained(tiny_models / "t5")
    with pytest.raises(ValueError, match="does not match the aligner output width"):
        Aligner(64, proxy.d_model + 1).init_norm_from_t5(proxy)
    with pytest.raises(ValueError, match="needs norm='t5'"):
        Aligner(64, proxy.d_model, norm="none").init_norm_from_t5(proxy)


def test_the_proxy_decoder_follows_the_trainer_only_when_checkpointing(tiny_models) -> None:
    """Dropout is removed at load, so the frozen T5 stays in eval mode unless activation
    checkpointing needs train mode; asking which uses no deprecated transformers property."""
    import warnings

    proxy = ProxyT5Decoder.from_pretrained(tiny_models / "t5")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        proxy.train(True)
        assert not proxy.t5.training
        proxy.enable_activation_checkpointing()
        assert proxy.t5.training and any(getattr(m, "gradient_checkpointing", False) for m in proxy.t5.modules())
        proxy.train(False)
        assert not proxy.t5.training


def test_feature_width_mismatch_is_clear() -> None:
    with pytest.raises(ValueError, match="feature width 7 does not match the aligner's input width 12"):
        Aligner(12, 8)(torch.randn(1, 2, 7))


def test_save_load_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    aligner = Aligner(12, 8, hidden_dim=16, norm="t5")
    with torch.no_grad():
        aligner.final_norm.weight.uniform_(0.5, 1.5)
    aligner.save_pretrained(tmp_path / "aligner")
    assert (tmp_path / "aligner" / "config.json").is_file()
    assert (tmp_path / "aligner" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = Aligner.from_pretrained(tmp_path / "aligner")
    assert loaded.config.hidden_dim == 16 and loaded.config.norm == "t5"
    x = torch.randn(2, 4, 12)
    torch.testing.assert_close(loaded(x), aligner(x))
