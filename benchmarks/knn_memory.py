"""Blockwise kNN on more features than the bound: peak RSS against the bound, items/s.

    python benchmarks/knn_memory.py [--train 100000] [--queries 1000] [--bound-mb 64]
        [--in-memory]

Writes a Zarr group of synthetic float16 CLS-like features (ViT-S: 384 channels;
--train rows, and --queries rows each of val and test) whose 10 classes are
noisy cluster centres, then, in a fresh process, runs `featstore.probing.knn.knn_blockwise`
(cosine, k chosen from the default grid on val) reading the rows from Zarr with
--bound-mb, on one BLAS thread as `featstore probe` runs it, and prints that process's
peak RSS beside the bound and the features' size, and items/s. --in-memory also runs
the in-memory kNN (`probes.knn_probe`, scikit-learn on the whole float64 matrices) in
its own process, for its peak and the check that both predict the same.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

D, CLASSES, CHUNK = 384, 10, 4096
NOISE = 8.0  # per channel, around centres of norm ~20: classes overlap


def _write(path: Path, n_train: int, n_query: int) -> None:
    root = zarr.open_group(path, mode="w")
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(CLASSES, D))
    for name, n in (("train", n_train), ("val", n_query), ("test", n_query)):
        x = root.create_array(name, shape=(n, D), chunks=(CHUNK, D), dtype="float16")
        y = root.create_array(f"{name}_label", shape=(n,), chunks=(n,), dtype="int64")
        labels = rng.integers(0, CLASSES, n)
        for s in range(0, n, CHUNK):
            e = min(s + CHUNK, n)
            noise = NOISE * rng.normal(size=(e - s, D))
            x[s:e] = (centres[labels[s:e]] + noise).astype(np.float16)
        y[:] = labels


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def _rss_mb() -> float:
    """Resident memory now (Linux), so that an import's passing peak is not the baseline."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1e3
    return _peak_rss_mb()


def _run(path: str, bound_mb: float, in_memory: bool) -> None:
    from threadpoolctl import threadpool_limits

    from featstore.probing import probes
    from featstore.probing.knn import knn_blockwise

    root = zarr.open_group(path, mode="r")
    x = {s: root[s] for s in ("train", "val", "test")}
    y = {s: np.asarray(root[f"{s}_label"][:]) for s in x}
    np.asarray(x["val"][:1])  # zarr's codec pipeline, loaded before the baseline is taken
    base = _rss_mb()
    t0 = time.perf_counter()
    with threadpool_limits(limits=1):
        if in_memory:
            whole = {s: np.asarray(a[:], np.float64) for s, a in x.items()}
            pred = probes.knn_probe(
                whole["train"], y["train"], whole["val"], y["val"], whole["test"], CLASSES
            )
        else:
            pred = knn_blockwise(
                x["train"], y["train"], x["val"], y["val"], x["test"], CLASSES, memory_mb=bound_mb
            )
    secs = time.perf_counter() - t0
    acc = float((pred.proba.argmax(1) == y["test"]).mean())
    np.save(Path(path) / ("memory.npy" if in_memory else "blockwise.npy"), pred.proba)
    out = dict(peak_mb=_peak_rss_mb(), base_mb=base, seconds=secs, k=pred.param, accuracy=acc)
    print(json.dumps(out))


def _child(path: Path, bound_mb: float, in_memory: bool) -> dict:
    cmd = [sys.executable, __file__, "--run", str(path), "--bound-mb", str(bound_mb)]
    out = subprocess.run(
        cmd + (["--in-memory"] if in_memory else []), capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--bound-mb", type=float, default=64)
    ap.add_argument("--in-memory", action="store_true")
    ap.add_argument("--run", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        _run(args.run, args.bound_mb, args.in_memory)
        return
    from featstore.probing.knn import plan

    with tempfile.TemporaryDirectory(dir="." if Path("cache").is_dir() else None) as tmp:
        path = Path(tmp) / "features.zarr"
        _write(path, args.train, args.queries)
        got = _child(path, args.bound_mb, False)
        ref = _child(path, args.bound_mb, True) if args.in_memory else None
        same = ref and np.array_equal(np.load(path / "blockwise.npy"), np.load(path / "memory.npy"))
    p = plan(D, 50, args.bound_mb, votes=2)  # as knn_blockwise plans 10 classes, k <= 50
    queries = 2 * args.queries
    mb = args.train * D * 2 / 1e6
    print(f"features: {args.train} train rows + {queries} val/test rows x {D}, float16")
    print(f"  ({mb:.0f} MB of train rows; {4 * mb:.0f} MB as the float64 the kNN computes in)")
    passes = -(-args.queries // p.query_rows) * 2
    print(
        f"bound: {args.bound_mb:.0f} MB -> blocks of {p.train_rows} train rows x "
        f"{p.query_rows} query rows ({passes} passes over the train rows)"
    )
    print(
        f"peak RSS, blockwise: {got['peak_mb']:.0f} MB = {got['base_mb']:.0f} MB resident before "
        f"kNN (Python, numpy, zarr, scikit-learn) + {got['peak_mb'] - got['base_mb']:.0f} MB"
    )
    pairs = queries * args.train / got["seconds"]
    print(
        f"throughput: {queries / got['seconds']:.0f} query items/s "
        f"({pairs / 1e6:.1f} M query x train pairs/s), {got['seconds']:.1f} s; "
        f"k={got['k']}, test accuracy {got['accuracy']:.3f}"
    )
    if ref is not None:
        print(
            f"in memory (scikit-learn): peak RSS {ref['peak_mb']:.0f} MB "
            f"(+{ref['peak_mb'] - ref['base_mb']:.0f} MB), {ref['seconds']:.1f} s; "
            f"same predictions: {bool(same)}"
        )


if __name__ == "__main__":
    main()
