"""``thinkdiff extract-features`` on a tiny random Qwen2-VL: content, resume, ranks, reports, CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from thinkdiff.cli import main
from thinkdiff.data.extraction import (
    DESCRIPTION_PROMPTS,
    VLLM_MIN_VERSION,
    VLLM_TEXT_TOKENS,
    ExtractionSettings,
    extract_features,
    make_engine,
)
from thinkdiff.data.feature_shards import FeatureShards, load_index, read_shard_records, verify_shards
from thinkdiff.data.sources import SkipLog, iter_samples, list_source_shards
from thinkdiff.data.synthetic import BAD_SAMPLES, write_tar_shards

NUM_SHARDS, PER_SHARD = 3, 3
GOOD_KEYS = sorted(f"{s:05d}{i:04d}" for s in range(NUM_SHARDS) for i in range(PER_SHARD))
SETTINGS = ExtractionSettings(max_new_tokens=8, seed=1)


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny LVLM, tar shards with bad samples, and one uninterrupted extraction run."""
    from thinkdiff.tiny.qwen import save_tiny_qwen_vl

    root = tmp_path_factory.mktemp("extraction")
    model = save_tiny_qwen_vl(root / "qwen", kind="qwen2_vl")
    tars = root / "tars"
    write_tar_shards(tars, num_shards=NUM_SHARDS, samples_per_shard=PER_SHARD, bad=True)
    engine = make_engine("hf", str(model), SETTINGS)
    summary = extract_features(tars, root / "full", engine, SETTINGS, batch_size=2, progress=False)
    return {
        "root": root,
        "model": model,
        "tars": tars,
        "engine": engine,
        "full": root / "full",
        "summary": summary,
    }


def _checksums(out: Path) -> dict[str, dict[str, str]]:
    return {r["name"]: {k: f["sha256"] for k, f in r["files"].items()} for r in read_shard_records(out)}


def test_the_paper_prompts() -> None:
    assert len(DESCRIPTION_PROMPTS) == len(set(DESCRIPTION_PROMPTS)) == 16
    assert DESCRIPTION_PROMPTS[0] == "Describe the image concisely."
    assert SETTINGS.prompt_for("k") == SETTINGS.prompt_for("k") in DESCRIPTION_PROMPTS
    assert len({SETTINGS.prompt_for(str(i)) for i in range(200)}) == 16
    defaults = ExtractionSettings()
    assert (defaults.temperature, defaults.top_p, defaults.max_new_tokens) == (0.6, 0.9, 64)


def test_output_holds_every_good_sample_and_the_report(kit: dict) -> None:
    full, summary = kit["full"], kit["summary"]
    index = load_index(full)
    assert index["complete"] and index["num_samples"] == len(GOOD_KEYS) and verify_shards(full) == []
    shards = FeatureShards(full)
    assert sorted(s["key"] for s in shards) == GOOD_KEYS
    assert summary.samples_written == len(GOOD_KEYS) and summary.shards_written == NUM_SHARDS
    assert summary.skipped == {reason: 1 for reason in sorted(BAD_SAMPLES.values())}

    report = json.loads((full / "report.json").read_text())
    assert report["skipped"] == summary.skipped and report["bytes_per_sample"] > 0
    skipped = [json.loads(line) for line in (full / "skipped.jsonl").read_text().splitlines()]
    assert {s["key"]: s["reason"] for s in skipped} == BAD_SAMPLES
    assert all(s["shard"].endswith("00000.tar") for s in skipped)

    meta = shards.metadata(0)[0]
    assert meta["prompt"] == SETTINGS.prompt_for(meta["key"]) and meta["caption"].startswith("a test picture")
    sample = shards[0]
    assert 1 <= sample["features"].shape[0] <= SETTINGS.max_new_tokens
    assert sample["features"].dtype == torch.bfloat16 and sample["features"].shape[1] == 64


def _direct_features(extractor, image, prompt: str, token_ids: torch.Tensor) -> torch.Tensor:
    """[N, H] states of one sample by a plain forward pass: no padding, positions computed by the
    model itself; independent of the batching and position bookkeeping of the extraction path."""
    inputs = extractor.processor(
        text=[extractor.chat_text([image, prompt])], images=[image], return_tensors="pt"
    )
    fed = token_ids[None, :-1]
    prompt_len = inputs["input_ids"].shape[1]
    with torch.no_grad():
        return extractor.model.model(
            input_ids=torch.cat([inputs["input_ids"], fed], 1),
            attention_mask=torch.ones(1, prompt_len + fed.shape[1], dtype=torch.long),
            mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(fed)], 1),
            pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"],
        ).last_hidden_state[0, prompt_len - 1 :]


