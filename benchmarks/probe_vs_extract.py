"""Why the cache exists: probing cached features vs extracting them, side by side.

    python benchmarks/probe_vs_extract.py [--manifest data_manifest.yaml]

Runs, in one go and into a fresh temporary cache, `featstore extract` (cold) and then
`featstore probe` twice (the second is what every later study pays), each in its own
process; prints wall seconds, their ratio and each stage's peak memory (max RSS).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest", default="data_manifest.yaml")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        common = ["--manifest", args.manifest, "--cache", f"{tmp}/cache"]
        cli = str(Path(sys.executable).parent / "featstore")
        ext = timed([cli, "extract", *common])
        probes = [timed([cli, "probe", *common, "--out", f"{tmp}/results{i}"]) for i in range(2)]
        size = sum(f.stat().st_size for f in Path(tmp, "cache").rglob("*") if f.is_file())
    print(f"manifest {args.manifest}; feature sets: {size / 1e6:.0f} MB on disk")
    print(f"{'stage':<22} {'seconds':>8} {'peak MB':>8}")
    print(f"{'extract (cold)':<22} {ext[0]:8.1f} {ext[1]:8.0f}")
    for i, (s, m) in enumerate(probes):
        print(f"{f'probe from cache #{i + 1}':<22} {s:8.1f} {m:8.0f}")
    print(f"extract / probe time: {ext[0] / probes[-1][0]:.1f}x")


if __name__ == "__main__":
    main()
