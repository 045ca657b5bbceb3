"""Reliability of training on bad or hostile input: checkpoints that would run code, broken
checkpoints and data, changed settings on resume, leftovers of killed runs.

Every test builds the bad input itself and checks the exit status, the one-line message naming the
file and the problem, that no traceback is printed, and that nothing is written that should not be.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from thinkdiff.cli import main
from thinkdiff.training.checkpoint import (
    LEGACY_STATE,
    STATE_JSON,
    STATE_TENSORS,
    checkpoint_dirs,
    read_trainer_state,
)
from thinkdiff.training.config import debug_lvlm
from thinkdiff.training.trainer import Trainer, train

QUICK = {"log_every": 1, "val_every": 0, "decode_every": 0, "save_every": 3, "keep_last": 5}


class Payload:
    """Unpickling this runs a shell command that leaves ``marker`` behind."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def quick_config(feature_dir: Path, out: Path, **overrides):
    return debug_lvlm().updated(data=[str(feature_dir)], output_dir=str(out), **{**QUICK, **overrides})


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Run ``thinkdiff ARGV`` in this process; return its exit status and stderr."""
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().err


def train_cli(feature_dir: Path, out: Path, *extra: str) -> list[str]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in QUICK.items()]
    return ["train", "--preset", "debug-lvlm", "--data", str(feature_dir), "--output-dir", str(out), *flags, *extra]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the SHA-256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_one_line_error(err: str, *needles: str) -> None:
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], (needle, err)


def write_evil_state(folder: Path, marker: Path) -> None:
    for name in (STATE_JSON, STATE_TENSORS):
        (folder / name).unlink(missing_ok=True)
    torch.save({"step": 3, "world_size": 1, "evil": Payload(marker)}, folder / LEGACY_STATE)


@pytest.fixture(scope="module")
def short_run(feature_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 6-step run with checkpoints at steps 3 and 6 (copy it before changing it)."""
    out = tmp_path_factory.mktemp("short") / "run"
    train(quick_config(feature_dir, out, max_steps=6), resume="never")
    return out


