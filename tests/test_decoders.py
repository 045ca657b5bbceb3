"""The T5-reading decoders beyond FLUX and CogVideoX on the tiny kit: Chroma, PixArt-Sigma, SD3 and
LTX-Video. Every mode is checked against the same computation done by hand with the stock pipeline's
own ``encode_prompt``, and every image against the stock pipeline given those embeddings."""

from __future__ import annotations

import functools
import inspect
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_calibration import calibrate_config
from tests.test_calibration import proxy_model as proxy_model  # a fixture, shared
from tests.test_pipeline import image, make_model, pixels
from tests.test_pipeline import no_heavy_loads as no_heavy_loads  # a fixture, shared
from thinkdiff.models.bundle import load_model
from thinkdiff.pipelines import (
    DEFAULT_INSTRUCTION,
    InferenceSettings,
    Request,
    ThinkDiffPipeline,
    cobsat_items,
)

DECODERS = ["chroma", "pixart-sigma", "sd3", "ltx-video"]
FAST: dict[str, dict[str, Any]] = {
    "chroma": {"height": 64, "width": 64, "num_inference_steps": 2},
    "pixart-sigma": {"num_inference_steps": 2},  # the stock size: 32 latents x 8 = 256 px
    "sd3": {"num_inference_steps": 2},  # 8 latents x 8 = 64 px
    "ltx-video": {"height": 32, "width": 32, "num_frames": 9, "num_inference_steps": 2},
}
STOCK_SIZE = {"chroma": None, "pixart-sigma": 256, "sd3": 64, "ltx-video": None}
NUM_TOKENS = 16  # LVLM tokens in lvlm mode: short, so that extra text fits LTX-Video's 128


def stock_class(name: str):
    import diffusers

    return {
        "chroma": diffusers.ChromaPipeline,
        "pixart-sigma": diffusers.PixArtSigmaPipeline,
        "sd3": diffusers.StableDiffusion3Pipeline,
        "ltx-video": diffusers.LTXPipeline,
    }[name]


