"""Two CPU processes (gloo DDP) train the same aligner as one process fed the same global batches."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("ddp_worker.py")


def run(cmd: list[str], env_dir: Path, expect_ok: bool = True) -> str:
    env = {**os.environ, "THINKDIFF_TINY_DIR": str(env_dir), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # A session of its own, so a hung rank is killed with its launcher instead of lingering.
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail("DDP run timed out:\n" + output[-3000:])
    assert (proc.returncode == 0) == expect_ok, output[-6000:]
    return output


@pytest.mark.slow
def test_two_processes_match_one(feature_dir, tiny_env, tmp_path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    run([sys.executable, str(WORKER), str(feature_dir), str(one)], tiny_env)
    # --standalone: torchrun picks a free port, so parallel or leftover runs cannot collide.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run([*torchrun, str(WORKER), str(feature_dir), str(two)], tiny_env)
    single = load_file(str(one / "rank0.safetensors"))
    rank0, rank1 = load_file(str(two / "rank0.safetensors")), load_file(str(two / "rank1.safetensors"))
    for name, value in single.items():
        assert torch.equal(rank0[name], rank1[name]), f"ranks disagree on {name}"
        torch.testing.assert_close(rank0[name], value, rtol=0, atol=1e-5)


RESUME_WORKER = Path(__file__).with_name("ddp_resume_worker.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.mark.slow
def test_ranks_resume_from_rank_0s_checkpoint_without_a_shared_filesystem(
    feature_dir, tiny_env, tmp_path
) -> None:
    """Each rank sees its own run folder. Rank 1's holds a newer checkpoint than rank 0's: every
    rank still resumes from rank 0's choice, and they stay identical. When rank 1 cannot see that
    checkpoint at all, every rank stops with one clear line instead of training apart or hanging."""
    import json
    import shutil

    run([*TORCHRUN, str(RESUME_WORKER), str(feature_dir), str(tmp_path), "first"], tiny_env)
    rank0, rank1 = tmp_path / "run-rank0" / "checkpoints", tmp_path / "run-rank1" / "checkpoints"
    assert sorted(p.name for p in rank0.iterdir()) == ["step-0000003", "step-0000006"]
    assert not rank1.exists()  # only rank 0 writes checkpoints
    shutil.copytree(rank0, rank1)
    shutil.rmtree(rank0 / "step-0000006")  # rank 0 newest: step 3; rank 1 newest: step 6

    run([*TORCHRUN, str(RESUME_WORKER), str(feature_dir), str(tmp_path), "resume"], tiny_env)
    for r in range(2):
        assert json.loads((tmp_path / f"rank{r}.json").read_text()) == {"resumed": True, "step": 3}
    a, b = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    for name, value in a.items():
        assert torch.equal(value, b[name]), f"ranks disagree on {name}"

    shutil.rmtree(rank1)  # rank 1 sees no checkpoint at all
    output = run([*TORCHRUN, str(RESUME_WORKER), str(feature_dir), str(tmp_path), "resume"], tiny_env, expect_ok=False)
    assert "rank 0 resumes from checkpoints/step-0000009 (step 9) but not every rank can" in output
    assert f"rank 1: checkpoint {rank1 / 'step-0000009'} does not exist" in output
    assert "shared filesystem" in output
