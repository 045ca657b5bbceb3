"""``--hint``: bare, ours; a sentence, that sentence; an empty sentence, refused in one line."""

from __future__ import annotations

import json

import pytest

from thinkdiff.cli import main
from thinkdiff.pipelines.constants import HINT_INSTRUCTION

DRY_RUN = ["eval", "cobsat", "generate", "--mode", "text-bridge", "--dry-run"]


@pytest.mark.parametrize(
    ("flags", "hint"), [([], None), (["--hint"], HINT_INSTRUCTION), (["--hint", " Note: x "], "Note: x")]
)
def test_hint_flag_gives_the_sentence_asked_for(
    capsys: pytest.CaptureFixture[str], flags: list[str], hint: str | None
) -> None:
    assert main([*DRY_RUN, *flags]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["hint"] == hint


@pytest.mark.parametrize("empty", ["", "  "])
def test_an_empty_hint_is_refused_in_one_line(
    tmp_path, capsys: pytest.CaptureFixture[str], empty: str
) -> None:
    """An empty sentence (an unset shell variable in ``--hint "$HINT"``) is neither ours nor none."""
    generate = ["generate", "--mode", "text-bridge", "--text", "a red car", "--out", str(tmp_path / "g.png")]
    for argv in ([*DRY_RUN, "--hint", empty], [*generate, "--hint", empty]):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--hint got an empty sentence" in err[0], err
    assert not (tmp_path / "g.png").exists()
