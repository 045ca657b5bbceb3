"""Training: the debug presets learn, resume equals uninterrupted, bad configs fail early."""

from __future__ import annotations

import json
import math

import pytest
import torch

from thinkdiff.models.bundle import load_model
from thinkdiff.training.checkpoint import checkpoint_dirs, load_aligner_weights
from thinkdiff.training.config import TrainConfig, debug_lvlm, load_config, preset
from thinkdiff.training.trainer import Trainer, TrainingError, train


def lvlm_config(feature_dir, out, **overrides) -> TrainConfig:
    return debug_lvlm().updated(
        data=[str(feature_dir)], val_data=[str(feature_dir)], output_dir=str(out), **overrides
    )


def test_debug_lvlm_trains_and_exports(feature_dir, tmp_path) -> None:
    config = lvlm_config(feature_dir, tmp_path / "run", max_steps=40, log_every=2, save_every=20)
    result = train(config, resume="never")
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.7 * first, result.losses
    run = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "samples.jsonl", "loss.png"):
        assert (run / name).is_file(), name
    assert [p.name for p in checkpoint_dirs(run)] == ["step-0000020", "step-0000040"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "grad_norm", "samples_per_s", "data_wait_fraction", "padding_fraction"} <= set(
        rows[0]
    )
    assert any("val_loss" in r for r in rows)
    _, info = load_model(run / "model")
    assert info.variant == "lvlm" and info.in_dim == 64 and info.out_dim == 32
    assert info.diffusion_decoder == "tiny:flux"
    assert json.loads((run / "config.json").read_text())["max_steps"] == 40


def test_progress_false_draws_no_step_bar(feature_dir, tmp_path, capfd) -> None:
    """``--no-progress`` commands (a mini-world report's ablations, its build's calibrations) pass
    ``progress=False`` down to the loop: no step bar, while the default still draws one."""
    for progress in (True, False):
        config = lvlm_config(feature_dir, tmp_path / str(progress), max_steps=3, save_every=3)
        train(config, resume="never", progress=progress)
        drawn = "%|" in capfd.readouterr().err
        assert drawn == progress


def test_train_step_puts_the_proxy_in_training_mode(feature_dir, tmp_path) -> None:
    """activation_checkpointing and proxy_dropout act only in training mode: the trainer must set it."""
    for overrides, recompute in (({}, False), ({"activation_checkpointing": True}, True)):
        trainer = Trainer(lvlm_config(feature_dir, tmp_path / f"run-{recompute}", **overrides))
        calls = [0]
        trainer.proxy.t5.decoder.block[0].layer[0].register_forward_hook(
            lambda *_, calls=calls: calls.__setitem__(0, calls[0] + 1)
        )
        trainer.train_step(trainer.data.next_step())
        assert calls[0] == (2 if recompute else 1)  # checkpointed: the block runs again in backward
    trainer = Trainer(lvlm_config(feature_dir, tmp_path / "dropout", proxy_dropout=True))
    trainer.train_step(trainer.data.next_step())
    assert trainer.proxy.t5.training  # dropout 0.1 active, as in the released code
    trainer.validate()
    assert not trainer.proxy.t5.training


def test_kill_and_resume_equals_uninterrupted(feature_dir, tmp_path) -> None:
    common = {"max_steps": 12, "save_every": 3, "log_every": 1, "val_every": 0, "decode_every": 0}
    whole = Trainer(lvlm_config(feature_dir, tmp_path / "whole", **common)).fit(resume="never")
    first = Trainer(lvlm_config(feature_dir, tmp_path / "cut", **common))
    first.fit(resume="never", stop_after=7)  # "killed" after step 7; the last checkpoint is step 6
    assert checkpoint_dirs(tmp_path / "cut")[-1].name == "step-0000006"
    resumed = Trainer(lvlm_config(feature_dir, tmp_path / "cut", **common))
    rest = resumed.fit(resume="auto")
    assert rest.step == 12
    torch.testing.assert_close(torch.tensor(rest.losses), torch.tensor(whole.losses[6:]), rtol=0, atol=1e-6)
    a, _ = load_model(tmp_path / "whole" / "model")
    b, _ = load_model(tmp_path / "cut" / "model")
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == sorted(set(steps))  # no duplicated steps in the record after the resume


def test_non_finite_steps_are_skipped_then_stop(feature_dir, tmp_path, monkeypatch) -> None:
    trainer = Trainer(
        lvlm_config(
            feature_dir,
            tmp_path / "nan",
            max_steps=20,
            save_every=2,
            max_bad_steps=3,
            val_every=0,
            decode_every=0,
        )
    )
    real = trainer.loss_of
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        loss = real(batch)
        # Steps 3 and 6..: non-finite; one isolated bad step is skipped, a run of them stops.
        return loss * math.nan if calls["n"] == 3 or calls["n"] >= 6 else loss

    monkeypatch.setattr(trainer, "loss_of", flaky)
    before = {n: p.detach().clone() for n, p in trainer.unwrapped_aligner().named_parameters()}
    with pytest.raises(
        TrainingError, match=r"non-finite steps in a row.*Last good checkpoint: .*step-0000006"
    ):
        trainer.fit(resume="never")
    assert trainer.skipped_steps == 4
    # The good checkpoint holds finite weights that differ from the start.
    aligner = trainer.unwrapped_aligner()
    load_aligner_weights(aligner, checkpoint_dirs(tmp_path / "nan")[-1] / "aligner.safetensors")
    assert all(torch.isfinite(p).all() for p in aligner.parameters())
    assert any(not torch.equal(before[n], p) for n, p in aligner.named_parameters())


