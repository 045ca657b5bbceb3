"""``thinkdiff app``: the web page (the package :mod:`thinkdiff.app`); needs ``pip install thinkdiff[app]``."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """\
Without --model the models are the miniature world's committed weights: the page starts offline on
a CPU in seconds and the world's judge reads every image. On a GPU, name real models:
  thinkdiff app --model runs/lvlm/model --model runs/clip/model --decoder black-forest-labs/FLUX.1-dev
The page picks among the server's models and decoders only; it never names a server path.
It listens on 127.0.0.1 unless --host says otherwise (e.g. --host 0.0.0.0 to serve a network).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from thinkdiff.pipelines.constants import OFFLOAD_MODES, QUANTIZE_MODES

    parser = subparsers.add_parser(
        "app",
        help="a web page for interleaved images and text (Gradio)",
        description="A web page: an editor for interleaved images and text, Generate, the image.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        help="a ThinkDiff model folder or hub id the page may pick (repeatable; default: the mini world)",
    )
    parser.add_argument(
        "--decoder", action="append", default=[], help="a decoder the page may pick besides the model's own"
    )
    parser.add_argument("--lvlm", help="LVLM for lvlm / text-bridge (default: each model's)")
    parser.add_argument("--vision", help="BLIP-2 vision model for clip mode (default: each model's)")
    parser.add_argument("--miniworld", type=Path, help="a mini-world models folder (default: the committed one)")
    parser.add_argument("--device", help="torch device (default: cuda if available)")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto")
    parser.add_argument("--offload", choices=OFFLOAD_MODES, default="none", help="decoder CPU offload")
    parser.add_argument(
        "--quantize", choices=QUANTIZE_MODES, default="none", help="LVLM + decoder transformer quantization"
    )
    parser.add_argument("--transformer-file", help="a GGUF file for the decoder transformer")
    parser.add_argument(
        "--keep-loaded", action="store_true", help="keep every model loaded between jobs (needs the memory)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("thinkdiff-app-out"), help="where each job's files are written"
    )
    parser.add_argument("--max-images", type=int, default=8, help="most images per sequence (default 8)")
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload (default 20 MB)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from thinkdiff.cli import CommandError

    try:
        import gradio  # noqa: F401
    except ImportError as error:
        raise CommandError("the app needs Gradio: pip install 'thinkdiff[app]'") from error
    from thinkdiff.app import AppConfig, Backend, launch

    if args.miniworld is not None and args.model:
        raise ValueError("give --model (real models) or --miniworld, not both")
    if not args.model and (args.quantize != "none" or args.transformer_file or args.decoder):
        raise ValueError("--quantize, --transformer-file and --decoder apply to real models (--model)")
    if args.quantize != "none":
        import torch

        from thinkdiff.models.quantization import check_quantize

        check_quantize(args.quantize, torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    for name in ("port", "max_images"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_upload_mb <= 0:
        raise ValueError("--max-upload-mb must be > 0")
    for model in args.model:
        # A local folder must exist; anything else is a hub id, loaded (or refused) in the page.
        if (model.startswith((".", "/", "~")) or Path(model).exists()) and not Path(model).expanduser().is_dir():
            raise FileNotFoundError(f"--model {model}: no such folder")
    backend = Backend(
        AppConfig(
            models=list(args.model),
            decoders=list(args.decoder),
            lvlm=args.lvlm,
            vision=args.vision,
            miniworld=args.miniworld,
            device=args.device,
            dtype=args.dtype,
            offload=args.offload,
            quantize=args.quantize,
            transformer_file=args.transformer_file,
            keep_loaded=args.keep_loaded,
            out_dir=args.out,
            max_images=args.max_images,
            max_upload_mb=args.max_upload_mb,
        )
    )
    print(f"thinkdiff app: http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    launch(backend, host=args.host, port=args.port)
    return 0
