"""Host memory of loading the proxy T5: ours (decoder only, bf16) vs the released code's way.

The released code loads the whole Flan-T5-XXL in fp32 on every rank and then drops the encoder
(~45 GB host RAM per rank). ``ProxyT5Decoder.from_pretrained`` skips the encoder blocks and
converts tensor by tensor, so the peak is about the bf16 decoder. Both are measured side by side,
each in a fresh process (peak RSS), on a T5 checkpoint written in fp32 with the Flan-T5-XXL shape
scaled down (same layer counts, narrower), then the ratios are applied to the real sizes.

"Peak memory" is the private (anonymous) resident memory a load adds, sampled every 2 ms from
outside the process; pages of the memory-mapped checkpoint are page cache, reported apart.

Run: ``python benchmarks/bench_proxy_memory.py [--scale 8]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import XXL, scaled_t5_config


def t5_params(d_model: int, d_ff: int, num_layers: int, vocab_size: int, inner: int) -> dict[str, int]:
    """Parameter counts of a gated-GELU T5 (v1.1 / flan): encoder, decoder, embeddings."""
    attention = 4 * d_model * inner
    ffn = 3 * d_model * d_ff
    encoder = num_layers * (attention + ffn + 2 * d_model) + d_model
    decoder = num_layers * (2 * attention + ffn + 3 * d_model) + d_model
    return {
        "encoder": encoder,
        "decoder": decoder,
        "shared": vocab_size * d_model,
        "lm_head": vocab_size * d_model,
    }


MEASURE = r"""
import os, sys, torch, transformers, diffusers
import thinkdiff.models.proxy_decoder
from transformers import T5ForConditionalGeneration
mode, folder = sys.argv[1], sys.argv[2]
print("ready", flush=True)
sys.stdin.readline()  # the parent reads the baseline memory now
if mode == "ours":
    model = thinkdiff.models.proxy_decoder.ProxyT5Decoder.from_pretrained(folder, dtype=torch.bfloat16, device="cpu")
else:
    # The released code (transformers 4.x): the whole fp32 state dict read by torch.load without
    # memory mapping, the whole model built in fp32, then the encoder dropped.
    from transformers import T5Config
    state = torch.load(os.path.join(folder, "pytorch_model.bin"), map_location="cpu", weights_only=True, mmap=False)
    model = T5ForConditionalGeneration(T5Config.from_pretrained(folder))
    model.load_state_dict(state, strict=False)
    del state, model.encoder
import time
time.sleep(0.3)  # hold the loaded model while the parent takes its last samples
print("done", flush=True)
"""


def _anon_bytes(pid: int) -> int:
    """Private (anonymous) resident memory: what the process itself allocated, not page cache."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_memory(mode: str, folder: Path) -> tuple[int, int]:
    """Peak (anonymous, total resident) memory added by loading, sampled from outside the process."""
    child = subprocess.Popen(
        [sys.executable, "-c", MEASURE, mode, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdin is not None
    child.stdout.readline()  # "ready": imports done
    base_anon, base_rss = _anon_bytes(child.pid), _rss_bytes(child.pid)
    child.stdin.write("go\n")
    child.stdin.flush()
    peak_anon = peak_rss = 0
    while child.poll() is None:
        try:
            peak_anon = max(peak_anon, _anon_bytes(child.pid))
            peak_rss = max(peak_rss, _rss_bytes(child.pid))
        except FileNotFoundError:
            break
        time.sleep(0.002)
    if child.wait() != 0:
        raise RuntimeError(f"measuring {mode} failed")
    return peak_anon - base_anon, peak_rss - base_rss


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=int, default=8, help="divide widths by this (layer counts stay real)")
    args = parser.parse_args()

    import torch
    from transformers import T5ForConditionalGeneration

    from thinkdiff.tiny.t5 import save_tiny_t5

    config = scaled_t5_config(args.scale)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "t5"
        save_tiny_t5(folder)  # tokenizer files; the weights are replaced below
        with torch.device("cpu"):
            model = T5ForConditionalGeneration(config)
        model.save_pretrained(folder)  # fp32 on disk, as the hub's flan-t5-xxl
        torch.save(model.state_dict(), folder / "pytorch_model.bin")  # the pickle the released code read
        sizes = t5_params(
            config.d_model, config.d_ff, config.num_layers, config.vocab_size, config.d_kv * config.num_heads
        )
        del model
        ours, ours_rss = peak_memory("ours", folder)
        released, released_rss = peak_memory("released", folder)

    gib = 1024**3
    decoder_bf16 = 2 * (sizes["decoder"] + sizes["shared"] + sizes["lm_head"])
    full_fp32 = 4 * sum(sizes.values())
    real = t5_params(
        XXL["d_model"], XXL["d_ff"], XXL["num_layers"], XXL["vocab_size"], XXL["d_kv"] * XXL["num_heads"]
    )
    real_decoder_bf16 = 2 * (real["decoder"] + real["shared"] + real["lm_head"])
    result = {
        "scaled_config": {"d_model": config.d_model, "d_ff": config.d_ff, "layers": config.num_layers},
        "decoder_bf16_bytes": decoder_bf16,
        "full_fp32_bytes": full_fp32,
        "peak_private_ours": ours,
        "peak_private_released": released,
        "peak_resident_incl_page_cache_ours": ours_rss,
        "peak_resident_incl_page_cache_released": released_rss,
        "ours_over_decoder_bf16": ours / decoder_bf16,
        "released_over_ours": released / ours,
        "real_flan_t5_xxl": {
            "params": real,
            "decoder_bf16_GiB": real_decoder_bf16 / gib,
            "ours_estimated_peak_GiB": ours / decoder_bf16 * real_decoder_bf16 / gib,
            "released_estimated_peak_GiB": released / decoder_bf16 * real_decoder_bf16 / gib,
        },
    }
    print(json.dumps(result, indent=2))
    print(
        f"\nproxy load peak private host RAM: ours {ours / gib:.2f} GiB = {ours / decoder_bf16:.2f}x the bf16 decoder; "
        f"released-style {released / gib:.2f} GiB ({released / ours:.1f}x ours). At Flan-T5-XXL: ours ~"
        f"{result['real_flan_t5_xxl']['ours_estimated_peak_GiB']:.1f} GiB vs released ~"
        f"{result['real_flan_t5_xxl']['released_estimated_peak_GiB']:.1f} GiB per rank."
    )


if __name__ == "__main__":
    main()
