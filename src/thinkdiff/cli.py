"""The ``thinkdiff`` command line: one entry point, one module per subcommand.

Each module in ``thinkdiff.commands`` exposes ``register(subparsers)``, which adds its parser and
sets ``func`` to a plain function taking the parsed arguments. Modules keep heavy imports (torch,
transformers, diffusers) inside their functions so that ``thinkdiff --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from thinkdiff import __version__

# Order is the order shown in --help.
COMMAND_MODULES: list[str] = [
    "thinkdiff.commands.demo",
    "thinkdiff.commands.make_tiny_models",
    "thinkdiff.commands.extract_features",
    "thinkdiff.commands.train",
    "thinkdiff.commands.eval_cobsat",
    "thinkdiff.commands.generate",
    "thinkdiff.commands.convert_official",
    "thinkdiff.commands.push",
    "thinkdiff.commands.miniworld",
    "thinkdiff.commands.app",
]


class CommandError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="thinkdiff",
        description="ThinkDiff: multimodal in-context reasoning for diffusion models.",
    )
    parser.add_argument("--version", action="version", version=f"thinkdiff {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except (CommandError, ValueError, FileNotFoundError) as exc:
        # Bad input is reported as one clear line; real bugs still raise with a traceback.
        print(f"thinkdiff {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
        # An output path naming a file where a folder goes (or the reverse), in any command.
        print(f"thinkdiff {args.command}: error: {exc.strerror}: {exc.filename}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
