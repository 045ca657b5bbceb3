"""Feature extraction and feature reading: throughput and bytes on disk, side by side.

1. Reading at the real size (64 generated tokens x 3584, Qwen2-VL-7B, bf16): samples/s of
   ``FeatureShardDataset`` alone and through a ``DataLoader`` (workers, batches padded to the
   longest), with the shards in the page cache (warm) and evicted from it (cold). Training in the
   paper consumes about 133 samples/s (global batch 96, 25k steps in 5 h); the target is 10x that.
2. Bytes per sample on disk against the released code's per-sample fp32 tensors (``torch.save``).
3. Extraction on the tiny random Qwen2-VL (CPU): the two hf ways on the same inputs and seeds -
   hidden states read out of ``generate`` vs ``generate`` then one teacher-forced pass - and, when
   vLLM is installed and a GPU is present, vLLM (eager) against hf on a tiny model of head size 64
   (unverified on a GPU so far).

Run: ``python benchmarks/bench_features.py [--samples 4000] [--workers 2] [--json out.json]``
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

PAPER_TRAINING_SAMPLES_PER_S = 96 * 25_000 / (5 * 3600)  # ~133


def write_real_size_shards(out: Path, samples: int, shards: int, tokens: int, hidden: int) -> float:
    """Feature shards of ``samples`` samples of [tokens, hidden] bf16; returns seconds taken."""
    from thinkdiff.data.feature_shards import FeatureShardWriter, write_index

    generator = torch.Generator().manual_seed(0)
    pool = [torch.randn(tokens, hidden, generator=generator).bfloat16() for _ in range(8)]
    ids = torch.randint(0, 150_000, (tokens,), generator=generator)
    started = time.perf_counter()
    per_shard = samples // shards
    for shard in range(shards):
        with FeatureShardWriter(out, shard) as writer:
            for i in range(per_shard):
                writer.add(f"{shard:05d}{i:04d}", ids, pool[i % len(pool)], prompt="Describe the image concisely.",
                           text="a synthetic answer of typical length for a caption-like description of a photo")  # fmt: skip
            writer.finish({"source": f"synthetic-{shard}"})
    write_index(out, num_source_shards=shards)
    return time.perf_counter() - started


def evict_from_page_cache(folder: Path) -> None:
    """Drop our own files from the page cache (no root needed), so reads come from the disk."""
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


try:  # imported here, not in the collate function: forked workers inherit it instead of importing it
    from thinkdiff.objectives import pad_features
except ImportError:  # the benchmark also runs where the objectives are not there yet

    def pad_features(features: list[torch.Tensor]) -> tuple[torch.Tensor, None]:
        from torch.nn.utils.rnn import pad_sequence

        return pad_sequence(features, batch_first=True), None


def pad_plain(batch: list[dict]) -> dict:
    """Pad features to the longest sample with the training collator's padding (a fresh tensor)."""
    features_BLH, _ = pad_features([s["features"] for s in batch])
    return {"features": features_BLH, "keys": [s["key"] for s in batch]}


def pad_shared(batch: list[dict]) -> dict:
    """The same padding, written straight into shared memory when in a DataLoader worker.

    A worker must hand its batch to the main process through shared memory; a tensor made
    elsewhere is copied there first (``default_collate`` avoids that copy the same way).
    """
    features = [s["features"] for s in batch]
    length, width = max(f.shape[0] for f in features), features[0].shape[1]
    out_BLH = torch.empty(len(features), length, width, dtype=features[0].dtype)
    if torch.utils.data.get_worker_info() is not None:
        out_BLH.share_memory_()
    out_BLH.zero_()
    for i, f in enumerate(features):
        out_BLH[i, : f.shape[0]] = f
    return {"features": out_BLH, "keys": [s["key"] for s in batch]}


def read_dataset(root: Path) -> dict[str, float]:
    from thinkdiff.data.feature_dataset import FeatureShardDataset

    dataset = FeatureShardDataset(root, shuffle_buffer=1000, rank=0, world_size=1)
    started = time.perf_counter()
    count = sum(1 for _ in dataset)
    return {"samples_per_s": count / (time.perf_counter() - started)}


def read_loader(root: Path, batch_size: int, workers: int, collate) -> dict[str, float]:
    """Steady samples/s after the first batch, and the time to the first batch (worker start)."""
    from thinkdiff.data.feature_dataset import FeatureShardDataset

    dataset = FeatureShardDataset(root, batch_size=batch_size, shuffle_buffer=1000, rank=0, world_size=1)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate,
        prefetch_factor=4 if workers else None,
    )
    started = time.perf_counter()
    first = None
    count = 0
    for batch in loader:
        if first is None:
            first = time.perf_counter()
        else:
            count += len(batch["keys"])
    assert first is not None
    return {"samples_per_s": count / (time.perf_counter() - first), "first_batch_s": first - started}