def test_checkpoint_loads_strictly(feature_dir, tmp_path) -> None:
    from safetensors.torch import save_file

    from thinkdiff.models.aligner import Aligner

    aligner = Aligner(64, 32)
    bad = {k: v for k, v in aligner.state_dict().items() if k != "fc2.bias"}
    bad["fc1.weight"] = torch.zeros(32, 63)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['fc2.bias'\].*fc1.weight: \[32, 63\] vs \[32, 64\]"):
        load_aligner_weights(aligner, tmp_path / "bad.safetensors")


def test_bad_configs_fail_before_work(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        preset("nope")
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        debug_lvlm().updated(data=[str(tmp_path)]).validate(num_processes=3)
    with pytest.raises(ValueError, match="no training data"):
        debug_lvlm().validate()
    with pytest.raises(ValueError, match=r"training data .* does not exist"):
        debug_lvlm().updated(data=[str(tmp_path / "missing")]).validate()
    with pytest.raises(ValueError, match="unknown config field"):
        load_config("debug-lvlm", None, {"learning_rate": 1.0})
    with pytest.raises(ValueError, match="aligner_norm must be"):
        debug_lvlm().updated(data=[str(tmp_path)], aligner_norm="batchnorm").validate()
    with pytest.raises(ValueError, match="micro batch 3 does not divide"):
        debug_lvlm().updated(data=[str(tmp_path)], micro_batch_size=3).validate()


def test_presets_are_valid_and_paper_faithful(tmp_path) -> None:
    lvlm, clip = preset("lvlm-qwen2vl-flant5xxl"), preset("clip-eva-flant5xxl")
    assert (lvlm.global_batch_size, lvlm.max_steps, clip.global_batch_size, clip.max_steps) == (
        96,
        25_000,
        168,
        100_000,
    )
    for config in (lvlm, clip):
        assert (config.lr, config.warmup_start_lr, config.warmup_steps, config.min_lr) == (
            1e-4,
            1e-6,
            2000,
            8e-5,
        )
        assert (config.beta1, config.beta2, config.weight_decay, config.grad_clip) == (0.9, 0.999, 0.05, None)
        assert not config.proxy_dropout
    for name in ("lvlm-qwen2vl-flant5xxl", "clip-eva-flant5xxl", "debug-lvlm", "debug-clip"):
        for processes in (1, 2, 4):
            preset(name).updated(data=[str(tmp_path)]).validate(num_processes=processes)


def test_schedule_and_decay_groups() -> None:
    from thinkdiff.models.aligner import Aligner
    from thinkdiff.training.schedule import build_optimizer, lr_at

    config = preset("lvlm-qwen2vl-flant5xxl")
    assert lr_at(0, config) == pytest.approx(1e-6)
    assert lr_at(1000, config) == pytest.approx(1e-6 + (1e-4 - 1e-6) / 2)
    assert lr_at(2000, config) == pytest.approx(1e-4)
    assert lr_at(25_000, config) == pytest.approx(8e-5)
    optimizer = build_optimizer(Aligner(8, 4), config)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and all(p.ndim == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3  # two biases and the norm


def test_debug_clip_trains_on_image_caption_shards(tiny_env, tmp_path) -> None:
    from thinkdiff.data.synthetic import write_tar_shards
    from thinkdiff.training.config import debug_clip

    write_tar_shards(tmp_path / "tars", num_shards=2, samples_per_shard=8)  # shard 0 holds bad samples too
    config = debug_clip().updated(
        data=[str(tmp_path / "tars")],
        val_data=[str(tmp_path / "tars")],
        output_dir=str(tmp_path / "run"),
        global_batch_size=4,
        max_steps=80,
        log_every=10,
        val_every=40,
        decode_every=40,
        save_every=40,
    )
    result = train(config, resume="never")
    assert sum(result.losses[-10:]) / 10 < 0.8 * sum(result.losses[:10]) / 10, result.losses
    _, info = load_model(tmp_path / "run" / "model")
    assert info.variant == "clip" and info.in_dim == 48 and info.source_model == "tiny:blip2-vision"
    decoded = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert decoded and all(row["input"] and row["target"] for row in decoded)


def test_the_loop_optimises_the_objective_it_is_given(feature_dir, tmp_path) -> None:
    """The trainer takes any class with the objective interface; what it records reaches thinkdiff.json."""
    from thinkdiff.training.proxy_objective import ProxyObjective

    calls: list[int] = []

    class Recording(ProxyObjective):
        def loss(self, aligner, batch, step):
            calls.append(step)
            return 2.0 * super().loss(aligner, batch, step)

        def record(self):
            return {"objective": "recording"}

    config = lvlm_config(feature_dir, tmp_path / "run", max_steps=3, val_every=0, decode_every=0)
    trainer = Trainer(config, objective=Recording)
    result = trainer.fit(resume="never")
    assert calls == [0, 1, 2]  # one micro-batch per step, with the step it belongs to
    proxy = train(config.updated(output_dir=str(tmp_path / "proxy")), resume="never")
    # The same first batch and weights: the step's loss is the objective's (twice the proxy's).
    assert result.losses[0] == pytest.approx(2.0 * proxy.losses[0], rel=1e-6)
    _, info = load_model(tmp_path / "run" / "model")
    assert info.extra["objective"] == "recording"


def test_the_trainer_imports_no_objective_and_no_decoder() -> None:
    """The loop knows the objective interface and the list of objectives, nothing specific."""
    import ast
    from pathlib import Path

    import thinkdiff.training.trainer as trainer_module

    tree = ast.parse(Path(trainer_module.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    specific = {"thinkdiff.objectives", "thinkdiff.training.calibration", "thinkdiff.training.proxy_objective"}
    assert not imported & specific, imported & specific
    assert not any(name and name.startswith("thinkdiff.pipelines") for name in imported), imported
    assert "thinkdiff.training.objective" in imported
