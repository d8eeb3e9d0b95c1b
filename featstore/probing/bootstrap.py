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
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import numpy as np

N_BOOT = 1000
Draws = dict[str, np.ndarray]  # metric -> (N_BOOT + 1,) float64: all units, then resamples
BLOCK_BYTES = 64e6  # the weights of this many bytes of resamples are held at a time


def resamples(n: int, seed: int) -> Iterator[np.ndarray]:
    """The unit indices (n,) of each resample, in order."""
    rng = np.random.default_rng(seed)
    for _ in range(N_BOOT):
        yield rng.integers(0, n, n)


def draws(scores: Callable[[np.ndarray], dict[str, float]], n: int, seed: int = 0) -> Draws:
    """`scores(idx)` of all n units, then of each resample. With a single unit every
    resample is that unit again: its draws are NaN, so the interval is NaN (unknown),
    not a zero-width interval that would claim certainty."""
    point = scores(np.arange(n))
    if n < 2:
        return {m: np.array([v, *[np.nan] * N_BOOT], dtype=float) for m, v in point.items()}
    each = [scores(idx) for idx in resamples(n, seed)]
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


def _weight_blocks(n: int, seed: int) -> Iterator[np.ndarray]:
    """Resample counts (n, b) float64 in blocks of b resamples (the first block's first
    column: all ones); the last block set is kept (`_weights`) for the next call."""
    step = max(1, int(BLOCK_BYTES // (8 * max(n, 1))))
    if step > N_BOOT:  # one block: the same for every probe and curve point of a set
        yield _weights(n, seed)
        return
    block = [np.ones(n)]
    for idx in resamples(n, seed):
        block.append(np.bincount(idx, minlength=n).astype(np.float64))
        if len(block) == step:
            yield np.stack(block, axis=1)
            block = []
    if block:
        yield np.stack(block, axis=1)


@functools.lru_cache(maxsize=1)
def _weights(n: int, seed: int) -> np.ndarray:
    """All resample counts (n, N_BOOT + 1), read-only (at most `BLOCK_BYTES`)."""
    out = np.stack(
        [np.ones(n), *(np.bincount(i, minlength=n).astype(np.float64) for i in resamples(n, seed))],
        axis=1,
    )
    out.flags.writeable = False
    return out


def weighted_auroc(positive: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUROC of each weighting (b,): (pairs positive above negative + half the tied
    pairs) / (positives x negatives); NaN without positives or negatives.

    positive: (n,) bool; score: (n,) float; w: (n, b) resample counts. Units sorted by
    score; tied scores are summed into one group first.
    """
    order = np.argsort(score, kind="stable")
    s = score[order]
    ws = w[order]
    pos = ws * positive[order].astype(np.float64)[:, None]
    neg = ws - pos
    if len(s) > 1 and (s[1:] == s[:-1]).any():  # groups of equal scores: half credit
        starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
        pos, neg = np.add.reduceat(pos, starts, axis=0), np.add.reduceat(neg, starts, axis=0)
        below = np.cumsum(neg, 0)
        below -= 0.5 * neg
    else:  # a positive's own row holds no negative weight: the running sum is below it
        below = np.cumsum(neg, 0)
    p, q = pos.sum(0), neg.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = np.einsum("gb,gb->b", pos, below) / (p * q)
    return np.where((p > 0) & (q > 0), auc, np.nan)


def _nanmean(a: np.ndarray) -> np.ndarray:
    """Mean over axis 0 of the finite values; NaN where there is none."""
    ok = np.isfinite(a)
    with np.errstate(invalid="ignore"):
        return np.where(ok, a, 0.0).sum(0) / np.where(ok.any(0), ok.sum(0), np.nan)


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
    if k == 2:
        auroc = weighted_auroc(y == 1, proba[:, 1], w)
    else:
        auroc = _nanmean(np.stack([weighted_auroc(y == c, proba[:, c], w) for c in range(k)]))
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
    auc = np.stack([weighted_auroc(truth[:, j], proba[:, j], w) for j in range(y.shape[1])])
    return {
        "accuracy": ((pred == truth).T @ w).sum(0) / (w.sum(0) * y.shape[1]),
        "balanced_accuracy": ((recall + spec) / 2).mean(0),
        "auroc": _nanmean(auc),
        "f1": (2 * tp / np.maximum(n_pred + n_true, 1)).mean(0),
        "precision": (tp / np.maximum(n_pred, 1)).mean(0),
        "recall": recall.mean(0),
    }


def classification_draws(y: np.ndarray, proba: np.ndarray, seed: int = 0) -> Draws:
    """`draws` of `metrics.classification_scores(y, proba)`, all resamples at once.

    y: (n,) int labels and proba: (n, K), or multi-hot y: (n, L) and proba: (n, L).
    """
    score = _multi if y.ndim == 2 else _single
    parts = [score(y, proba, w) for w in _weight_blocks(len(y), seed)]
    return {m: np.concatenate([p[m] for p in parts]) for m in parts[0]}
