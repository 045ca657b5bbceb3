"""benchmarks/gpu_check.py: the smoke run of every branch on the CPU, and its report's guarantees."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    """The benchmark script as a module (its folder on sys.path, as when it runs)."""
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    yield gpu_check
    sys.path.remove(str(SCRIPT.parent))


@pytest.fixture(scope="module")
def smoke(tiny_env: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """One `gpu_check.py --smoke` run, exactly as `make gpu-check-smoke` starts it."""
    out = tmp_path_factory.mktemp("gpu-check")
    env = {**os.environ, "THINKDIFF_TINY_DIR": str(tiny_env), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    seconds = time.perf_counter() - start
    print(f"gpu_check.py --smoke: {seconds:.0f} s")  # shown with -s; docs/gpu-check.md has the measurements
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[gpu-check" in proc.stdout  # progress is printed as it goes
    return json.loads((out / "gpu-check.json").read_text()), (out / "gpu-check.md").read_text()


def test_smoke_runs_every_part(smoke: tuple[dict, str], gpu_check) -> None:
    """Every part ran inside its budget (a part over it would be partial, with rows missing)."""
    report, md = smoke
    parts = report["parts"]
    assert list(parts) == list(gpu_check.PARTS)
    for name, part in parts.items():
        assert part["status"] in ("done", "partial", "unavailable"), (name, part)
        assert f"## {name}: {part['status']}" in md

    training = parts["training"]["rows"]
    assert [(r["micro_batch"], r["activation_checkpointing"]) for r in training] == [
        (2, False), (6, False), (2, True), (6, True),
    ]  # fmt: skip
    for row in training:
        # Checkpointing really recomputes: the first decoder block runs again in the backward pass.
        assert row["block_forwards_per_micro_batch"] == (2 if row["activation_checkpointing"] else 1)
        assert row["finite"] and row["samples_per_s"] > 0 and row["mfu"] > 0
        # A random proxy with a unit-scale head starts near ln(vocab), not at thousands.
        assert 5 < row["loss_first"] < 20
    # Checkpointing recomputes the same function: the same data and seed give the same losses.
    assert training[0]["loss_last"] == pytest.approx(training[2]["loss_last"], rel=1e-4)

    features = parts["features"]["rows"]
    agreement = features[0]
    assert agreement["what"].startswith("generate vs teacher-forced")
    assert agreement["tokens"] == 2 * 8 and agreement["within_tolerance"]
    assert [r["what"] for r in features[1:]] == [
        "hf extraction, features=recompute",
        "hf extraction, features=generate",
    ]
    assert all(r["samples_per_s"] > 0 for r in features[1:])

    inference = parts["inference"]["rows"]
    ran = {(r["offload"], r["size"]) for r in inference}
    # Model offload runs on the CPU too (the hooks with the CPU as execution device).
    assert {("none", 512), ("none", 1024), ("model", 512), ("model", 1024)} <= ran
    for row in inference:
        assert row["seconds_per_image"] > 0 and row["steps"] == 2 and row["quantize"] == "none"
        assert {"lvlm", "aligner", "decoder"} <= set(row["timings"])
    # Offload modes the CPU cannot run are skipped with the reason, never silently.
    skipped = [n for n in parts["inference"]["notes"] if n.startswith("skipped")]
    assert len(ran) + len(skipped) == 6

    (calibration,) = parts["calibration"]["rows"]  # calibration_step exists in this version
    assert calibration["finite"] and calibration["step_s"] > 0 and calibration["micro_batch"] == 2

    quantized = parts["quantized"]
    modes = [r["quantize"] for r in quantized["rows"]]
    assert modes[0] == "none" and all(r["seconds_per_image"] > 0 for r in quantized["rows"])
    skipped = [n for n in quantized["notes"] if n.startswith("skipped quantize")]
    assert len(modes) + len(skipped) == 4  # none, nf4, int8, fp8: each ran or says why not
    assert any("nf4" in n and "CUDA" in n for n in skipped)  # bitsandbytes needs a GPU

    assert "| micro-batch | act. ckpt | samples/s | MFU |" in md
    assert "| none | 1024 | 128 | 2 |" in md


def test_report_survives_failure_and_is_written_as_it_goes(gpu_check, tmp_path: Path, monkeypatch) -> None:
    """A row is on disk before its part ends; a failing part does not stop the next one."""
    seen_on_disk = {}

    def first(s, budget, emit, note, work):
        emit({"value": 1.5})
        seen_on_disk.update(json.loads((tmp_path / "gpu-check.json").read_text()))
        raise RuntimeError("boom")

    def second(s, budget, emit, note, work):
        note("skipped the rest: over the part's budget")

    monkeypatch.setattr(gpu_check, "RUNNERS", {"calibration": first, "quantized": second})
    s = gpu_check.settings_for(smoke=True)
    report = gpu_check.Report(tmp_path, {"smoke": True, "device": "cpu", "versions": dict.fromkeys(
        ("torch", "transformers", "diffusers"), "x"), "settings": {}})  # fmt: skip
    deadline = time.perf_counter() + 60
    assert gpu_check.run_part("calibration", s, report, deadline) is False
    assert gpu_check.run_part("quantized", s, report, deadline) is True
    assert seen_on_disk["parts"]["calibration"]["rows"] == [{"value": 1.5}]
    final = json.loads((tmp_path / "gpu-check.json").read_text())
    assert final["parts"]["calibration"]["status"] == "failed"
    assert "RuntimeError: boom" in final["parts"]["calibration"]["error"]
    assert final["parts"]["quantized"]["status"] == "partial"
    md = (tmp_path / "gpu-check.md").read_text()
    assert "## calibration: failed" in md and "- failed: RuntimeError: boom" in md and "| value |" in md and "| 1.5 |" in md

    # Past the whole run's deadline a part is skipped without running.
    assert gpu_check.run_part("calibration", s, report, time.perf_counter()) is True
    assert json.loads((tmp_path / "gpu-check.json").read_text())["parts"]["calibration"]["status"] == "skipped"


def test_a_killed_run_keeps_what_it_measured(tiny_env: Path, tmp_path: Path) -> None:
    """SIGKILL after the first measurement: the report on disk is whole and holds it."""
    env = {**os.environ, "THINKDIFF_TINY_DIR": str(tiny_env), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path), "--parts", "training", "features"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    report = tmp_path / "gpu-check.json"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if report.is_file() and json.loads(report.read_text())["parts"].get("training", {}).get("rows"):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.kill()
    finally:
        proc.wait(timeout=60)
    data = json.loads(report.read_text())  # atomic writes: never a half-written file
    training = data["parts"]["training"]
    assert training["status"] == "running" and training["rows"][0]["micro_batch"] == 2
    assert "features" not in data["parts"]
    assert "| 2 | False |" in (tmp_path / "gpu-check.md").read_text()


def test_feature_agreement_tolerance_separates_rounding_from_bugs(gpu_check) -> None:
    gen = torch.Generator().manual_seed(0)
    forced = torch.randn(2, 40, 3584, generator=gen)
    mask = torch.ones(2, 40, dtype=torch.bool)
    # Two independent bf16 roundings of the same values: within tolerance.
    rounded = (forced + forced * 2**-8 * torch.randn(forced.shape, generator=gen)).bfloat16()
    assert gpu_check.feature_agreement(rounded, forced.bfloat16(), mask)["within_tolerance"]
    # Features shifted by one position (an off-by-one between the two paths): far outside.
    shifted = torch.roll(forced, 1, dims=1)
    result = gpu_check.feature_agreement(shifted, forced, mask)
    assert not result["within_tolerance"] and result["median_rel"] > 1
    # Masked positions are not compared.
    broken = forced.clone()
    broken[:, -5:] = 0
    mask[:, -5:] = False
    assert gpu_check.feature_agreement(broken, forced, mask)["tokens"] == 70


def test_the_gpu_settings_fit_eight_minutes_at_real_dimensions(gpu_check) -> None:
    s = gpu_check.settings_for(smoke=False)
    assert s.micro_batches == (32, 96) and s.sizes == {512: 512, 1024: 1024}
    assert (s.steps, s.sequential_steps, s.feature_width, s.depth, s.narrow) == (28, 4, 3584, None, False)
    # The parts' budgets end by the deadline, which leaves start-up and one overrunning run inside 8 min.
    assert sum(s.budgets.values()) <= s.max_seconds <= 8 * 60 - 20
    # The proxy it trains is Flan-T5-XXL's decoder with its own LM head (6.50 B, not the tied 6.37 B),
    # built in bf16 (here on the meta device: no memory).
    proxy = gpu_check.random_proxy_t5("meta", torch.bfloat16, s.t5_scale, s.t5_layers)
    assert sum(p.numel() for p in proxy.parameters()) == 6_504_622_080
    assert proxy.dtype == torch.bfloat16 and proxy.t5.lm_head.weight is not proxy.t5.shared.weight
    assert not proxy.has_encoder and proxy.d_model == 4096


def test_refuses_without_cuda_unless_smoke(gpu_check, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert gpu_check.main(["--out", "unused"]) == 2
    assert "no CUDA device" in capsys.readouterr().out
