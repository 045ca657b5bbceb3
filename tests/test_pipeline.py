"""The ThinkDiff inference pipeline on the tiny kit: every mode, both decoders, by-hand equality."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from thinkdiff.models.aligner import Aligner
from thinkdiff.models.bundle import ThinkDiffInfo, load_model, save_model
from thinkdiff.pipelines import (
    DEFAULT_INSTRUCTION,
    InferenceSettings,
    Request,
    SeededImageGenerator,
    ThinkDiffPipeline,
    cobsat_items,
)

FLUX_FAST = {"height": 64, "width": 64, "num_inference_steps": 2}
COG_FAST = {"height": 16, "width": 16, "num_frames": 9, "num_inference_steps": 2}
MINI_FLUX = Path(__file__).parents[1] / "src" / "thinkdiff" / "miniworld" / "weights" / "flux"


def make_model(
    folder: Path, variant: str, out_dim: int = 32, decoder: str = "tiny:flux", seed: int = 0
) -> Path:
    """A trained-looking model folder: a random aligner between tiny components."""
    in_dim, source = (64, "tiny:qwen2-vl") if variant == "lvlm" else (48, "tiny:blip2-vision")
    torch.manual_seed(seed)
    info = ThinkDiffInfo(
        variant=variant,
        source_model=source,
        proxy_t5="tiny:t5",
        diffusion_decoder=decoder,
        in_dim=in_dim,
        out_dim=out_dim,
    )
    return save_model(folder, Aligner(in_dim, out_dim), info)


def image(color: tuple[int, int, int], size: int = 56) -> Image.Image:
    # 56 px = 4 visual tokens in the tiny Qwen2-VL: keeps the LVLM stage fast.
    rng = np.random.default_rng(sum(color))
    noise = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(np.clip(np.array(color, dtype=np.uint8) + noise, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def models(tiny_env: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipeline-models")
    return {
        "lvlm": make_model(root / "lvlm", "lvlm"),
        "clip": make_model(root / "clip", "clip", seed=1),
    }


@pytest.fixture(scope="module")
def items(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    """CoBSAT-style input, one image as a file path (as the CLI passes them), one as PIL."""
    path = tmp_path_factory.mktemp("images") / "white.png"
    image((230, 230, 230)).save(path)
    return cobsat_items(["white", "blue", "red"], [path, image((20, 20, 220))])


@pytest.fixture(scope="module")
def flux(tiny_env: Path):
    from diffusers import FluxPipeline

    from thinkdiff.models.loading import resolve_model_dir

    pipe = FluxPipeline.from_pretrained(resolve_model_dir("tiny:flux"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def cogvideox(tiny_env: Path):
    from diffusers import CogVideoXPipeline

    from thinkdiff.models.loading import resolve_model_dir

    pipe = CogVideoXPipeline.from_pretrained(resolve_model_dir("tiny:cogvideox"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch):
    """Records the keyword arguments every stock FluxPipeline / CogVideoXPipeline call receives."""
    from diffusers import CogVideoXPipeline, FluxPipeline

    calls: list[dict[str, Any]] = []
    for cls in (FluxPipeline, CogVideoXPipeline):
        original = cls.__call__

        @functools.wraps(original)  # keeps the signature the pipeline reads its defaults from
        def recording(self, *args, _original=original, **kwargs):
            calls.append(kwargs)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__call__", recording)
    return calls


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def lvlm_by_hand(items: list[Any], seed: int, exactly: bool = True):
    from thinkdiff.models.loading import resolve_model_dir
    from thinkdiff.models.lvlm import LVLMFeatureExtractor, SamplingSettings

    extractor = LVLMFeatureExtractor.from_pretrained(resolve_model_dir("tiny:qwen2-vl"), device="cpu")
    if exactly:
        sampling = SamplingSettings.exactly(128, temperature=0.6, top_p=0.9, seed=seed)
    else:
        sampling = SamplingSettings(max_new_tokens=128, temperature=0.6, top_p=0.9, seed=seed)
    # As the pipeline runs generate, without hidden states: lvlm mode (exactly) recomputes the
    # features teacher-forced; a prompt writer needs its text only.
    return extractor.generate(
        [[DEFAULT_INSTRUCTION, *items]], sampling, teacher_forced=True, with_states=exactly
    )


# ---- the three modes, checked against the same computation done step by step -----------------


@torch.no_grad()
def test_lvlm_mode_hands_flux_the_hand_computed_embeddings(models, items, flux, spy) -> None:
    pipe = ThinkDiffPipeline.from_pretrained(models["lvlm"], device="cpu")
    assert (pipe.mode, pipe.decoder_spec.family, pipe.source_model) == ("lvlm", "flux", "tiny:qwen2-vl")
    out = pipe([Request(items, seed=3), Request(items, seed=3, extra_text="a red car")], **FLUX_FAST)

    # By hand: LVLM (instruction + items, exactly 128 tokens) -> aligner; pooled = CLIP("").
    lvlm = lvlm_by_hand(items, seed=3)
    aligner, _ = load_model(models["lvlm"])
    aligned = aligner(lvlm.features)  # [1, 128, 32]
    _, pooled_empty, _ = flux.encode_prompt(prompt="", max_sequence_length=128)
    extra_t5, _, _ = flux.encode_prompt(prompt="a red car", max_sequence_length=128)

    assert out.lvlm_texts == [lvlm.texts[0], lvlm.texts[0]]
    assert [c["prompt_embeds"].shape[1] for c in spy] == [128, 256]  # different lengths: two calls
    torch.testing.assert_close(spy[0]["prompt_embeds"], aligned, rtol=0, atol=0)
    torch.testing.assert_close(spy[0]["pooled_prompt_embeds"], pooled_empty, rtol=0, atol=0)
    torch.testing.assert_close(spy[1]["prompt_embeds"], torch.cat([aligned, extra_t5], dim=1), rtol=0, atol=0)
    torch.testing.assert_close(spy[1]["pooled_prompt_embeds"], pooled_empty, rtol=0, atol=0)
    assert out.embeddings.num_aligned_tokens == [128, 128]
    assert out.embeddings.prompt_attention_mask.sum(1).tolist() == [128, 256]

    # The image is the stock pipeline's for those embeddings and the request's seed.
    generator = torch.Generator().manual_seed(3)
    stock = flux(**out.embeddings.decoder_kwargs(0), generator=generator, **FLUX_FAST).images[0]
    assert out.images[0].size == (64, 64)
    np.testing.assert_array_equal(pixels(out.images[0]), pixels(stock))
    assert out.settings[0] == {**FLUX_FAST, "guidance_scale": 3.5, "true_cfg_scale": 1.0}
    assert {"load_lvlm", "lvlm", "aligner", "text_encoders", "decoder"} <= set(out.timings)


@torch.no_grad()
def test_clip_mode_hands_flux_image_tokens_then_its_own_t5(models, items, flux, spy) -> None:
    from thinkdiff.data.image_caption import blip2_preprocess
    from thinkdiff.models.clip_vision import CLIPVisionFeatures

    pipe = ThinkDiffPipeline.from_pretrained(models["clip"], device="cpu")
    out = pipe(Request([DEFAULT_INSTRUCTION, *items], seed=1), **FLUX_FAST)

    vision = CLIPVisionFeatures.from_pretrained("tiny:blip2-vision", device="cpu")
    aligner, _ = load_model(models["clip"])
    images = [Image.open(items[1]).convert("RGB"), items[3]]
    tokens = aligner(vision(torch.stack([blip2_preprocess(im) for im in images])))  # [2, 65, 32]
    # The instruction is dropped; texts are stripped and joined with spaces.
    text = "Word 1: white, Word 2: blue, Word 3: red,"
    t5, pooled, _ = flux.encode_prompt(prompt=text, max_sequence_length=128)
    expected = torch.cat([tokens[0], tokens[1], t5[0]])[None]

    assert out.lvlm_texts == [None]
    assert spy[0]["prompt_embeds"].shape == (1, 65 * 2 + 128, 32)
    torch.testing.assert_close(spy[0]["prompt_embeds"], expected, rtol=0, atol=0)
    torch.testing.assert_close(spy[0]["pooled_prompt_embeds"], pooled, rtol=0, atol=0)
    assert out.embeddings.num_aligned_tokens == [130]
    assert out.images[0].size == (64, 64)
    # encode() alone gives the same embeddings, ready for a stock pipeline.
    alone = pipe.encode(Request([DEFAULT_INSTRUCTION, *items], seed=1)).decoder_kwargs(0)
    torch.testing.assert_close(alone["prompt_embeds"], expected, rtol=0, atol=0)
    torch.testing.assert_close(alone["pooled_prompt_embeds"], pooled, rtol=0, atol=0)


@torch.no_grad()
def test_text_bridge_encodes_the_lvlm_prompt_with_the_decoders_encoders(models, items, flux, spy) -> None:
    pipe = ThinkDiffPipeline.from_pretrained(None, decoder="tiny:flux", lvlm="tiny:qwen2-vl", device="cpu")
    assert pipe.mode == "text-bridge" and pipe.aligner is None
    # With an lvlm model folder the bridge uses that folder's LVLM and decoder: a fair comparison.
    paired = ThinkDiffPipeline.from_pretrained(models["lvlm"], mode="text-bridge", device="cpu")
    assert (paired.source_model, paired.decoder_spec.name, paired.aligner) == (
        "tiny:qwen2-vl",
        "tiny:flux",
        None,
    )
    out = pipe(Request(items, seed=4), **FLUX_FAST)

    lvlm = lvlm_by_hand(items, seed=4, exactly=False)  # may stop at EOS, like any prompt writer
    t5, pooled, _ = flux.encode_prompt(prompt=lvlm.texts[0], max_sequence_length=512)
    assert out.lvlm_texts == lvlm.texts
    torch.testing.assert_close(spy[0]["prompt_embeds"], t5, rtol=0, atol=0)
    torch.testing.assert_close(spy[0]["pooled_prompt_embeds"], pooled, rtol=0, atol=0)
    assert out.embeddings.num_aligned_tokens == [0]
    assert out.images[0].size == (64, 64)


# ---- CogVideoX -------------------------------------------------------------------------------


@torch.no_grad()
def test_cogvideox_lvlm_mode_fills_its_fixed_prompt_length(models, items, cogvideox, spy, tmp_path) -> None:
    model = make_model(tmp_path / "lvlm-cog", "lvlm", decoder="tiny:cogvideox")
    pipe = ThinkDiffPipeline.from_pretrained(model, device="cpu")
    assert pipe.decoder_spec.kind == "video" and pipe.decoder_spec.required_length == 226
    out = pipe(Request(items, seed=2, extra_text="a red car"), **COG_FAST)

    assert out.images == [] and len(out.videos) == 1
    frames = out.videos[0]
    assert len(frames) == 9 and frames[0].size == (16, 16)
    lvlm = lvlm_by_hand(items, seed=2)
    aligner, _ = load_model(model)
    # 128 aligned tokens, then CogVideoX's own T5 of the extra text filling 226 - 128 = 98.
    tail, _ = cogvideox.encode_prompt(
        prompt="a red car", do_classifier_free_guidance=False, max_sequence_length=98
    )
    negative, _ = cogvideox.encode_prompt(
        prompt="", do_classifier_free_guidance=False, max_sequence_length=226
    )
    torch.testing.assert_close(spy[0]["prompt_embeds"], torch.cat([aligner(lvlm.features), tail], dim=1))
    torch.testing.assert_close(spy[0]["negative_prompt_embeds"], negative, rtol=0, atol=0)


@torch.no_grad()
def test_cogvideox_clip_mode_frames_and_length(models, items, tmp_path) -> None:
    model = make_model(tmp_path / "clip-cog", "clip", decoder="tiny:cogvideox")
    pipe = ThinkDiffPipeline.from_pretrained(model, device="cpu")
    out = pipe(Request(items, seed=0), **COG_FAST)
    assert out.embeddings.prompt_embeds.shape == (1, 226, 32)  # 130 image tokens + 96 T5 tokens
    assert out.embeddings.num_aligned_tokens == [130]
    assert len(out.videos[0]) == 9
    assert out.settings[0] == {**COG_FAST, "guidance_scale": 6}


# ---- FLUX true classifier-free guidance ---------------------------------------------------------


@torch.no_grad()
def test_true_cfg_scale_one_computes_no_negative_and_loads_no_t5(
    models, items, spy, monkeypatch: pytest.MonkeyPatch
) -> None:
    from thinkdiff.pipelines.decoders import FluxDecoder

    loaded: list[list[str]] = []  # components of every decoder pipeline loaded
    t5_lengths: list[int] = []  # every T5 encoding asked for
    load, encode_text = FluxDecoder.load, FluxDecoder.encode_text

    def recording_load(self, components):
        loaded.append(list(components))
        return load(self, components)

    def recording_encode_text(self, pipe, texts, max_length):
        t5_lengths.append(max_length)
        return encode_text(self, pipe, texts, max_length)

    monkeypatch.setattr(FluxDecoder, "load", recording_load)
    monkeypatch.setattr(FluxDecoder, "encode_text", recording_encode_text)
    pipe = ThinkDiffPipeline.from_pretrained(models["lvlm"], device="cpu")
    one = pipe(Request(items, seed=3), true_cfg_scale=1.0, **FLUX_FAST)
    assert one.embeddings.negative_prompt_embeds is None
    assert one.embeddings.negative_pooled_prompt_embeds is None
    assert "negative_prompt_embeds" not in spy[0] and spy[0]["true_cfg_scale"] == 1.0
    # lvlm mode without extra text or CFG: CLIP only (the pooled vector of ""), T5 neither loaded nor run.
    assert t5_lengths == [] and pipe._negatives == {}
    assert loaded and not any("text_encoder_2" in components for components in loaded)

    # The same probes see the negative as soon as the scale is above 1: T5("") at the prompt's 128 tokens.
    pipe.encode(Request(items, seed=3), true_cfg_scale=1.5)
    assert t5_lengths == [128] and "text_encoder_2" in loaded[-1]


@torch.no_grad()
def test_true_cfg_negative_is_t5_of_empty_at_the_prompts_length(models, items, flux, spy) -> None:
    pipe = ThinkDiffPipeline.from_pretrained(models["lvlm"], device="cpu")
    requests = [
        Request(items, seed=3),
        Request(items, seed=3, extra_text="a red car"),  # 128 + 128 tokens: a second decoder call
        Request(items, seed=3, true_cfg_scale=1.0),  # the request's own value wins: no CFG
    ]
    out = pipe(requests, true_cfg_scale=2.5, **FLUX_FAST)
    assert [s["true_cfg_scale"] for s in out.settings] == [2.5, 2.5, 1.0]

    _, pooled_empty, _ = flux.encode_prompt(prompt="", max_sequence_length=128)
    by_length = {c["prompt_embeds"].shape[1]: c for c in spy if c["true_cfg_scale"] > 1}
    assert sorted(by_length) == [128, 256]
    for length, call in by_length.items():
        negative, _, _ = flux.encode_prompt(prompt="", max_sequence_length=length)
        assert call["negative_prompt_embeds"].shape == call["prompt_embeds"].shape
        torch.testing.assert_close(call["negative_prompt_embeds"], negative, rtol=0, atol=0)
        torch.testing.assert_close(call["negative_pooled_prompt_embeds"], pooled_empty, rtol=0, atol=0)
    assert "negative_prompt_embeds" not in next(c for c in spy if c["true_cfg_scale"] == 1.0)

    # The image is the stock pipeline's true CFG with those embeddings, and differs from no CFG.
    kwargs = out.embeddings.decoder_kwargs(1)
    assert kwargs["negative_prompt_embeds"].shape == kwargs["prompt_embeds"].shape == (1, 256, 32)
    stock = flux(**kwargs, true_cfg_scale=2.5, generator=torch.Generator().manual_seed(3), **FLUX_FAST)
    np.testing.assert_array_equal(pixels(out.images[1]), pixels(stock.images[0]))
    assert np.abs(pixels(out.images[0]) - pixels(out.images[2])).max() > 0

    # encode() resolves the scale the same way and returns the negatives for every row.
    emb = pipe.encode(Request(items, seed=3), true_cfg_scale=2.5)
    torch.testing.assert_close(emb.negative_prompt_embeds, by_length[128]["negative_prompt_embeds"])
    assert pipe.encode(Request(items, seed=3)).negative_prompt_embeds is None


def test_true_cfg_scale_is_for_flux_only(models, items, tmp_path, no_heavy_loads) -> None:
    model = make_model(tmp_path / "lvlm-cog", "lvlm", decoder="tiny:cogvideox")
    pipe = ThinkDiffPipeline.from_pretrained(model, device="cpu")
    with pytest.raises(ValueError, match="true_cfg_scale applies to FLUX decoders only"):
        pipe(Request(items), true_cfg_scale=2.0)
    with pytest.raises(ValueError, match="request 0: true_cfg_scale applies to FLUX"):
        pipe(Request(items, true_cfg_scale=2.0))


# ---- LVLM answer modes -------------------------------------------------------------------------


@torch.no_grad()
def test_lvlm_stop_at_eos_and_greedy(models, items, spy, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import shutil

    from thinkdiff.models.loading import resolve_model_dir
    from thinkdiff.models.lvlm import LVLMFeatureExtractor, SamplingSettings

    # By hand: 16 greedy tokens of the tiny LVLM, which never emits its EOS here.
    extractor = LVLMFeatureExtractor.from_pretrained(resolve_model_dir("tiny:qwen2-vl"), device="cpu")
    full = extractor.generate(
        [[DEFAULT_INSTRUCTION, *items]], SamplingSettings(max_new_tokens=16, do_sample=False)
    )
    tokens = full.token_ids[0].tolist()
    assert int(full.feature_mask[0].sum()) == 16
    # The same LVLM whose generation_config makes its 5th greedy token an EOS: the answer ends there.
    n = 5
    assert tokens[n - 1] not in tokens[: n - 1]
    lvlm = tmp_path / "qwen2-vl-eos"
    shutil.copytree(resolve_model_dir("tiny:qwen2-vl"), lvlm)
    config = json.loads((lvlm / "generation_config.json").read_text())
    config["eos_token_id"] = [*config["eos_token_id"], tokens[n - 1]]
    (lvlm / "generation_config.json").write_text(json.dumps(config))

    asked: list[tuple[int, SamplingSettings]] = []
    original = LVLMFeatureExtractor.generate

    def recording(self, prompts, sampling=None, **kwargs):
        asked.append((len(prompts), sampling))
        return original(self, prompts, sampling, **kwargs)

    monkeypatch.setattr(LVLMFeatureExtractor, "generate", recording)
    settings = InferenceSettings(num_tokens=16, stop_at_eos=True, greedy=True, encoder_batch_size=2)
    pipe = ThinkDiffPipeline.from_pretrained(models["lvlm"], lvlm=lvlm, device="cpu", settings=settings)
    out = pipe([Request(items, seed=3), Request(items, seed=4)], **FLUX_FAST)
    # Greedy: the seed does not matter, so both requests share one unseeded call; EOS is allowed
    # from the first token.
    assert [(b, a.max_new_tokens, a.min_new_tokens, a.do_sample, a.seed) for b, a in asked] == [
        (2, 16, 0, False, None)
    ]

    # Features up to and including the EOS, which the decoded answer ends with.
    aligner, _ = load_model(models["lvlm"])
    text = extractor.processor.tokenizer.decode(tokens[:n], skip_special_tokens=True)
    assert out.lvlm_texts == [text, text]
    assert out.embeddings.num_aligned_tokens == [n, n]
    for call in spy:
        torch.testing.assert_close(call["prompt_embeds"], aligner(full.features[:, :n]))


# ---- decoder descriptors ------------------------------------------------------------------------


def test_decoder_spec_is_hashable() -> None:
    from thinkdiff.pipelines.decoders import DecoderSpec

    assert hash(DecoderSpec.inspect(MINI_FLUX)) == hash(DecoderSpec.inspect(MINI_FLUX))


def test_a_bad_descriptor_is_not_written(tmp_path) -> None:
    import shutil

    from thinkdiff.pipelines.decoders import DECODER_DESCRIPTOR, DecoderSpec, write_pixel_space_descriptor

    folder = tmp_path / "flux"  # the mini FLUX's configs: all that is read
    (folder / "transformer").mkdir(parents=True)
    shutil.copy(MINI_FLUX / "model_index.json", folder)
    shutil.copy(MINI_FLUX / "transformer" / "config.json", folder / "transformer")
    with pytest.raises(ValueError, match="pixel_unshuffle 3 gives 108 packed channels"):
        write_pixel_space_descriptor(folder, pixel_unshuffle=3, sample_size=30)
    assert not (folder / DECODER_DESCRIPTOR).exists()
    assert sorted(p.name for p in folder.iterdir()) == ["model_index.json", "transformer"]  # no temp file

    path = write_pixel_space_descriptor(
        folder, pixel_unshuffle=2, sample_size=32, defaults={"true_cfg_scale": 3}
    )
    assert path == folder / DECODER_DESCRIPTOR
    assert dict(DecoderSpec.inspect(folder).defaults) == {"true_cfg_scale": 3}


# ---- determinism, batching, reuse --------------------------------------------------------------


@torch.no_grad()
def test_same_seed_same_image_and_batching_changes_nothing(models, items) -> None:
    settings = InferenceSettings(decoder_batch_size=4, encoder_batch_size=4)
    pipe = ThinkDiffPipeline.from_pretrained(models["clip"], device="cpu", settings=settings)
    alone = [pipe(Request(items, seed=s), **FLUX_FAST).images[0] for s in (5, 5, 6)]
    np.testing.assert_array_equal(pixels(alone[0]), pixels(alone[1]))
    assert np.abs(pixels(alone[0]) - pixels(alone[2])).max() > 0

    # One decoder call for three requests (one generator each) gives the same images.
    batched = pipe([Request(items, seed=s) for s in (5, 6, 5)], **FLUX_FAST)
    for got, want in zip(batched.images, [alone[0], alone[2], alone[0]]):
        np.testing.assert_allclose(pixels(got), pixels(want), atol=1)

    # The LVLM stage is seeded too: same request, same seed, same text and image.
    lvlm = ThinkDiffPipeline.from_pretrained(models["lvlm"], device="cpu")
    first, second = (lvlm(Request(items, seed=7), **FLUX_FAST) for _ in range(2))
    assert first.lvlm_texts == second.lvlm_texts
    np.testing.assert_array_equal(pixels(first.images[0]), pixels(second.images[0]))


@torch.no_grad()
def test_keep_loaded_loads_once_and_matches_staged(models, items) -> None:
    staged = ThinkDiffPipeline.from_pretrained(models["lvlm"], device="cpu")
    kept = ThinkDiffPipeline.from_pretrained(models["lvlm"], device="cpu", keep_loaded=True)
    reference = staged(Request(items, seed=9), **FLUX_FAST)
    assert staged._loaded == {}  # every stage released its models
    first = kept(Request(items, seed=9), **FLUX_FAST)
    second = kept(Request(items, seed=9, extra_text="blue"), **FLUX_FAST)  # now needs T5 too
    third = kept(Request(items, seed=9), **FLUX_FAST)
    assert not any(k.startswith("load_") for k in third.timings)
    assert "load_decoder" in second.timings  # reloaded once with the T5 encoder added
    for out in (first, third):
        np.testing.assert_array_equal(pixels(out.images[0]), pixels(reference.images[0]))
    kept.release()
    assert kept._loaded == {}


@torch.no_grad()
def test_seeded_image_generator_for_evaluation_harnesses(models, items) -> None:
    pipe = ThinkDiffPipeline.from_pretrained(models["clip"], device="cpu", keep_loaded=True)
    generator = SeededImageGenerator(pipe, **FLUX_FAST)
    one = generator(items, seed=123)
    batch = generator.generate_batch([items, items], [123, 124])
    assert isinstance(one, Image.Image) and len(batch) == 2
    np.testing.assert_allclose(pixels(batch[0]), pixels(one), atol=1)


# ---- inputs and formatting ---------------------------------------------------------------------


def test_cobsat_items_match_the_evaluation_protocol() -> None:
    from thinkdiff.evaluation.cobsat.protocol import COBSAT_INSTRUCTION, build_prompt, shown

    assert DEFAULT_INSTRUCTION == COBSAT_INSTRUCTION
    prompt = build_prompt(1, 2, 0, [0, 1, 2], [0, 1, 2, 3])
    images = [Path("/data") / rel for rel in prompt.image_inputs]
    ours = cobsat_items([shown(x) for x in prompt.x_items], images, instruction=DEFAULT_INSTRUCTION)
    assert ours == prompt.thinkdiff_items("/data")
    assert cobsat_items(["white", "blue", "red"], ["A", "B"]) == [
        "Word 1: white, ",
        "A",
        "\n\nWord 2: blue, ",
        "B",
        "\n\nWord 3: red, ",
    ]


def test_instruction_is_added_once(models) -> None:
    pipe = ThinkDiffPipeline.from_pretrained(models["lvlm"], device="cpu")
    assert pipe._lvlm_items(["Word 1: a, "], DEFAULT_INSTRUCTION) == [DEFAULT_INSTRUCTION, "Word 1: a, "]
    for given in (DEFAULT_INSTRUCTION, "hinted"):  # the plain instruction gives way to the hinted one
        assert pipe._lvlm_items([given, "Word 1: a, "], "hinted") == ["hinted", "Word 1: a, "]
    pipe.settings.instruction = None
    assert pipe._lvlm_items(["Word 1: a, "], None) == ["Word 1: a, "]


# ---- bad input: clear errors before anything heavy loads ---------------------------------------


@pytest.fixture
def no_heavy_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import DiffusionPipeline

    from thinkdiff.models.clip_vision import CLIPVisionFeatures
    from thinkdiff.models.lvlm import LVLMFeatureExtractor

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    for cls in (LVLMFeatureExtractor, CLIPVisionFeatures, DiffusionPipeline):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


def test_bad_inputs_fail_before_models_load(models, items, tmp_path, no_heavy_loads) -> None:
    pipe = ThinkDiffPipeline.from_pretrained(
        models["lvlm"], device="cpu", settings=InferenceSettings(max_images=2)
    )
    with pytest.raises(ValueError, match="no inputs"):
        pipe(Request([]))
    with pytest.raises(ValueError, match="no inputs"):
        pipe(Request(["  "]))
    with pytest.raises(FileNotFoundError, match=r"image file not found: .*missing.png"):
        pipe(Request(["x", tmp_path / "missing.png"]))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=r"cannot read image .*broken.png"):
        pipe(Request(["x", broken]))
    with pytest.raises(ValueError, match="request 1: 3 images, more than the 2 accepted"):
        pipe([Request(items), Request([*items, image((1, 2, 3))])])
    with pytest.raises(ValueError, match="items must be str"):
        pipe(Request(["x", 3]))
    with pytest.raises(ValueError, match="num_frames applies to video decoders"):
        pipe(Request(items), num_frames=9)

    cog_clip = make_model(tmp_path / "clip-cog", "clip", decoder="tiny:cogvideox")
    four = [image((i * 50, 0, 0)) for i in range(4)]
    with pytest.raises(ValueError, match="4 images give 260 image tokens, more than decoder tiny:cogvideox"):
        ThinkDiffPipeline.from_pretrained(cog_clip, device="cpu")(Request(four))


def test_bad_models_and_modes_fail_before_models_load(models, tmp_path, no_heavy_loads) -> None:
    with pytest.raises(ValueError, match="ThinkDiff-LVLM model; mode clip needs a clip model"):
        ThinkDiffPipeline.from_pretrained(models["lvlm"], mode="clip")
    with pytest.raises(ValueError, match="ThinkDiff-CLIP model; mode lvlm needs a lvlm model"):
        ThinkDiffPipeline.from_pretrained(models["clip"], mode="lvlm")
    with pytest.raises(ValueError, match="unknown mode 'dream'"):
        ThinkDiffPipeline.from_pretrained(models["lvlm"], mode="dream")
    with pytest.raises(ValueError, match="mode lvlm needs a trained ThinkDiff model folder"):
        ThinkDiffPipeline.from_pretrained(None, mode="lvlm", decoder="tiny:flux")
    narrow = make_model(tmp_path / "narrow", "lvlm", out_dim=16)
    with pytest.raises(ValueError, match="16-wide prompt embeddings but decoder tiny:flux takes 32-wide"):
        ThinkDiffPipeline.from_pretrained(narrow)
    with pytest.raises(ValueError, match="it needs a GPU"):
        ThinkDiffPipeline.from_pretrained(models["lvlm"], device="cpu", offload="model")
    with pytest.raises(ValueError, match="not a diffusers pipeline folder"):
        ThinkDiffPipeline.from_pretrained(models["lvlm"], decoder="tiny:qwen2-vl")
    with pytest.raises(ValueError, match="gives 48-wide features but the aligner reads 64-wide"):
        ThinkDiffPipeline.from_pretrained(models["lvlm"], lvlm="tiny:blip2-vision")
    with pytest.raises(FileNotFoundError, match=r"ThinkDiff model folder .* does not exist"):
        ThinkDiffPipeline.from_pretrained(tmp_path / "nowhere")


# ---- the library's bounds are the command line's -----------------------------------------------


@pytest.mark.parametrize(
    ("settings", "request_kwargs", "call_kwargs", "message"),
    [
        ({}, {"num_inference_steps": 99999999999}, {}, r"^request 0: num_inference_steps 99999999999 is above 1000, "),
        ({}, {}, {"num_inference_steps": 99999999999}, r"^call: num_inference_steps 99999999999 is above 1000, "),
        ({"num_tokens": 100000000}, {}, {}, r"^num_tokens 100000000 is above 4096, the most tokens LVLM tiny:qwen2-vl"),
        ({"text_max_length": 100000000}, {}, {}, r"^text_max_length 100000000 is above 512, the most T5 tokens"),
        ({"temperature": float("nan")}, {}, {}, r"^temperature nan is not a finite number"),
        ({}, {"guidance_scale": float("inf")}, {}, r"^request 0: guidance_scale inf is not a finite number"),
        ({}, {}, {"guidance_scale": float("nan")}, r"^call: guidance_scale nan is not a finite number"),
        ({}, {"seed": -1}, {}, r"^request 0: seed -1 is not a seed: seeds run from 0 to 9223372036854775807"),
        ({}, {"seed": 2**64}, {}, r"^request 0: seed 18446744073709551616 is not a seed"),
    ],
)
def test_the_python_api_checks_the_command_lines_bounds(
    tiny_env, items, no_heavy_loads, settings, request_kwargs, call_kwargs, message
) -> None:
    pipe = ThinkDiffPipeline.from_pretrained(
        None, decoder="tiny:flux", lvlm="tiny:qwen2-vl", device="cpu", settings=InferenceSettings(**settings)
    )
    with pytest.raises(ValueError, match=message):
        pipe(Request(items, **request_kwargs), **call_kwargs)
    if not call_kwargs:  # the input check alone refuses it too (as diffusers' check_inputs does)
        with pytest.raises(ValueError, match=message):
            pipe.check(Request(items, **request_kwargs))


def test_the_python_api_checks_a_gguf_files_header(tiny_env, tmp_path) -> None:
    text = tmp_path / "notes.gguf"
    text.write_text("just some notes")
    with pytest.raises(ValueError, match=r"notes.gguf is not a GGUF file \(it starts with b'just', not b'GGUF'\)"):
        ThinkDiffPipeline.from_pretrained(None, decoder="tiny:flux", lvlm="tiny:qwen2-vl", transformer_file=text)


def test_frames_are_bounded_by_the_decoders_config(tiny_env, items, tmp_path, no_heavy_loads) -> None:
    import json
    import shutil

    from thinkdiff.limits import LARGEST_FRAMES
    from thinkdiff.models.loading import resolve_model_dir

    # sincos positions (tiny:cogvideox, like CogVideoX-2B): any count runs, bounded by memory.
    pipe = ThinkDiffPipeline.from_pretrained(None, decoder="tiny:cogvideox", lvlm="tiny:qwen2-vl", device="cpu")
    with pytest.raises(ValueError, match=rf"^request 0: num_frames 100000 is above {LARGEST_FRAMES}, the most frames"):
        pipe(Request(items, num_frames=100000))
    with pytest.raises(ValueError, match=rf"^call: num_frames 100000 is above {LARGEST_FRAMES}, "):
        pipe(Request(items), num_frames=100000)
    # Learned positions (CogVideoX-5B-I2V): the table's sample_frames frames.
    learned = tmp_path / "cog-learned"
    shutil.copytree(resolve_model_dir("tiny:cogvideox"), learned)
    config_file = learned / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config["use_learned_positional_embeddings"] = True
    config_file.write_text(json.dumps(config))
    pipe = ThinkDiffPipeline.from_pretrained(None, decoder=str(learned), lvlm="tiny:qwen2-vl", device="cpu")
    frames = config["sample_frames"]
    with pytest.raises(ValueError, match=rf"num_frames {frames + 4} is above {frames}, the most frames decoder .* has learned"):
        pipe.check(Request(items, num_frames=frames + 4))
    pipe.check(Request(items, num_frames=frames))  # the table's own count passes