@functools.cache
def stock(name: str):
    """The whole stock pipeline of ``tiny:<name>`` (every component), as a user would load it."""
    from thinkdiff.models.loading import resolve_model_dir

    pipe = stock_class(name).from_pretrained(resolve_model_dir(f"tiny:{name}"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def own(name: str, text: str, length: int) -> dict[str, torch.Tensor | None]:
    """By hand: the stock ``encode_prompt`` of one text (T5 states, their mask, SD3's CLIP block and pooled)."""
    pipe = stock(name)
    if name == "chroma":
        t5, _, mask, *_ = pipe.encode_prompt(prompt=text, do_classifier_free_guidance=False, max_sequence_length=length)
        return {"t5": t5, "mask": mask, "prefix": None, "pooled": None}
    if name == "sd3":
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=text, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False, max_sequence_length=length
        )
        return {"t5": embeds[:, 77:], "mask": None, "prefix": embeds[:, :77], "pooled": pooled}
    kwargs = {"clean_caption": False} if name == "pixart-sigma" else {}
    t5, mask, _, _ = pipe.encode_prompt(
        prompt=text, do_classifier_free_guidance=False, max_sequence_length=length, **kwargs
    )
    return {"t5": t5, "mask": mask, "prefix": None, "pooled": None}


def by_hand(name: str, body: list[torch.Tensor], masks: list[torch.Tensor | None], prefix_text: str | None):
    """prompt_embeds and mask as the decoder must receive them: [SD3's CLIP block of ``prefix_text``],
    then the body parts; parts without a mask of their own are all attended."""
    if name == "sd3":
        body = [own(name, prefix_text or "", 1)["prefix"], *body]
        masks = [None, *masks]
    embeds = torch.cat(body, dim=1)
    if name == "sd3":
        return embeds, None
    dtype = next(m.dtype for m in masks if m is not None) if any(m is not None for m in masks) else None
    dtype = dtype or {"chroma": torch.float32, "pixart-sigma": torch.int64, "ltx-video": torch.bool}[name]
    mask = torch.cat(
        [torch.ones(b.shape[:2], dtype=dtype) if m is None else m.to(dtype) for b, m in zip(body, masks)], dim=1
    )
    return embeds, mask


@pytest.fixture(scope="module")
def models(tiny_env: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("decoder-models")
    out = {}
    for name in DECODERS:
        out[f"lvlm-{name}"] = make_model(root / f"lvlm-{name}", "lvlm", decoder=f"tiny:{name}")
        out[f"clip-{name}"] = make_model(root / f"clip-{name}", "clip", decoder=f"tiny:{name}", seed=1)
    return out


@pytest.fixture(scope="module")
def items(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    path = tmp_path_factory.mktemp("images") / "white.png"
    image((230, 230, 230)).save(path)
    return cobsat_items(["white", "blue", "red"], [path, image((20, 20, 220))])


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch):
    """Records the keyword arguments of every stock pipeline call."""
    calls: list[dict[str, Any]] = []
    for name in DECODERS:
        cls = stock_class(name)
        original = cls.__call__

        @functools.wraps(original)  # keeps the signature the pipeline reads its defaults from
        def recording(self, *args, _original=original, **kwargs):
            calls.append(kwargs)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__call__", recording)
    return calls


def output(name: str, out) -> Any:
    return out.videos[0][0] if name == "ltx-video" else out.images[0]


def stock_output(name: str, result) -> Any:
    return result.frames[0][0] if name == "ltx-video" else result.images[0]


def assert_equal(a: torch.Tensor | None, b: torch.Tensor | None) -> None:
    assert (a is None) == (b is None)
    if a is not None:
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- the three modes, by hand ---------------------------------------------------------------------


@pytest.mark.parametrize("name", DECODERS)
@torch.no_grad()
def test_lvlm_mode_aligned_tokens_then_own_t5_and_guidance_negative(name, models, items, spy) -> None:
    from thinkdiff.models.loading import resolve_model_dir
    from thinkdiff.models.lvlm import LVLMFeatureExtractor, SamplingSettings

    settings = InferenceSettings(num_tokens=NUM_TOKENS)
    pipe = ThinkDiffPipeline.from_pretrained(models[f"lvlm-{name}"], device="cpu", settings=settings)
    assert pipe.decoder_spec.family == name
    out = pipe(Request(items, seed=3, extra_text="a red car"), **FAST[name])

    extractor = LVLMFeatureExtractor.from_pretrained(resolve_model_dir("tiny:qwen2-vl"), device="cpu")
    lvlm = extractor.generate(
        [[DEFAULT_INSTRUCTION, *items]],
        SamplingSettings.exactly(NUM_TOKENS, temperature=0.6, top_p=0.9, seed=3),
        teacher_forced=True,  # as the pipeline computes lvlm features
    )
    aligner, _ = load_model(models[f"lvlm-{name}"])
    aligned = aligner(lvlm.features)  # [1, 16, 32]
    limit = pipe.decoder_spec.max_length
    room = min(128, limit - NUM_TOKENS)  # text_max_length, within the decoder's limit
    extra = own(name, "a red car", room)
    # lvlm: the pooled vector and SD3's CLIP block are CLIP("") even with extra text.
    expected, expected_mask = by_hand(name, [aligned, extra["t5"]], [None, extra["mask"]], prefix_text="")
    empty = own(name, "", NUM_TOKENS + room)  # the guidance negative: T5("") at the prompt's length
    negative, negative_mask = by_hand(name, [empty["t5"]], [empty["mask"]], prefix_text="")

    (call,) = spy
    assert_equal(call["prompt_embeds"], expected)
    assert_equal(call.get("prompt_attention_mask"), expected_mask)
    assert_equal(call["negative_prompt_embeds"], negative)
    assert_equal(call.get("negative_prompt_attention_mask"), negative_mask)
    assert_equal(call.get("pooled_prompt_embeds"), own(name, "", 1)["pooled"])
    assert_equal(call.get("negative_pooled_prompt_embeds"), own(name, "", 1)["pooled"])
    assert out.embeddings.num_aligned_tokens == [NUM_TOKENS]
    assert out.embeddings.num_prefix_tokens == (77 if name == "sd3" else 0)
    if name == "chroma":  # Chroma's own mask: the text, its EOS and one pad token
        tokens = len(stock(name).tokenizer("a red car").input_ids)
        assert int(call["prompt_attention_mask"].sum()) == NUM_TOKENS + tokens + 1

    # The output is the stock pipeline's for those embeddings and the request's seed.
    generator = torch.Generator().manual_seed(3)
    # PixArt-Sigma's negative_prompt defaults to "", which it refuses beside negative embeddings.
    extra_kwargs = {"negative_prompt": None} if name == "pixart-sigma" else {}
    result = stock(name)(**out.embeddings.decoder_kwargs(0), generator=generator, **FAST[name], **extra_kwargs)
    np.testing.assert_array_equal(pixels(output(name, out)), pixels(stock_output(name, result)))
    guidance = inspect.signature(stock_class(name).__call__).parameters["guidance_scale"].default
    assert out.settings[0]["guidance_scale"] == guidance
    if STOCK_SIZE[name] is not None:  # sizes from the configs when not given
        assert (out.settings[0]["height"], out.settings[0]["width"]) == (STOCK_SIZE[name],) * 2
        assert output(name, out).size == (STOCK_SIZE[name],) * 2


@pytest.mark.parametrize("name", DECODERS)
@torch.no_grad()
def test_clip_mode_image_tokens_then_own_t5_of_the_text(name, models, items, spy) -> None:
    from thinkdiff.data.image_caption import blip2_preprocess
    from thinkdiff.models.clip_vision import CLIPVisionFeatures

    # LTX-Video reads 128 tokens: one image (65 tokens) leaves room for text, two would not.
    request_items = [items[0], items[1], items[2], items[4]] if name == "ltx-video" else items
    pipe = ThinkDiffPipeline.from_pretrained(models[f"clip-{name}"], device="cpu")
    emb = pipe.encode(Request([DEFAULT_INSTRUCTION, *request_items], seed=1))

    vision = CLIPVisionFeatures.from_pretrained("tiny:blip2-vision", device="cpu")
    aligner, _ = load_model(models[f"clip-{name}"])
    images = [Image.open(items[1]).convert("RGB"), items[3]][: 1 if name == "ltx-video" else 2]
    tokens = aligner(vision(torch.stack([blip2_preprocess(im) for im in images])))  # [images, 65, 32]
    text = "Word 1: white, Word 2: blue, Word 3: red,"
    room = min(128, pipe.decoder_spec.max_length - 65 * len(images))
    mine = own(name, text, room)
    # clip mode: SD3's CLIP block and pooled vector are CLIP of the text.
    expected, expected_mask = by_hand(
        name, [*(t[None] for t in tokens), mine["t5"]], [*(None for _ in images), mine["mask"]], prefix_text=text
    )
    kwargs = emb.decoder_kwargs(0)
    assert_equal(kwargs["prompt_embeds"], expected)
    assert_equal(kwargs.get("prompt_attention_mask"), expected_mask)
    assert_equal(kwargs.get("pooled_prompt_embeds"), mine["pooled"])
    assert emb.num_aligned_tokens == [65 * len(images)] and emb.lvlm_texts == [None]


@pytest.mark.parametrize("name", DECODERS)
@torch.no_grad()
def test_text_bridge_equals_the_stock_pipeline_given_the_prompt(name, items, spy) -> None:
    pipe = ThinkDiffPipeline.from_pretrained(
        None, decoder=f"tiny:{name}", lvlm="tiny:qwen2-vl", device="cpu", settings=InferenceSettings(num_tokens=24)
    )
    out = pipe(Request(items, seed=4), **FAST[name])
    text = out.lvlm_texts[0]
    assert text
    # The stock pipeline given the same prompt text (its own encoders, its own negative of ""),
    # with the same seed, makes the same output: the bridge is the decoder's own text path.
    result = stock(name)(prompt=text, generator=torch.Generator().manual_seed(4), **FAST[name])
    np.testing.assert_array_equal(pixels(output(name, out)), pixels(stock_output(name, result)))
    assert out.embeddings.num_aligned_tokens == [0]
    mine = own(name, text, pipe.decoder_spec.max_length)
    expected, _ = by_hand(name, [mine["t5"]], [mine["mask"]], prefix_text=text)
    assert_equal(spy[0]["prompt_embeds"], expected)


# ---- guidance, loading, limits ----------------------------------------------------------------------


@pytest.mark.parametrize("name", DECODERS)
@torch.no_grad()
def test_no_guidance_no_negative_and_no_t5(name, models, items, spy, monkeypatch: pytest.MonkeyPatch) -> None:
    from thinkdiff.pipelines.decoders import DiffusionDecoder

    loaded: list[list[str]] = []
    load = DiffusionDecoder.load

    def recording(self, components):
        loaded.append(list(components))
        return load(self, components)

    monkeypatch.setattr(DiffusionDecoder, "load", recording)
    settings = InferenceSettings(num_tokens=NUM_TOKENS)
    pipe = ThinkDiffPipeline.from_pretrained(models[f"lvlm-{name}"], device="cpu", settings=settings)
    out = pipe(Request(items, seed=3), guidance_scale=1.0, **FAST[name])
    assert out.embeddings.negative_prompt_embeds is None
    assert "negative_prompt_embeds" not in spy[0]
    # Only the denoise stage, and SD3's CLIPs for the block and pooled vector of "": no T5.
    text_stages = [c for c in loaded if "transformer" not in c]
    t5 = "text_encoder_3" if name == "sd3" else "text_encoder"
    assert not any(t5 in c for c in loaded)
    assert text_stages == ([["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]] if name == "sd3" else [])


@torch.no_grad()
def test_ltx_video_limit_drops_extra_text_and_cuts_with_a_warning(models, items, spy, caplog) -> None:
    pipe = ThinkDiffPipeline.from_pretrained(
        models["lvlm-ltx-video"], device="cpu", settings=InferenceSettings(num_tokens=136)
    )
    with caplog.at_level(logging.WARNING, logger="thinkdiff.pipelines.pipeline_thinkdiff"):
        emb = pipe.encode(Request(items, seed=3, extra_text="a red car"))
    assert emb.prompt_embeds.shape[1] == 128  # 136 aligned tokens cut to LTX-Video's 128
    assert emb.num_aligned_tokens == [128]
    assert "extra text dropped" in caplog.text and "cut to the 128" in caplog.text


def test_clip_images_beyond_the_limit_are_refused_before_models_load(models, items, no_heavy_loads) -> None:
    pipe = ThinkDiffPipeline.from_pretrained(models["clip-ltx-video"], device="cpu")
    with pytest.raises(ValueError, match=r"request 0: 2 images give 130 image tokens, more than decoder"):
        pipe.encode(Request(items))
    with pytest.raises(ValueError, match="true_cfg_scale applies to FLUX decoders only"):
        ThinkDiffPipeline.from_pretrained(models["lvlm-chroma"], device="cpu")(Request(items), true_cfg_scale=2.0)


# ---- specs: sizes and limits from the configs and the installed pipelines -------------------------


def test_specs_read_sizes_from_the_configs(tiny_env: Path) -> None:
    from thinkdiff.pipelines.decoders import MAX_SEQUENCE_LENGTHS, DecoderSpec
    from thinkdiff.tiny import TINY_DIMS

    for name in DECODERS:
        spec = DecoderSpec.inspect(f"tiny:{name}")
        assert spec.family == name and spec.prompt_width == TINY_DIMS["t5_d_model"]
        # The limits are the installed pipelines' own max_sequence_length defaults.
        default = inspect.signature(stock_class(name).__call__).parameters["max_sequence_length"].default
        assert spec.max_length == MAX_SEQUENCE_LENGTHS[name] == default
    sd3 = DecoderSpec.inspect("tiny:sd3")
    assert (sd3.pooled_width, sd3.prefix_length) == (TINY_DIMS["sd3_pooled_projection_dim"], 77)
    assert [DecoderSpec.inspect(f"tiny:{n}").kind for n in DECODERS] == ["image", "image", "image", "video"]


def test_an_unknown_pipeline_is_refused_with_the_known_ones(tmp_path: Path) -> None:
    from thinkdiff.pipelines.decoders import DecoderSpec

    (tmp_path / "transformer").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "HunyuanDiTPipeline"}))
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "HunyuanDiT2DModel"}))
    with pytest.raises(ValueError, match=r"HunyuanDiTPipeline pipeline .*known decoders: FluxPipeline.*LTXPipeline"):
        DecoderSpec.inspect(tmp_path)


