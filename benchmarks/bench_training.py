"""Training throughput of ThinkDiff-LVLM: FLOPs, samples/s, MFU, padding, data wait.

1. Arithmetic at real dimensions (Qwen2-VL-7B features, Flan-T5-XXL decoder): FLOPs per sample and
   the rate the targets ask for.
2. Measured on this CPU, side by side in one run, with the real trainer on a Flan-T5-XXL shaped
   decoder scaled in width (all 24 layers, real vocabulary) and 64-token feature shards:
   bucketed batches (our default) vs the released order, with achieved FLOP/s against this CPU's
   own matmul rate (a CPU "MFU"), the padding fraction and the share of step time spent waiting
   for data.
3. On a GPU, when there is one: the real dimensions with random weights (bf16 decoder, fp32
   aligner, bf16 autocast), samples/s, MFU against the card's bf16 peak, and peak memory, with and
   without activation checkpointing.

Run: ``python benchmarks/bench_training.py [--scale 8] [--steps 4] [--batch 16]``
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from common import QWEN2VL_7B_HIDDEN, XXL, scaled_t5_config

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def flops_per_sample(dims: dict[str, int], feature_dim: int, memory: int, target: int) -> float:
    """Forward + activation-only backward (~= forward) FLOPs of one sample: decoder, LM head, aligner."""
    d, ff, inner = dims["d_model"], dims["d_ff"], dims["d_kv"] * dims["num_heads"]
    per_target = 4 * d * inner + 2 * d * inner + 3 * d * ff  # self-attn, cross-attn q/o, gated FFN
    per_memory = 2 * d * inner  # cross-attn k/v of the memory
    decoder = dims["num_layers"] * (target * per_target + memory * per_memory)
    lm_head = target * d * dims["vocab_size"]
    aligner = memory * (feature_dim * d + d * d)
    forward_macs = decoder + lm_head + aligner
    return 2 * 2 * forward_macs  # 2 FLOPs per MAC; backward through activations ~= forward


def cpu_matmul_flops(size: int = 1024, repeats: int = 10) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def write_scaled_t5(folder: Path, scale: int) -> dict[str, int]:
    from transformers import T5ForConditionalGeneration

    from thinkdiff.tiny.tokenizers import save_t5_tokenizer

    config = scaled_t5_config(scale, dropout_rate=0.1)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    save_t5_tokenizer(folder)
    return dict(XXL, d_model=config.d_model, d_ff=config.d_ff, num_heads=config.num_heads)


def write_features(folder: Path, tokenizer, width: int, samples: int, tokens: int = 64) -> None:
    from thinkdiff.data.feature_shards import FeatureShardWriter, write_index

    gen = torch.Generator().manual_seed(0)
    words = [i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids]
    with FeatureShardWriter(folder, 0) as writer:
        for i in range(samples):
            ids = torch.tensor(words)[torch.randint(len(words), (tokens,), generator=gen)]
            writer.add(f"s{i:06d}", ids, torch.randn(tokens, width, generator=gen))
        writer.finish()
    write_index(folder, num_source_shards=1)


def cpu_runs(args: argparse.Namespace) -> dict[str, object]:
    from transformers import AutoTokenizer

    from thinkdiff.training.config import debug_lvlm
    from thinkdiff.training.trainer import Trainer

    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dims = write_scaled_t5(root / "t5", args.scale)
        feature_dim = QWEN2VL_7B_HIDDEN // args.scale
        lvlm = "tiny:qwen2-vl"
        from thinkdiff.models.loading import resolve_model_dir

        tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(lvlm))
        steps = args.steps + 1  # the first step warms up and is not timed
        write_features(root / "features", tokenizer, feature_dim, samples=args.batch * steps * 2)
        matmul = cpu_matmul_flops()
        results["cpu_matmul_GFLOPs"] = matmul / 1e9
        for name, bucket in (("bucketed (default)", 4), ("released order", 0)):
            config = debug_lvlm().updated(
                data=[str(root / "features")],
                output_dir=str(root / f"run-{bucket}"),
                proxy_t5=str(root / "t5"),
                lvlm=lvlm,
                global_batch_size=args.batch,
                max_steps=steps,
                bucket_batches=bucket,
                num_workers=1,
                log_every=1,
                val_every=0,
                decode_every=0,
                save_every=10_000,
                shuffle_buffer=256,
            )
            trainer = Trainer(config)
            trainer.fit(resume="never")
            rows = [
                json.loads(line)
                for line in (root / f"run-{bucket}" / "metrics.jsonl").read_text().splitlines()
            ][1:]
            sps = sum(r["samples_per_s"] for r in rows) / len(rows)
            padding = sum(r["padding_fraction"] for r in rows) / len(rows)
            wait = sum(r["data_wait_fraction"] for r in rows) / len(rows)
            # Useful FLOPs: the unpadded work (mean cut 32 of 64 tokens on each side).
            useful = flops_per_sample(dims, feature_dim, 32, 32)
            results[name] = {
                "samples_per_s": sps,
                "padding_fraction": padding,
                "data_wait_fraction": wait,
                "useful_GFLOP_per_sample": useful / 1e9,
                "cpu_mfu": sps * useful / matmul,
            }
        # The debug preset as shipped: every tiny:* model, 64-wide features, batch 8.
        write_features(root / "tiny-features", tokenizer, 64, samples=8 * 40)
        config = debug_lvlm().updated(
            data=[str(root / "tiny-features")], output_dir=str(root / "run-debug"), max_steps=40, log_every=10,
            val_every=0, decode_every=0, save_every=10_000,
        )  # fmt: skip
        Trainer(config).fit(resume="never")
        rows = [json.loads(line) for line in (root / "run-debug" / "metrics.jsonl").read_text().splitlines()][
            1:
        ]
        results["debug-lvlm preset"] = {"samples_per_s": sum(r["samples_per_s"] for r in rows) / len(rows)}
    a, b = results["bucketed (default)"], results["released order"]
    results["speedup_bucketed_over_released_order"] = a["samples_per_s"] / b["samples_per_s"]  # type: ignore[index]
    return results


def gpu_run(batch: int, checkpointing: bool) -> dict[str, float]:
    """Real dimensions, random weights: one Flan-T5-XXL decoder in bf16 on the GPU."""
    from transformers import T5Config, T5ForConditionalGeneration
    from transformers.modeling_outputs import BaseModelOutput

    from thinkdiff.models.aligner import Aligner

    config = T5Config(
        **{k: XXL[k] for k in ("d_model", "d_ff", "d_kv", "num_heads", "vocab_size")},
        num_layers=0,
        num_decoder_layers=XXL["num_layers"],
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        use_cache=False,
    )
    torch.cuda.reset_peak_memory_stats()
    with torch.device("cuda"):
        t5 = T5ForConditionalGeneration(config).to(torch.bfloat16).requires_grad_(False)
        aligner = Aligner(QWEN2VL_7B_HIDDEN, XXL["d_model"])
    if checkpointing:
        t5.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        t5.train()
    else:
        t5.eval()
    optimizer = torch.optim.AdamW(aligner.parameters(), lr=1e-4, fused=True)
    features = torch.randn(batch, 32, QWEN2VL_7B_HIDDEN, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(batch, 32, dtype=torch.bool, device="cuda")
    labels = torch.randint(0, 32000, (batch, 33), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            memory = aligner(features).to(torch.bfloat16)
            loss = t5(
                encoder_outputs=BaseModelOutput(last_hidden_state=memory), attention_mask=mask, labels=labels
            ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    n = 10
    start = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    sps = batch * n / (time.perf_counter() - start)
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), 989e12)
    return {
        "samples_per_s": sps,
        "mfu": sps * flops_per_sample(XXL, QWEN2VL_7B_HIDDEN, 32, 32) / peak,
        "peak_memory_GiB": torch.cuda.max_memory_allocated() / 1024**3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scale", type=int, default=8, help="width divisor of the CPU model (layers stay 24)"
    )
    parser.add_argument("--steps", type=int, default=4, help="timed optimiser steps per CPU run")
    parser.add_argument("--batch", type=int, default=16, help="CPU global batch")
    args = parser.parse_args()
    os.environ.setdefault("THINKDIFF_TINY_DIR", str(Path(tempfile.gettempdir()) / "thinkdiff-bench-tiny"))

    real = flops_per_sample(XXL, QWEN2VL_7B_HIDDEN, 32, 32)
    report: dict[str, object] = {
        "real_dims_GFLOP_per_sample": real / 1e9,
        "paper_rate_per_A100": {
            "samples_per_s": 96 / 0.72 / 4,
            "mfu": 96 / 0.72 / 4 * real / PEAK_BF16["A100"],
        },
        "target_per_H100": {"samples_per_s": 300, "mfu": 300 * real / PEAK_BF16["H100"]},
    }
    report["cpu"] = cpu_runs(args)
    if torch.cuda.is_available():
        report["gpu"] = {
            f"batch{b}{'_ckpt' if c else ''}": gpu_run(b, c)
            for b, c in ((32, False), (96, False), (96, True))
        }
    else:
        report["gpu"] = (
            "no GPU here: run this script on one to measure samples/s, MFU and memory at real dimensions"
        )
    print(json.dumps(report, indent=2))
    cpu = report["cpu"]
    print(
        f"\nreal dims: {real / 1e9:.0f} GFLOP/sample; the paper ran at {report['paper_rate_per_A100']['samples_per_s']:.1f} "
        f"samples/s per A100 ({report['paper_rate_per_A100']['mfu']:.1%} MFU)."
    )
    for name in ("bucketed (default)", "released order"):
        r = cpu[name]  # type: ignore[index]
        print(
            f"CPU 1/{args.scale}-width XXL, {name}: {r['samples_per_s']:.2f} samples/s, padding {r['padding_fraction']:.1%}, "
            f"data wait {r['data_wait_fraction']:.1%}, CPU MFU {r['cpu_mfu']:.1%}"
        )
    print(f"bucketed / released order: {cpu['speedup_bucketed_over_released_order']:.2f}x")  # type: ignore[index]
    print(f"debug-lvlm preset (tiny kit): {cpu['debug-lvlm preset']['samples_per_s']:.0f} samples/s")  # type: ignore[index]


if __name__ == "__main__":
    main()
