"""Bootstrap draws of test scores, and the 95% intervals they give (numpy; no torch).

A score's draws are its value on all test units (draw 0) and on `N_BOOT` resamples
with replacement (the resamples of `numpy.random.default_rng(seed)`, one
`integers(0, n, n)` each). Keeping the draws, not only the interval, lets the
repeats of a label-efficiency point be pooled: each resample scores every repeat's
predictions of the same test units, and the interval is that of their mean.

`classification_draws` scores every resample at once, as resample counts (weights)
of the test units: the confusion counts and AUROC pair counts of a resample are
weighted sums, exact in float64, so each draw equals `metrics.classification_scores`
on the resampled arrays.

`Resampling` draws whole groups (patients, volumes, slides) instead of units, for any
number of resamples; `weighted_draws` scores any `WeightedMetric` under it. Two
encoders scored on one `Resampling` have paired draws (`featstore.probing.paired`).

Intervals resample what is independent: given `groups` (the test units' patients, where
the set has a `patient` coordinate), `draws` and `classification_draws` resample whole
patients, so that the near-duplicate images of one patient (or the reconstructions of
one scan) enter or leave a resample together, as `Resampling` does; without, each unit
(an image, a volume, a slide) is its own group. Rows say which (`Resampled`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np

N_BOOT = 1000
Draws = dict[str, np.ndarray]  # metric -> (N_BOOT + 1,) float64: all units, then resamples
BLOCK_BYTES = 64e6  # the weights of this many bytes of resamples are held at a time
# What a bootstrap resampled: whole patients, or the test units themselves.
Resampled = Literal["patient", "image", "volume", "slide"]


def resampled(has_patient: bool, dims: int, slides: bool) -> Resampled:
    """What the intervals of a set's rows resample: its patients where it has them,
    else its test unit (a slide's tiles, a volume's slices, or an image)."""
    if has_patient:
        return "patient"
    return "slide" if slides else "volume" if dims == 3 else "image"


def resamples(n: int, seed: int, groups: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """The unit indices of each resample, in order: n draws of a unit, or (groups: (n,)
    ids) as many draws of a group as there are groups, each drawn group's units all
    taken (in unit order). The groups drawn are those of `Resampling.of(n, groups,
    seed=seed)`, resample by resample."""
    rng = np.random.default_rng(seed)
    if groups is None:
        for _ in range(N_BOOT):
            yield rng.integers(0, n, n)
        return
    r = Resampling.of(n, groups, seed=seed)
    order = np.argsort(r.group_of, kind="stable")
    members = np.split(order, np.cumsum(np.bincount(r.group_of, minlength=r.n_groups))[:-1])
    for _ in range(N_BOOT):
        yield np.concatenate([members[g] for g in rng.integers(0, r.n_groups, r.n_groups)])


def draws(
    scores: Callable[[np.ndarray], dict[str, float]],
    n: int,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> Draws:
    """`scores(idx)` of all n units, then of each resample (`resamples`: of whole
    groups where `groups` (n,) is given). With a single unit (group) every resample is
    that unit again: its draws are NaN, so the interval is NaN (unknown), not a
    zero-width interval that would claim certainty."""
    point = scores(np.arange(n))
    if n < 2 or (groups is not None and len(np.unique(groups)) < 2):
        return {m: np.array([v, *[np.nan] * N_BOOT], dtype=float) for m, v in point.items()}
    each = [scores(idx) for idx in resamples(n, seed, groups)]
    return {m: np.array([v, *(d[m] for d in each)], dtype=float) for m, v in point.items()}


def intervals(found: Draws) -> dict[str, tuple[float, float, float]]:
    """{metric: (value, ci_low, ci_high)}: draw 0, and the 2.5 and 97.5 percentiles of
    the finite resample draws (NaN when none is finite)."""
    out = {}
    for name, vals in found.items():
        rest = vals[1:][np.isfinite(vals[1:])]
        lo, hi = np.percentile(rest, [2.5, 97.5]) if len(rest) else (np.nan, np.nan)
        out[name] = (float(vals[0]), float(lo), float(hi))
    return out


def pooled(found: list[Draws]) -> Draws:
    """The mean over repeats of each draw (draws of the same resamples)."""
    return {m: np.mean([d[m] for d in found], axis=0) for m in found[0]}


@dataclass(frozen=True, eq=False)
class Resampling:
    """The bootstrap resamples of one test set, drawn as whole groups.

    Every encoder scored on the same `Resampling` sees the same resamples, so the
    draws of two encoders are paired. A resample draws `n_groups` groups with
    replacement (`numpy.random.default_rng(seed).integers(0, n_groups, n_groups)` per
    resample, the stream of `resamples`), and every unit of a drawn group counts once
    per draw: a patient's images, a volume's slices or a slide's tiles always enter or
    leave a resample together. Without groups each unit is its own group, and the
    weights are those of `classification_draws`.

    group_of: (n,) int64, the group 0..n_groups-1 of each unit.
    """

    group_of: np.ndarray
    n_groups: int
    n_resamples: int = N_BOOT
    seed: int = 0

    @classmethod
    def of(
        cls, n: int, groups: np.ndarray | None = None, *, n_resamples: int = N_BOOT, seed: int = 0
    ) -> Resampling:
        """The resamples of n units; groups: (n,) any hashable ids (patients, volumes,
        slides), or None for one group per unit."""
        if groups is None:
            return cls(np.arange(n), n, n_resamples, seed)
        groups = np.asarray(groups)
        if groups.shape != (n,):
            raise ValueError(
                f"groups has shape {groups.shape} but there are {n} test units: pass one "
                "group id (patient, volume or slide) per unit, or None"
            )
        uniq, group_of = np.unique(groups, return_inverse=True)
        return cls(group_of.astype(np.int64), len(uniq), n_resamples, seed)

    @property
    def n(self) -> int:
        """The number of test units."""
        return len(self.group_of)

    def blocks(self) -> Iterator[np.ndarray]:
        """Resample counts of the units (n, b) float64 in blocks of b resamples: the
        first block's first column is all ones (the full set), then the resamples in
        order, `n_resamples + 1` columns in all. A set whose counts fit `BLOCK_BYTES`
        comes as one block, kept for the next call (the other encoders of a set)."""
        step = max(2, int(BLOCK_BYTES // (8 * max(self.n, 1))))
        if step > self.n_resamples:
            yield _all_weights(self.group_of.tobytes(), self.n_groups, self.n_resamples, self.seed)
        else:
            yield from _generate(self.group_of, self.n_groups, self.n_resamples, self.seed, step)

    def weights(self) -> np.ndarray:
        """All resample counts (n, n_resamples + 1) float64 (`blocks` joined)."""
        return np.concatenate(list(self.blocks()), axis=1)


def _generate(
    group_of: np.ndarray, n_groups: int, n_resamples: int, seed: int, step: int
) -> Iterator[np.ndarray]:
    # One (b, n_groups) draw gives the same numbers as b draws of n_groups in a row.
    rng = np.random.default_rng(seed)
    done, first = 0, True
    while first or done < n_resamples:
        b = min(step - first, n_resamples - done)
        picks = rng.integers(0, max(n_groups, 1), (b, n_groups))
        flat = (picks + n_groups * np.arange(b)[:, None]).ravel()
        counts = np.bincount(flat, minlength=b * n_groups).reshape(b, n_groups)
        w = np.ascontiguousarray(counts.T, dtype=np.float64)[group_of]
        yield np.concatenate([np.ones((len(group_of), 1)), w], axis=1) if first else w
        done, first = done + b, False


@functools.lru_cache(maxsize=1)
def _all_weights(group_of: bytes, n_groups: int, n_resamples: int, seed: int) -> np.ndarray:
    """All resample counts in one read-only block (at most `BLOCK_BYTES`)."""
    index = np.frombuffer(group_of, dtype=np.int64)
    out = next(_generate(index, n_groups, n_resamples, seed, n_resamples + 1))
    out.flags.writeable = False
    return out


WeightedMetric = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""A score of predictions under resample counts: `(pred (n, ...), w (n, b)) -> (b,)`.
Column j of w holds how often each unit is in resample j; a column of ones is the
score on the full set. `weighted_mean` and `macro_auroc_of` are two."""


