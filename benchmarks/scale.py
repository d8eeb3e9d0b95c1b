"""The whole pipeline at growing sizes: is featstore's own work linear in the items?

    python benchmarks/scale.py [--sizes 1000,10000,100000] [--slices 240] [--dir DIR]

Data: synthetic CT-like volumes of CT-RATE's shape (64 x 64 in-plane, `--slices` axial
slices, a blob in the positive class), written once as real NIfTI files + CSV and
read back by the real NIfTI reader; a size in slices becomes
max(12, ceil(size / slices)) volumes (probes need volumes of both classes in every
split), so the smallest size is rounded up. Encoder: `pixels:16`, the raw-pixel
"encoder" (16-px patch means, no network): a zero-cost stand-in for a fast GPU, so
what is measured is featstore's own cost per item (listing, fingerprints,
allocation, decode, writes, marks, checks, reads, pooling, probes, report).

Every stage runs as a subprocess of the real CLI (`featstore ...`, this checkout's code),
and its peak RSS is the child's own (`os.wait4` rusage, ru_maxrss):

- extract: a new set (CLS only; `featstore extract`)
- ls, verify: `featstore ls CACHE`, `featstore verify SET` (decodes every chunk)
- resume: an extract into a second cache killed (SIGKILL) once 90% of its units are
  marked, then timed while it resumes; its time per item is over the items redone
- probe: linear and kNN on volume-pooled (mean) CLS, bootstrap intervals
- abmil: `--pool abmil`, attention-MIL on the slices' CLS
- curve: the label-efficiency curve, 6 fractions x 5 repeats
- report: `featstore report` of the curve's results (probes and curves)

For each stage and size: wall time, time per item (per slice), peak RSS and files
written; then each stage's time per item divided by its value at 10k slices (the
requested size 10000, else the smallest). Writes benchmarks/figures/scale.png
(log-log time per item against slices) and scale.md (the table). The machine's load
average is printed: on a shared machine the figures are indicative only.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIGURES = REPO / "benchmarks" / "figures"
STAGES = ("extract", "ls", "verify", "resume", "probe", "abmil", "curve", "report")
FRACTIONS, REPEATS = "0.01,0.05,0.1,0.25,0.5,1", 5
MANIFEST = """\
cache: {cache}
encoders: ['pixels:16']
resolutions: [64]
baseline: null
patch: false
datasets:
  - name: ct
    format: synthetic
    synthetic: {{kind: cls3d, n: {volumes}, size: 64, slices: {slices}, seed: 0}}
    path: {data}
    task: classification
    dims: 3
    splits: {{ratios: [0.6, 0.2, 0.2], seed: 0}}
