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


def run(cmd: list[str], env_dir: Path) -> None:
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
    assert proc.returncode == 0, output[-6000:]


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
