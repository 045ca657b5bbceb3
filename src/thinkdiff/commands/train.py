"""``thinkdiff train``: train the aligner of ThinkDiff-LVLM or ThinkDiff-CLIP.

Every field of :class:`thinkdiff.training.config.TrainConfig` is a flag (``--global-batch-size``);
flags override ``--config FILE.json``, which overrides ``--preset``. For several GPUs or nodes,
start the same command under ``accelerate launch`` or ``torchrun``.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _optional(convert: Any) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else convert(text)

    parse.__name__ = convert.__name__
    return parse


def _field_parser(type_text: str) -> tuple[Any, dict[str, Any]]:
    """argparse ``type`` and extra options for a dataclass field's annotation (a string here)."""
    if type_text.startswith("list["):
        return str, {"nargs": "+"}
    base = {"bool": _parse_bool, "int": int, "float": float}.get(type_text.split(" |")[0], str)
    return (_optional(base) if "None" in type_text else base), {}


def register(subparsers: argparse._SubParsersAction) -> None:
    from thinkdiff.training.config import PRESETS, TrainConfig

    parser = subparsers.add_parser(
        "train",
        help="train the aligner against the frozen proxy T5 decoder",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", choices=list(PRESETS), help="start from a named run")
    parser.add_argument("--config", type=Path, help="JSON file of config fields (e.g. a run's config.json)")
    parser.add_argument(
        "--resume",
        default="auto",
        help="'auto' (continue from the run folder's newest checkpoint, if any), 'never', or a checkpoint folder",
    )
    parser.add_argument(
        "--allow-change",
        nargs="+",
        default=[],
        metavar="FIELD",
        help="config fields that may differ from the resumed checkpoint's (e.g. max_steps to train "
        "longer); a resume with any other changed setting is refused. Recorded in changes.jsonl",
    )
    fields = parser.add_argument_group("config fields (override the preset and --config)")
    for f in dataclasses.fields(TrainConfig):
        convert, extra = _field_parser(str(f.type))
        fields.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f"field_{f.name}",
            type=convert,
            default=argparse.SUPPRESS,
            help=f.metadata.get("help"),
            metavar=f.name.upper(),
            **extra,
        )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from thinkdiff.training.config import load_config
    from thinkdiff.training.resume import check_allow_change
    from thinkdiff.training.trainer import train

    overrides = {k.removeprefix("field_"): v for k, v in vars(args).items() if k.startswith("field_")}
    config = load_config(args.preset, args.config, overrides)
    allow_change = tuple(name.replace("-", "_") for name in args.allow_change)
    check_allow_change(allow_change)
    resume = args.resume if args.resume in ("auto", "never") else Path(args.resume)
    result = train(config, resume=resume, allow_change=allow_change)
    print(f"trained {result.step} steps ({result.skipped_steps} skipped); run folder {result.output_dir}")
    if result.model_dir is not None:
        print(f"model: {result.model_dir}")
    return 0