def fp32_per_sample_bytes(tokens: int, hidden: int) -> int:
    """Size of one sample saved as the released code did: fp32 tensors, one torch.save per sample."""
    buffer = io.BytesIO()
    torch.save(
        {"features": torch.zeros(tokens, hidden), "token_ids": torch.zeros(tokens, dtype=torch.long)}, buffer
    )
    return buffer.getbuffer().nbytes


def bench_reading(args: argparse.Namespace, results: dict) -> None:
    from thinkdiff.data.feature_shards import load_index

    work = Path(tempfile.mkdtemp(prefix="bench-features-", dir=args.tmp))
    try:
        seconds = write_real_size_shards(work, args.samples, args.shards, args.tokens, args.hidden)
        index = load_index(work)
        on_disk = sum(f["bytes"] for s in index["shards"] for f in s["files"].values())
        results["write_samples_per_s"] = index["num_samples"] / seconds
        results["bytes_per_sample"] = on_disk / index["num_samples"]
        results["fp32_per_sample_bytes"] = fp32_per_sample_bytes(args.tokens, args.hidden)
        reading = results["reading"] = {}
        for cache in ("warm", "cold"):
            for name, run in (
                ("dataset, main process", lambda: read_dataset(work)),
                (
                    "DataLoader, plain padding",
                    lambda: read_loader(work, args.batch_size, args.workers, pad_plain),
                ),
                (
                    "DataLoader, shared-memory padding",
                    lambda: read_loader(work, args.batch_size, args.workers, pad_shared),
                ),
            ):
                if cache == "cold":
                    evict_from_page_cache(work)
                reading[f"{name} ({cache})"] = run()
    finally:
        shutil.rmtree(work, ignore_errors=True)


VLLM_HEAD_SIZE = 64
"""Head size of the vLLM check's tiny model in both towers: vLLM's FlashAttention backend takes
32, 64, 96, 128, 160, 192, 224 or 256 (the tiny kit's Qwen2-VL has 16)."""


