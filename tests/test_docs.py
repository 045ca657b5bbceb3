"""The README and docs/ say only what runs.

Every ``thinkdiff ...`` line in a fenced shell block of README.md or docs/*.md is parsed by the
real command-line parser (so a renamed or removed flag fails here). Blocks preceded by the marker
``<!-- docs-test: run -->`` use only the offline kit (``tiny:`` models) or the miniature world and
are run as written, in a temporary folder, and must exit 0.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from thinkdiff.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
RUN_MARKER = "<!-- docs-test: run -->"
FENCE = re.compile(r"(?P<marker><!-- docs-test: run -->\s*\n)?```(?:bash|sh|shell|console)\n(?P<body>.*?)```", re.S)


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def shell_blocks(path: Path) -> list[tuple[bool, str]]:
    """(runnable, body) of every fenced shell block in ``path``."""
    return [(bool(m.group("marker")), m.group("body")) for m in FENCE.finditer(path.read_text())]


def commands(body: str) -> list[str]:
    """Logical command lines (continuations joined, comments dropped)."""
    lines, current = [], ""
    for raw in body.splitlines():
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        if current.strip():
            lines.append(current.strip())
        current = ""
    return lines


def thinkdiff_argv(command: str) -> list[str] | None:
    """The arguments of a ``thinkdiff`` (or ``.venv/bin/thinkdiff``) call, else None."""
    # Shell arithmetic and variables stand for numbers or names here: any placeholder parses.
    command = re.sub(r"\$\(\([^)]*\)\)", "0", command)
    command = re.sub(r"\$\{?\w+\}?", "0", command)
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    for i, word in enumerate(words):
        if word.endswith("thinkdiff") and (i == 0 or words[i - 1] in ("&&", ";", "|", "env") or "=" in words[i - 1]):
            argv = words[i + 1 :]
            if "..." in argv:
                return None  # an elided example ("--features features/ ..."), not a command to parse
            for stop in ("&&", ";", "|", ">", "2>&1", "&"):
                if stop in argv:
                    argv = argv[: argv.index(stop)]
            return argv
    return None


def all_blocks() -> list[tuple[str, bool, str]]:
    return [(f"{p.relative_to(ROOT)}#{i}", run, body) for p in doc_files() for i, (run, body) in enumerate(shell_blocks(p))]


@pytest.mark.parametrize(("where", "body"), [(w, b) for w, _, b in all_blocks()], ids=[w for w, _, _ in all_blocks()])
def test_every_documented_command_parses(where: str, body: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    for command in commands(body):
        argv = thinkdiff_argv(command)
        if argv is None or not argv or argv[0] in ("-h", "--help", "--version"):
            continue
        try:
            parser.parse_args(argv)
        except SystemExit as exc:
            if exc.code not in (0, None):
                pytest.fail(f"{where}: `{command}` does not parse: {capsys.readouterr().err.strip()}")


def test_docs_have_runnable_blocks() -> None:
    assert sum(run for _, run, _ in all_blocks()) >= 1, f"no block is marked {RUN_MARKER!r}"


@pytest.mark.parametrize(
    ("where", "body"), [(w, b) for w, r, b in all_blocks() if r], ids=[w for w, r, _ in all_blocks() if r]
)
def test_runnable_blocks_run(where: str, body: str, tiny_env: Path, tmp_path: Path) -> None:
    assert "tiny:" in body or "miniworld" in body or "demo" in body, f"{where}: runnable blocks use offline models only"
    env = {**os.environ, "THINKDIFF_TINY_DIR": str(tiny_env), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "THINKDIFF_ROOT": str(ROOT)}
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", body], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"{where} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"


@pytest.mark.parametrize("guide", ["training.md", "inference.md", "cobsat.md"])
def test_every_guide_has_a_cpu_path_that_runs(guide: str) -> None:
    """A newcomer on a CPU can follow each guide: it has a block that the test above runs."""
    assert any(run for run, _ in shell_blocks(ROOT / "docs" / guide)), f"docs/{guide} has no {RUN_MARKER!r} block"
