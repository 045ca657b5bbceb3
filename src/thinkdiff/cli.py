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
from thinkdiff.console import OneLineArgumentParser, escaped, quiet_console
from thinkdiff.storage import storage_failure

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


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(
        prog="thinkdiff",
        description="ThinkDiff: multimodal in-context reasoning for diffusion models.",
    )
    parser.add_argument("--version", action="version", version=f"thinkdiff {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, every warning and the libraries' loading bars"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    innermost: OneLineArgumentParser = vars(args).pop("_parser", parser)
    if extras:
        innermost.refuse_unrecognized(extras)
    quiet_console(args.verbose)
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
    except Exception as exc:
        message = _one_line_error(exc, args)
        if message is None:
            raise  # a real bug: keep its traceback
        logging.getLogger("thinkdiff").debug("%s failed", args.command, exc_info=True)
        _close_progress_bars()
        print(f"thinkdiff {args.command}: error: {escaped(message)}", file=sys.stderr)  # one line, whatever it quotes
        return 2
    return int(result or 0)


# The arguments naming where a command writes, for an OS error that names no file (train's
# config fields are parsed as ``field_<name>``).
OUTPUT_ARGUMENTS = ("out", "out_dir", "output_dir", "field_output_dir")


def _close_progress_bars() -> None:
    """End the progress bars the failed command left open, so that its error starts a line of its own."""
    tqdm_module = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm_module, "tqdm", None), "_instances", ())):
        bar.close()


def _one_line_error(exc: Exception, args: argparse.Namespace) -> str | None:
    """The one line a user sees for ``exc``, or ``None`` when it is a bug (shown with its traceback)."""
    failure = storage_failure(exc)
    if failure is not None:
        # A full disk, a quota or a read-only folder, wherever it hit: the writers remove their
        # temporary files on the way out, and complete outputs are never touched.
        where = failure.filename or next(
            (str(value) for name in OUTPUT_ARGUMENTS if (value := getattr(args, name, None))), "the output folder"
        )
        return f"{failure.reason}: {where} ({failure.advice})"
    if isinstance(exc, (CommandError, ValueError, FileNotFoundError)):
        return str(exc)  # bad input, already said in one line
    if isinstance(exc, (FileExistsError, NotADirectoryError, IsADirectoryError)):
        # An output path naming a file where a folder goes (or the reverse), in any command.
        return f"{exc.strerror}: {exc.filename}"
    return None


if __name__ == "__main__":
    sys.exit(main())