"""


@dataclass(frozen=True)
class Row:
    """One stage at one size."""

    stage: str
    slices: int
    items: int  # the items the stage's time is divided by (resume: those redone)
    seconds: float
    peak_mb: float
    files: int

    @property
    def per_item_us(self) -> float:
        return self.seconds / max(self.items, 1) * 1e6


def _count(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def _cli(*args: str) -> list[str]:
    """The installed `featstore` command (this checkout's code, by PYTHONPATH)."""
    return [str(Path(sys.executable).parent / "featstore"), *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}


def _wait(proc: subprocess.Popen[bytes], what: str, log: Path) -> tuple[float, int]:
    """(peak RSS in MB, exit code) of a child, from its own rusage."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{what} failed with exit {code}; see {log}")
    return usage.ru_maxrss / 1024, code


def run_stage(stage: str, cmd: list[str], written: Path, items: int, slices: int, log: Path) -> Row:
    """Run `cmd` (one CLI call) and measure it; `written`: where its files go."""
    before = _count(written)
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=REPO)
        peak, _ = _wait(proc, stage, log)
        seconds = time.perf_counter() - t0
    return Row(stage, slices, items, seconds, peak, _count(written) - before)


def _units_marked(set_dir: Path) -> int:
    marks = set_dir / "_featstore" / "done" / "c"
    try:
        return sum(1 for p in marks.iterdir() if p.name.isdigit())
    except FileNotFoundError:
        return 0


def _resume(work: Path, mpath: Path, set_name: str, n_units: int, slices: int, log: Path) -> Row:
    """Kill an extract into a second cache at 90% of its units, then time the resume."""
    cache = work / "cache-killed"
    cmd = _cli("extract", "--manifest", str(mpath), "--cache", str(cache))
    target = max(1, math.floor(0.9 * n_units))
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=REPO)
        while proc.poll() is None and _units_marked(cache / set_name) < target:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    from featstore.store.sets import FeatureSet

    fs = FeatureSet(cache / set_name)
    layout = fs.layout
    left = fs.pending_units()
    redo = sum(len(range(layout.n_items)[layout.unit_slice(u)]) for u in left)
    return run_stage("resume", cmd, cache, redo, slices, log)


def one_size(work: Path, size: int, slices_per_volume: int) -> list[Row]:
    """Every stage at `size` slices, in `work`."""
    from featstore.data import readers
    from featstore.data.manifest import load_manifest
    from featstore.store.sets import FeatureSet

    volumes = max(12, math.ceil(size / slices_per_volume))
    work.mkdir(parents=True)
    mpath = work / "manifest.yaml"
    mpath.write_text(
        MANIFEST.format(
            cache=work / "cache", volumes=volumes, slices=slices_per_volume, data=work / "data"
        )
    )
    t0 = time.perf_counter()
    readers.prepare(load_manifest(mpath).datasets[0])  # writes the NIfTI files (not timed)
    print(f"  {volumes} volumes written in {time.perf_counter() - t0:.0f} s", flush=True)
    n = volumes * slices_per_volume
    log = work / "stages.log"
    cache, results = work / "cache", work / "results"
    m = str(mpath)
    rows = [run_stage("extract", _cli("extract", "--manifest", m), cache, n, n, log)]
    (set_dir,) = [p for p in cache.glob("*.zarr")]
    fs = FeatureSet(set_dir)
    rows.append(run_stage("ls", _cli("ls", str(cache)), cache, n, n, log))
    rows.append(run_stage("verify", _cli("verify", str(set_dir)), cache, n, n, log))
    rows.append(_resume(work, mpath, set_dir.name, fs.layout.n_units, n, log))
    probe = _cli("probe", "--manifest", m, "--out", str(results))
    rows.append(run_stage("probe", probe, results, n, n, log))
    abmil = _cli("probe", "--manifest", m, "--out", str(work / "results-abmil"), "--pool", "abmil")
    rows.append(run_stage("abmil", abmil, work / "results-abmil", n, n, log))
    curve = [*probe[:-1], str(work / "results-curve"), "--fractions", FRACTIONS]
    curve += ["--repeats", str(REPEATS)]
    rows.append(run_stage("curve", curve, work / "results-curve", n, n, log))
    curves = work / "results-curve"  # the report of the probes and their curves
    rows.append(run_stage("report", _cli("report", "--out", str(curves)), curves, n, n, log))
    return rows


def reference_size(sizes: list[int], rows: list[Row]) -> int:
    """The slices of the size the ratios divide by: the one asked as 10000, else the
    smallest."""
    by_asked = dict(zip(sizes, sorted({r.slices for r in rows}), strict=True))
    return by_asked.get(10_000, min(by_asked.values()))


def table(rows: list[Row], ref: int) -> str:
    base = {r.stage: r.per_item_us for r in rows if r.slices == ref}
    lines = [
        "| stage | slices | items timed | wall s | µs / item | ratio to 10k | peak RSS MB "
        "| files |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (STAGES.index(r.stage), r.slices)):
        ratio = r.per_item_us / base[r.stage] if base.get(r.stage) else float("nan")
        lines.append(
            f"| {r.stage} | {r.slices:,} | {r.items:,} | {r.seconds:.2f} | "
            f"{r.per_item_us:,.1f} | {ratio:.2f} | {r.peak_mb:.0f} | {r.files:,} |"
        )
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for stage in STAGES:
        got = sorted((r.slices, r.per_item_us) for r in rows if r.stage == stage)
        if got:
            ax.plot(*zip(*got, strict=True), marker="o", label=stage)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("slices in the set")
    ax.set_ylabel("wall time per slice (µs)")
    ax.set_title("featstore stages at growing sizes (flat = linear)")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000,100000", help="slices, comma-separated")
    ap.add_argument("--slices", type=int, default=240, help="slices per volume")
    ap.add_argument("--dir", default=None, help="work folder, kept (default: a temporary one)")
    ap.add_argument("--figures", default=str(FIGURES), help="where scale.png and scale.md go")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        tmp = args.dir or stack.enter_context(tempfile.TemporaryDirectory())
        for size in sizes:
            print(f"size {size:,} slices (load average {os.getloadavg()[0]:.1f})", flush=True)
            got = one_size(Path(tmp) / str(size), size, args.slices)
            for r in got:
                print(
                    f"  {r.stage:8s} {r.seconds:8.2f} s  {r.per_item_us:9.1f} us/item  "
                    f"{r.peak_mb:6.0f} MB  {r.files:6d} files",
                    flush=True,
                )
            rows += got
    ref = reference_size(sizes, rows)
    md = table(rows, ref)
    load = os.getloadavg()
    note = (
        f"{os.cpu_count()} cores, load average at the end {load[0]:.1f} / {load[1]:.1f} / "
        f"{load[2]:.1f} (1/5/15 min); ratios: time per item / its value at {ref:,} slices"
    )
    print(md)
    print(note)
    figures = Path(args.figures)
    plot(rows, figures / "scale.png")
    (figures / "scale.md").write_text(md + "\n\n" + note + "\n")
    print(f"wrote {figures / 'scale.png'} and {figures / 'scale.md'}")


if __name__ == "__main__":
    main()
