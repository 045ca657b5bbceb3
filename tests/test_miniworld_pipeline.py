"""The project's inference code on the committed miniature world equals the world's own path.

``ThinkDiffPipeline`` (lvlm mode: greedy answer up to EOS, true CFG 3.0 from the FLUX folder's
``thinkdiff_decoder.json``) and ``thinkdiff generate`` are compared with ``run_vlm`` + the aligner +
``MiniWorld.images_from_embeds``, the path the report measures.

Tolerance: ``run_vlm`` reads the answer's features in one teacher-forced pass, the pipeline reads
them from ``generate``'s KV-cached steps; the two differ by float rounding (~1e-6). Through 20
guided Euler steps that can move a pixel across a uint8 rounding boundary, so images may differ
by 1-2 levels on a few values. Given the same embeddings the two paths are bit-identical.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from thinkdiff.evaluation.cobsat.protocol import prompts_list
from thinkdiff.miniworld.experiments import prompt_seed, run_vlm
from thinkdiff.miniworld.minicobsat import MiniPrompt, build_prompt
from thinkdiff.miniworld.models import DEFAULT_CFG, DEFAULT_STEPS, MiniWorld, default_weights_dir
from thinkdiff.pipelines import (
    DECODER_DESCRIPTOR,
    DecoderSpec,
    Request,
    ThinkDiffOutput,
    ThinkDiffPipeline,
    latents_to_pixels,
    pixels_to_latents,
)

WEIGHTS = default_weights_dir()
MINI_SETTINGS = {
    "height": 32,
    "width": 32,
    "num_inference_steps": DEFAULT_STEPS,
    "guidance_scale": 0.0,  # no guidance embedding: FLUX ignores it
    "true_cfg_scale": DEFAULT_CFG,
}
# (task, shot, index); when measured, the second image differed from the world's by 1 level on 1 value.
PROMPTS = [(1, 2, 0), (4, 2, 0)]


def prompt(task_id: int, shot: int, index: int) -> MiniPrompt:
    return build_prompt(task_id, shot, index, *prompts_list()[index])


@pytest.fixture(scope="module")
def world() -> MiniWorld:
    return MiniWorld(WEIGHTS)


@pytest.fixture(scope="module")
def pipe(world) -> ThinkDiffPipeline:
    return world.thinkdiff_pipeline("lvlm")


def assert_images_close(got: np.ndarray, want: np.ndarray) -> None:
    """At most 2 uint8 levels apart, on under 1% of the values (see the module docstring)."""
    assert got.shape == want.shape and got.dtype == want.dtype == np.uint8
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


# ---- ThinkDiffPipeline = the world's own path ---------------------------------------------------


@pytest.mark.parametrize(("task_id", "shot", "index"), PROMPTS)
@torch.no_grad()
def test_lvlm_pipeline_equals_the_worlds_path(world, pipe, task_id, shot, index) -> None:
    p = prompt(task_id, shot, index)
    seed = prompt_seed(p)
    out = pipe(Request(p.items(), seed=seed))

    run = run_vlm(world, [p], progress=False)[0]
    aligner, _ = world.aligner("lvlm")
    expected_LD = aligner(run.features_NH)
    assert (out.lvlm_texts[0] or "").strip() == run.answer
    embeds_LD = out.embeddings.prompt_embeds[0]
    assert embeds_LD.shape == expected_LD.shape  # the answer's tokens up to and including EOS
    torch.testing.assert_close(embeds_LD, expected_LD, rtol=0, atol=1e-4)
    # The true-CFG negative is the world's: T5("") padded to the prompt's length; pooled zero.
    torch.testing.assert_close(
        out.embeddings.negative_prompt_embeds[0], world.negative_embeds(len(expected_LD)), rtol=0, atol=0
    )
    assert torch.count_nonzero(out.embeddings.negative_pooled_prompt_embeds) == 0
    assert out.settings[0] == MINI_SETTINGS

    image = np.asarray(out.images[0])
    assert_images_close(image, world.images_from_embeds([expected_LD], [seed])[0])
    # Given the pipeline's own embeddings, the world's sampler draws exactly the same image.
    np.testing.assert_array_equal(image, world.images_from_embeds([embeds_LD], [seed])[0])


@torch.no_grad()
def test_text_bridge_encodes_the_answer_at_the_descriptors_length(world) -> None:
    from thinkdiff.miniworld.components.flux import MAX_TEXT_TOKENS, t5_states

    bridge = world.thinkdiff_pipeline("lvlm", mode="text-bridge", keep_loaded=False)
    p = prompt(*PROMPTS[0])
    out = bridge(Request(p.items(), seed=prompt_seed(p)))
    answer = run_vlm(world, [p], progress=False)[0].answer
    assert (out.lvlm_texts[0] or "").strip() == answer
    text = out.lvlm_texts[0]
    padded_LD = t5_states(world.t5_encoder, world.t5_tokenizer, [text], length=MAX_TEXT_TOKENS)[0]
    torch.testing.assert_close(out.embeddings.prompt_embeds[0], padded_LD, rtol=0, atol=0)
    np.testing.assert_array_equal(
        np.asarray(out.images[0]), world.images_from_embeds([padded_LD], [prompt_seed(p)])[0]
    )


# ---- thinkdiff generate and the demo ------------------------------------------------------------


def cli_items(p: MiniPrompt, folder: Path) -> list[str]:
    """``--text``/``--image`` arguments for a prompt (its context images written as PNG, lossless)."""
    args: list[str] = []
    for i, item in enumerate(p.items(instruction=None)):
        if isinstance(item, str):
            args += ["--text", item]
        else:
            path = folder / f"context{i}.png"
            item.save(path)
            args += ["--image", str(path)]
    return args


def test_generate_cli_on_the_mini_weights(world, pipe, tmp_path, capsys) -> None:
    from thinkdiff.cli import main

    p = prompt(*PROMPTS[0])
    seed = prompt_seed(p)
    models = ["--model", str(WEIGHTS / "thinkdiff" / "lvlm"), "--decoder", str(WEIGHTS / "flux")]
    models += [
        "--lvlm",
        str(WEIGHTS / "vlm"),
        "--stop-at-eos",
        "--greedy",
        "--num-tokens",
        str(world.inference_settings().num_tokens),
    ]
    inputs = cli_items(p, tmp_path)
    out = tmp_path / "mini.png"
    code = main(["generate", *models, *inputs, "--seed", str(seed), "--out", str(out)])
    assert code == 0 and str(out) in capsys.readouterr().out

    assert Image.open(out).size == (32, 32)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    expected = pipe(Request(p.items(), seed=seed))
    assert sidecar["settings"] == MINI_SETTINGS
    assert sidecar["lvlm_text"] == expected.lvlm_texts[0]
    assert sidecar["conditioning"]["stop_at_eos"] is True and sidecar["conditioning"]["greedy"] is True
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(expected.images[0]))

    # A job's "true_cfg" overrides the descriptor's default, like "guidance" does.
    jobs = tmp_path / "jobs.jsonl"
    items = [{flag.removeprefix("--"): value} for flag, value in zip(inputs[::2], inputs[1::2])]
    jobs.write_text(json.dumps({"items": items, "seed": seed, "true_cfg": 1.0, "out": "plain.png"}) + "\n")
    assert main(["generate", *models, "--jobs", str(jobs), "--out", str(tmp_path / "jobs")]) == 0
    plain = json.loads((tmp_path / "jobs" / "plain.json").read_text())
    assert plain["settings"] == {**MINI_SETTINGS, "true_cfg_scale": 1.0}


def test_demo_goes_through_the_pipeline(world, tmp_path, monkeypatch) -> None:
    from thinkdiff.miniworld.demo import run_demo

    calls: list[ThinkDiffOutput] = []
    original = ThinkDiffPipeline.__call__

    def spy(self, *args, **kwargs):
        calls.append(original(self, *args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(ThinkDiffPipeline, "__call__", spy)
    threads = torch.get_num_threads()
    try:
        result = run_demo(out_dir=tmp_path, task="Color-II")  # one prompt (the grid is tests/test_demo.py's)
    finally:
        torch.set_num_threads(threads)  # run_demo sets its own thread count
    assert result["path"] == tmp_path / "demo.png" and result["path"].stat().st_size > 1000
    assert "VLM answer" in result["summary"] and f"ThinkDiff {'CORRECT' if result['correct'] else 'WRONG'}" in result["summary"]
    from thinkdiff.miniworld.build import DEMO_CALIBRATED, calibrated_dir

    if calibrated_dir(WEIGHTS, DEMO_CALIBRATED).is_dir():  # the committed world draws with the calibrated aligner
        assert f"aligner: {calibrated_dir(WEIGHTS, DEMO_CALIBRATED).name}" in result["summary"]
    # The answer and the judged image are the pipeline's.
    assert len(calls) == 1 and calls[0].lvlm_texts[0].strip() == result["answer"]
    (verdict,) = world.judge.read([np.asarray(calls[0].images[0])])
    assert verdict.to_dict() == result["verdict"].to_dict()


# ---- the descriptor of a pixel-space FLUX -------------------------------------------------------


def test_the_committed_flux_is_a_pixel_space_decoder() -> None:
    from thinkdiff.pipelines.decoders import FluxDecoder

    spec = DecoderSpec.inspect(WEIGHTS / "flux")
    assert (spec.latent_space, spec.pixel_unshuffle, spec.sample_size, spec.max_sequence_length) == (
        "pixels",
        2,
        32,
        16,
    )
    decoder = FluxDecoder(spec, torch.device("cpu"), torch.float32)
    assert decoder.default_settings() == MINI_SETTINGS
    assert decoder.denoise_components == ("transformer",) and decoder.absent_components == ("vae",)


def test_pixels_round_trip_through_packed_latents() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    latents = pixels_to_latents(images, 2)
    assert latents.shape == (2, 64, 48)
    np.testing.assert_array_equal(latents_to_pixels(latents, 32, 32, 2), images)


def config_copy(folder: Path) -> Path:
    """The mini FLUX's configs alone (what ``DecoderSpec.inspect`` reads), without the descriptor."""
    for name in ("model_index.json", "transformer/config.json"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(WEIGHTS / "flux" / name, folder / name)
    return folder


def test_no_vae_and_no_descriptor_is_a_clear_error(tmp_path) -> None:
    folder = config_copy(tmp_path / "flux")
    with pytest.raises(ValueError, match=rf"FLUX decoder {folder} has no VAE .* no {DECODER_DESCRIPTOR}"):
        DecoderSpec.inspect(folder)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pixel_unshuffle": 0}, "pixel_unshuffle must be a positive integer, got 0"),
        ({"pixel_unshuffle": 4}, "pixel_unshuffle 4 gives 192 packed channels but the transformer takes 48"),
        ({"sample_size": 30}, "sample_size 30 must be a multiple of 2 \\* pixel_unshuffle = 4"),
        ({"latent_space": "vae"}, "latent_space 'vae' but .* has no VAE"),
        ({"defaults": {"steps": 20}}, "defaults.steps is not a setting"),
        ({"defaults": {"num_inference_steps": 2.5}}, "num_inference_steps must be a positive integer"),
        ({"vae": True}, "unknown keys \\['vae'\\]"),
    ],
)
def test_bad_descriptor_values_are_clear_errors(tmp_path, change, message) -> None:
    folder = config_copy(tmp_path / "flux")
    descriptor = json.loads((WEIGHTS / "flux" / DECODER_DESCRIPTOR).read_text())
    (folder / DECODER_DESCRIPTOR).write_text(json.dumps({**descriptor, **change}))
    with pytest.raises(ValueError, match=message):
        DecoderSpec.inspect(folder)


def test_pixel_space_sizes_must_fold_into_tokens(pipe) -> None:
    p = prompt(*PROMPTS[0])
    with pytest.raises(ValueError, match="call: height 30 is not a multiple of 4"):
        pipe(Request(p.items()), height=30)
    with pytest.raises(ValueError, match="request 0: width 34 is not a multiple of 4"):
        pipe(Request(p.items(), width=34))
