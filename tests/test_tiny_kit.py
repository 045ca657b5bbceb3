"""The offline tiny-model kit: every component loads through the generic hub code path and runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from thinkdiff import tiny
from thinkdiff.tiny import TINY_DIMS, make_tiny_models, save_tiny_t5
from thinkdiff.tiny.tokenizers import (
    COLORS,
    TINY_CORPUS,
    byte_level_bpe,
    save_clip_tokenizer,
    save_t5_tokenizer,
)


def _image(height: int = 40, width: int = 60, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# --- tokenizers -------------------------------------------------------------------------------


def test_t5_tokenizer_follows_t5_conventions_and_round_trips(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, T5TokenizerFast

    save_t5_tokenizer(tmp_path)
    auto = AutoTokenizer.from_pretrained(tmp_path)
    fast = T5TokenizerFast.from_pretrained(tmp_path)
    for tok in (auto, fast):
        assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
        assert len(tok) == TINY_DIMS["t5_tokenizer_len"]
    # Sentinels at the top of the vocabulary, <extra_id_0> last, as in the real T5 vocab.
    assert auto.convert_tokens_to_ids("<extra_id_0>") == len(auto) - 1
    assert auto.convert_tokens_to_ids("<extra_id_99>") == len(auto) - 100

    ids = auto("a red car on a glacier background").input_ids
    assert ids[-1] == auto.eos_token_id
    assert auto.unk_token_id not in ids
    for sentence in TINY_CORPUS:
        assert auto.decode(auto(sentence).input_ids, skip_special_tokens=True) == sentence


def test_byte_level_bpe_is_deterministic_and_lossless() -> None:
    specials = ["<|endoftext|>", "<|im_start|>", "<image>"]
    first, second = byte_level_bpe(400, specials), byte_level_bpe(400, specials)
    assert first.to_str() == second.to_str()
    assert first.get_vocab_size() == 400
    assert [first.token_to_id(t) for t in specials] == [0, 1, 2]
    # Byte-level: text outside the corpus (accents, emoji, capitals) still round-trips exactly.
    text = "A Zebra on the Glacier, 42 héllo ✨ <image>"
    assert first.decode(first.encode(text).ids, skip_special_tokens=False) == text
    assert len(first.encode(" ".join(COLORS)).ids) <= 2 * len(COLORS)  # colours are learned words
    with pytest.raises(ValueError, match="vocab_size"):
        byte_level_bpe(100, specials)


def test_clip_tokenizer_loads_and_pads(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(save_clip_tokenizer(tmp_path))
    assert type(tok).__name__ == "CLIPTokenizer"
    ids = tok("A Red Car", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(ids) == 77
    assert ids[0] == tok.bos_token_id
    assert tok.unk_token_id not in ids[: ids.index(tok.eos_token_id)]
    assert tok.decode(ids, skip_special_tokens=True) == "a red car"


# --- the kit as a whole --------------------------------------------------------------------------


def test_manifest_lists_every_component_with_agreeing_dims(tiny_models: Path) -> None:
    manifest = json.loads((tiny_models / "manifest.json").read_text())
    assert set(manifest["components"]) == set(tiny.COMPONENTS)
    for name, entry in manifest["components"].items():
        assert (tiny_models / entry["path"]).is_dir(), name
    comps = manifest["components"]
    d_model = comps["t5"]["dims"]["hidden_size"]
    assert d_model == comps["flux"]["dims"]["joint_attention_dim"] == TINY_DIMS["t5_d_model"]
    assert comps["flux"]["dims"]["t5_d_model"] == comps["cogvideox"]["dims"]["text_embed_dim"] == d_model
    assert comps["qwen2-vl"]["dims"]["hidden_size"] == TINY_DIMS["qwen_hidden"]
    assert comps["qwen2.5-vl"]["dims"]["hidden_size"] == TINY_DIMS["qwen_hidden"]
    assert comps["blip2-vision"]["dims"]["hidden_size"] == TINY_DIMS["blip2_vision_hidden"]
    # No temporary folders left behind.
    assert not [p for p in tiny_models.iterdir() if p.name.startswith(".")]


def test_interrupted_build_leaves_no_partial_component_and_rerun_overwrites(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(path: Path, seed: int = 0) -> Path:
        (path / "config.json").write_text("{}")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(tiny, "COMPONENTS", {"t5": save_tiny_t5, "broken": broken})
    with pytest.raises(RuntimeError, match="interrupted"):
        make_tiny_models(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t5"]

    (tmp_path / "t5" / "stale.txt").write_text("from an older build")
    monkeypatch.setattr(tiny, "COMPONENTS", {"t5": save_tiny_t5})
    make_tiny_models(tmp_path, seed=1)
    assert not (tmp_path / "t5" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "t5"]


def test_weights_depend_only_on_seed(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    a, b, c = (save_tiny_t5(tmp_path / name, seed=s) for name, s in (("a", 0), ("b", 0), ("c", 1)))
    wa, wb, wc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["shared.weight"], wc["shared.weight"])


# --- each component through its generic loader ------------------------------------------------------


def test_t5_proxy_loads_trains_and_generates(tiny_models: Path) -> None:
    from transformers import AutoTokenizer, T5ForConditionalGeneration
    from transformers.modeling_outputs import BaseModelOutput

    t5 = T5ForConditionalGeneration.from_pretrained(tiny_models / "t5").eval()
    tok = AutoTokenizer.from_pretrained(tiny_models / "t5")
    cfg = t5.config
    assert (cfg.feed_forward_proj, cfg.dropout_rate) == ("gated-gelu", 0.1)
    # flan-t5: untied lm_head, decoder outputs not rescaled (5.x reports tie_word_embeddings=True anyway).
    assert not cfg.scale_decoder_outputs
    assert t5.lm_head.weight.data_ptr() != t5.shared.weight.data_ptr()
    assert not torch.equal(t5.lm_head.weight, t5.shared.weight)
    assert cfg.decoder_start_token_id == tok.pad_token_id == 0
    norm = t5.encoder.final_layer_norm.weight
    assert norm.min() >= 0.5 and norm.max() <= 1.5 and norm.std() > 0.1  # not the all-ones init

    # The ThinkDiff call: the decoder reads external memory in place of the encoder output.
    memory = torch.randn(2, 5, cfg.d_model)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    labels = tok(["a red car", "a cat"], padding=True, return_tensors="pt").input_ids
    labels[labels == tok.pad_token_id] = -100
    out = t5(encoder_outputs=BaseModelOutput(last_hidden_state=memory), attention_mask=mask, labels=labels)
    assert torch.isfinite(out.loss)
    gen = t5.generate(
        encoder_outputs=BaseModelOutput(last_hidden_state=memory), attention_mask=mask, max_new_tokens=4
    )
    assert gen.shape[0] == 2 and gen[0, 0] == cfg.decoder_start_token_id


def test_flux_makes_64px_images_from_prompt_or_embeddings(tiny_models: Path) -> None:
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_models / "flux")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.guidance_embeds
    d_text = pipe.transformer.config.joint_attention_dim
    d_pooled = pipe.transformer.config.pooled_projection_dim
    assert d_text == pipe.text_encoder_2.config.d_model
    assert d_pooled == pipe.text_encoder.config.hidden_size

    common = {"num_inference_steps": 2, "height": 64, "width": 64, "output_type": "pt"}
    image = pipe(prompt="a red car", **common).images
    assert image.shape == (1, 3, 64, 64)
    for length in (3, 11):  # any prompt length works with FLUX's RoPE text positions
        image = pipe(
            prompt_embeds=torch.randn(1, length, d_text),
            pooled_prompt_embeds=torch.randn(1, d_pooled),
            generator=torch.Generator().manual_seed(0),
            **common,
        ).images
        assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


def test_blip2_vision_tower_has_real_geometry(tiny_models: Path) -> None:
    from transformers import AutoImageProcessor, Blip2VisionModel

    folder = tiny_models / "blip2-vision"
    processor = AutoImageProcessor.from_pretrained(folder)
    model = Blip2VisionModel.from_pretrained(folder).eval()
    pixels = processor(images=_image(), return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 224, 224)
    # A flat grey image becomes (128/255 - mean) / std per channel: rescale + CLIP normalisation.
    grey = processor(images=Image.new("RGB", (50, 70), (128, 128, 128)), return_tensors="pt").pixel_values
    expected = (128 / 255 - torch.tensor(processor.image_mean)) / torch.tensor(processor.image_std)
    torch.testing.assert_close(grey[0, :, 0, 0], expected, atol=1e-4, rtol=0)

    with torch.no_grad():
        hidden = model(pixel_values=pixels).last_hidden_state
    assert hidden.shape == (1, TINY_DIMS["blip2_vision_tokens"], TINY_DIMS["blip2_vision_hidden"])


def test_cogvideox_makes_frames_from_prompt_embeddings(tiny_models: Path) -> None:
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline.from_pretrained(tiny_models / "cogvideox")
    pipe.set_progress_bar_config(disable=True)
    cfg = pipe.transformer.config
    assert cfg.text_embed_dim == pipe.text_encoder.config.d_model
    assert not cfg.use_rotary_positional_embeddings  # 2B style: exact text length required
    shape = (1, cfg.max_text_seq_length, cfg.text_embed_dim)
    frames = pipe(
        prompt_embeds=torch.randn(shape),
        negative_prompt_embeds=torch.zeros(shape),
        num_inference_steps=2,
        height=16,
        width=16,
        num_frames=9,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).frames
    assert frames.shape == (1, 9, 3, 16, 16)
    assert torch.isfinite(frames).all()


def test_llava_answers_about_an_image(tiny_models: Path) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_models / "llava")
    model = LlavaForConditionalGeneration.from_pretrained(tiny_models / "llava").eval()
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "USER: <image>\nWhat colour is it? ASSISTANT:"

    inputs = processor(images=_image(), text=prompt, return_tensors="pt")
    image_id = model.config.image_token_index
    assert (inputs.input_ids == image_id).sum() == model.config.image_seq_length
    assert inputs.input_ids[0, 0] == processor.tokenizer.bos_token_id
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, inputs.input_ids.shape[1] + 3)
    assert isinstance(processor.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True), str)
