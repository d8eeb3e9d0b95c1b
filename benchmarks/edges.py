"""Trust at the edges, as a user meets them: `featstore extract` stopped by a signal in
each phase, and a cache on a read-only mount. Called by `benchmarks/reliability.py`.

A signal lands in a named phase deterministically (`FEATSTORE_TEST_SIGNAL_AT`); the
read-only cache is a read-only bind mount, tried only where `mount` is allowed.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

PHASES = {
    "listing": signal.SIGINT,
    "loading": signal.SIGTERM,
    "allocating": signal.SIGINT,
    "computing": signal.SIGTERM,
    "finishing": signal.SIGTERM,
}


Run = subprocess.CompletedProcess[str]


def _extract(featstore: str, work: Path, env: dict[str, str], *extra: str) -> Run:
    cmd = [featstore, "extract", "--manifest", "m.yaml", "--workers", "0", *extra]
    return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=120)


def signal_cases(featstore: str, work: Path, env: dict[str, str]) -> list[tuple[str, bool, str]]:
    """(case, as expected, last line): exit 128+signal, a line naming the phase and how
    to resume, no traceback; then a plain rerun completes the set."""
    rows = []
    for phase, sig in PHASES.items():
        shutil.rmtree(work / "cache", ignore_errors=True)
        proc = _extract(featstore, work, {**env, "FEATSTORE_TEST_SIGNAL_AT": f"{phase}:{sig.name}"})
        out = proc.stdout + proc.stderr
        last = (out.strip().splitlines() or [""])[-1]
        ok = (
            proc.returncode == 128 + sig
            and f"stopped by {sig.name} while" in last
            and "rerun" in last
            and "Traceback" not in out
        )
        rerun = _extract(featstore, work, env)
        ok = ok and rerun.returncode == 0
        rows.append((f"{sig.name} while {phase}", ok, last))
    return rows


def read_only_cases(featstore: str, work: Path, env: dict[str, str]) -> list[tuple[str, bool, str]]:
    """A complete cache on a read-only bind mount: a cached extract, ls and verify work;
    an --overwrite is refused with a message naming the read-only cache."""
    cache = work / "cache"
    if not any(cache.glob("*.zarr")):
        _extract(featstore, work, env)
    bind = subprocess.run(["mount", "--bind", str(cache), str(cache)], capture_output=True)
    if bind.returncode != 0:
        return [("read-only cache (needs mount --bind: skipped)", True, bind.stderr.decode()[:80])]
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(cache)], check=True)
        (path,) = cache.glob("*.zarr")
        rows = []
        cached = _extract(featstore, work, env)
        said = (cached.stdout.strip().splitlines() or [""])[-1]
        rows.append(("read-only cache: cached extract", cached.returncode == 0, said))
        for args in (["ls", str(cache)], ["verify", str(path)]):
            p = subprocess.run([featstore, *args], env=env, capture_output=True, text=True)
            last = (p.stdout.strip().splitlines() or [""])[-1]
            rows.append((f"read-only cache: {args[0]}", p.returncode == 0, last))
        over = _extract(featstore, work, env, "--overwrite")
        said = over.stderr.strip()
        ok = over.returncode == 2 and "is read-only" in said and "Traceback" not in said
        rows.append(("read-only cache: --overwrite refused", ok, said[:120]))
        return rows
    finally:
        subprocess.run(["umount", str(cache)], check=False)