def copy_run(short_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    return run


# ---- no code runs from a checkpoint ------------------------------------------------------


def test_checkpoint_state_is_json_and_safetensors(short_run: Path) -> None:
    folder = checkpoint_dirs(short_run)[-1]
    assert sorted(p.name for p in folder.iterdir()) == ["aligner.safetensors", STATE_JSON, STATE_TENSORS]
    state = read_trainer_state(folder)
    assert state["step"] == 6 and state["world_size"] == 1
    assert isinstance(state["rng"]["python"], tuple) and state["rng"]["numpy"][1].dtype.name == "uint32"
    assert all(isinstance(k, int) for k in state["optimizer"]["state"])


def test_crafted_trainer_state_is_refused_and_runs_nothing(
    feature_dir: Path, short_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evil = tmp_path / "evil"
    shutil.copytree(checkpoint_dirs(short_run)[0], evil)
    marker = tmp_path / "marker"
    write_evil_state(evil, marker)
    out = tmp_path / "new-run"
    code, err = cli(capsys, *train_cli(feature_dir, out, "--max-steps=9", "--resume", str(evil)))
    assert code == 2
    assert_one_line_error(err, str(evil / LEGACY_STATE), "refused", "would run code")
    assert not marker.exists(), "the pickle ran its command"
    assert not out.exists(), "nothing may be written for a refused resume"


def test_auto_resume_skips_a_crafted_newest_checkpoint(
    feature_dir: Path, short_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = copy_run(short_run, tmp_path)
    marker = tmp_path / "marker"
    write_evil_state(checkpoint_dirs(run)[-1], marker)
    trainer = Trainer(quick_config(feature_dir, run, max_steps=6))
    assert trainer.resume("auto")
    assert trainer.step == 3 and not marker.exists()
    assert "skipping checkpoint step-0000006" in caplog.text and "would run code" in caplog.text


def test_legacy_trainer_state_still_resumes(feature_dir: Path, short_run: Path, tmp_path: Path) -> None:
    """A checkpoint of the earlier pickle format resumes (read with weights_only=True) exactly."""
    run = copy_run(short_run, tmp_path)
    folder = checkpoint_dirs(run)[0]
    torch.save(read_trainer_state(folder), folder / LEGACY_STATE)  # what the old code wrote
    (folder / STATE_JSON).unlink()
    (folder / STATE_TENSORS).unlink()
    shutil.rmtree(checkpoint_dirs(run)[-1])
    resumed = Trainer(quick_config(feature_dir, run, max_steps=6)).fit(resume="auto")
    whole = json.loads((short_run / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    assert resumed.step == 6
    assert resumed.losses[-1] == pytest.approx(whole, abs=1e-6)


def test_other_pickle_loads_run_nothing(tmp_path: Path) -> None:
    """The two other readers of user-supplied pickles (released checkpoints, .bin towers) refuse a
    payload without running it; nothing in the package passes trust_remote_code."""
    from thinkdiff.models.state_dicts import load_prefixed_state_dict
    from thinkdiff.pipelines.official import convert_official_checkpoint

    marker = tmp_path / "marker"
    folder = tmp_path / "tower"
    folder.mkdir()
    torch.save({"vision.w": Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"corrupt checkpoint shard .*pytorch_model.bin"):
        load_prefixed_state_dict(folder, "vision.", torch.float32)
    torch.save({"state_dict": Payload(marker)}, tmp_path / "released.pth")
    with pytest.raises(ValueError, match=r"released.pth holds pickled objects besides tensors"):
        convert_official_checkpoint(tmp_path / "released.pth", tmp_path / "model", "lvlm")
    assert not marker.exists() and not (tmp_path / "model").exists()
    src = Path(__file__).parents[1] / "src" / "thinkdiff"
    offenders = [
        str(p)
        for p in src.rglob("*.py")
        if any(s in p.read_text() for s in ("trust_remote_code=True", "weights_only=False", "allow_pickle=True"))
    ]
    assert offenders == []


# ---- a resume is the same run ------------------------------------------------------------


def test_resume_with_changed_settings_is_refused_naming_them(
    feature_dir: Path, short_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(short_run, tmp_path)
    before = snapshot(run)
    code, err = cli(capsys, *train_cli(feature_dir, run, "--max-steps=9", "--lr=0.01", "--seed=3"))
    assert code == 2
    assert_one_line_error(err, str(checkpoint_dirs(run)[-1]), "lr: 0.003 -> 0.01", "max_steps: 6 -> 9")
    assert "seed: 42 -> 3" in err and "--allow-change max_steps lr seed" in err
    assert snapshot(run) == before


def test_a_deliberate_change_is_allowed_and_recorded(
    feature_dir: Path, short_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(short_run, tmp_path)
    # log_every and keep_last do not change the result: never compared.
    argv = train_cli(feature_dir, run, "--max-steps=9", "--log-every=2", "--allow-change", "max-steps")
    code, err = cli(capsys, *argv)
    assert code == 0, err
    assert checkpoint_dirs(run)[-1].name == "step-0000009"
    changes = [json.loads(line) for line in (run / "changes.jsonl").read_text().splitlines()]
    assert changes == [
        {"step": 6, "checkpoint": str(run / "checkpoints" / "step-0000006"), "field": "max_steps", "old": 6, "new": 9}
    ]
    code, err = cli(capsys, *train_cli(feature_dir, run, "--allow-change", "learning_rate"))
    assert code == 2 and "unknown config field(s) learning_rate" in err


# ---- one line, never a traceback --------------------------------------------------------


@pytest.mark.parametrize("broken", [STATE_JSON, STATE_TENSORS, "aligner.safetensors"])
def test_a_truncated_checkpoint_falls_back_to_the_newest_good_one(
    feature_dir: Path,
    short_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    broken: str,
) -> None:
    run = copy_run(short_run, tmp_path)
    newest = checkpoint_dirs(run)[-1]
    data = (newest / broken).read_bytes()
    (newest / broken).write_bytes(data[: len(data) // 2])
    # Named explicitly: refused with one line; nothing written.
    before = snapshot(run)
    code, err = cli(capsys, *train_cli(feature_dir, run, "--max-steps=6", "--resume", str(newest)))
    assert code == 2
    assert_one_line_error(err, str(newest / broken), "truncated")
    assert snapshot(run) == before
    # auto: skips it, saying which and why, and redoes steps 4..6 from step 3.
    code, err = cli(capsys, *train_cli(feature_dir, run, "--max-steps=6"))
    assert code == 0 and "Traceback" not in err
    assert "skipping checkpoint step-0000006" in caplog.text and str(newest / broken) in caplog.text
    assert "resuming from step-0000003, the newest good checkpoint" in caplog.text
    assert read_trainer_state(checkpoint_dirs(run)[-1])["step"] == 6  # rewritten whole
    final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    whole = json.loads((short_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["step"] == 6 and final["loss"] == pytest.approx(whole["loss"], abs=1e-6)


def test_a_finished_checkpoint_resumed_into_a_new_folder_makes_a_whole_run(
    feature_dir: Path, short_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from thinkdiff.models.bundle import load_model

    source = copy_run(short_run, tmp_path)
    before = snapshot(source)
    new = tmp_path / "new"
    finished = checkpoint_dirs(source)[-1]
    code, err = cli(capsys, *train_cli(feature_dir, new, "--max-steps=6", "--resume", str(finished)))
    assert code == 0 and "Traceback" not in err, err
    assert snapshot(source) == before  # the run it continues is only read
    assert [p.name for p in checkpoint_dirs(new)] == ["step-0000006"]  # its own copy: a whole run
    exported, _ = load_model(new / "model")
    original, _ = load_model(source / "model")
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), original.state_dict().values()))
    # The new folder continues on its own: train longer from its checkpoint, not from step 0.
    code, err = cli(capsys, *train_cli(feature_dir, new, "--max-steps=9", "--allow-change", "max_steps"))
    assert code == 0 and "Traceback" not in err, err
    assert read_trainer_state(checkpoint_dirs(new)[-1])["step"] == 9
    steps = [json.loads(line)["step"] for line in (new / "metrics.jsonl").read_text().splitlines()]
    assert steps == [7, 8, 9]


def test_resume_naming_a_run_folder_says_so(
    feature_dir: Path, short_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = cli(capsys, *train_cli(feature_dir, tmp_path / "new", "--max-steps=6", "--resume", str(short_run)))
    assert code == 2
    assert_one_line_error(err, f"{short_run} is a run folder, not a checkpoint", "--resume auto")
    assert not (tmp_path / "new").exists()


def test_no_good_checkpoint_at_all_is_one_line(
    feature_dir: Path, short_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(short_run, tmp_path)
    for folder in checkpoint_dirs(run):
        (folder / STATE_JSON).write_text("{")
    before = snapshot(run)
    code, err = cli(capsys, *train_cli(feature_dir, run, "--max-steps=6"))
    assert code == 2
    assert_one_line_error(err, "no usable checkpoint", "step-0000003", "step-0000006", "--resume never")
    assert snapshot(run) == before


def test_a_cut_off_metrics_line_is_dropped_with_a_warning(
    feature_dir: Path,
    short_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    run = copy_run(short_run, tmp_path)
    shutil.rmtree(checkpoint_dirs(run)[-1])  # killed after step 6 was logged, before its checkpoint
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 7, "lo')
    code, err = cli(capsys, *train_cli(feature_dir, run, "--max-steps=6"))
    assert code == 0 and "Traceback" not in err
    assert f"{metrics} line 7 is cut off or unreadable" in caplog.text
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_output_dir_naming_a_file_is_one_line(
    feature_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("mine")
    code, err = cli(capsys, *train_cli(feature_dir, tmp_path / "file", "--max-steps=3"))
    assert code == 2
    assert_one_line_error(err, f"output_dir {tmp_path / 'file'} is an existing file")
    assert (tmp_path / "file").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("missing", r"missing \['fc2.bias'\]"),
        ("extra", r"unexpected \['extra.weight'\]"),
        ("shape", r"wrong shapes \['fc1.weight: \[32, 63\] vs \[32, 64\]'\]"),
        ("truncated", r"truncated or not safetensors"),
    ],
)
def test_an_aligner_folder_loads_strictly(short_run: Path, tmp_path: Path, edit: str, message: str) -> None:
    from safetensors.torch import load_file, save_file

    from thinkdiff.models.bundle import WEIGHTS_FILE, load_model

    model = tmp_path / "model"
    shutil.copytree(short_run / "model", model)
    weights = model / WEIGHTS_FILE
    state = load_file(str(weights))
    if edit == "missing":
        del state["fc2.bias"]
    elif edit == "extra":
        state["extra.weight"] = torch.zeros(2)
    elif edit == "shape":
        state["fc1.weight"] = torch.zeros(32, 63)
    if edit == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    else:
        save_file(state, str(weights))
    with pytest.raises(ValueError, match=message) as raised:
        load_model(model)
    assert str(weights) in str(raised.value) and "\n" not in str(raised.value)


def test_generate_out_below_a_file_is_one_line(
    tiny_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from thinkdiff.models.aligner import Aligner
    from thinkdiff.models.bundle import ThinkDiffInfo, save_model

    info = ThinkDiffInfo("lvlm", "tiny:qwen2-vl", "tiny:t5", "tiny:flux", in_dim=64, out_dim=32)
    model = save_model(tmp_path / "model", Aligner(64, 32), info)
    (tmp_path / "file").write_text("mine")
    fast = ["--height", "64", "--width", "64", "--steps", "1"]
    code, err = cli(capsys, "generate", "--model", str(model), "--text", "a", "--out", str(tmp_path / "file" / "x.png"), *fast)
    assert code == 2
    assert_one_line_error(err, "is a file, not a folder", str(tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "mine"


# ---- training checks its data -----------------------------------------------------------


@pytest.fixture()
def own_features(feature_dir: Path, tmp_path: Path) -> Path:
    """A copy of the session's feature folder, to damage."""
    return Path(shutil.copytree(feature_dir, tmp_path / "features"))


def flip_a_byte(path: Path, offset: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "workers"),
    [("shard-000000.safetensors", 0), ("shard-000000.safetensors", 1), ("shard-000000.jsonl", 1)],
)
def test_a_shard_whose_checksum_differs_is_refused_on_first_read(
    own_features: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str, workers: int
) -> None:
    for shard in ("shard-000000", "shard-000001"):  # every shard, so the very first batch hits one
        target = own_features / damage.replace("shard-000000", shard)
        if target.suffix == ".jsonl":  # an edited caption, same length
            edited = target.read_text().replace('"text": "a ', '"text": "A ', 1)
            assert edited != target.read_text()
            target.write_text(edited)
        else:
            flip_a_byte(target)
    out = tmp_path / "run"
    code, err = cli(capsys, *train_cli(own_features, out, "--max-steps=3", f"--num-workers={workers}"))
    assert code == 2
    assert_one_line_error(err, "feature shard file", damage.removeprefix("shard-000000"), "SHA-256 differs")
    assert not out.exists()  # no config.json, tensorboard/ or metrics of a run that never stepped


def test_a_run_refused_on_first_read_leaves_an_existing_folder_as_it_was(
    own_features: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for shard in ("shard-000000", "shard-000001"):
        flip_a_byte(own_features / f"{shard}.safetensors")
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, err = cli(capsys, *train_cli(own_features, out, "--max-steps=3"))
    assert code == 2
    assert_one_line_error(err, "SHA-256 differs")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        ("truncate", "shard-000001.safetensors: "),
        ("record", "shard-000001.json: the shard's record is missing"),
        ("index", "shard-000001.json: differs from index.json"),
    ],
)
def test_a_shard_that_does_not_match_its_record_is_refused_before_the_first_step(
    own_features: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str, needle: str
) -> None:
    shard = own_features / "shard-000001.safetensors"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "record":
        (own_features / "shard-000001.json").unlink()
    else:
        record = json.loads((own_features / "shard-000001.json").read_text())
        record["num_samples"] -= 1
        (own_features / "shard-000001.json").write_text(json.dumps(record))
    out = tmp_path / "run"
    code, err = cli(capsys, *train_cli(own_features, out, "--max-steps=3"))
    assert code == 2
    assert_one_line_error(err, f"feature folder {own_features} does not match its records", needle)
    assert not out.exists()


def test_a_shard_header_that_contradicts_its_record_is_refused(own_features: Path) -> None:
    from thinkdiff.data.feature_shards import ShardMismatchError, check_feature_folder

    shard = own_features / "shard-000000.safetensors"
    data = shard.read_bytes()
    # The same bytes, but the header claims one token more (same length: padding absorbs it).
    header = data[8:4096]
    tokens = json.loads(header)["token_ids"]["shape"][0]
    forged = header.replace(f'"token_ids":{{"dtype":"I32","shape":[{tokens}]'.encode(),
                            f'"token_ids":{{"dtype":"I32","shape":[{tokens + 1}]'.encode())
    assert forged != header
    shard.write_bytes(data[:8] + forged[: len(header)].ljust(len(header), b" ") + data[4096:])
    record = json.loads((own_features / "shard-000000.json").read_text())
    assert shard.stat().st_size == record["files"]["features"]["bytes"]
    with pytest.raises(ShardMismatchError, match=rf"shard-000000.safetensors: token_ids is I32 \[{tokens + 1}\]"):
        check_feature_folder(own_features)


def test_features_of_another_width_or_lvlm_are_refused(
    tiny_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoTokenizer

    from tests.conftest import write_feature_folder
    from thinkdiff.data.feature_shards import write_index

    tokenizer = AutoTokenizer.from_pretrained(tiny_env / "qwen2-vl")
    narrow = write_feature_folder(tmp_path / "narrow", tokenizer, width=48, shards=1, per_shard=8)
    out = tmp_path / "run"
    code, err = cli(capsys, *train_cli(narrow, out, "--max-steps=3"))
    assert code == 2
    assert_one_line_error(err, f"{narrow} holds 48-wide features", "LVLM tiny:qwen2-vl has hidden size 64")
    other = write_feature_folder(tmp_path / "other", tokenizer, shards=1, per_shard=8)
    write_index(other, num_source_shards=1, model="Qwen/Qwen2.5-VL-7B-Instruct")
    code, err = cli(capsys, *train_cli(other, out, "--max-steps=3"))
    assert code == 2
    assert_one_line_error(err, "made by LVLM Qwen/Qwen2.5-VL-7B-Instruct", "lvlm is tiny:qwen2-vl")
    assert not out.exists()


# ---- no debris ---------------------------------------------------------------------------


def dead_pid() -> int:
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_rerun_removes_the_temporary_files_of_a_killed_run_only(
    feature_dir: Path, short_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import subprocess

    from thinkdiff.utils import _host_tag

    run = copy_run(short_run, tmp_path)
    host, dead = _host_tag(), dead_pid()
    debris = [
        run / "checkpoints" / f".step-0000009.{host}-{dead}.tmp",  # a checkpoint cut off mid-write
        run / f".model.{host}-{dead}.tmp",  # the model export
        run / f".model.{dead}.old",  # an earlier version's name
    ]
    for folder in debris:
        folder.mkdir()
        (folder / "aligner.safetensors").write_bytes(b"half")
    (run / f".metrics.jsonl.{host}-{dead}.tmp").write_text("{")
    debris.append(run / f".metrics.jsonl.{host}-{dead}.tmp")
    live = subprocess.Popen(["sleep", "60"])
    try:
        kept = [
            run / "checkpoints" / f".step-0000012.{host}-{live.pid}.tmp",  # a live process is writing it
            run / "checkpoints" / f".step-0000012.0000beef-{dead}.tmp",  # another machine's: cannot tell
            run / "notes.2024.tmp",  # not one of our names
        ]
        for path in kept:
            path.write_text("x")
        code, err = cli(capsys, *train_cli(feature_dir, run, "--max-steps=6"))
        assert code == 0, err
        assert [p for p in debris if p.exists()] == []
        assert all(p.read_text() == "x" for p in kept)
    finally:
        live.kill()
        live.wait()


def test_remove_debris_of_feature_folders(tmp_path: Path) -> None:
    from thinkdiff.utils import remove_debris

    dead = dead_pid()
    names = [f"index.json.{dead}.tmp", f"shard-000003.json.{dead}.tmp", f"skipped.jsonl.{dead}.tmp"]
    for name in [*names, "index.json", "shard-000003.safetensors.tmp", f"other.json.{dead}.tmp"]:
        (tmp_path / name).write_text("x")
    assert remove_debris(tmp_path) == sorted(names)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["index.json", "shard-000003.safetensors.tmp", f"other.json.{dead}.tmp"]
    )


def test_shards_are_hashed_in_the_workers_and_not_again_next_epoch(
    feature_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch.utils.data import DataLoader

    from thinkdiff.data import feature_shards
    from thinkdiff.data.feature_dataset import FeatureShardDataset

    log = tmp_path / "hashed.log"
    real = feature_shards.file_sha256

    def logged(path: Path) -> str:  # forked workers inherit this; they append to one file
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {Path(path).name}\n")
        return real(path)

    monkeypatch.setattr(feature_shards, "file_sha256", logged)
    dataset = FeatureShardDataset(feature_dir, batch_size=4, shuffle_buffer=0)
    assert not log.exists()  # nothing hashed at start-up
    loader = DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=list)
    counts = []
    for epoch in range(2):
        dataset.set_epoch(epoch)
        assert sum(len(batch) for batch in loader) == 48
        counts.append(len(log.read_text().splitlines()))
    rows = [line.split() for line in log.read_text().splitlines()]
    assert os.getpid() not in {int(pid) for pid, _ in rows}  # in the workers
    names = {name for _, name in rows}
    assert names == {f"shard-00000{s}.{ext}" for s in (0, 1) for ext in ("safetensors", "jsonl")}
    assert counts[0] <= 2 * len(names) and counts[1] == counts[0]  # at most once per worker, once per run


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda s: s.update(step="6"), "step, skipped_steps and world_size must be integers"),
        (lambda s: s.update(config=[1]), "optimizer, rng, data and config must be mappings"),
        (lambda s: s["rng"].update(python=5), "does not fit this run"),
        (lambda s: s.update(optimizer={"state": {}, "param_groups": []}), "does not fit this run"),
        (lambda s: s.update(extra={"__tensor__": "t999"}), "refers to tensor 't999'"),
    ],
)
def test_a_malformed_trainer_state_is_one_line(
    feature_dir: Path, short_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], edit, needle: str
) -> None:
    run = copy_run(short_run, tmp_path)
    newest = checkpoint_dirs(run)[-1]
    state = json.loads((newest / STATE_JSON).read_text())
    edit(state)
    (newest / STATE_JSON).write_text(json.dumps(state))
    before = snapshot(run)
    code, err = cli(capsys, *train_cli(feature_dir, run, "--max-steps=6", "--resume", str(newest)))
    assert code == 2
    assert_one_line_error(err, str(newest), needle)
    assert snapshot(run) == before