def save_vllm_sized_qwen(folder: Path) -> Path:
    """The tiny Qwen2-VL (its tokenizer, processor and token ids) widened to head size 64 in the
    text and vision towers (2 heads each), random weights: a model vLLM's kernels run."""
    from transformers import AutoConfig, GenerationConfig, Qwen2VLForConditionalGeneration

    from thinkdiff.tiny.qwen import save_tiny_qwen_vl

    save_tiny_qwen_vl(folder, kind="qwen2_vl")
    config = AutoConfig.from_pretrained(folder)
    width = 2 * VLLM_HEAD_SIZE
    text, vision = config.text_config, config.vision_config
    text.hidden_size, text.intermediate_size = width, 2 * width
    text.num_attention_heads = text.num_key_value_heads = 2
    # M-RoPE splits the head's 32 rotary frequencies among (t, h, w), as 16/24/24 of 64 in the 7B.
    text.rope_parameters["mrope_section"] = [8, 12, 12]
    vision.embed_dim, vision.num_heads, vision.hidden_size = width, 2, width
    generation = GenerationConfig.from_pretrained(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config = generation
    model.save_pretrained(folder)
    return folder


def bench_vllm(work: Path, settings, results: dict) -> None:
    """vLLM (eager: no CUDA graphs or torch.compile for 32 images) against hf on the same model.

    A failing engine is reported in ``results["extract_vllm_error"]``, not raised: the other
    numbers of the run still count.
    """
    from thinkdiff.data.extraction import extract_features, make_engine

    model = save_vllm_sized_qwen(work / "qwen-vllm")
    try:
        engine = make_engine("vllm", str(model), settings, enforce_eager=True)
        summary = extract_features(work / "tars", work / "out-vllm", engine, settings, batch_size=64, progress=False)
        results["extract_vllm"] = summary.samples_per_second
    except Exception as exc:  # vLLM raises many kinds; the report needs the one line
        lines = str(exc).strip().splitlines()
        results["extract_vllm_error"] = f"{type(exc).__name__}: {lines[0] if lines else ''}"
        return
    hf = make_engine("hf", str(model), settings)
    summary = extract_features(work / "tars", work / "out-vllm-hf", hf, settings, batch_size=8, progress=False)
    results["extract_hf_recompute_vllm_model"] = summary.samples_per_second


def bench_extraction(args: argparse.Namespace, results: dict) -> None:
    import importlib.util

    from thinkdiff.data.extraction import ExtractionSettings, HFEngine, extract_features, make_engine
    from thinkdiff.data.synthetic import write_tar_shards
    from thinkdiff.tiny.qwen import save_tiny_qwen_vl

    work = Path(tempfile.mkdtemp(prefix="bench-extract-", dir=args.tmp))
    try:
        model = save_tiny_qwen_vl(work / "qwen", kind="qwen2_vl")
        write_tar_shards(
            work / "tars", num_shards=2, samples_per_shard=args.extract_samples // 2, bad=False, image_size=64
        )
        settings = ExtractionSettings(max_new_tokens=args.tokens)
        engine = make_engine("hf", str(model), settings)
        assert isinstance(engine, HFEngine)
        rates: dict[str, list[float]] = {"recompute": [], "generate": []}
        for repeat in range(3):  # interleaved, best of 3: the two cores are shared
            for way in rates:
                engine.features = way
                out = work / f"out-{way}-{repeat}"
                summary = extract_features(work / "tars", out, engine, settings, batch_size=8, progress=False)
                rates[way].append(summary.samples_per_second)
        results["extract_hf_recompute"] = max(rates["recompute"])
        results["extract_hf_generate"] = max(rates["generate"])
        results["extract_tokens_per_sample"] = summary.samples_written and (
            json.loads((out / "index.json").read_text())["num_tokens"] / summary.samples_written
        )
        if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available():
            bench_vllm(work, settings, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=4000, help="samples written for the reading test")
    parser.add_argument("--shards", type=int, default=4, help="feature shards they are written to")
    parser.add_argument("--tokens", type=int, default=64, help="generated tokens per sample (paper: 64)")
    parser.add_argument("--hidden", type=int, default=3584, help="feature width (Qwen2-VL-7B: 3584)")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch per GPU (released: 32)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--extract-samples", type=int, default=32, help="images for the extraction test")
    parser.add_argument("--skip-extraction", action="store_true")
    parser.add_argument("--skip-reading", action="store_true")
    parser.add_argument("--tmp", default=None, help="folder for the temporary shards (default: system temp)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    results: dict = {"tokens": args.tokens, "hidden": args.hidden, "cpu_count": os.cpu_count()}
    if not args.skip_reading:
        bench_reading(args, results)
        target = 10 * PAPER_TRAINING_SAMPLES_PER_S
        print(
            f"reading {args.samples} samples of {args.tokens} x {args.hidden} bf16 ({args.workers} workers, batch {args.batch_size}):"
        )
        for name, numbers in results["reading"].items():
            rate = numbers["samples_per_s"]
            first = (
                f", first batch after {numbers['first_batch_s']:.2f} s" if "first_batch_s" in numbers else ""
            )
            print(f"  {name:42s} {rate:7.0f} samples/s = {rate / PAPER_TRAINING_SAMPLES_PER_S:5.1f}x training "
                  f"({'meets' if rate >= target else 'BELOW'} {target:.0f}/s){first}")  # fmt: skip
        ratio = results["fp32_per_sample_bytes"] / results["bytes_per_sample"]
        print(f"  bytes/sample       {results['bytes_per_sample']:9.0f} (ours, bf16 + ids + metadata)")
        print(f"                     {results['fp32_per_sample_bytes']:9.0f} (released: fp32 torch.save per sample)  -> {ratio:.2f}x smaller")  # fmt: skip
        print(f"  writing            {results['write_samples_per_s']:9.0f} samples/s")
    if not args.skip_extraction:
        bench_extraction(args, results)
        recompute, generate = results["extract_hf_recompute"], results["extract_hf_generate"]
        print(
            f"extraction, tiny Qwen2-VL on CPU, {args.extract_samples} images, up to {args.tokens} new tokens:"
        )
        print(f"  hf generate + teacher-forced pass  {recompute:8.1f} samples/s")
        print(
            f"  hf hidden states out of generate   {generate:8.1f} samples/s  (ratio {recompute / generate:.2f})"
        )
        if "extract_vllm" in results:
            vllm, hf = results["extract_vllm"], results["extract_hf_recompute_vllm_model"]
            print(f"  vllm (eager, head size {VLLM_HEAD_SIZE} model)      {vllm:8.1f} samples/s  "
                  f"(hf on that model {hf:.1f}: ratio {vllm / hf:.2f})")  # fmt: skip
        else:
            print(f"  vllm                               {results.get('extract_vllm_error', 'not measured (needs vLLM and a GPU)')}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
