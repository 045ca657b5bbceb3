"""Calibration, the diffusion decoder in the training loop: the objective on the tiny kit, token
alignment across two different tokenizers, task-format calibration data, and bad configs."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import CAPTIONS
from thinkdiff.models.bundle import load_model
from thinkdiff.training.calibration import align_tokens, alignment_word_agreement
from thinkdiff.training.checkpoint import load_aligner_weights
from thinkdiff.training.config import debug_calibrate_clip, debug_calibrate_lvlm, debug_lvlm, preset
from thinkdiff.training.probe import calibration_step
from thinkdiff.training.trainer import Trainer, train


@pytest.fixture(scope="module")
def proxy_model(feature_dir, tmp_path_factory):
    """A briefly proxy-trained (no split) ThinkDiff-LVLM aligner: the calibration start."""
    out = tmp_path_factory.mktemp("proxy")
    config = debug_lvlm().updated(
        data=[str(feature_dir)], val_data=[], output_dir=str(out), max_steps=4, split=False, val_every=0,
        decode_every=0,
    )  # fmt: skip
    return train(config, resume="never").model_dir


def calibrate_config(feature_dir, proxy_model, out, **overrides):
    return debug_calibrate_lvlm().updated(
        data=[str(feature_dir)],
        val_data=[str(feature_dir)],
        output_dir=str(out),
        init_aligner=str(proxy_model),
        calibration_size=64,
        **overrides,
    )


@pytest.mark.parametrize(
    "overrides",
    [{}, {"noise_source": "pure", "proxy_weight": 0.0}, {"calibration_loss": "regress", "proxy_weight": 0.0}],
)
def test_calibration_starts_from_the_aligner_learns_and_leaves_the_decoder_frozen(
    feature_dir, proxy_model, tmp_path, overrides
) -> None:
    config = calibrate_config(feature_dir, proxy_model, tmp_path / "run", max_steps=12, lr=1e-2, **overrides)
    trainer = Trainer(config)
    start, _ = load_model(proxy_model)
    assert all(torch.equal(a, b) for a, b in zip(trainer.unwrapped_aligner().state_dict().values(), start.state_dict().values()))
    transformer = trainer.objective.calibration.pipe.transformer
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    result = trainer.fit(resume="never")
    assert not any(p.requires_grad for p in transformer.parameters())
    assert all(torch.equal(before[k], v) for k, v in transformer.state_dict().items())
    assert sum(result.losses[-3:]) < sum(result.losses[:3]), result.losses
    _, info = load_model(tmp_path / "run" / "model")
    assert info.extra["objective"] == "calibrate" and info.extra["init_aligner"] == str(proxy_model)
    assert info.extra["calibrate_from_scratch"] is False
    if overrides.get("calibration_loss") != "regress":
        assert trainer.objective.calibration._cache  # teacher states are cached per text


def test_calibration_resume_equals_uninterrupted(feature_dir, proxy_model, tmp_path) -> None:
    common = {"max_steps": 6, "save_every": 3, "log_every": 1, "val_every": 0}
    whole = Trainer(calibrate_config(feature_dir, proxy_model, tmp_path / "whole", **common)).fit(resume="never")
    Trainer(calibrate_config(feature_dir, proxy_model, tmp_path / "cut", **common)).fit(resume="never", stop_after=3)
    resumed = Trainer(calibrate_config(feature_dir, proxy_model, tmp_path / "cut", **common)).fit(resume="auto")
    assert resumed.losses == pytest.approx(whole.losses[3:], rel=1e-5)
    a, _ = load_model(tmp_path / "whole" / "model")
    b, _ = load_model(tmp_path / "cut" / "model")
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_clip_calibration_with_source_image_noise(tiny_env, tmp_path) -> None:
    from thinkdiff.data.synthetic import write_tar_shards

    write_tar_shards(tmp_path / "tars", num_shards=1, samples_per_shard=8)
    config = debug_calibrate_clip().updated(
        data=[str(tmp_path / "tars")], val_data=[], output_dir=str(tmp_path / "run"), global_batch_size=4,
        max_steps=3, noise_source="source", calibration_size=64, val_every=0, calibrate_from_scratch=True,
    )  # fmt: skip
    result = train(config, resume="never")
    assert result.model_dir is not None and all(torch.isfinite(torch.tensor(result.losses)))


def test_one_calibration_step_for_the_gpu_check(feature_dir, proxy_model, tmp_path) -> None:
    out = calibration_step(calibrate_config(feature_dir, proxy_model, tmp_path / "one"))
    assert out["finite"] and out["applied"] and out["grad_norm"] > 0 and out["peak_memory"] == 0


def test_bad_calibration_configs_fail_before_work(feature_dir, tmp_path) -> None:
    base = debug_calibrate_lvlm().updated(data=[str(feature_dir)])
    for overrides, message in (
        ({"split": True}, "split to false"),
        ({"noise_source": "source"}, "set target_images"),
        ({"calibration_loss": "mse"}, "calibration_loss"),
        ({"noise_min_sigma": 0.0}, "noise_min_sigma"),
        ({"init_aligner": str(tmp_path / "missing")}, "does not exist"),
        ({"objective": "other"}, "objective"),
        ({}, "objective 'calibrate' starts from a trained aligner: give init_aligner"),
        ({"objective": "proxy", "calibrate_from_scratch": True}, "calibrate_from_scratch is for"),
        ({"init_aligner": str(tmp_path), "calibrate_from_scratch": True}, "without init_aligner"),
    ):
        with pytest.raises(ValueError, match=message):
            base.updated(**overrides).validate()
    with pytest.raises(ValueError, match="lvlm only"):
        debug_calibrate_clip().updated(data=[str(feature_dir)], calibration_loss="regress").validate()
    for name in ("calibrate-lvlm-flux", "calibrate-clip-flux"):
        config = preset(name)
        assert config.objective == "calibrate" and config.activation_checkpointing
    # 'auto' noise: the images' latents where they are at hand, else the teacher's own path.
    assert base.calibration_noise == "teacher"
    assert base.updated(target_images=str(tmp_path)).calibration_noise == "source"
    assert debug_calibrate_clip().calibration_noise == "source"
    assert base.updated(noise_source="pure", target_images=str(tmp_path)).calibration_noise == "pure"


def test_offset_alignment_works_across_two_different_tokenizers(tiny_env) -> None:
    from transformers import AutoTokenizer

    qwen = AutoTokenizer.from_pretrained(tiny_env / "qwen2-vl")  # byte-level BPE
    t5 = AutoTokenizer.from_pretrained(tiny_env / "t5")  # unigram with "▁" pieces
    text = "a checkered house on a white background"
    ids = qwen(text, add_special_tokens=False).input_ids
    assert len(ids) != len(t5(text).input_ids) - 1  # the tokenizations differ
    assert align_tokens(text, ids, qwen, t5, "one-to-one") is None
    pairs = align_tokens(text, [*ids, qwen.eos_token_id], qwen, t5, "offsets")
    assert pairs[-1] == (len(ids), len(t5(text).input_ids) - 1)  # EOS with EOS
    assert [t for _, t in pairs] == sorted(t for _, t in pairs)  # monotone
    texts = [*CAPTIONS, "Create an image of a blueish dog, on grass!"]
    for a, b in ((qwen, t5), (t5, qwen)):
        measured = alignment_word_agreement(texts, a, b)
        assert measured["coverage"] == 1.0 and measured["same_word"] == 1.0, measured


def test_task_format_extraction_groups_samples_and_answers_greedily(tiny_env, tmp_path) -> None:
    from PIL import Image

    from thinkdiff.data.extraction import ExtractionSettings, extract_features, make_engine
    from thinkdiff.data.feature_shards import FeatureShards
    from thinkdiff.data.task_prompts import group_task_prompts, interleaved_items

    folder = tmp_path / "source"
    folder.mkdir()
    for i in range(8):
        Image.new("RGB", (32, 32), (30 * i, 10, 200)).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"a thing number {i} on a table.\n")
    settings = ExtractionSettings(max_new_tokens=6, task_shots=(1, 2), task_text_words=3, greedy=True)
    engine = make_engine("hf", "tiny:qwen2-vl", settings, device="cpu", dtype=torch.float32)
    extract_features(folder, tmp_path / "a", engine, settings, batch_size=2, progress=False)
    extract_features(folder, tmp_path / "b", engine, settings, batch_size=2, progress=False)
    shards = FeatureShards(tmp_path / "a")
    meta = shards.metadata(0)
    # Groups of 2, 3, 2 samples (the last 1 too few for a 2-shot prompt): shots cycle 1, 2, 1.
    assert [m["shots"] for m in meta] == [1, 2, 1]
    assert [m["target_key"] for m in meta] == ["001", "004", "006"]
    assert meta[1]["prompt"] == "a thing number" and meta[1]["caption"] == "a thing number 4 on a table."
    # Greedy: the same answers and features every time.
    other = FeatureShards(tmp_path / "b")
    assert [m["text"] for m in meta] == [m["text"] for m in other.metadata(0)]
    assert torch.equal(shards[0]["features"], other[0]["features"])
    # The stretch signal: flow matching onto each prompt's target image (the group's last image).
    config = debug_calibrate_lvlm().updated(
        data=[str(tmp_path / "a")], val_data=[], output_dir=str(tmp_path / "flow"), global_batch_size=3,
        max_steps=2, calibration_loss="flow", target_images=str(folder), calibration_size=64, val_every=0,
        calibrate_from_scratch=True,
    )  # fmt: skip
    result = train(config, resume="never")
    assert result.model_dir is not None and all(torch.isfinite(torch.tensor(result.losses)))
    with pytest.raises(ValueError, match="needs target_images"):
        config.updated(target_images=None).validate()
    # 'source' noise for ThinkDiff-LVLM: the same target images' latents, noised, under distillation.
    source = config.updated(calibration_loss="distill", noise_source="source", output_dir=str(tmp_path / "src"))
    result = train(source, resume="never")
    assert result.model_dir is not None and all(torch.isfinite(torch.tensor(result.losses)))
    items = interleaved_items(["red", "blue"], ["IMG"], "Do it.")
    assert items == ["Do it.", "Word 1: red, ", "IMG", "\n\nWord 2: blue, "]
    with pytest.raises(ValueError, match="one text more"):
        interleaved_items(["red"], ["IMG"], None)
    assert next(group_task_prompts([], (1,)), None) is None


def test_flow_target_images_are_read_like_every_model_input(tmp_path) -> None:
    """A transparent PNG target lands on white and a 16-bit one is scaled (thinkdiff.imaging)."""
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    from thinkdiff.training.calibration import Calibration

    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "001.png")
    Image.fromarray(np.full((8, 8), 0x8000, np.uint16)).save(tmp_path / "002.png")
    reader = SimpleNamespace(
        config=SimpleNamespace(target_images=str(tmp_path)), width=8, height=8, _target_files=None
    )
    images = Calibration.target_images(reader, ["001:task1", "002:task2"])
    assert images.shape == (2, 8, 8, 3) and images.dtype == np.uint8
    assert (images[0] == 255).all() and (images[1] == 128).all()


def test_mini_task_is_the_benchmark_task_type() -> None:
    from thinkdiff.evaluation.cobsat.protocol import TASKS, CobsatTask
    from thinkdiff.miniworld.minicobsat import MINI_TASKS, MiniTask

    assert MiniTask is CobsatTask
    assert all(isinstance(t, CobsatTask) for t in MINI_TASKS.values())
    assert MINI_TASKS[2].x_items[0] == "circle" and TASKS[1].x_items[0] == "yellow"
    assert MINI_TASKS[2].obj_category == "shape"


def test_proxy_checkpoint_is_a_valid_init(proxy_model) -> None:
    from thinkdiff.models.aligner import Aligner

    aligner = Aligner(64, 32)
    load_aligner_weights(aligner, proxy_model / "diffusion_pytorch_model.safetensors")
    assert json.loads((proxy_model / "thinkdiff.json").read_text())["extra"]["objective"] == "proxy"


def test_calibrate_without_an_aligner_to_start_from_is_refused_in_one_line(feature_dir, tmp_path, capsys) -> None:
    """Calibration starts from a trained aligner; from random weights only when asked, and recorded."""
    from thinkdiff.cli import main

    out = tmp_path / "run"
    argv = ["train", "--preset", "debug-calibrate-lvlm", "--data", str(feature_dir), "--output-dir", str(out)]
    capsys.readouterr()
    assert main([*argv, "--val-data", str(feature_dir)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "give init_aligner" in err and "calibrate_from_scratch" in err
    assert not out.exists()
    assert main([*argv, "--calibrate-from-scratch", "true", "--max-steps", "1", "--val-every", "0"]) == 0
    _, info = load_model(out / "model")
    assert info.extra["calibrate_from_scratch"] is True and info.extra["init_aligner"] is None
