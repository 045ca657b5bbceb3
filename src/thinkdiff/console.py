"""What the console shows: usage errors in one line, and no third-party noise known to be harmless.

``-v`` keeps everything (every warning, every library's loading bars, debug logs) for debugging.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import warnings
from typing import Any, NoReturn

from thinkdiff.limits import finite_float

# "argument --preset: invalid choice: 'debug-lvml' (choose from 'a', 'b')" (quotes vary by Python).
_INVALID_CHOICE = re.compile(r"^(?P<argument>.*)invalid choice: (?P<value>.+?) \(choose from (?P<choices>.*)\)$")

# Third-party warnings that say nothing a user of this package can act on, each matched by its
# category, the start of its message and the module that issues it (never a blanket filter).
HARMLESS_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    # convert-official reads release checkpoints with weights_only=True, whatever their protocol.
    (UserWarning, r"Detected pickle protocol", r"torch\."),
    # diffusers' own Chroma transformer builds FluxPosEmbed through its deprecated import path.
    (FutureWarning, r"`FluxPosEmbed` is deprecated", r"diffusers\."),
)
# Library log lines of the same kind: (logger name, text in the message).
HARMLESS_LOG_LINES: tuple[tuple[str, str], ...] = (
    # The PIL image processors are the ones this package uses; torchvision is not a dependency.
    ("transformers.utils.import_utils", "requires torchvision (not installed); falling back"),
    # transformers 5 writes tie_word_embeddings=True into every T5 config, whatever it is given; a
    # T5 with its own LM head (Flan-T5, the mini world's and the tiny kit's T5) is then loaded
    # with that head kept untied, exactly as stored, and this line says so on every load.
    ("transformers.modeling_utils", "but both are present in the checkpoints with different values, so we will NOT tie"),
)


def escaped(text: object) -> str:
    """``str(text)`` with every control character (a newline, an escape sequence) written as its
    Python escape, so that a name chosen by someone else (a file name, a symlink's target) cannot
    start a line of its own or restyle the terminal. Printable text is unchanged."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in str(text))


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (no usage block), naming the closest
    valid choice or option when the user mistyped one. Subcommand parsers inherit the class.

    Every ``type=float`` option of every command reads its value with
    :func:`thinkdiff.limits.finite_float`: argparse looks a ``type`` up in the parser's registry
    first, so ``--guidance nan`` is refused in one line wherever a float flag is declared.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register("type", float, finite_float)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        namespace, extras = super().parse_known_args(args, namespace)
        # The innermost (sub)command parser that ran, for an unrecognised option's closest match.
        if not hasattr(namespace, "_parser"):
            namespace._parser = self
        return namespace, extras

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {escaped(self._explained(message))}\n")

    def refuse_unrecognized(self, extras: list[str]) -> NoReturn:
        """Report options this parser does not know, with the closest one it does."""
        options = [o for o in self._option_string_actions if o.startswith("--")]
        hints = [
            f"{extra} (did you mean {close[0]}?)"
            if (close := difflib.get_close_matches(extra.split("=")[0], options, n=1))
            else extra
            for extra in extras
        ]
        self.error(f"unrecognized arguments: {' '.join(hints)}")

    def _explained(self, message: str) -> str:
        match = _INVALID_CHOICE.match(message)
        if match is None:
            return f"{message} (see {self.prog} --help)"
        value = match["value"].strip("'\"")
        choices = [c.strip().strip("'\"") for c in match["choices"].split(",")]
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"choose from {', '.join(choices)}"
        return f"{match['argument']}invalid choice {value!r}; {hint}"


def quiet_console(verbose: bool) -> None:
    """Unless ``verbose``: filter :data:`HARMLESS_WARNINGS` and :data:`HARMLESS_LOG_LINES`, and turn
    off the libraries' loading bars (diffusers, transformers, Hub downloads).

    The bars go through ``TQDM_DISABLE``, which tqdm reads when it is first imported and which only
    sets a default: this package's own progress bars (training, extraction) pass ``disable``
    themselves and stay. A ``TQDM_DISABLE`` the user set is kept.
    """
    if verbose:
        return
    os.environ.setdefault("TQDM_DISABLE", "1")
    for category, message, module in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, line_filter in _LOG_FILTERS:
        logging.getLogger(name).addFilter(line_filter)  # once: the same filter object is not added twice


class _DropLines(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


_LOG_FILTERS = tuple((name, _DropLines(text)) for name, text in HARMLESS_LOG_LINES)
