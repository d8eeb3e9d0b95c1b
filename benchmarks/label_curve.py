"""Label-efficiency curve vs one full probe, on the same in-memory features.

    python benchmarks/label_curve.py [--items 5000] [--dim 384] [--repeats 5]

Draws a classification set of `--items` feature vectors (4 Gaussian classes of
different sizes, `--dim` channels like ViT-S, split 70/10/20 %), then times, in one
process and one BLAS thread (as `featstore probe` runs), alternately for `--rounds`
rounds: one full probe (linear + kNN, bootstrap intervals), and the curve of the
fractions 0.01, 0.05, 0.1, 0.25, 0.5, 1 with `--repeats` draws each (the full
probe included, as `featstore probe --fractions ... --repeats N` runs it), after
one untimed full probe. Prints the medians and their ratio; the target is <= 10x.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from threadpoolctl import threadpool_limits

from featstore.data.settings import LabelEfficiency
from featstore.probing import classification, curves
from featstore.probing.classification import ClassArrays
from featstore.probing.options import ProbeOptions
from featstore.probing.rows import Outcome, SetColumns

FRACTIONS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0)


def features(items: int, dim: int, seed: int = 0) -> ClassArrays:
    """Four classes (40/30/20/10 % of items), centres 1.5 apart; splits 70/10/20 %."""
    rng = np.random.default_rng(seed)
    y = rng.choice(4, items, p=[0.4, 0.3, 0.2, 0.1])
    centres = rng.normal(size=(4, dim)) * 1.5 / np.sqrt(dim) * 4
    x = centres[y] + rng.normal(size=(items, dim))
    split = rng.choice(np.array(["train", "val", "test"]), items, p=[0.7, 0.1, 0.2])
    ids = np.array([f"i{i}" for i in range(items)])
    return ClassArrays(x, y, split, ids, 4)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=5000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    a = features(args.items, args.dim)
    opts = ProbeOptions()
    le = LabelEfficiency(fractions=FRACTIONS, repeats=args.repeats)
    where = SetColumns("bench", "synthetic", False, 224, "bench", "", "default")

    def full() -> Outcome:
        return classification.outcome(a, classification.predict(a, opts), opts.seed)

    times: dict[str, list[float]] = {"full probe": [], "curve": []}
    rows = 0
    with threadpool_limits(limits=1):
        full()  # untimed: imports, and the resample counts both sides then share
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            full()
            times["full probe"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            found = full()
            curve = curves.class_curve(a, opts, le, where, found)
            times["curve"].append(time.perf_counter() - t0)
            rows = len(curve.rows)
    med = {k: statistics.median(v) for k, v in times.items()}
    n_train = int((a.split == "train").sum())
    print(f"{args.items} items ({n_train} train), dim {args.dim}, 4 classes; linear + kNN")
    print(f"curve: fractions {FRACTIONS} x {args.repeats} repeats, {rows} curve rows")
    for k, v in med.items():
        print(f"{k:<11} median {v:7.2f} s  (rounds: {', '.join(f'{t:.2f}' for t in times[k])})")
    ratios = [c / f for c, f in zip(times["curve"], times["full probe"], strict=True)]
    print(
        f"curve / full probe: {med['curve'] / med['full probe']:.1f}x of the medians, "
        f"{statistics.median(ratios):.1f}x median per round (target <= 10x)"
    )


if __name__ == "__main__":
    main()
