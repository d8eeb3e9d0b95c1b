"""Probes on frozen features: arrays in, predictions out (scikit-learn; no torch).

Defaults follow the DINOv3 / MedMNIST+ protocols: hyper-parameters are chosen on the
validation split and the final model is fitted on the training split.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from featstore.errors import ProbeError
from featstore.probing.items import volume_items
from featstore.probing.metrics import dice_iou

C_GRID = tuple(10.0**e for e in range(-4, 3))  # 1e-4 .. 1e2
K_GRID = (1, 3, 5, 10, 20, 50)
SEG_C_GRID = (0.01, 0.1, 1.0)
SEG_MAX_PATCHES = 10_000  # ample for a linear head; the fits dominate probe time


@dataclass(frozen=True)
class Prediction:
    """Class scores for the test items, with the hyper-parameter chosen on val."""

    proba: np.ndarray  # (n_test, K) or, multi-label, (n_test, L)
    param: float
    seconds: float


def check_split(y: np.ndarray, split: str) -> None:
    """A `ProbeError` for an empty split, or a single-class train split (y: (n,) int)."""
    if len(y) == 0:
        raise ProbeError(f"the {split} split is empty; give it samples (or change `splits:`)")
    if y.ndim == 1 and len(np.unique(y)) < 2 and split == "train":
        raise ProbeError(f"the train split has a single class ({int(y[0])}); a probe needs two")


def _full_proba(model: Any, x: np.ndarray, k: int) -> np.ndarray:
    """predict_proba with a column for every class 0..k-1 (absent ones get 0)."""
    out = np.zeros((len(x), k))
    out[:, model.classes_.astype(int)] = model.predict_proba(x)
    return out


def _logreg(c: float, seed: int) -> LogisticRegression:
    return LogisticRegression(C=c, max_iter=1000, random_state=seed)


def _sweep(
    x: np.ndarray, y: np.ndarray, grid: Sequence[float], seed: int
) -> Iterator[tuple[float, LogisticRegression]]:
    """Yield (C, model) along the grid, weakest regularisation last, each fit warm-started
    from the previous one (the path converges in a fraction of the cold-start time)."""
    model = LogisticRegression(max_iter=1000, random_state=seed, warm_start=True)
    for c in sorted(grid):
        yield c, model.set_params(C=c).fit(x, y)


def fit_per_label(
    fit: Callable[[int], Prediction], ytr: np.ndarray, n_test: int, t0: float
) -> Prediction:
    """Multi-hot labels (n, L) as L binary problems: `fit(j)` scores label j.

    A label never (or always) on in train gets a constant score; `param` is the
    median of the chosen hyper-parameters.
    """
    cols, params = [], []
    for j in range(ytr.shape[1]):
        if len(np.unique(ytr[:, j])) < 2:
            cols.append(np.full(n_test, float(ytr[0, j])))
            continue
        p = fit(j)
        cols.append(p.proba[:, 1])
        params.append(p.param)
    param = float(np.median(params)) if params else float("nan")
    return Prediction(np.stack(cols, 1), param, time.perf_counter() - t0)


def linear_probe(
    xtr: np.ndarray,
    ytr: np.ndarray,
    xva: np.ndarray,
    yva: np.ndarray,
    xte: np.ndarray,
    n_classes: int,
    grid: Sequence[float] = C_GRID,
    seed: int = 0,
) -> Prediction:
    """Standardised features, L2 logistic regression; C chosen by val accuracy.

    x*: (n, D) float features; y*: (n,) int labels, or (n, L) multi-hot (one binary
    problem per label, C chosen per label). The prediction's proba is
    (n_test, n_classes) float64, or (n_test, L) for multi-hot labels.
    """
    for y, s in ((ytr, "train"), (yva, "val")):
        check_split(y, s)
    t0 = time.perf_counter()
    scaler = StandardScaler().fit(xtr)
    xtr, xva, xte = (scaler.transform(x) for x in (xtr, xva, xte))
    if ytr.ndim == 2:
        return fit_per_label(
            lambda j: linear_probe(xtr, ytr[:, j], xva, yva[:, j], xte, 2, grid, seed),
            ytr,
            len(xte),
            t0,
        )
    best = (-1.0, grid[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for c, model in _sweep(xtr, ytr, grid, seed):
            acc = float((model.predict(xva) == yva).mean())
            if acc > best[0]:
                best = (acc, c)
        model = _logreg(best[1], seed).fit(xtr, ytr)  # a clean fit: reproducible on its own
    return Prediction(_full_proba(model, xte, n_classes), best[1], time.perf_counter() - t0)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm: (n, D) float -> (n, D) float (zero rows stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_probe(
    xtr: np.ndarray,
    ytr: np.ndarray,
    xva: np.ndarray,
    yva: np.ndarray,
    xte: np.ndarray,
    n_classes: int,
    grid: Sequence[int] = K_GRID,
    metric: str = "cosine",
    per_label: bool = False,
) -> Prediction:
    """kNN with majority vote; `cosine` on L2-normalised features (DINOv3) or
    `euclidean` on raw features (MedMNIST+). k chosen by val accuracy.

    x*: (n, D) float features; y*: (n,) int labels, or (n, L) multi-hot. The
    prediction's proba is (n_test, n_classes) float64, or (n_test, L) for multi-hot.
    Multi-hot labels share one k chosen on exact-match accuracy, or, with `per_label`
    (the seed paper's protocol), each label is its own binary task with its own k
    (`param`: their median).
    """
    for y, s in ((ytr, "train"), (yva, "val")):
        check_split(y, s)
    t0 = time.perf_counter()
    if ytr.ndim == 2 and per_label:
        return fit_per_label(
            lambda j: knn_probe(xtr, ytr[:, j], xva, yva[:, j], xte, 2, grid, metric),
            ytr,
            len(xte),
            t0,
        )
    if metric == "cosine":  # on unit vectors, Euclidean ranks neighbours as cosine does
        xtr, xva, xte = l2_normalise(xtr), l2_normalise(xva), l2_normalise(xte)
    ks = [k for k in grid if k <= len(xtr)] or [len(xtr)]
    if ytr.ndim == 2:
        model = KNeighborsClassifier(ks[0], algorithm="brute")
        best = max(
            ks,
            key=lambda k: (
                model.set_params(n_neighbors=k).fit(xtr, ytr).predict(xva) == yva
            ).mean(),
        )
        model.set_params(n_neighbors=best).fit(xtr, ytr)
        proba = np.stack(
            [
                p[:, -1] if p.shape[1] == 2 else np.full(len(xte), float(c[0]))
                for p, c in zip(model.predict_proba(xte), model.classes_, strict=True)
            ],
            1,
        )
        return Prediction(proba, best, time.perf_counter() - t0)
    scores = {}
    for k in ks:
        model = KNeighborsClassifier(k, algorithm="brute").fit(xtr, ytr)
        scores[k] = float((model.predict(xva) == yva).mean())
    best = max(ks, key=lambda k: (scores[k], -k))
    model = KNeighborsClassifier(best, algorithm="brute").fit(xtr, ytr)
    return Prediction(_full_proba(model, xte, n_classes), best, time.perf_counter() - t0)


def pool_volumes(
    cls: np.ndarray,
    vols: Sequence[np.ndarray],
    how: str = "mean",
    patch_mean: np.ndarray | None = None,
) -> np.ndarray:
    """Slice CLS tokens to one vector per volume.

    cls: (n_items, D); vols: each volume's item indices (`items.volume_items`);
    patch_mean: (n_items, D) mean patch token per slice, used by how="cls+patch".
    Returns (V, D or 2D) float64, volumes in the order of `vols`.
    """
    if how == "cls+patch" and patch_mean is None:
        raise ProbeError("pooling 'cls+patch' needs patch tokens in the feature set")
    feats = np.concatenate([cls, patch_mean], 1) if patch_mean is not None else cls
    if how == "max":
        return np.stack([feats[v].max(0) for v in vols]).astype(np.float64)
    if how in ("mean", "cls+patch"):
        return np.stack([feats[v].astype(np.float64).mean(0) for v in vols])
    raise ProbeError(f"unknown pooling '{how}'; use mean, max or cls+patch (abmil is trained)")


def _bins(size: int, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and end pixel of each of `cells` cells over `size` pixels, as torch's
    adaptive pooling cuts them (floor(i*size/cells), ceil((i+1)*size/cells))."""
    i = np.arange(cells)
    return (i * size) // cells, -((-(i + 1) * size) // cells)


def patch_targets(mask: np.ndarray, rows: int, cols: int, n_classes: int) -> np.ndarray:
    """Majority class of each cell of a (rows, cols) grid: (n, H, W) uint8 -> (n, rows,
    cols) int64; ties go to the lower class id.

    The targets of the linear segmentation heads (the patch grid) and of the dense
    decoder (4x that grid). Cells are adaptive-pooling bins, so any H/rows ratio
    works; counted with integral images, 64 masks at a time (bounded memory).
    """
    n, h, w = mask.shape
    (y0, y1), (x0, x1) = _bins(h, rows), _bins(w, cols)
    out = np.empty((n, rows, cols), np.int64)
    for s in range(0, n, 64):
        m = np.asarray(mask[s : s + 64])
        counts = np.empty((len(m), rows, cols, n_classes), np.int64)
        for c in range(n_classes):
            integ = np.pad((m == c).cumsum(1).cumsum(2), ((0, 0), (1, 0), (1, 0)))
            a, b = integ[:, y1], integ[:, y0]
            counts[..., c] = a[:, :, x1] - b[:, :, x1] - a[:, :, x0] + b[:, :, x0]
        out[s : s + 64] = counts.argmax(-1)
    return out


def linear_logits(
    model: LogisticRegression | SGDClassifier, x: np.ndarray, n_classes: int
) -> np.ndarray:
    """Class scores (m, n_classes) float32 of a fitted linear classifier on rows x (m, D).

    A binary model's decision is the log-odds of `classes_[1]`: its classes score
    (0, decision). Classes absent from training score -1e9 (never the argmax).
    """
    out = np.full((len(x), n_classes), -1e9, np.float32)
    dec = model.decision_function(x)
    if dec.ndim == 1:
        dec = np.stack([np.zeros_like(dec), dec], 1)
    out[:, model.classes_.astype(int)] = dec
    return out


def _linear_weights(src: int, dst: int) -> np.ndarray:
    """(dst, src) 1-D linear interpolation, half-pixel centres, edges clamped."""
    x = np.clip((np.arange(dst) + 0.5) * src / dst - 0.5, 0, src - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, src - 1)
    w = np.zeros((dst, src), np.float32)
    np.add.at(w, (np.arange(dst), lo), 1 - (x - lo))
    np.add.at(w, (np.arange(dst), hi), x - lo)
    return w


def upsample_logits(logits: np.ndarray, size: int) -> np.ndarray:
    """Bilinear (n, rows, cols, K) -> (n, size, size, K) float32, as torch's
    `interpolate(mode="bilinear", align_corners=False)`; separable, so two matmuls."""
    _, r, c, _ = logits.shape
    wy, wx = _linear_weights(r, size), _linear_weights(c, size)
    return np.einsum("yr,nrck,xc->nyxk", wy, logits.astype(np.float32), wx, optimize=True)


@dataclass(frozen=True)
class SegModel:
    """A fitted linear segmentation head on patch tokens (C = `param`)."""

    scaler: StandardScaler
    model: LogisticRegression
    n_classes: int
    param: float
    seconds: float

    def predict(self, patch: np.ndarray, size: int, batch: int = 64) -> np.ndarray:
        """patch: (n, rows, cols, D) float16 | float32 -> label maps (n, size, size) uint8."""
        return self._maps(patch, size, batch, lambda up: up.argmax(-1), np.uint8)

    def boundary(self, patch: np.ndarray, size: int, batch: int = 64) -> np.ndarray:
        """patch (n, rows, cols, D) -> (n, size, size) float32, the probability of
        class 1 (`boundary_probability`; instance datasets)."""
        return self._maps(patch, size, batch, boundary_probability, np.float32)

    def _maps(
        self,
        patch: np.ndarray,
        size: int,
        batch: int,
        reduce: Callable[[np.ndarray], np.ndarray],
        dtype: type[np.generic],
    ) -> np.ndarray:
        out = np.empty((len(patch), size, size), dtype)
        for s in range(0, len(patch), batch):
            p = np.asarray(patch[s : s + batch], np.float32)
            n, r, c, d = p.shape
            logits = linear_logits(
                self.model, self.scaler.transform(p.reshape(-1, d)), self.n_classes
            )
            out[s : s + batch] = reduce(upsample_logits(logits.reshape(n, r, c, -1), size))
        return out


def boundary_probability(logits: np.ndarray) -> np.ndarray:
    """Two-class scores (..., 2) -> (...) float32, the softmax probability of class 1:
    a sigmoid of the score difference (a class absent from training scores -1e9 and
    gives 0 or 1). Above 0.5 exactly where the arg-max is class 1."""
    diff = np.asarray(logits[..., 1], np.float64) - np.asarray(logits[..., 0], np.float64)
    return (0.5 * (1.0 + np.tanh(0.5 * diff))).astype(np.float32)


def _sample_patches(
    patch: np.ndarray, targets: np.ndarray, limit: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(patch, np.float32).reshape(-1, patch.shape[-1])
    y = targets.reshape(-1)
    if len(y) > limit:
        keep = np.random.default_rng(seed).choice(len(y), limit, replace=False)
        x, y = x[keep], y[keep]
    return x, y


def seg_probe(
    patch_tr: np.ndarray,
    mask_tr: np.ndarray,
    patch_va: np.ndarray,
    mask_va: np.ndarray,
    volumes_va: np.ndarray,
    n_classes: int,
    grid: Sequence[float] = SEG_C_GRID,
    seed: int = 0,
) -> SegModel:
    """Linear head on patch tokens; C chosen by mean foreground Dice on val.

    patch_*: (n, rows, cols, D) float16 | float32; mask_*: (n, H, W) uint8; volumes_va:
    (n,) ids used to re-stack val slices into volumes for Dice (each 2D image is its
    own id).
    """
    n, rows, cols, _ = patch_tr.shape
    if n == 0 or len(patch_va) == 0:
        raise ProbeError("segmentation needs train and val items")
    t0 = time.perf_counter()
    x, y = _sample_patches(
        patch_tr, patch_targets(mask_tr, rows, cols, n_classes), SEG_MAX_PATCHES, seed
    )
    if len(np.unique(y)) < 2:
        if len(np.unique(mask_tr)) > 1:
            raise ProbeError(
                f"at the {rows}x{cols} patch grid every patch is background: the "
                "structures are smaller than a patch; use a higher resolution"
            )
        raise ProbeError("the train masks hold a single class; nothing to segment")
    scaler = StandardScaler().fit(x)
    x = scaler.transform(x)
    best: tuple[float, SegModel] | None = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for c, model in _sweep(x, y, grid, seed):
            cand = SegModel(scaler, copy.deepcopy(model), n_classes, c, 0.0)
            dice = mean_dice(
                cand.predict(patch_va, mask_va.shape[-1]), mask_va, volumes_va, n_classes
            )
            if best is None or dice > best[0]:
                best = (dice, cand)
    if best is None:
        raise ValueError("seg_probe needs a non-empty grid of C values")
    chosen = best[1]
    return SegModel(scaler, chosen.model, n_classes, chosen.param, time.perf_counter() - t0)


def per_volume_scores(
    pred: np.ndarray, truth: np.ndarray, volumes: np.ndarray, n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Dice and IoU per volume and class: two (V, K-1) float64 arrays (NaN: class absent).

    pred, truth: (n, H, W) uint8 label maps; volumes: (n,) volume id of each item
    (V distinct ids, in order of first appearance).
    """
    vols = volume_items(volumes)
    dice = np.zeros((len(vols), n_classes - 1))
    iou = np.zeros_like(dice)
    for i, v in enumerate(vols):
        dice[i], iou[i] = dice_iou(pred[v], truth[v], n_classes)
    return dice, iou


def mean_dice(pred: np.ndarray, truth: np.ndarray, volumes: np.ndarray, n_classes: int) -> float:
    """Foreground Dice averaged over volumes and classes (0.0 when nothing is scorable).

    pred, truth: (n, H, W) uint8 label maps; volumes: (n,) volume id of each item.
    """
    dice, _ = per_volume_scores(pred, truth, volumes, n_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(dice)) if np.isfinite(dice).any() else 0.0