def _check_against_direct(extractor, out: Path, tars: Path) -> int:
    shards = FeatureShards(out)
    images = {s.key: s.image for shard in list_source_shards(tars) for s in iter_samples(shard, SkipLog())}
    prompts = {m["key"]: m["prompt"] for i in range(len(shards.shard_sizes)) for m in shards.metadata(i)}
    for stored in shards:
        direct = _direct_features(
            extractor, images[stored["key"]], prompts[stored["key"]], stored["token_ids"]
        )
        # Stored in bf16: equal up to bf16 rounding of the fp32 states.
        torch.testing.assert_close(stored["features"].float(), direct, atol=1e-2, rtol=1e-2)
        # The stored ids are what the model generated: the text decodes from them.
        decoded = extractor.processor.tokenizer.decode(stored["token_ids"], skip_special_tokens=True)
        assert decoded == stored["text"]
    return len(shards)


def test_features_equal_a_direct_teacher_forced_pass(kit: dict) -> None:
    assert _check_against_direct(kit["engine"].extractor, kit["full"], kit["tars"]) == len(GOOD_KEYS)


def _fake_ids(seed: int, max_tokens: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed % 2**31)
    return torch.randint(20, 600, (max_tokens - seed % 3,), generator=generator).tolist()  # ragged lengths


