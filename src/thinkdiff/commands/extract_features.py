"""``thinkdiff extract-features``: pre-compute the LVLM token features ThinkDiff-LVLM trains on."""

from __future__ import annotations

import argparse
from pathlib import Path

_DTYPES = ("auto", "bfloat16", "float16", "float32")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "extract-features",
        help="describe images with the LVLM and store its token features as shards",
        description=(
            "For every image of an image-caption source, draw one of the paper's 16 description prompts, "
            "let the LVLM (Qwen2-VL / Qwen2.5-VL) sample an answer, and store the answer's token ids, text "
            "and post-final-norm features (bf16) in feature shards, one per input shard. A rerun skips "
            "complete shards. Ranks (--rank/--world-size, or RANK/WORLD_SIZE from torchrun or accelerate) "
            "split the input shards; each rank updates index.json when it finishes."
        ),
    )
    parser.add_argument("--model", help="LVLM hub id or folder, e.g. Qwen/Qwen2-VL-7B-Instruct")
    parser.add_argument(
        "--source",
        nargs="+",
        help="tar shards (brace pattern like 'cc_sbu/{00000..01254}.tar', a list, or a folder of .tar), "
        "a folder of images with .txt captions, or a .jsonl/.csv manifest (image_path, caption)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder of the feature shards")
    parser.add_argument(
        "--engine", choices=("hf", "vllm"), default="hf", help="generation engine (default: hf)"
    )
    parser.add_argument(
        "--hf-features",
        choices=("recompute", "generate"),
        default="recompute",
        help="hf engine: recompute the features in one teacher-forced pass (default), or read them out of generate",
    )
    parser.add_argument(
        "--prompts-file", type=Path, help="instruction prompts, one per line (default: the paper's 16)"
    )
    parser.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (default: 0.6)")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default: 0.9)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=64, help="tokens per answer at most (default: 64)"
    )
    parser.add_argument(
        "--qcd-alpha",
        type=float,
        default=0.0,
        help="query-contrastive decoding weight against the prompt without its last text (the image alone; "
        "task format: without the final word); hf engine; default 0: off",
    )
    parser.add_argument(
        "--task-shots",
        type=int,
        nargs="+",
        default=[],
        help="task-format calibration data: group consecutive samples into interleaved prompts of K "
        "images with short texts + a final text (ThinkDiff's instruction; several K are cycled). The "
        "source must be disjoint from the benchmark you evaluate on; see docs/calibration.md",
    )
    parser.add_argument(
        "--task-text-words", type=int, default=0, help="task format: words kept of each caption (0: all)"
    )
    parser.add_argument("--greedy", action="store_true", help="greedy answers (as at test time)")
    parser.add_argument(
        "--hint",
        nargs="?",
        const="",
        metavar="SENTENCE",
        help="task format: append a hint to the instruction (bare flag: ours, as thinkdiff generate --hint)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images per generation batch (default: 8)")
    parser.add_argument(
        "--dtype", choices=_DTYPES, default="auto", help="model dtype (auto: bf16 on GPU, fp32 on CPU)"
    )
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt choice and the sampling")
    parser.add_argument(
        "--prompt-features", action="store_true", help="also store the prompt tokens' features (ablation)"
    )
    parser.add_argument(
        "--samples-per-shard", type=int, default=1000, help="shard size for folder and manifest sources"
    )
    parser.add_argument("--max-pixels", type=int, help="cap on image pixels for the LVLM processor")
    parser.add_argument(
        "--vllm-gpu-memory", type=float, default=0.5, help="share of GPU memory vLLM may take (default: 0.5)"
    )
    parser.add_argument("--rank", type=int, help="this process's rank (overrides RANK)")
    parser.add_argument("--world-size", type=int, help="number of processes (overrides WORLD_SIZE)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--allow-change",
        nargs="+",
        default=[],
        metavar="SETTING",
        help="settings (as named in extraction.json, e.g. batch_size) that may differ from the ones the "
        "folder was written with; any other difference is refused. Recorded in changes.jsonl",
    )
    parser.add_argument(
        "--merge-only",
        action="store_true",
        help="only rebuild index.json, report.json and skipped.jsonl of --out (after a multi-node run)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from thinkdiff.commands.generate import hint_of
    from thinkdiff.data.extraction import (
        DESCRIPTION_PROMPTS,
        ExtractionSettings,
        check_settings_before_loading,
        extract_features,
        make_engine,
        merge,
    )

    if args.merge_only:
        report = merge(args.out)
        print(_report_line(args.out, report))
        return 0
    if not args.model or not args.source:
        raise ValueError("--model and --source are required (unless --merge-only)")
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} is an existing file, not a folder")

    prompts = DESCRIPTION_PROMPTS
    if args.prompts_file is not None:
        if not args.prompts_file.is_file():
            raise FileNotFoundError(f"prompts file {args.prompts_file} does not exist")
        prompts = tuple(line.strip() for line in args.prompts_file.read_text(encoding="utf-8").splitlines())
        prompts = tuple(p for p in prompts if p)
    settings = ExtractionSettings(
        prompts=prompts,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        prompt_features=args.prompt_features,
        samples_per_shard=args.samples_per_shard,
        task_shots=tuple(args.task_shots),
        task_text_words=args.task_text_words,
        greedy=args.greedy,
        qcd_alpha=args.qcd_alpha,
        hint=hint_of(args),
    )
    # Check the cheap things (ranks, the source) before loading a large model.
    from thinkdiff.data.sharding import rank_and_world_size
    from thinkdiff.data.sources import list_source_shards
    from thinkdiff.limits import lvlm_context_bound

    rank, world_size = rank_and_world_size(args.rank, args.world_size)
    source = args.source[0] if len(args.source) == 1 else args.source
    list_source_shards(source, samples_per_shard=args.samples_per_shard)
    lvlm_context_bound(args.model).check("--max-new-tokens", args.max_new_tokens)
    allow_change = [name.replace("-", "_") for name in args.allow_change]
    check_settings_before_loading(
        args.out,
        args.model,
        source,
        settings,
        batch_size=args.batch_size,
        engine=args.engine,
        hf_features=args.hf_features,
        allow_change=allow_change,
    )

    engine = make_engine(
        args.engine,
        args.model,
        settings,
        device=args.device,
        dtype=_dtype(args.dtype),
        hf_features=args.hf_features,
        max_pixels=args.max_pixels,
        gpu_memory_utilization=args.vllm_gpu_memory,
    )
    summary = extract_features(
        source,
        args.out,
        engine,
        settings,
        batch_size=args.batch_size,
        rank=rank,
        world_size=world_size,
        progress=not args.no_progress,
        allow_change=allow_change,
    )
    print(summary)
    return 0


def _dtype(name: str):
    import torch

    return None if name == "auto" else getattr(torch, name)


def _report_line(out: Path, report: dict) -> str:
    state = "complete" if report["complete"] else "incomplete"
    per_sample = report["bytes_per_sample"]
    size = f"{per_sample / 1024:.1f} KiB/sample" if per_sample else "no samples"
    return (
        f"{out}: {report['num_shards']}/{report['num_source_shards']} shards ({state}), "
        f"{report['num_samples']} samples, skipped {report['skipped'] or 'none'}, {size}"
    )
