"""``thinkdiff make-tiny-models DIR``: write the offline tiny random kit."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "make-tiny-models",
        help="write tiny random instances of every component (no downloads)",
        description=(
            "Write tiny random-weight instances of every component the project uses (Qwen2-VL, "
            "Qwen2.5-VL, T5, FLUX.1, BLIP-2 vision, CogVideoX, LLaVA) with locally built "
            "tokenizers and processors, in the standard formats that from_pretrained reads."
        ),
    )
    parser.add_argument("out_dir", type=Path, help="folder to write (one subfolder per component)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from thinkdiff.tiny import make_tiny_models

    paths = make_tiny_models(args.out_dir, seed=args.seed)
    for name, path in paths.items():
        print(f"{name:14s} {path}")
    return 0
