"""Console output: usage errors in one line with the closest valid value; harmless third-party
warnings, log lines and loading bars hidden unless -v (and only those)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

import pytest
import torch

from thinkdiff.cli import main
from thinkdiff.console import HARMLESS_LOG_LINES, quiet_console


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["train", "--preset", "debug-lvml"],
         "thinkdiff train: error: argument --preset: invalid choice 'debug-lvml'; did you mean 'debug-lvlm'?"),
        (["trian"], "thinkdiff: error: argument COMMAND: invalid choice 'trian'; did you mean 'train'?"),
        (["eval", "cobsat", "generat"],
         "thinkdiff eval cobsat: error: argument SUBCOMMAND: invalid choice 'generat'; did you mean 'generate'?"),
        (["generate", "--stepz", "3"],
         "thinkdiff generate: error: unrecognized arguments: --stepz (did you mean --steps?) 3 "
         "(see thinkdiff generate --help)"),
        (["train", "--max-stepz=4"],
         "thinkdiff train: error: unrecognized arguments: --max-stepz=4 (did you mean --max-steps?) "
         "(see thinkdiff train --help)"),
        (["generate", "--steps", "x"],
         "thinkdiff generate: error: argument --steps: invalid int value: 'x' (see thinkdiff generate --help)"),
        (["push"],
         "thinkdiff push: error: the following arguments are required: MODEL_DIR, REPO_ID "
         "(see thinkdiff push --help)"),
    ],
)
def test_usage_errors_are_one_line(argv: list[str], line: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err == line + "\n" and captured.out == ""


def test_a_choice_with_no_close_match_lists_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--preset", "zzz"])
    err = capsys.readouterr().err.strip()
    assert err.startswith("thinkdiff train: error: argument --preset: invalid choice 'zzz'; choose from ")
    assert "debug-lvlm" in err and "\n" not in err


def test_only_the_known_harmless_warnings_are_hidden() -> None:
    deprecated = "`FluxPosEmbed` is deprecated and will be removed in a later version."
    cases = [
        (deprecated, "diffusers.models.embeddings"),  # hidden
        (deprecated, "mypackage.core"),  # the same words from elsewhere: shown
        ("something else is deprecated", "diffusers.models.embeddings"),  # shown
    ]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_console(verbose=False)
        for message, module in cases:
            warnings.warn_explicit(message, FutureWarning, "x.py", 1, module=module, registry={})
    assert [str(w.message) for w in seen] == [cases[1][0], cases[2][0]]


def test_known_log_lines_are_hidden_unless_verbose() -> None:
    name, text = HARMLESS_LOG_LINES[0]
    logger = logging.getLogger(name)
    before, logger.filters[:] = list(logger.filters), []
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)  # on the logger itself: transformers' root logger does not propagate
    try:
        quiet_console(verbose=True)
        logger.warning("`X` %s to `XPil`", text)
        quiet_console(verbose=False)
        logger.warning("`Y` %s to `YPil`", text)
        logger.warning("another line")
    finally:
        logger.removeHandler(handler)
        logger.filters[:] = before
    assert seen == [f"`X` {text} to `XPil`", "another line"]


def test_the_t5_untied_head_line_is_hidden_and_the_head_loads_as_stored() -> None:
    """Loading the mini T5 says its config ties the LM head to the embedding; the head stays the
    trained one (as for Flan-T5), so the line is noise and is hidden unless verbose."""
    from safetensors.torch import load_file

    from thinkdiff.miniworld.components.t5 import load_t5
    from thinkdiff.miniworld.models import default_weights_dir

    folder = default_weights_dir() / "t5"
    logger = logging.getLogger("transformers.modeling_utils")
    before, logger.filters[:] = list(logger.filters), []
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        quiet_console(verbose=True)
        model, _ = load_t5(folder)
        shown = [line for line in seen if "NOT tie" in line]
        seen.clear()
        quiet_console(verbose=False)
        load_t5(folder)
    finally:
        logger.removeHandler(handler)
        logger.filters[:] = before
    assert len(shown) == 1 and not [line for line in seen if "NOT tie" in line]
    stored = load_file(folder / "model.safetensors")
    assert torch.equal(model.lm_head.weight, stored["lm_head.weight"])
    assert not torch.equal(model.lm_head.weight, model.shared.weight)


@pytest.mark.parametrize(("verbose", "library_bar"), [(False, "True"), (True, "False")])
def test_library_loading_bars_are_off_unless_verbose(verbose: bool, library_bar: str) -> None:
    code = (
        "from thinkdiff.console import quiet_console\n"
        f"quiet_console(verbose={verbose})\n"
        "from tqdm import tqdm\n"
        "print(tqdm(range(2)).disable, tqdm(range(2), disable=False).disable)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == [library_bar, "False"]  # a bar that sets disable itself (ours) is never touched
