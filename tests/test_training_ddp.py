"""Two CPU processes (gloo DDP) train the same aligner as one process fed the same global batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("ddp_worker.py")


def run(cmd: list[str], tmp: Path, env_dir: Path) -> None:
    env = {**os.environ, "THINKDIFF_TINY_DIR": str(env_dir), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_match_one(feature_dir, tiny_env, tmp_path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    run([sys.executable, str(WORKER), str(feature_dir), str(one)], one, tiny_env)
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29561",
    ]
    run([*torchrun, str(WORKER), str(feature_dir), str(two)], two, tiny_env)
    single = load_file(str(one / "rank0.safetensors"))
    rank0, rank1 = load_file(str(two / "rank0.safetensors")), load_file(str(two / "rank1.safetensors"))
    for name, value in single.items():
        assert torch.equal(rank0[name], rank1[name]), f"ranks disagree on {name}"
        torch.testing.assert_close(rank0[name], value, rtol=0, atol=1e-5)
