"""Trust at the edges, as a user meets them: `featstore extract` stopped by a signal in
each phase, killed inside an --overwrite, a cache on a read-only mount, feature sets of
another format, cluster options that cannot work. Called by `benchmarks/reliability.py`.

A signal lands in a named phase deterministically (`FEATSTORE_TEST_SIGNAL_AT`), a kill
at a named point of the overwrite (`FEATSTORE_TEST_PAUSE_AT`: the process pauses there
until it is killed); the read-only cache is a read-only bind mount, tried only where
`mount` is allowed; the old format is the set the previous release wrote
(tests/fixtures/format2).
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

FORMAT2 = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "format2"

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


def _leftovers(cache: Path) -> list[Path]:
    return [p for p in cache.glob(".*.zarr.*") if ".claims" not in p.name]


def kill_cases(featstore: str, work: Path, env: dict[str, str]) -> list[tuple[str, bool, str]]:
    """SIGKILL inside an --overwrite, at each named point: then a plain rerun gives a
    whole, verified set and no leftovers."""
    rows = []
    for point in ("removing", "publishing"):
        if not any((work / "cache").glob("*.zarr")):
            _extract(featstore, work, env)
        paused = work / f"paused-{point}"
        cmd = [featstore, "extract", "--manifest", "m.yaml", "--workers", "0", "--overwrite"]
        pause_env = {**env, "FEATSTORE_TEST_PAUSE_AT": f"{point}:{paused}"}
        proc = subprocess.Popen(cmd, cwd=work, env=pause_env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.time() + 120
        while not paused.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        reached = paused.exists()
        proc.kill()
        killed = proc.wait() == -signal.SIGKILL
        rerun = _extract(featstore, work, env)
        (path,) = (work / "cache").glob("*.zarr")
        check = subprocess.run([featstore, "verify", str(path)], env=env, capture_output=True)
        left = _leftovers(work / "cache")
        ok = reached and killed and rerun.returncode == 0 and check.returncode == 0 and not left
        said = (rerun.stdout.strip().splitlines() or [""])[-1]
        rows.append((f"SIGKILL inside --overwrite ({point})", ok, said))
    return rows


def version_cases(featstore: str, work: Path, env: dict[str, str]) -> list[tuple[str, bool, str]]:
    """The previous release's set (format 2) and one claiming a newer format: verify
    names the formats and the fix; an extract makes a new set beside the old one."""
    folder = work / "versions"
    shutil.rmtree(folder, ignore_errors=True)
    (old,) = FORMAT2.glob("*.zarr")
    path = folder / "cache" / old.name
    shutil.copytree(old, path)
    shutil.copy(FORMAT2 / "manifest.yaml", folder / "m.yaml")
    rows = []
    seen = subprocess.run([featstore, "verify", str(path)], env=env, capture_output=True, text=True)
    said = seen.stdout.strip()
    ok = seen.returncode == 1 and "(2, this one reads 3); re-extract" in said
    rows.append(("format 2 set: verify", ok and len(said.splitlines()) == 1, said))
    before = sorted(p.stat().st_mtime_ns for p in path.rglob("*"))
    made = _extract(featstore, folder, env, "--no-baseline")
    said = (made.stdout.strip().splitlines() or [""])[-2:][0]
    sets = list((folder / "cache").glob("*.zarr"))
    untouched = sorted(p.stat().st_mtime_ns for p in path.rglob("*")) == before
    ok = made.returncode == 0 and "new" in said and len(sets) == 2 and untouched
    rows.append(("format 2 set: extract makes a new set beside it", ok, said))
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["featstore_format"] = 4
    (path / "zarr.json").write_text(json.dumps(meta))
    seen = subprocess.run([featstore, "verify", str(path)], env=env, capture_output=True, text=True)
    said = seen.stdout.strip()
    ok = seen.returncode == 1 and "(4, this one reads 3)" in said and "upgrade featstore" in said
    rows.append(("format 4 set (newer): verify", ok, said))
    return rows


def cluster_option_cases(
    featstore: str, work: Path, env: dict[str, str]
) -> list[tuple[str, bool, str]]:
    """Cluster options that cannot work: one `error:` line and exit 2, fast."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    quick = {**env, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"}
    rows = []
    for label, args, want in (
        ("--cluster local:0", ["--cluster", "local:0"], "expected local:N"),
        ("--scheduler with nothing there", ["--scheduler", closed], "no dask scheduler"),
    ):
        t0 = time.perf_counter()
        proc = _extract(featstore, work, quick, *args)
        said = proc.stderr.strip()
        ok = proc.returncode == 2 and want in said and "Traceback" not in said
        rows.append((f"{label} ({time.perf_counter() - t0:.0f} s)", ok, said))
    return rows
