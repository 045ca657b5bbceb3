"""Training throughput of ThinkDiff-LVLM: FLOPs, samples/s, MFU, padding, data wait.

1. Arithmetic at real dimensions (Qwen2-VL-7B features, Flan-T5-XXL decoder): FLOPs per sample and
   the rate the targets ask for.
2. Measured on this CPU, side by side in one run, with the real trainer on a Flan-T5-XXL shaped
   decoder scaled in width (all 24 layers, real vocabulary) and 64-token feature shards:
   bucketed batches (our default) vs the released order, with achieved FLOP/s against this CPU's
   own matmul rate (a CPU "MFU"), the padding fraction and the share of step time spent waiting
   for data.
3. On a GPU, when there is one: the real dimensions with random weights through the project's
   own step (``ProxyT5Decoder`` built in bf16 in place, ``lvlm_loss``, the fp32 aligner under
   accelerate's bf16 autocast, fused AdamW): samples/s, MFU against the card's bf16 peak, and the
   peak allocated and reserved memory of training alone (the weights counted, their construction
   not), with and without activation checkpointing.

Run: ``python benchmarks/bench_training.py [--scale 8] [--steps 4] [--batch 16]``;
``--smoke`` runs every part on the CPU in about a minute (narrow models, one step).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from common import QWEN2VL_7B_HIDDEN, XXL, random_proxy_t5, scaled_t5_config, write_scaled_lvlm

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


def fresh_accelerator(**kwargs: object):
    """An ``Accelerator`` with these settings even if one with others exists in this process.

    accelerate keeps one state per process and refuses a second ``Accelerator`` that differs; this
    benchmark runs a CPU/fp32 part and a GPU/bf16 part in turn, so the state is reset between
    them (as accelerate's own tests do; one process, no process group).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(**kwargs)


def cpu_runs(args: argparse.Namespace) -> dict[str, object]:
    from transformers import AutoTokenizer

    from thinkdiff.training.config import debug_lvlm
    from thinkdiff.training.trainer import Trainer

    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dims = write_scaled_t5(root / "t5", args.scale)
        feature_dim = QWEN2VL_7B_HIDDEN // args.scale
        lvlm = str(write_scaled_lvlm(root / "lvlm", feature_dim))
        from thinkdiff.models.loading import resolve_model_dir

        tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(lvlm))
        steps = args.steps + 1  # the first step warms up and is not timed
        write_features(root / "features", tokenizer, feature_dim, samples=args.batch * steps * 2)
        matmul = cpu_matmul_flops()
        results["cpu_matmul_GFLOPs"] = matmul / 1e9
        # On a GPU machine the trainer would pick the GPU (and bf16); this section measures the CPU
        # against its own matmul rate, so it is told to stay there, in fp32.
        accelerator = fresh_accelerator(cpu=True, mixed_precision="no")
        results["accelerator"] = {"device": str(accelerator.device), "mixed_precision": accelerator.mixed_precision}
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
            trainer = Trainer(config, accelerator=accelerator)
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
        debug_steps = 4 if args.smoke else 40
        write_features(root / "tiny-features", tokenizer, 64, samples=8 * debug_steps)
        config = debug_lvlm().updated(
            data=[str(root / "tiny-features")], output_dir=str(root / "run-debug"), max_steps=debug_steps,
            log_every=debug_steps // 4, val_every=0, decode_every=0, save_every=10_000,
        )  # fmt: skip
        Trainer(config, accelerator=accelerator).fit(resume="never")
        rows = [json.loads(line) for line in (root / "run-debug" / "metrics.jsonl").read_text().splitlines()][
            1:
        ]
        results["debug-lvlm preset"] = {"samples_per_s": sum(r["samples_per_s"] for r in rows) / len(rows)}
    a, b = results["bucketed (default)"], results["released order"]
    results["speedup_bucketed_over_released_order"] = a["samples_per_s"] / b["samples_per_s"]  # type: ignore[index]
    return results


