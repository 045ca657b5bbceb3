"""The mini-world report's time per section: a quick world's quick report beside the committed full one.

Builds a ``--quick`` world (or takes ``--world``), runs ``thinkdiff miniworld report`` on it with
``--quick`` (small counts: the test suite's report), and prints each section's wall seconds next to the same section
of the committed full report (``src/thinkdiff/miniworld/measured/report.json``), with the share
of each in its report. The two lanes of sections run side by side in two processes, so a report's
total is about the longer lane, not the sum.

Run: ``python benchmarks/bench_miniworld.py [--world DIR] [--threads 2]``; state the machine's load
(``uptime``) with the numbers, as the CPU is often shared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMITTED = (
    Path(__file__).resolve().parents[1] / "src" / "thinkdiff" / "miniworld" / "measured" / "report.json"
)


def thinkdiff(*args: str, threads: int) -> float:
    """Run one ``thinkdiff`` command; its wall seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "thinkdiff.cli", *args, "--threads", str(threads)], check=True, env=env
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=Path, default=None, help="a built (quick) world; default: build one")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        world = args.world
        if world is None:
            world = Path(tmp) / "world"
            seconds = thinkdiff(
                "miniworld", "build", str(world), "--quick", "--no-progress", threads=args.threads
            )
            print(f"quick build: {seconds:.0f} s")
        out = Path(tmp) / "report"
        wall = thinkdiff(
            "miniworld", "report", str(world), str(out), "--quick", "--no-progress", threads=args.threads
        )
        quick = json.loads((out / "report.json").read_text())["seconds"]
    full = json.loads(COMMITTED.read_text())["seconds"]
    print(f"quick report: {wall:.0f} s wall (process start and imports included)\n")
    names = [n for n in quick if n != "total"] + [n for n in full if n not in quick and n != "total"]
    print(
        f"{'section':20s} {'quick (s)':>10s} {'share':>6s} {'committed full (s)':>19s} {'share':>6s} {'full/quick':>10s}"
    )
    for name in [*names, "total"]:
        q, f = quick.get(name), full.get(name)
        q_share = f"{q / quick['total']:.0%}" if q is not None and name != "total" else ""
        f_share = f"{f / full['total']:.0%}" if f is not None and name != "total" else ""
        ratio = f"{f / q:.0f}x" if q and f else "-"
        q_text = f"{q:.1f}" if q is not None else "-"
        f_text = f"{f:.1f}" if f is not None else "-"
        print(f"{name:20s} {q_text:>10s} {q_share:>6s} {f_text:>19s} {f_share:>6s} {ratio:>10s}")


if __name__ == "__main__":
    main()