def test_vllm_engine_glue_with_a_stand_in_vllm(
    kit: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM itself needs a GPU; a stand-in with its API checks what the engine does around it."""
    from types import ModuleType, SimpleNamespace

    seen: dict = {}

    class LLM:
        def __init__(self, model: str, **kwargs) -> None:
            seen["init"] = {"model": model, **kwargs}

        def generate(self, requests: list[dict], params: list, use_tqdm: bool = True) -> list:
            seen.setdefault("requests", []).extend(requests)
            seen.setdefault("params", []).extend(params)
            ids = [_fake_ids(p.seed, p.max_tokens) for p in params]
            return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=i)]) for i in ids]

    vllm = ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams, vllm.__version__ = LLM, SimpleNamespace, VLLM_MIN_VERSION
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    engine = make_engine("vllm", str(kit["model"]), SETTINGS)
    engine.feature_batch_size = 2  # several feature passes per generation batch
    extract_features(f"{kit['tars']}/00001.tar", tmp_path, engine, SETTINGS, batch_size=3, progress=False)

    init = seen["init"]
    assert init["model"] == str(kit["model"]) and init["limit_mm_per_prompt"] == {"image": 1, "video": 0}
    # The HF processor's pixel cap on both sides, and a context for one such image + text + answer.
    size = engine.extractor.processor.image_processor.size
    assert init["mm_processor_kwargs"] == {"size": {k: size[k] for k in ("shortest_edge", "longest_edge")}}
    assert init["max_model_len"] == size["longest_edge"] // 28**2 + VLLM_TEXT_TOKENS + SETTINGS.max_new_tokens
    request = seen["requests"][0]
    assert "<|vision_start|><|image_pad|><|vision_end|>" in request["prompt"]
    assert request["prompt"].endswith("<|im_start|>assistant\n")
    assert request["multi_modal_data"]["image"].mode == "RGB"
    assert _check_against_direct(engine.extractor, tmp_path, kit["tars"]) == PER_SHARD
    lengths = {len(s["token_ids"]) for s in FeatureShards(tmp_path)}
    assert len(lengths) > 1  # ragged answers are stored at their own lengths
    # vLLM bans the vision tokens the hf engine suppresses; each bad word is exactly its one token.
    vision = engine.extractor.vision_token_ids
    assert engine.bad_words == ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer = engine.extractor.processor.tokenizer
    assert [tokenizer.encode(w, add_special_tokens=False) for w in engine.bad_words] == [[i] for i in vision]
    assert all(p.bad_words == engine.bad_words for p in seen["params"])


def test_both_hf_ways_give_the_same_shards(kit: dict) -> None:
    from thinkdiff.data.extraction import HFEngine

    engine = HFEngine(kit["engine"].extractor, SETTINGS, features="generate", model=kit["engine"].model)
    out = kit["root"] / "from-generate"
    extract_features(kit["tars"], out, engine, SETTINGS, batch_size=2, progress=False)
    a, b = FeatureShards(kit["full"]), FeatureShards(out)
    for i in range(len(a)):
        assert torch.equal(a[i]["token_ids"], b[i]["token_ids"])
        torch.testing.assert_close(a[i]["features"].float(), b[i]["features"].float(), atol=1e-2, rtol=1e-2)


_KILL_SCRIPT = """
import os, signal, sys, torch
torch.set_num_threads(1)
from thinkdiff.data.extraction import ExtractionSettings, extract_features, make_engine
real_replace = os.replace
def replace(src, dst):
    real_replace(src, dst)
    # Die in the middle of completing shard 1: its features have their final name, its metadata
    # and record do not exist yet; shard 2 is not started.
    if str(dst).endswith("shard-000001.safetensors"):
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
settings = ExtractionSettings(max_new_tokens=8, seed=1)
engine = make_engine("hf", sys.argv[1], settings)
extract_features(sys.argv[2], sys.argv[3], engine, settings, batch_size=2, progress=False)
"""


def test_kill_and_resume_gives_the_same_shards(kit: dict) -> None:
    out = kit["root"] / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-c", _KILL_SCRIPT, str(kit["model"]), str(kit["tars"]), str(out)]
    result = subprocess.run(args, env=env, capture_output=True, timeout=120)
    assert result.returncode == -9, result.stderr.decode()[-2000:]
    assert [r["name"] for r in read_shard_records(out)] == [
        "shard-000000"
    ]  # only the shard in progress is lost
    assert (out / "shard-000001.safetensors").exists() and list(out.glob("shard-000001.*.tmp"))
    gone = subprocess.Popen(["true"])
    gone.wait()
    (out / f"index.json.{gone.pid}.tmp").write_text("{")  # an earlier version's debris, its process gone

    summary = extract_features(kit["tars"], out, kit["engine"], SETTINGS, batch_size=2, progress=False)
    assert summary.shards_done_before == 1 and summary.shards_written == NUM_SHARDS - 1
    assert not list(out.glob("*.tmp"))
    assert _checksums(out) == _checksums(kit["full"])
    assert load_index(out)["complete"]


def test_two_ranks_cover_every_sample_exactly_once(kit: dict) -> None:
    out = kit["root"] / "ranks"
    summaries = [
        extract_features(
            kit["tars"], out, kit["engine"], SETTINGS, batch_size=2, rank=r, world_size=2, progress=False
        )
        for r in range(2)
    ]
    assert [s.shards_assigned for s in summaries] == [2, 1]
    keys = [s["key"] for s in FeatureShards(out)]
    assert sorted(keys) == GOOD_KEYS  # every sample, none twice
    assert _checksums(out) == _checksums(kit["full"])  # and the same content as one process writes
    # A rerun of a finished rank does nothing.
    again = extract_features(
        kit["tars"], out, kit["engine"], SETTINGS, batch_size=2, rank=0, world_size=2, progress=False
    )
    assert again.shards_written == 0 and again.shards_done_before == 2


def test_resuming_with_other_settings_is_refused(kit: dict) -> None:
    other = ExtractionSettings(max_new_tokens=4, seed=1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        extract_features(kit["tars"], kit["full"], kit["engine"], other, progress=False)


def test_a_rerun_with_another_image_size_cap_is_refused(kit: dict, tmp_path: Path) -> None:
    """The cap decides the visual tokens, so the features: it is recorded and compared."""
    source = f"{kit['tars']}/00001.tar"
    extract_features(source, tmp_path, kit["engine"], SETTINGS, batch_size=2, progress=False)
    recorded = json.loads((tmp_path / "extraction.json").read_text())["image_size"]
    assert recorded["longest_edge"] == kit["engine"].extractor.processor.image_processor.size["longest_edge"]
    capped = make_engine("hf", str(kit["model"]), SETTINGS, max_pixels=recorded["shortest_edge"])
    with pytest.raises(ValueError, match=r"other settings \(image_size: .*--allow-change image_size"):
        extract_features(source, tmp_path, capped, SETTINGS, batch_size=2, progress=False)


def test_a_rerun_with_another_batch_size_is_refused_unless_allowed(
    kit: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["extract-features", "--model", str(kit["model"]), "--source", f"{kit['tars']}/00001.tar"]
    argv += ["--out", str(out), "--max-new-tokens", "3", "--no-progress"]
    assert main([*argv, "--batch-size", "2"]) == 0
    (out / "shard-000000.json").unlink()  # as if killed before the shard was complete
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main([*argv, "--batch-size", "3"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"{out} was written with other settings (batch_size: 2 -> 3)" in err
    assert "--allow-change batch_size" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written

    assert main([*argv, "--batch-size", "3", "--allow-change", "batch_size"]) == 0
    assert json.loads((out / "extraction.json").read_text())["batch_size"] == 3
    changes = [json.loads(line) for line in (out / "changes.jsonl").read_text().splitlines()]
    assert changes == [{"field": "batch_size", "old": 2, "new": 3}]
    assert main([*argv, "--batch-size", "3"]) == 0  # the accepted value is the folder's now

    capsys.readouterr()
    (tmp_path / "file").write_text("x")
    assert main([*argv[:5], "--out", str(tmp_path / "file"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"--out {tmp_path / 'file'} is an existing file" in err
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_vllm_engine_without_vllm_is_a_clear_error(kit: dict) -> None:
    with pytest.raises(ValueError, match=r"pip install 'thinkdiff\[vllm\]'"):
        make_engine("vllm", str(kit["model"]), SETTINGS)


def test_command_line(kit: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Describe it.\n\nWhat is there?\n")
    out = tmp_path / "out"
    argv = [
        "extract-features",
        "--model",
        str(kit["model"]),
        "--source",
        f"{kit['tars']}/{{00001..00002}}.tar",
    ]
    argv += ["--out", str(out), "--max-new-tokens", "3", "--batch-size", "4", "--prompts-file", str(prompts)]
    assert main([*argv, "--no-progress"]) == 0
    assert "6 samples" in capsys.readouterr().out
    assert {m["prompt"] for m in FeatureShards(out).metadata(0)} <= {"Describe it.", "What is there?"}
    assert main(["extract-features", "--out", str(out), "--merge-only"]) == 0
    assert "2/2 shards (complete)" in capsys.readouterr().out

    assert (
        main(
            [
                "extract-features",
                "--model",
                str(kit["model"]),
                "--source",
                str(tmp_path / "nope.tar"),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "do not exist" in capsys.readouterr().err
    assert main(["extract-features", "--out", str(out)]) == 2


def test_prompt_features_for_the_ablation(kit: dict, tmp_path: Path) -> None:
    from thinkdiff.data.extraction import HFEngine

    settings = ExtractionSettings(max_new_tokens=4, seed=1, prompt_features=True)
    engine = HFEngine(kit["engine"].extractor, settings, model=kit["engine"].model)
    extract_features(f"{kit['tars']}/00001.tar", tmp_path, engine, settings, batch_size=3, progress=False)
    shards = FeatureShards(tmp_path, prompt_features=True)
    extractor = engine.extractor
    for i in range(len(shards)):
        sample = shards[i]
        prompt = shards.metadata(0)[i]["prompt"]
        image = next(
            s.image
            for s in iter_samples(list_source_shards(kit["tars"])[1], SkipLog())
            if s.key == sample["key"]
        )
        inputs = extractor.processor(
            text=[extractor.chat_text([image, prompt])], images=[image], return_tensors="pt"
        )
        with torch.no_grad():
            direct = extractor.model.model(**inputs).last_hidden_state[0]
        assert sample["prompt_features"].shape == direct.shape  # the padding of the batch is not stored
        torch.testing.assert_close(sample["prompt_features"].float(), direct, atol=1e-2, rtol=1e-2)


def test_a_sample_the_lvlm_rejects_is_skipped_not_fatal(kit: dict, tmp_path: Path) -> None:
    import io
    import tarfile

    from PIL import Image

    from thinkdiff.data.synthetic import jpeg_bytes

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    thin = io.BytesIO()
    Image.new("RGB", (600, 2), "red").save(thin, format="PNG")  # aspect ratio 300: Qwen2-VL refuses it
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for key, image in [("a", jpeg_bytes(1)), ("thin", thin.getvalue()), ("b", jpeg_bytes(2))]:
            add(tar, f"{key}.{'png' if key == 'thin' else 'jpg'}", image)
            add(tar, f"{key}.txt", b"a caption")
    summary = extract_features(
        tmp_path / "00000.tar", tmp_path / "out", kit["engine"], SETTINGS, batch_size=3, progress=False
    )
    assert summary.skipped == {"lvlm_error": 1}
    assert [s["key"] for s in FeatureShards(tmp_path / "out")] == ["a", "b"]


def test_the_lvlm_never_samples_a_vision_token_so_no_valid_image_is_dropped(kit: dict, tmp_path: Path) -> None:
    """The tiny random Qwen2-VL samples vision special tokens; a sampled <|image_pad|> breaks the
    teacher-forced feature pass (one more image slot than image features) and lost the sample."""
    import io
    import tarfile

    from thinkdiff.data.synthetic import jpeg_bytes

    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for i in range(16):
            for name, data in ((f"{i:03d}.jpg", jpeg_bytes(i)), (f"{i:03d}.txt", b"a caption")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    settings = ExtractionSettings(max_new_tokens=32, seed=7)
    engine = make_engine("hf", str(kit["model"]), settings)
    config = engine.extractor.model.config
    vision = engine.extractor.vision_token_ids  # read from the config and the tokenizer
    assert {config.image_token_id, config.video_token_id, config.vision_start_token_id} < set(vision)
    tokens = engine.extractor.processor.tokenizer.convert_ids_to_tokens(vision)
    assert "<|vision_pad|>" in tokens and not set(engine.extractor.eos_token_ids) & set(vision)

    def run(out: Path) -> tuple[dict, int]:
        summary = extract_features(tmp_path / "00000.tar", out, engine, settings, batch_size=8, progress=False)
        stored = [t for s in FeatureShards(out) for t in s["token_ids"].tolist()]
        return summary.skipped, sum(t in vision for t in stored)

    engine.extractor.vision_token_ids = []  # as before: nothing suppressed
    try:
        skipped, sampled = run(tmp_path / "unsuppressed")
    finally:
        engine.extractor.vision_token_ids = vision
    assert skipped == {"lvlm_error": 1} and sampled > 0  # what the audit saw

    skipped, sampled = run(tmp_path / "suppressed")
    assert skipped == {} and sampled == 0
    assert len(FeatureShards(tmp_path / "suppressed")) == 16


def test_a_cut_tar_and_a_non_utf8_caption_are_listed_in_the_report(kit: dict, tmp_path: Path) -> None:
    import io
    import tarfile

    from thinkdiff.data.synthetic import jpeg_bytes

    members = [("a.jpg", jpeg_bytes(1)), ("a.txt", b"fine"), ("b.jpg", jpeg_bytes(2)), ("b.txt", b"caf\xe9")]
    members += [("c.jpg", jpeg_bytes(3)), ("c.txt", b"fine too"), ("d.jpg", jpeg_bytes(4)), ("d.txt", b"lost")]
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(tmp_path / "00000.tar") as tar:
        cut = tar.getmember("d.jpg").offset_data + 100  # inside d.jpg
    data = (tmp_path / "00000.tar").read_bytes()
    (tmp_path / "00000.tar").write_bytes(data[:cut])
    out = tmp_path / "out"
    summary = extract_features(tmp_path / "00000.tar", out, kit["engine"], SETTINGS, batch_size=2, progress=False)
    # Two samples lost (b, d), each counted once; the stream error that cost d is a shard error.
    expected = {"caption_not_utf8": 1, "truncated_sample": 1}
    assert summary.skipped == expected and summary.samples_written == 2
    assert summary.shard_errors == {"unreadable_shard": 1}
    assert sum(summary.skipped.values()) == len(members) // 2 - summary.samples_written
    report = json.loads((out / "report.json").read_text())
    assert report["skipped"] == expected and report["shard_errors"] == {"unreadable_shard": 1}
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert {(s["key"], s["reason"]) for s in skipped} == {
        ("b", "caption_not_utf8"),
        ("d", "truncated_sample"),
        ("", "unreadable_shard"),
    }
    assert [s["key"] for s in FeatureShards(out)] == ["a", "c"]
