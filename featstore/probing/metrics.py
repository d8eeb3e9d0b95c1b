"""Scores and seeded bootstrap intervals (numpy + scipy; no torch).

Classification metrics take `y (n,)` int labels and `proba (n, K)` class scores
(multi-label: `y (n, L)` multi-hot and `proba (n, L)`). Segmentation metrics take
label maps of one item (a 2D image, or a re-stacked 3D volume) and return one value
per foreground class: `dice_iou`, `precision_recall` and `hd95`.

HD95 follows MONAI's `compute_hausdorff_distance(percentile=95)`: boundaries are the
mask minus its erosion (6/4-connected), distances are Euclidean in the units of
`spacing` (millimetres when known, pixels otherwise), and the value is the larger of
the two directed 95th percentiles. Empty masks: both empty is NaN (nothing to score;
left out of means, like Dice); exactly one empty is the largest distance the grid
allows (its diagonal) where MONAI returns inf, so that a missed or hallucinated
structure is penalised without turning every mean and interval into inf.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata

from featstore.probing import bootstrap

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
    """accuracy, balanced_accuracy, auroc, f1, precision, recall for one prediction.

    AUROC, F1, precision and recall are macro averages: over the classes present in
    `y` (single-label; a class never predicted has precision 0, as sklearn's
    `zero_division=0`), or over labels (multi-label). Single-label macro recall equals
    balanced accuracy; both are kept because the paper reports recall.

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
            "precision": float(np.mean(tp / np.maximum(pred.sum(0), 1))),
            "recall": float(np.mean(recall)),
        }
    k = proba.shape[1]
    pred = proba.argmax(1)
    cm = _confusion(y, pred, k)
    support = cm.sum(1)
    present = support > 0
    recall = np.diag(cm)[present] / support[present]
    denom = cm.sum(0) + support
    f1 = np.where(denom > 0, 2 * np.diag(cm) / np.maximum(denom, 1), 0.0)[present]
    precision = (np.diag(cm) / np.maximum(cm.sum(0), 1))[present]
    return {
        "accuracy": float(np.diag(cm).sum() / len(y)),
        "balanced_accuracy": float(recall.mean()),
        "auroc": macro_auroc(y, proba),
        "f1": float(f1.mean()),
        "precision": float(precision.mean()),
        "recall": float(recall.mean()),
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


def precision_recall(
    pred: np.ndarray, truth: np.ndarray, classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class voxel precision and recall of one item (image or volume).

    pred, truth: integer label maps of the same shape. Returns two (classes - 1,)
    float64 arrays; NaN where a class is absent from both (as Dice), 0 where only one
    side has it (a missed or hallucinated structure).
    """
    prec = np.full(classes - 1, np.nan)
    rec = np.full(classes - 1, np.nan)
    for c in range(1, classes):
        p, t = pred == c, truth == c
        n_p, n_t = int(p.sum()), int(t.sum())
        if n_p + n_t == 0:
            continue
        tp = int((p & t).sum())
        prec[c - 1] = tp / n_p if n_p else 0.0
        rec[c - 1] = tp / n_t if n_t else 0.0
    return prec, rec


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Voxels of `mask` with a 6-connected (3D) / 4-connected (2D) neighbour outside it;
    voxels on the array's edge count as boundary (as MONAI and medpy)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...] | None = None) -> float:
    """95th-percentile symmetric Hausdorff distance between two binary masks' boundaries.

    pred, truth: bool arrays of one shape, (H, W) or (D, H, W); spacing: the size of a
    pixel/voxel along each axis (mm), None for pixels. The larger of the two directed
    95th percentiles (MONAI's definition; medpy pools both directions first). NaN when
    both masks are empty; the grid's diagonal when exactly one is.
    """
    sp = np.ones(pred.ndim) if spacing is None else np.asarray(spacing, np.float64)
    if len(sp) != pred.ndim:
        raise ValueError(f"spacing {tuple(sp)} does not match a {pred.ndim}D mask")
    has_p, has_t = bool(pred.any()), bool(truth.any())
    if not (has_p or has_t):
        return float("nan")
    if not (has_p and has_t):
        return float(np.sqrt((((np.asarray(pred.shape) - 1) * sp) ** 2).sum()))
    # Crop to the union's bounding box grown by one voxel: every boundary point lies in
    # it, so the distance transforms are exact, and a mask touches the crop's edge only
    # where it touches the image's.
    where = np.nonzero(pred | truth)
    box = tuple(
        slice(max(int(ix.min()) - 1, 0), min(int(ix.max()) + 2, n))
        for ix, n in zip(where, pred.shape, strict=True)
    )
    bp, bt = _boundary(pred[box]), _boundary(truth[box])
    to_t = ndimage.distance_transform_edt(~bt, sampling=sp)[bp]
    to_p = ndimage.distance_transform_edt(~bp, sampling=sp)[bt]
    return float(max(np.percentile(to_t, 95), np.percentile(to_p, 95)))


def hd95_per_class(
    pred: np.ndarray, truth: np.ndarray, classes: int, spacing: tuple[float, ...] | None = None
) -> np.ndarray:
    """`hd95` of each foreground class 1..classes-1 of one item: (classes - 1,) float64."""
    return np.array([hd95(pred == c, truth == c, spacing) for c in range(1, classes)])


def with_intervals(
    scores: Callable[[np.ndarray], dict[str, float]], n: int, seed: int = 0
) -> dict[str, tuple[float, float, float]]:
    """{metric: (value, ci_low, ci_high)}; `scores(idx)` scores the items `idx`.

    `idx` is (n,) int: first all items in order (the value), then `N_BOOT` bootstrap
    resamples with replacement (the 95% percentile interval, NaN draws dropped).
    """
    return bootstrap.intervals(bootstrap.draws(scores, n, seed))