def weighted_draws(metric: WeightedMetric, pred: np.ndarray, resampling: Resampling) -> np.ndarray:
    """`metric` on all units, then on each resample: (n_resamples + 1,) float64. With
    fewer than two groups every resample repeats the set: those draws are NaN, not a
    zero-width interval that would claim certainty (as `draws`)."""
    if len(pred) != resampling.n:
        raise ValueError(
            f"the predictions have {len(pred)} units but the resampling has {resampling.n}: "
            "score every encoder on the same test units, in the same order"
        )
    out = np.concatenate([np.asarray(metric(pred, w), np.float64) for w in resampling.blocks()])
    if resampling.n_groups < 2:
        out[1:] = np.nan
    return out


def weighted_mean(values: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The weighted mean of per-unit values (b,), NaN units left out (a volume with
    nothing to score), NaN where no unit is finite. values: (n,) float, e.g. correct
    (accuracy) or a volume's Dice averaged over its classes (as `segscores`)."""
    ok = np.isfinite(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.where(ok, values, 0.0) @ w) / (ok.astype(np.float64) @ w)


def macro_auroc_of(y: np.ndarray) -> WeightedMetric:
    """The `WeightedMetric` of `metrics.macro_auroc` against labels y: (n,) int, or
    (n, L) multi-hot; its predictions are proba (n, K) or (n, L)."""

    def metric(proba: np.ndarray, w: np.ndarray) -> np.ndarray:
        return weighted_macro_auroc(y, proba, w)

    return metric


def weighted_auroc(positive: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUROC of each weighting (b,): (pairs positive above negative + half the tied
    pairs) / (positives x negatives); NaN without positives or negatives.

    positive: (n,) bool; score: (n,) float; w: (n, b) resample counts. The negatives
    are sorted once; each positive reads the running weight of the negatives below it
    (and half of those tied with it) at its place among them. Every sum is of
    integers and halves, so exact in float64 whatever its order.
    """
    pos, neg = np.flatnonzero(positive), np.flatnonzero(~positive)
    if len(pos) == 0 or len(neg) == 0:
        return np.full(w.shape[1], np.nan)
    neg = neg[np.argsort(score[neg], kind="stable")]
    ranked = score[neg]
    below = _running(w, neg)  # (q + 1, b): weight of the first i sorted negatives
    lo = np.searchsorted(ranked, score[pos], "left")
    hi = np.searchsorted(ranked, score[pos], "right")
    under = below[lo]
    if (hi != lo).any():  # negatives tied with a positive: half credit
        under += below[hi]
        under *= 0.5
    wp = w[pos]
    p, q = wp.sum(0), below[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = np.einsum("gb,gb->b", wp, under) / (p * q)
    return np.where((p > 0) & (q > 0), auc, np.nan)


def _running(w: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Running sums (g + 1, b) of the rows `rows` (g,) of w (n, b): row i sums
    w[rows[:i]]. A row at a time, read in place: numpy's cumsum down axis 0 of the
    gathered rows strides across them and is about 5x slower at (5000, 1001). With few
    columns (the full set alone, a permutation test) the loop's per-row call would
    dominate, and numpy's cumsum (the same sequential sums, the same bits) is used."""
    out = np.empty((len(rows) + 1, w.shape[1]))
    out[0] = 0.0
    if w.shape[1] < 64:
        np.cumsum(w[rows], axis=0, out=out[1:])
        return out
    for i, r in enumerate(rows.tolist()):
        np.add(out[i], w[r], out=out[i + 1])
    return out


def _nanmean(a: np.ndarray) -> np.ndarray:
    """Mean over axis 0 of the finite values; NaN where there is none."""
    ok = np.isfinite(a)
    with np.errstate(invalid="ignore"):
        return np.where(ok, a, 0.0).sum(0) / np.where(ok.any(0), ok.sum(0), np.nan)


def weighted_macro_auroc(y: np.ndarray, proba: np.ndarray, w: np.ndarray) -> np.ndarray:
    """`metrics.macro_auroc` under each weighting (b,), exact in float64.

    y: (n,) int labels and proba: (n, K), or multi-hot y: (n, L) and proba: (n, L);
    w: (n, b) resample counts. Binary: the AUROC of class 1; otherwise the mean over
    classes (labels) that have both positives and negatives.
    """
    if y.ndim == 2:
        cols = [(y[:, j] == 1, proba[:, j]) for j in range(y.shape[1])]
    elif proba.shape[1] == 2:
        return weighted_auroc(y == 1, proba[:, 1], w)
    else:
        cols = [(y == c, proba[:, c]) for c in range(proba.shape[1])]
    return _nanmean(np.stack([weighted_auroc(pos, s, w) for pos, s in cols]))


def _single(y: np.ndarray, proba: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    k = proba.shape[1]
    pred = proba.argmax(1)
    cm = (np.eye(k * k)[y * k + pred].T @ w).reshape(k, k, -1)  # (true, predicted, b)
    diag = np.stack([cm[c, c] for c in range(k)])  # (k, b)
    support, predicted = cm.sum(1), cm.sum(0)
    present = support > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(present, diag / support, np.nan)
        denom = predicted + support
        f1 = np.where(present, np.where(denom > 0, 2 * diag / np.maximum(denom, 1), 0.0), np.nan)
        precision = np.where(present, diag / np.maximum(predicted, 1), np.nan)
    auroc = weighted_macro_auroc(y, proba, w)
    balanced = _nanmean(recall)
    return {
        "accuracy": diag.sum(0) / w.sum(0),
        "balanced_accuracy": balanced,
        "auroc": auroc,
        "f1": _nanmean(f1),
        "precision": _nanmean(precision),
        "recall": balanced,
    }


def _multi(y: np.ndarray, proba: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    pred, truth = proba >= 0.5, y == 1
    tp, n_pred, n_true = (pred & truth).T @ w, pred.T @ w, truth.T @ w  # (L, b)
    spec = ((~pred & ~truth).T @ w) / np.maximum(((~truth).T @ w), 1)
    recall = tp / np.maximum(n_true, 1)
    return {
        "accuracy": ((pred == truth).T @ w).sum(0) / (w.sum(0) * y.shape[1]),
        "balanced_accuracy": ((recall + spec) / 2).mean(0),
        "auroc": weighted_macro_auroc(y, proba, w),
        "f1": (2 * tp / np.maximum(n_pred + n_true, 1)).mean(0),
        "precision": (tp / np.maximum(n_pred, 1)).mean(0),
        "recall": recall.mean(0),
    }


def classification_draws(
    y: np.ndarray, proba: np.ndarray, seed: int = 0, groups: np.ndarray | None = None
) -> Draws:
    """`draws` of `metrics.classification_scores(y, proba)`, all resamples at once.

    y: (n,) int labels and proba: (n, K), or multi-hot y: (n, L) and proba: (n, L);
    groups: (n,) the units' patients (whole patients resampled), or None (units).
    With a single group the resampled draws are NaN (no interval), as `draws`.
    """
    score = _multi if y.ndim == 2 else _single
    resampling = Resampling.of(len(y), groups, seed=seed)
    parts = [score(y, proba, w) for w in resampling.blocks()]
    out = {m: np.concatenate([p[m] for p in parts]) for m in parts[0]}
    if groups is not None and resampling.n_groups < 2:
        for v in out.values():
            v[1:] = np.nan
    return out
