"""ThinkDiff-LVLM feature extraction on tiny random Qwen2-VL / Qwen2.5-VL models (offline, CPU)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from thinkdiff.models.lvlm import (
    SYSTEM_PROMPT,
    LVLMFeatureExtractor,
    SamplingSettings,
    load_lvlm,
    load_processor,
)
from thinkdiff.tiny.qwen import save_tiny_qwen_vl

ATOL = 1e-5


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def tiny_qwen(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_qwen_vl(tmp_path_factory.mktemp("lvlm") / request.param, kind=request.param, seed=0)


@pytest.fixture(scope="module")
def extractor(tiny_qwen: Path) -> LVLMFeatureExtractor:
    return LVLMFeatureExtractor.from_pretrained(tiny_qwen, device="cpu", max_images=4)


def _image(width: int, height: int, color: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (width, height), color)


RED = _image(56, 56, (200, 10, 10))  # 4 visual tokens
BLUE = _image(112, 112, (10, 10, 200))  # 16 visual tokens
# Two prompts of different lengths, one with two images interleaved with text, one text only.
BATCH = [
    ["Word 1: red, ", RED, "\n\nWord 2: blue, ", BLUE, "\n\nWord 3: green, "],
    ["Describe a cat."],
]


def _image_pads(extractor: LVLMFeatureExtractor, input_ids: torch.Tensor) -> int:
    return int((input_ids == extractor.model.config.image_token_id).sum())


def test_tiny_folder_loads(tiny_qwen: Path) -> None:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen)
    config = json.loads((tiny_qwen / "config.json").read_text())
    assert model.config.model_type == config["model_type"] == tiny_qwen.name
    text = model.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        64,
        2,
        4,
        2,
    )
    assert sum(text.rope_parameters["mrope_section"]) == text.hidden_size // text.num_attention_heads // 2

    processor = load_processor(tiny_qwen)
    tokenizer = processor.tokenizer
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert len(tokenizer) == text.vocab_size
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id
    ids = tokenizer("<|im_start|>user\nhi<|im_end|>")["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>") and ids[-1] == tokenizer.eos_token_id


def test_tiny_weights_depend_only_on_seed(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    def weights(path: Path) -> dict[str, torch.Tensor]:
        return load_file(path / "model.safetensors")

    first = weights(save_tiny_qwen_vl(tmp_path / "a", seed=1))
    again = weights(save_tiny_qwen_vl(tmp_path / "b", seed=1))
    other = weights(save_tiny_qwen_vl(tmp_path / "b", seed=2))  # replaces the folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temporary folder left
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    with pytest.raises(ValueError, match="unknown kind"):
        save_tiny_qwen_vl(tmp_path / "c", kind="llava")


def test_single_image_chat(extractor: LVLMFeatureExtractor) -> None:
    text = extractor.chat_text([RED, "What is this?"])
    assert text == (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n<|im_start|>assistant\n"
    )
    inputs = extractor.prepare_inputs([[RED, "What is this?"]])
    assert _image_pads(extractor, inputs["input_ids"]) == 4
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4]]


def test_interleaved_images_get_vision_ids(extractor: LVLMFeatureExtractor) -> None:
    text = extractor.chat_text(BATCH[0])
    user = text.split("<|im_start|>user\n")[1]
    assert user.startswith(
        "Word 1: red, Picture 1: <|vision_start|><|image_pad|><|vision_end|>\n\nWord 2: blue, "
    )
    assert "Picture 2: <|vision_start|>" in user and user.endswith(
        "Word 3: green, <|im_end|>\n<|im_start|>assistant\n"
    )
    inputs = extractor.prepare_inputs([BATCH[0]])
    assert _image_pads(extractor, inputs["input_ids"]) == 4 + 16


def test_text_only_chat(extractor: LVLMFeatureExtractor) -> None:
    assert "Picture" not in extractor.chat_text(["Describe a cat."])
    inputs = extractor.prepare_inputs([["Describe a cat."]])
    assert "pixel_values" not in inputs
    out = extractor.generate([["Describe a cat."]], SamplingSettings(max_new_tokens=3, seed=0))
    assert out.features.shape == (1, out.token_ids.shape[1], extractor.hidden_size)


def test_image_path_input(extractor: LVLMFeatureExtractor, tmp_path: Path) -> None:
    path = tmp_path / "red.png"
    RED.save(path)
    from_path = extractor.prepare_inputs([[path, "x"]])
    from_image = extractor.prepare_inputs([[RED, "x"]])
    assert torch.equal(from_path["input_ids"], from_image["input_ids"])
    assert torch.allclose(from_path["pixel_values"], from_image["pixel_values"])


def test_batch_is_left_padded(extractor: LVLMFeatureExtractor) -> None:
    inputs = extractor.prepare_inputs(BATCH)
    mask = inputs["attention_mask"]
    assert mask[:, -1].all() and not mask[1, 0]  # the short text prompt is padded on the left


@pytest.mark.parametrize("batch", [BATCH, [["a"], ["a much longer text only prompt about a cat"]]])
def test_generate_and_teacher_forced_agree(extractor: LVLMFeatureExtractor, batch: list) -> None:
    sampling = SamplingSettings(max_new_tokens=6, seed=0)
    a = extractor.generate(batch, sampling, return_prompt_features=True)
    b = extractor.generate(batch, sampling, teacher_forced=True, return_prompt_features=True)
    assert torch.equal(a.token_ids, b.token_ids) and a.texts == b.texts
    assert a.features.shape == (2, a.token_ids.shape[1], extractor.hidden_size)
    assert a.features.dtype == torch.float32
    torch.testing.assert_close(a.features, b.features, atol=ATOL, rtol=0)
    torch.testing.assert_close(a.prompt_features, b.prompt_features, atol=ATOL, rtol=0)
    assert torch.equal(a.feature_mask, b.feature_mask) and torch.equal(a.prompt_mask, b.prompt_mask)


def test_batched_equals_single(extractor: LVLMFeatureExtractor) -> None:
    """Left padding, positions and M-RoPE are right iff each row matches the row run alone."""
    greedy = SamplingSettings(max_new_tokens=4, do_sample=False)
    batched = extractor.generate(BATCH, greedy, return_prompt_features=True)
    for row, prompt in enumerate(BATCH):
        single = extractor.generate([prompt], greedy, return_prompt_features=True)
        assert torch.equal(single.token_ids[0], batched.token_ids[row])
        torch.testing.assert_close(single.features[0], batched.features[row], atol=ATOL, rtol=0)
        n = int(single.prompt_mask.sum())
        assert int(batched.prompt_mask[row].sum()) == n
        torch.testing.assert_close(
            single.prompt_features[0], batched.prompt_features[row, :n], atol=ATOL, rtol=0
        )


def test_features_produce_their_tokens(extractor: LVLMFeatureExtractor) -> None:
    """Under greedy decoding, lm_head(feature i) predicts generated token i: feature i produced it."""
    out = extractor.generate(BATCH, SamplingSettings(max_new_tokens=5, do_sample=False), teacher_forced=True)
    predicted = extractor.model.lm_head(out.features).argmax(-1)
    assert torch.equal(predicted[out.feature_mask], out.token_ids[out.feature_mask])


def test_prompt_features_shape_and_mask(extractor: LVLMFeatureExtractor) -> None:
    inputs = extractor.prepare_inputs(BATCH)
    out = extractor.generate(BATCH, SamplingSettings(max_new_tokens=2, seed=0), return_prompt_features=True)
    assert out.prompt_features.shape == (*inputs["input_ids"].shape, extractor.hidden_size)
    assert out.prompt_mask.sum(1).tolist() == inputs["attention_mask"].sum(1).tolist()
    # Valid positions first: the mask is a run of True then False.
    assert torch.equal(out.prompt_mask, out.prompt_mask.sort(dim=1, descending=True, stable=True).values)
    # The last real prompt state is the one that produced the first generated token.
    last = out.prompt_mask.sum(1) - 1
    torch.testing.assert_close(
        out.prompt_features[torch.arange(2), last], out.features[:, 0], atol=ATOL, rtol=0
    )
    assert extractor.generate(BATCH, SamplingSettings(max_new_tokens=2)).prompt_features is None


def _early_eos(tokens: torch.Tensor) -> tuple[int, int]:
    """A position j in row 0 whose token appears neither earlier in row 0 nor anywhere in row 1."""
    for j in range(1, tokens.shape[1] - 1):
        token = int(tokens[0, j])
        if token not in tokens[0, :j].tolist() and token not in tokens[1].tolist():
            return j, token
    pytest.skip("no usable early-EOS token in this sample")


def test_early_eos_is_masked(extractor: LVLMFeatureExtractor, monkeypatch: pytest.MonkeyPatch) -> None:
    sampling = SamplingSettings(max_new_tokens=8, seed=0)
    free = extractor.generate(BATCH, sampling)
    j, eos = _early_eos(free.token_ids)
    # Declare the token sampled at position j of row 0 an EOS: same seed, same logits, so row 0
    # now stops there while row 1 goes on.
    monkeypatch.setattr(extractor, "eos_token_ids", [eos])
    for teacher_forced in (False, True):
        out = extractor.generate(BATCH, sampling, teacher_forced=teacher_forced)
        n = out.token_ids.shape[1]
        assert out.feature_mask[0].tolist() == [True] * (j + 1) + [False] * (n - j - 1)  # EOS itself kept
        assert out.feature_mask[1].all()
        assert int(out.token_ids[0, j]) == eos
        assert (out.token_ids[0, j + 1 :] == extractor.pad_token_id).all()
        assert torch.equal(out.token_ids[1], free.token_ids[1, :n])
    # Nothing after the EOS is decoded (this stand-in EOS is an ordinary token, so it is kept).
    assert out.texts[0] == extractor.processor.tokenizer.decode(
        free.token_ids[0, : j + 1], skip_special_tokens=True
    )


def test_teacher_forced_masks_hand_made_ids(extractor: LVLMFeatureExtractor) -> None:
    """Ragged id lists (as a generation engine returns them) and a real EOS, given by hand."""
    eos = extractor.eos_token_ids[0]
    inputs = extractor.prepare_inputs(BATCH)
    ids = [[100, 101, eos, 102, 103], [104, 105, 106]]
    out = extractor.features_from_tokens(inputs, ids, return_prompt_features=True)
    assert out.feature_mask.tolist() == [[True, True, True, False, False], [True, True, True, False, False]]
    assert out.token_ids[0, :3].tolist() == [100, 101, eos] and out.token_ids[1, :3].tolist() == [
        104,
        105,
        106,
    ]
    assert out.features.shape == (2, 5, extractor.hidden_size) and out.prompt_features is not None
    # Tokens after EOS cannot change the features before them (causal attention).
    short = extractor.features_from_tokens(inputs, [[100, 101, eos], [104, 105, 106]])
    torch.testing.assert_close(short.features, out.features[:, :3], atol=ATOL, rtol=0)


def test_exactly_n_tokens(extractor: LVLMFeatureExtractor, monkeypatch: pytest.MonkeyPatch) -> None:
    greedy = SamplingSettings(max_new_tokens=4, do_sample=False)
    first = int(extractor.generate(BATCH, greedy).token_ids[0, 0])
    monkeypatch.setattr(extractor, "eos_token_ids", [first])  # greedy decoding would stop at once
    assert extractor.generate(BATCH[:1], greedy).token_ids.shape[1] == 1
    for sampling in (SamplingSettings.exactly(4, do_sample=False), SamplingSettings.exactly(4, seed=1)):
        out = extractor.generate(BATCH, sampling)
        assert out.token_ids.shape == (2, 4) and out.feature_mask.all()
        assert first not in out.token_ids.tolist()


def test_seed_is_reproducible_and_local(extractor: LVLMFeatureExtractor) -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = extractor.generate(BATCH, SamplingSettings(max_new_tokens=5, seed=7))
    assert torch.equal(torch.rand(1), before)  # the global RNG did not move
    b = extractor.generate(BATCH, SamplingSettings(max_new_tokens=5, seed=7))
    assert torch.equal(a.token_ids, b.token_ids)


def test_max_pixels_caps_visual_tokens(tiny_qwen: Path) -> None:
    processor = load_processor(tiny_qwen, max_pixels=56 * 56)
    inputs = processor(text=["<|image_pad|>"], images=[BLUE], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4]]


def test_max_pixels_below_the_processors_minimum_is_refused_before_the_model_loads(
    tiny_qwen: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import thinkdiff.models.lvlm as lvlm_module

    smallest = load_processor(tiny_qwen).image_processor.size["shortest_edge"]
    load_processor(tiny_qwen, max_pixels=smallest)  # the minimum itself is a valid cap

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before max_pixels was checked")

    monkeypatch.setattr(lvlm_module, "load_lvlm", no_model)
    for bad in (0, smallest - 1):
        with pytest.raises(ValueError, match=f"max_pixels {bad} is below the {smallest} pixels"):
            LVLMFeatureExtractor.from_pretrained(tiny_qwen, max_pixels=bad)


def test_bad_inputs_raise(extractor: LVLMFeatureExtractor, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="non-empty list of prompts"):
        extractor.prepare_inputs([])
    with pytest.raises(ValueError, match="non-empty list of text and images"):
        extractor.prepare_inputs([[]])
    with pytest.raises(ValueError, match="non-empty list of text and images"):
        extractor.prepare_inputs(["a prompt given as a bare string"])
    with pytest.raises(ValueError, match="5 images, more than max_images=4"):
        extractor.prepare_inputs([[RED] * 5])
    missing = tmp_path / "missing.png"
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        extractor.prepare_inputs([[missing]])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=re.escape(str(broken))):
        extractor.prepare_inputs([["look", broken]])
    with pytest.raises(ValueError, match="got int"):
        extractor.prepare_inputs([["a", 3]])
    with pytest.raises(ValueError, match="at least one generated token"):
        extractor.features_from_tokens(extractor.prepare_inputs(BATCH), [[1], []])
    with pytest.raises(ValueError, match="token ids for 1 prompts"):
        extractor.features_from_tokens(extractor.prepare_inputs(BATCH), [[1]])
    right_padded = extractor.prepare_inputs(BATCH)
    right_padded["attention_mask"] = right_padded["attention_mask"].flip(1)
    with pytest.raises(ValueError, match="left padded"):
        extractor.features_from_tokens(right_padded, [[1], [2]])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 4, "min_new_tokens": 5}, "min_new_tokens"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
    ],
)
def test_bad_sampling_settings_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingSettings(**kwargs)


def test_unknown_model_type_raises(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported LVLM model_type 'gpt2'"):
        load_lvlm(tmp_path)
