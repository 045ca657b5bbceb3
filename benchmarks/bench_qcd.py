"""Query-contrastive decoding against plain decoding: time per generated token and peak memory, side by side.

QCD runs a second prompt (the input without its last text item) with its own KV cache beside
``generate``: one more prefill (vision tower included) and one more one-token forward per step.
Expected cost: up to 2x the time, and one more KV cache (Qwen2-VL-7B: 28 layers x 2 x 4 KV heads x
128 x 2 bytes = 57 KiB per token) plus the contrast prefill's activations.

Run: ``python benchmarks/bench_qcd.py [--model PATH] [--batch 4] [--tokens 32] [--repeats 3]``
(default model: a tiny random Qwen2-VL written to a temporary folder; on a GPU pass a real one).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image


def cobsat_like(batch: int, size: int) -> list[list]:
    """CoBSAT-shaped inputs: instruction, two (word, image) demonstrations, the query word."""
    from thinkdiff.pipelines.constants import DEFAULT_INSTRUCTION
    from thinkdiff.pipelines.requests import cobsat_items

    prompts = []
    for b in range(batch):
        images = [Image.new("RGB", (size, size), (40 * b % 255, 120, 30 * k)) for k in range(2)]
        prompts.append(cobsat_items(["red", "blue", "green"], images, instruction=DEFAULT_INSTRUCTION))
    return prompts


def timed(extractor, prompts, sampling, repeats: int) -> tuple[float, int]:
    """Best seconds of ``repeats`` generate calls, and the peak CUDA bytes (0 on the CPU)."""
    cuda = extractor.device.type == "cuda"
    best = float("inf")
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        extractor.generate(prompts, sampling, teacher_forced=True, with_states=False)
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, torch.cuda.max_memory_allocated() if cuda else 0


def main() -> None:
    from thinkdiff.models.lvlm import LVLMFeatureExtractor, SamplingSettings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="Qwen2-VL / Qwen2.5-VL folder (default: tiny random)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--alpha", type=float, default=0.5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from thinkdiff.tiny.qwen import save_tiny_qwen_vl

            model = save_tiny_qwen_vl(Path(tmp) / "qwen2-vl", kind="qwen2_vl")
        extractor = LVLMFeatureExtractor.from_pretrained(model)
        prompts = cobsat_like(args.batch, args.image_size)
        plain = SamplingSettings.exactly(args.tokens, seed=0)
        qcd = SamplingSettings.exactly(args.tokens, seed=0, qcd_alpha=args.alpha)
        timed(extractor, prompts, plain, 1)  # warm-up
        rows = {"plain": timed(extractor, prompts, plain, args.repeats), "qcd": timed(extractor, prompts, qcd, args.repeats)}
    per_token = {k: s / args.tokens for k, (s, _) in rows.items()}
    print(f"{extractor.device}, batch {args.batch}, {args.tokens} tokens, best of {args.repeats}")
    print(f"{'':8s} {'ms/token':>10s} {'peak GiB':>10s}")
    for name, (_, peak) in rows.items():
        print(f"{name:8s} {1000 * per_token[name]:10.2f} {peak / 2**30:10.2f}")
    ratio = per_token["qcd"] / per_token["plain"]
    print(f"QCD / plain time: {ratio:.2f}x" + (
        f", peak memory {rows['qcd'][1] / rows['plain'][1]:.2f}x" if rows["plain"][1] else ""
    ))  # fmt: skip


if __name__ == "__main__":
    main()
