"""Threads on a shared machine: extraction speed with and without a competing busy process.

    python benchmarks/contention.py [--case vits-32-3d] [--rounds 3]

Runs `extract_speed.py --case CASE` (one round each, in its own process) with torch
threads = every core and = cores - 1, first on a quiet machine and then while a
competing process keeps one core busy; the settings alternate within each round and
medians of the pipeline's items/s are printed. OpenMP threads that outnumber the
free cores wait on each other, so a forward pass sized for every core slows down
far more than the one busy core accounts for.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _rate(case: str, threads: int) -> float:
    out = subprocess.run(
        [sys.executable, str(HERE / "extract_speed.py"), "--case", case, "--rounds", "1",
         "--threads", str(threads)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    match = re.search(r"extract pipeline\s*:\s*([\d.]+)", out)
    if match is None:
        raise RuntimeError(out)
    return float(match[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="vits-32-3d")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    settings = sorted({cores, max(1, cores - 1)}, reverse=True)
    rates: dict[tuple[str, int], list[float]] = {}
    for busy in (False, True):
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            for _ in range(args.rounds):
                for t in settings:
                    key = ("busy" if busy else "quiet", t)
                    rates.setdefault(key, []).append(_rate(args.case, t))
        finally:
            if hog is not None:
                hog.kill()
    print(f"case {args.case}, {cores} cores; pipeline items/s, median of {args.rounds}")
    print(f"{'machine':<34} " + " ".join(f"{f'{t} threads':>10}" for t in settings))
    for state, label in (("quiet", "quiet"), ("busy", "one competing busy process")):
        row = [float(np.median(rates[(state, t)])) for t in settings]
        print(f"{label:<34} " + " ".join(f"{v:10.1f}" for v in row))


if __name__ == "__main__":
    main()
