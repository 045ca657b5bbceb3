"""What the page says about each output, and the rule for the folder the outputs go to."""

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thinkdiff.paths import confined_folder


@dataclass
class JobResult:
    """One generated output of a job, as written (``path`` and its ``.json`` sidecar)."""

    mode: str
    path: Path
    sidecar: dict[str, Any]
    verdict: dict[str, str] | None = None
    """Mini world: what the judge reads in the image."""
    correct: bool | None = None
    """Mini world with a known target: whether the judge's reading matches it."""

    @property
    def sidecar_path(self) -> Path:
        return self.path.with_suffix(".json")

    def summary(self) -> dict[str, Any]:
        """What the API returns for this output."""
        return {
            "mode": self.mode,
            "output": self.path.name,
            "seed": self.sidecar["seed"],
            "lvlm_text": self.sidecar["lvlm_text"],
            "timings": self.sidecar["timings"],
            "peak_memory_bytes": self.sidecar.get("peak_memory_bytes", {}),
            "judge": self.verdict,
            "correct": self.correct,
        }


def describe(result: JobResult, target_caption: str | None = None) -> str:
    """Markdown lines for one output: mode, seed, the judge's reading, timings, memory."""
    record = result.sidecar
    lines = [f"**{result.mode}** · seed {record['seed']} · `{result.path.name}`"]
    if result.verdict is not None:
        read = ", ".join(f"{k} {v}" for k, v in result.verdict.items())
        judged = f"judge reads: {read}"
        if result.correct is not None:
            judged += f" → {'CORRECT' if result.correct else 'WRONG'}"
            if target_caption:
                judged += f" (target: {target_caption})"
        lines.append(judged)
    timings = ", ".join(f"{k} {v:.2f} s" for k, v in record["timings"].items())
    lines.append(f"stage times: {timings}")
    memory = record.get("peak_memory_bytes")
    if memory:
        lines.append("peak GPU memory: " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in memory.items()))
    else:
        import resource  # POSIX only, like the CPU-memory reading it gives

        # ru_maxrss is KiB on Linux, bytes on macOS.
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        lines.append(f"peak memory: {rss / 2**30:.2f} GiB (the server process, CPU)")
    return "  \n".join(lines)


_OWN_ENTRY = re.compile(r"examples|\d{8}-\d{6}-\d{4,}-[0-9a-f]{16}")


def check_out_dir(out_dir: Path) -> None:
    """Refuse an ``--out`` that holds anything the app did not write.

    The page serves every file below ``--out`` to any client that names it (gradio's
    ``allowed_paths``), so that folder must hold only the app's own outputs: ``--out ~`` would
    otherwise publish the home folder. Each entry named like the app's own must be a real folder
    inside ``--out`` (:func:`thinkdiff.paths.confined_folder`): a symlink named ``examples`` would
    otherwise carry the example images the page writes to wherever it points. Nothing is written
    before this check.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file, not a folder")
    entries = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    foreign = [name for name in entries if not _OWN_ENTRY.fullmatch(name)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ValueError(
            f"--out {out_dir} holds files the app did not write ({shown}); every file under --out is "
            "served to the page's clients, so give the app a folder of its own"
        )
    for name in entries:
        confined_folder(out_dir, name)  # UnsafePathError (a ValueError) names the entry