def test_sd3_whose_clip_widths_do_not_fit_is_refused(tiny_env: Path, tmp_path: Path) -> None:
    import shutil

    from thinkdiff.models.loading import resolve_model_dir
    from thinkdiff.pipelines.decoders import DecoderSpec

    source = resolve_model_dir("tiny:sd3")
    folder = tmp_path / "sd3"
    for part in ("model_index.json", "transformer/config.json", "text_encoder/config.json", "text_encoder_2/config.json"):
        (folder / part).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / part, folder / part)
    config = json.loads((folder / "transformer/config.json").read_text())
    config["pooled_projection_dim"] = 2048
    (folder / "transformer/config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"CLIP widths \[8, 16\] .* pooled_projection_dim 2048"):
        DecoderSpec.inspect(folder)


# ---- calibration: the decoder in the training loop ---------------------------------------------------


@pytest.mark.parametrize(
    ("name", "noise_source"),
    [("chroma", "pure"), ("pixart-sigma", "pure"), ("pixart-sigma", "teacher"), ("sd3", "teacher"), ("ltx-video", "pure")],
)
def test_one_calibration_step_on_each_decoder(name, noise_source, feature_dir, proxy_model, tmp_path) -> None:
    from thinkdiff.training.probe import calibration_step

    config = calibrate_config(
        feature_dir, proxy_model, tmp_path / "one", diffusion_decoder=f"tiny:{name}", noise_source=noise_source,
        proxy_weight=0.0,
    )  # fmt: skip
    out = calibration_step(config)
    assert out["finite"] and out["applied"] and out["grad_norm"] > 0


@torch.no_grad()
def test_pixart_noise_process_is_its_training_diffusion(tiny_env) -> None:
    from thinkdiff.pipelines.decoders import DecoderSpec, load_decoder

    decoder = load_decoder(DecoderSpec.inspect("tiny:pixart-sigma"), torch.device("cpu"), torch.float32)
    clean, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    sigmas = torch.tensor([0.3, 0.9])
    noisy = decoder.add_noise(clean, noise, sigmas)
    alphas = stock("pixart-sigma").scheduler.alphas_cumprod[torch.tensor([300, 899])].reshape(2, 1, 1, 1)
    torch.testing.assert_close(noisy, alphas.sqrt() * clean + (1 - alphas).sqrt() * noise)
    # Given the true noise, one DDIM step to sigma 0 lands on timestep 0's mix (all but clean).
    back = decoder.euler_step(noisy[:1], noise[:1], 0.3, 0.0)
    alpha_0 = stock("pixart-sigma").scheduler.alphas_cumprod[0]
    torch.testing.assert_close(back, alpha_0.sqrt() * clean[:1] + (1 - alpha_0).sqrt() * noise[:1])


@pytest.mark.parametrize("name", ["flux", "chroma", "pixart-sigma", "sd3", "ltx-video"])
def test_image_latents_have_the_denoisers_latent_shape(name, tiny_env) -> None:
    """'source' noise and flow matching put VAE latents of images where the denoiser's latents go."""
    from thinkdiff.pipelines.decoders import DecoderSpec, load_decoder

    decoder = load_decoder(DecoderSpec.inspect(f"tiny:{name}"), torch.device("cpu"), torch.float32)
    assert "vae" in decoder.denoise_components
    pipe = decoder.load(["vae", "transformer"])
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    latents = decoder.image_latents(pipe, images)
    assert tuple(latents.shape) == (2, *decoder.latent_shape(pipe, 64, 64)) and torch.isfinite(latents).all()