def gpu_run(
    batch: int,
    checkpointing: bool,
    device: str = "cuda",
    scale: int = 1,
    layers: int | None = None,
    steps: int = 10,
) -> dict[str, float | str | None]:
    """Real dimensions (widths / ``scale``, ``layers`` decoder layers), random weights, the project's
    training step: ``lvlm_loss`` of the fp32 aligner and a bf16 ``ProxyT5Decoder`` under
    accelerate's bf16 autocast, ``accelerator.backward``, fused AdamW (on CUDA).

    Peak memory is reset after construction: it is training's own (weights, optimizer state,
    activations), not the building of the model.
    """
    from thinkdiff.models.aligner import Aligner
    from thinkdiff.objectives import LVLMBatch, lvlm_loss

    accelerator = fresh_accelerator(mixed_precision="bf16", cpu=device == "cpu")
    cuda = accelerator.device.type == "cuda"
    proxy = random_proxy_t5(accelerator.device, torch.bfloat16, scale=scale, num_decoder_layers=layers)
    if checkpointing:
        proxy.enable_activation_checkpointing()
    proxy.train()  # as the trainer does: its mode decides whether checkpointing runs
    width, hidden = proxy.d_model, QWEN2VL_7B_HIDDEN // scale
    aligner = Aligner(hidden, width).to(accelerator.device)
    optimizer = torch.optim.AdamW(aligner.parameters(), lr=1e-4, fused=cuda)
    aligner, optimizer = accelerator.prepare(aligner, optimizer)
    generator = torch.Generator().manual_seed(0)
    # The paper's mean sample: 32 feature tokens in, 32 target tokens (+ EOS) out; bf16 features.
    features = torch.randn(batch, 32, hidden, generator=generator).to(accelerator.device, torch.bfloat16)
    labels = torch.randint(0, XXL["vocab_size"], (batch, 33), generator=generator)
    step_batch = LVLMBatch(features, torch.ones(batch, 32, dtype=torch.bool), labels, [""] * batch,
                           [str(i) for i in range(batch)], [32] * batch, [[]] * batch)  # fmt: skip

    def step() -> float:
        with accelerator.autocast():
            loss = lvlm_loss(aligner, proxy, step_batch)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    if cuda:
        torch.cuda.synchronize()
        weights = torch.cuda.memory_allocated() / 1024**3
        torch.cuda.reset_peak_memory_stats()
    losses = [step() for _ in range(3)]  # warm-up (kernels, allocator, optimizer state)
    start = time.perf_counter()
    losses += [step() for _ in range(steps)]  # float(loss) waits for the device
    sps = batch * steps / (time.perf_counter() - start)
    dims = dict(XXL, d_model=width, d_ff=proxy.t5.config.d_ff, num_heads=proxy.t5.config.num_heads,
                num_layers=proxy.t5.config.num_decoder_layers)  # fmt: skip
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), 989e12)
    return {
        "device": name,
        "samples_per_s": sps,
        "mfu": sps * flops_per_sample(dims, hidden, 32, 32) / peak if cuda else None,
        "weights_GiB": weights if cuda else None,
        "peak_allocated_GiB": torch.cuda.max_memory_allocated() / 1024**3 if cuda else None,
        "peak_reserved_GiB": torch.cuda.max_memory_reserved() / 1024**3 if cuda else None,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_dtype_fp32": lvlm_loss(aligner, proxy, step_batch).dtype == torch.float32,
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
    parser.add_argument("--smoke", action="store_true", help="every part on the CPU, narrow and short")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    if args.smoke:
        args.scale, args.steps, args.batch = 64, 1, 4
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
    if args.smoke:  # the GPU part's code on the CPU: 1/64 width, 2 decoder layers
        report["gpu"] = {f"smoke{'_ckpt' if c else ''}": gpu_run(2, c, "cpu", 64, 2, 1) for c in (False, True)}
    elif torch.cuda.is_available():
        report["gpu"] = {
            f"batch{b}{'_ckpt' if c else ''}": gpu_run(b, c)
            for b, c in ((32, False), (96, False), (96, True))
        }
    else:
        report["gpu"] = (
            "no GPU here: run this script on one to measure samples/s, MFU and memory at real dimensions"
        )
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
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
    for name, r in report["gpu"].items() if isinstance(report["gpu"], dict) else ():
        memory = (f", peak {r['peak_allocated_GiB']:.1f} GiB allocated / {r['peak_reserved_GiB']:.1f} GiB reserved "
                  f"(weights {r['weights_GiB']:.1f})") if r["peak_allocated_GiB"] is not None else ""  # fmt: skip
        mfu = f", MFU {r['mfu']:.1%}" if r["mfu"] is not None else ""
        print(f"{r['device']} {name}: {r['samples_per_s']:.1f} samples/s{mfu}{memory}")


if __name__ == "__main__":
    main()
