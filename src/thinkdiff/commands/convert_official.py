"""``thinkdiff convert-official CKPT.pth OUT_DIR --variant lvlm|clip``: use the authors' checkpoints."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert-official",
        help="turn a released ThinkDiff checkpoint (.pth) into a model folder",
        description=(
            "Convert the authors' released checkpoint ({'model': state_dict} with mm_projector.{0,2,3} "
            "aligner tensors, e.g. thinkdiff_lvlm.pth / thinkdiff_clip.pth) into a ThinkDiff model folder "
            "that `thinkdiff generate --model` reads. The file is loaded with torch.load(weights_only=True); "
            "other entries are ignored with a warning; a missing or mis-shaped aligner tensor is an error."
        ),
    )
    parser.add_argument("checkpoint", type=Path, metavar="CKPT.pth", help="the released checkpoint")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="model folder to write")
    parser.add_argument("--variant", choices=["lvlm", "clip"], required=True, help="which release it is")
    parser.add_argument("--source-model", help="LVLM / BLIP-2 model it reads (default: the release's)")
    parser.add_argument("--proxy-t5", help="proxy T5 it was trained against (default google/flan-t5-xxl)")
    parser.add_argument(
        "--decoder", help="diffusion decoder it targets (default black-forest-labs/FLUX.1-dev)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it is a model folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from thinkdiff.models.bundle import load_info
    from thinkdiff.pipelines.official import convert_official_checkpoint

    folder = convert_official_checkpoint(
        args.checkpoint,
        args.out_dir,
        args.variant,
        source_model=args.source_model,
        proxy_t5=args.proxy_t5,
        diffusion_decoder=args.decoder,
        overwrite=args.overwrite,
    )
    info = load_info(folder)
    print(f"wrote {folder}: ThinkDiff-{info.variant.upper()} aligner {info.in_dim} -> {info.out_dim}")
    return 0
