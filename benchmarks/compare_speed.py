"""How long the paired comparisons of issue 28 take: 10 encoders x 5 datasets.

    python benchmarks/compare_speed.py [--encoders 10] [--datasets 5] [--units 5000]
        [--resamples 1000] [--classes 4] [--groups 0]

Synthetic predictions (no probing is timed here: the probes' time goes beside this
figure elsewhere). Per dataset: one `Resampling` of the test units (`--groups G`:
G patients instead of one group per unit); for each encoder, its bootstrap draws of
macro AUROC (`macro_auroc_of`, one-vs-rest over `--classes`) and of accuracy
(`weighted_mean` of per-unit correctness); then for each of the E(E-1)/2 pairs,
DeLong per class (`delong_from` of each encoder's `label_placements`, made once
per encoder), exact McNemar, and `compare_draws` of both
metrics; Holm over the pairs of each test. Then ranks, Friedman and Wilcoxon-Holm
over the datasets. Prints the seconds of each part and the total, and, for scale,
one pair through `paired_bootstrap` from scratch (both encoders' draws redone).
"""

from __future__ import annotations

import argparse
import time
from itertools import combinations

import numpy as np

from featstore.probing.bootstrap import Resampling, macro_auroc_of, weighted_draws, weighted_mean
from featstore.probing.pairdraws import compare_draws, paired_bootstrap
from featstore.probing.paired import adjust, delong_from, label_placements, mcnemar_exact
from featstore.probing.ranks import rank_encoders


def dataset(n: int, k: int, encoders: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Labels (n,) and each encoder's class probabilities (n, k): noisier logits for
    later encoders."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    probas = []
    for e in range(encoders):
        logits = np.eye(k)[y] * 2.0 + rng.normal(0, 1.0 + 0.1 * e, (n, k))
        p = np.exp(logits - logits.max(1, keepdims=True))
        probas.append(p / p.sum(1, keepdims=True))
    return y, probas


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoders", type=int, default=10)
    ap.add_argument("--datasets", type=int, default=5)
    ap.add_argument("--units", type=int, default=5000)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--groups", type=int, default=0, help="patients per test set (0: units)")
    args = ap.parse_args()
    n, e = args.units, args.encoders
    data = [dataset(n, args.classes, e, s) for s in range(args.datasets)]
    spent = dict.fromkeys(("draws", "delong", "mcnemar", "compare", "adjust", "ranks"), 0.0)
    auroc = np.empty((args.datasets, e))
    pairs = list(combinations(range(e), 2))

    def timed(part: str, t0: float) -> float:
        now = time.perf_counter()
        spent[part] += now - t0
        return now

    start = time.perf_counter()
    for d, (y, probas) in enumerate(data):
        t = time.perf_counter()
        groups = np.arange(n) * args.groups // n if args.groups else None
        res = Resampling.of(n, groups, n_resamples=args.resamples, seed=d)
        metric = macro_auroc_of(y)
        correct = [(p.argmax(1) == y) * 1.0 for p in probas]
        auc_draws = [weighted_draws(metric, p, res) for p in probas]
        acc_draws = [weighted_draws(weighted_mean, c, res) for c in correct]
        auroc[d] = [a[0] for a in auc_draws]
        t = timed("draws", t)
        places = [label_placements(y, p) for p in probas]  # once per encoder
        p_delong = [
            [delong_from(a, b).p_value for a, b in zip(places[i], places[j], strict=True)]
            for i, j in pairs
        ]
        t = timed("delong", t)
        p_mcnemar = [mcnemar_exact(correct[i] > 0, correct[j] > 0).p_value for i, j in pairs]
        t = timed("mcnemar", t)
        boots = [
            (compare_draws(auc_draws[i], auc_draws[j]), compare_draws(acc_draws[i], acc_draws[j]))
            for i, j in pairs
        ]
        t = timed("compare", t)
        adjust(np.ravel(p_delong), "holm")
        adjust(np.array(p_mcnemar), "holm")
        adjust(np.array([b[0].p_value for b in boots]), "holm")
        adjust(np.array([b[1].p_value for b in boots]), "holm")
        timed("adjust", t)
    t = time.perf_counter()
    rank_encoders(auroc, [f"enc{i}" for i in range(e)])
    timed("ranks", t)
    total = time.perf_counter() - start

    t = time.perf_counter()
    y, probas = data[0]
    paired_bootstrap(macro_auroc_of(y), probas[0], probas[1], n_resamples=args.resamples, seed=9)
    one_pair = time.perf_counter() - t

    print(
        f"{e} encoders x {args.datasets} datasets x {n} units x {args.resamples} resamples, "
        f"{args.classes} classes, {len(pairs)} pairs per dataset, "
        f"groups: {args.groups or 'units'}"
    )
    for part, s in spent.items():
        print(f"  {part:8s} {s:7.2f} s")
    print(f"total {total:.2f} s ({total / (args.datasets * len(pairs)) * 1e3:.1f} ms per pair)")
    print(f"one pair by paired_bootstrap from scratch (macro AUROC): {one_pair:.2f} s")


if __name__ == "__main__":
    main()
