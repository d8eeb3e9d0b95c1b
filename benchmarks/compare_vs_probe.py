"""Comparing encoders vs probing them (issue 28): is `featstore compare` cheap beside
the probes it reads?

    python benchmarks/compare_vs_probe.py [--encoders 10] [--datasets 5] [--units 5000]
        [--dim 384] [--classes 4] [--probe-datasets 1]

Probe side: the linear and kNN probes (`probes.linear_probe`, `probes.knn_probe`, as
`featstore probe` runs them) of each encoder on synthetic features (train = val =
test = `--units`, `--dim` channels), timed on `--probe-datasets` datasets and scaled
to `--datasets` (every dataset has the same shape). Compare side: `compare.compare`
of the kept predictions (each encoder against the first, both probes, AUROC, accuracy
and F1 with 1,000 paired resamples, McNemar, Holm) on all `--datasets`. The two
sides alternate for `--rounds` rounds (probe, compare, probe, ...); prints each round,
the medians and the ratio of the medians; the target is compare < 10% of probe time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

from featstore.probing import probes
from featstore.probing.compare import compare
from featstore.probing.predictions import Key, Predictions


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoders", type=int, default=10)
    ap.add_argument("--datasets", type=int, default=5)
    ap.add_argument("--units", type=int, default=5000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--probe-datasets", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    probe_times, compare_times = [], []
    for r in range(a.rounds):
        probe_total, compare_s, n_rows = one_round(a)
        probe_times.append(probe_total)
        compare_times.append(compare_s)
        print(f"round {r + 1}: probe {probe_total:.1f} s, compare {compare_s:.1f} s", flush=True)
    probe_med, compare_med = statistics.median(probe_times), statistics.median(compare_times)
    print(
        f"{a.encoders} encoders x {a.datasets} datasets x {a.units} test units, "
        f"{n_rows} comparisons"
    )
    print(
        f"median of {a.rounds} alternating rounds: probe (linear + kNN) {probe_med:.1f} s "
        f"(measured on {a.probe_datasets} dataset(s), scaled), compare {compare_med:.1f} s; "
        f"ratio compare / probe = {compare_med / probe_med:.1%}"
    )


def one_round(a: argparse.Namespace) -> tuple[float, float, int]:
    """One round: probe (timed, scaled), then compare of every kept prediction."""
    rng = np.random.default_rng(0)
    n, k = a.units, a.classes
    preds: list[Predictions] = []
    probe_s = 0.0
    for d in range(a.datasets):
        y = {s: rng.integers(0, k, n) for s in ("train", "val", "test")}
        centres = rng.normal(0, 1, (k, a.dim))
        for e in range(a.encoders):
            noise = 2.0 + e * 0.1
            x = {s: centres[v] + rng.normal(0, noise, (n, a.dim)) for s, v in y.items()}
            for probe in ("linear", "knn"):
                if d < a.probe_datasets:
                    t0 = time.perf_counter()
                    with threadpool_limits(limits=1):  # as `probe_set`
                        fit = probes.linear_probe if probe == "linear" else probes.knn_probe
                        pred = fit(x["train"], y["train"], x["val"], y["val"], x["test"], k)
                    probe_s += time.perf_counter() - t0
                    proba = pred.proba
                else:  # same shape, not timed: scores near the timed ones' quality
                    proba = rng.dirichlet(np.ones(k), n) * 0.5 + np.eye(k)[y["test"]] * 0.5
                key = Key(f"d{d}", f"enc{e}", False, 224, "", "default", probe, f"s{d}{e}")
                samples = np.array([f"u{i}" for i in range(n)])
                preds.append(Predictions(key, "classification", samples, None, y["test"], proba))
    probe_total = probe_s * a.datasets / a.probe_datasets
    t0 = time.perf_counter()
    df = compare(preds)
    compare_s = time.perf_counter() - t0
    return probe_total, compare_s, len(df)


if __name__ == "__main__":
    main()
