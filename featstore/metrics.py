"""Scores and seeded bootstrap intervals (numpy only).

Classification metrics take `y (n,)` int labels and `proba (n, K)` class scores
(multi-label: `y (n, L)` multi-hot and `proba (n, L)`); segmentation metrics take
per-item Dice/IoU values computed by `dice_iou`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.stats import rankdata

N_BOOT = 1000
# The headline metric of each task: tables, plots and the report's "best cell".
MAIN_METRIC = {"classification": "auroc", "multilabel": "auroc", "segmentation": "dice"}


def _auroc_binary(y: np.ndarray, s: np.ndarray) -> float:
    pos = int(y.sum())
    neg = len(y) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def macro_auroc(y: np.ndarray, proba: np.ndarray) -> float:
    """One-vs-rest AUROC averaged over classes (= sklearn's roc_auc_score 'ovr' macro).

    y: (n,) int labels and proba: (n, K) float class scores, or (multi-label) y: (n, L)
    multi-hot and proba: (n, L). NaN when no class has both positives and negatives.
    """
    if y.ndim == 2:  # multi-label
        vals = [_auroc_binary(y[:, j], proba[:, j]) for j in range(y.shape[1])]
    elif proba.shape[1] == 2:
        return _auroc_binary(y == 1, proba[:, 1])
    else:
        vals = [_auroc_binary(y == k, proba[:, k]) for k in range(proba.shape[1])]
    return float(np.nanmean(vals)) if not np.all(np.isnan(vals)) else float("nan")


def _confusion(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(y * k + pred, minlength=k * k).reshape(k, k)


def classification_scores(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """accuracy, balanced_accuracy, auroc (macro), f1 (macro) for one prediction.

    y: (n,) int labels and proba: (n, K) float class scores, or (multi-label) y: (n, L)
    multi-hot and proba: (n, L) per-label probabilities (decided at 0.5).
    """
    if y.ndim == 2:  # multi-label: per-label binary decisions at 0.5
        pred = proba >= 0.5
        tp = (pred & (y == 1)).sum(0)
        f1 = 2 * tp / np.maximum(pred.sum(0) + y.sum(0), 1)
        recall = tp / np.maximum(y.sum(0), 1)
        spec = ((~pred) & (y == 0)).sum(0) / np.maximum((y == 0).sum(0), 1)
        return {
            "accuracy": float((pred == (y == 1)).mean()),
            "balanced_accuracy": float(np.mean((recall + spec) / 2)),
            "auroc": macro_auroc(y, proba),
            "f1": float(np.mean(f1)),
        }
    k = proba.shape[1]
    pred = proba.argmax(1)
    cm = _confusion(y, pred, k)
    support = cm.sum(1)
    present = support > 0
    recall = np.diag(cm)[present] / support[present]
    denom = cm.sum(0) + support
    f1 = np.where(denom > 0, 2 * np.diag(cm) / np.maximum(denom, 1), 0.0)[present]
    return {
        "accuracy": float(np.diag(cm).sum() / len(y)),
        "balanced_accuracy": float(recall.mean()),
        "auroc": macro_auroc(y, proba),
        "f1": float(f1.mean()),
    }


def dice_iou(pred: np.ndarray, truth: np.ndarray, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class Dice and IoU of one item (image or volume).

    pred, truth: integer label maps of the same shape. Returns two (classes - 1,)
    float64 arrays for the foreground classes 1..classes-1; NaN where a class is absent from
    both prediction and truth (nothing to score).
    """
    dice = np.full(classes - 1, np.nan)
    iou = np.full(classes - 1, np.nan)
    for c in range(1, classes):
        p, t = pred == c, truth == c
        total = p.sum() + t.sum()
        if total == 0:
            continue
        inter = (p & t).sum()
        dice[c - 1] = 2 * inter / total
        iou[c - 1] = inter / (total - inter)
    return dice, iou


def with_intervals(
    scores: Callable[[np.ndarray], dict[str, float]], n: int, seed: int = 0
) -> dict[str, tuple[float, float, float]]:
    """{metric: (value, ci_low, ci_high)}; `scores(idx)` scores the items `idx`.

    `idx` is (n,) int: first all items in order (the value), then `N_BOOT` bootstrap
    resamples with replacement (the 95% percentile interval, NaN draws dropped).
    """
    point = scores(np.arange(n))
    rng = np.random.default_rng(seed)
    draws = [scores(rng.integers(0, n, n)) for _ in range(N_BOOT)]
    out = {}
    for name, value in point.items():
        vals = np.array([d[name] for d in draws], dtype=float)
        vals = vals[np.isfinite(vals)]
        lo, hi = np.percentile(vals, [2.5, 97.5]) if len(vals) else (np.nan, np.nan)
        out[name] = (value, float(lo), float(hi))
    return out
