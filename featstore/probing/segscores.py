"""Scores of segmentation predictions: per image (2D) or re-stacked volume (3D) and
class, averaged over volumes with bootstrap intervals, a block of whole volumes at a
time (numpy; no torch).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from featstore.data.settings import Instances
from featstore.probing import bootstrap, geometry
from featstore.probing import metrics as fm
from featstore.probing.instances import INSTANCE_METRICS, unit_scores
from featstore.probing.items import volume_items
from featstore.probing.streaming import BYTES_PER_ELEMENT


@dataclass(frozen=True)
class Examples:
    """A few test predictions of a segmentation head, for the report.

    item: (n,) item indices into the set; pred, truth: (n, R, R) uint8 label maps.
    """

    item: np.ndarray
    pred: np.ndarray
    truth: np.ndarray


METRICS = ("dice", "iou", "precision", "recall", "hd95")  # the rows of `volume_scores`
PER_CLASS = ("dice", "hd95")  # also reported per class name (`dice:<name>`)
# Bytes per pixel of a block being scored: the (H, W, K) float32 upsampled logits, the
# int64 argmax, the uint8 prediction and truth (measured: benchmarks/seg_memory.py).
PIXEL_BYTES_PER_CLASS, PIXEL_BYTES = 8, 16
SCORE_ITEMS = 256  # items per block without a memory bound


def volume_scores(
    pred: np.ndarray, truth: np.ndarray, k: int, spacing: geometry.Spacing | None
) -> np.ndarray:
    """`METRICS` of one image or volume: (5, k-1) float64 (NaN: class absent).

    pred, truth: (n, H, W) uint8, the items of ONE volume in slice order (a 2D image:
    n = 1); spacing: its grid spacing (None: pixels).
    """
    if len(pred) == 1 and (spacing is None or len(spacing) == 2):  # a 2D image
        pred, truth = pred[0], truth[0]
    dice, iou = fm.dice_iou(pred, truth, k)
    precision, recall = fm.precision_recall(pred, truth, k)
    hd95 = fm.hd95_per_class(pred, truth, k, spacing)
    found = {"dice": dice, "iou": iou, "precision": precision, "recall": recall, "hd95": hd95}
    return np.stack([found[m] for m in METRICS])


Scorer = Callable[[np.ndarray], dict[str, float]]  # test units (indices) -> {metric: value}


def volume_scorer(per: np.ndarray, names: Sequence[str]) -> Scorer:
    """Scores of any resample of the volumes, averaged over them (NaN, nothing to score,
    left out): every metric of `METRICS` (averaged over classes first), and dice and
    hd95 per class name. per: (V, 5, K-1) `volume_scores` of each volume."""

    def scores(i: np.ndarray) -> dict[str, float]:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN resamples of a rare class
            out = {m: float(np.nanmean(np.nanmean(per[i, j], 1))) for j, m in enumerate(METRICS)}
            for c, name in enumerate(names):
                for m in PER_CLASS:
                    out[f"{m}:{name}"] = float(np.nanmean(per[i, METRICS.index(m), c]))
        return out

    return scores


def volume_draws(
    per: np.ndarray, names: Sequence[str], seed: int, groups: np.ndarray | None = None
) -> bootstrap.Draws:
    """`volume_scorer`'s bootstrap draws (`featstore.probing.bootstrap`); groups: (V,)
    each volume's patient (whole patients resampled), or None (volumes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN resamples of a rare class
        return bootstrap.draws(volume_scorer(per, names), len(per), seed, groups)


def summarise(
    per: np.ndarray, names: Sequence[str], seed: int
) -> dict[str, tuple[float, float, float]]:
    """`volume_scorer`'s scores of all volumes, with bootstrap intervals."""
    return bootstrap.intervals(volume_draws(per, names, seed))


def seg_scores(
    pred: np.ndarray,
    truth: np.ndarray,
    volumes: np.ndarray,
    names: Sequence[str],
    spacing: Mapping[str, geometry.Spacing] | None,
    seed: int,
) -> dict[str, tuple[float, float, float]]:
    """Dice, IoU, precision, recall and HD95 per image (2D) or volume (3D) and class,
    averaged over items (NaN, i.e. nothing to score, left out), with intervals.

    pred, truth: (n, H, W) uint8, a volume's items contiguous and in slice order;
    volumes: (n,) ids; spacing: grid spacing per id (None: pixels). The whole-array
    form of `score_volumes`.
    """
    k = len(names) + 1
    per = []
    for v in volume_items(volumes):
        sp = None if spacing is None else spacing[str(volumes[v[0]])]
        per.append(volume_scores(pred[v], truth[v], k, sp))
    return summarise(np.stack(per), names, seed)


# A head's prediction for a block of whole volumes: patch (n, rows, cols, C) and the
# number of items of each volume -> label maps (n, H, W) uint8.
Predict = Callable[[np.ndarray, list[int]], np.ndarray]
# Reads items (m,) of the set -> (patch (m, rows, cols, C), mask (m, H, W) uint8).
Read = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def block_items(memory_mb: float | None, tokens: int, pixels: int, n_classes: int) -> int:
    """Items per scoring block: `SCORE_ITEMS` without a bound, else as many as fit in
    `memory_mb` (at least one) with `tokens` token elements and `pixels` mask pixels
    per item."""
    if memory_mb is None:
        return SCORE_ITEMS
    item = tokens * BYTES_PER_ELEMENT + pixels * (PIXEL_BYTES_PER_CLASS * n_classes + PIXEL_BYTES)
    return max(1, int(memory_mb * 1e6 // item))


def _groups(vols: Sequence[np.ndarray], max_items: int) -> Iterator[list[int]]:
    """Runs of whole volumes with at most `max_items` items (at least one volume)."""
    group: list[int] = []
    n = 0
    for v, items in enumerate(vols):
        if group and n + len(items) > max_items:
            yield group
            group, n = [], 0
        group.append(v)
        n += len(items)
    if group:
        yield group


def score_volumes(
    predict: Predict,
    read: Read,
    vols: Sequence[np.ndarray],
    ids: Sequence[str],
    names: Sequence[str],
    spacing: Mapping[str, geometry.Spacing] | None,
    seed: int,
    max_items: int = SCORE_ITEMS,
) -> tuple[dict[str, tuple[float, float, float]], Examples]:
    """`seg_scores` of a head, predicted and scored a block of whole volumes at a time
    (`per_volume`, then `summarise`)."""
    found = per_volume(predict, read, vols, ids, len(names) + 1, spacing, max_items)
    return summarise(found.per, names, seed), found.examples


@dataclass(frozen=True)
class Scored:
    """A head's scores of each test volume (image), and a few of its predictions.

    per: (V, 5, k-1) `volume_scores`; instances: (V, 3) `instances.instance_scores`
    (instance datasets; else None); examples: `Examples`.
    """

    per: np.ndarray
    instances: np.ndarray | None
    examples: Examples


def per_volume(
    predict: Predict,
    read: Read,
    vols: Sequence[np.ndarray],
    ids: Sequence[str],
    k: int,
    spacing: Mapping[str, geometry.Spacing] | None,
    max_items: int = SCORE_ITEMS,
    shown: Sequence[int] | None = None,
    rule: Instances | None = None,
) -> Scored:
    """`volume_scores` of each test volume under a head, and examples.

    vols: the set's item indices of each test volume, in slice order; ids: their
    volume ids; max_items: items per block (a larger volume is a block on its own).
    Only one block's tokens, predictions and masks are held, plus each volume's
    scores, so memory follows `max_items` and the largest volume, not the test split.
    Examples: the items `shown` that are scored here; without it, per volume (first 3),
    its slice with most foreground. With `rule` (an instance dataset, two classes),
    `predict` gives the boundary probability (n, H, W) float32 instead of labels: the
    label maps are where it is above 0.5 (the arg-max), and each volume's instances
    by `rule` are scored too (`featstore.probing.instances`).
    """
    per = np.zeros((len(vols), len(METRICS), k - 1))
    inst = None if rule is None else np.zeros((len(vols), len(INSTANCE_METRICS)))
    wanted = None if shown is None else {int(i) for i in shown}
    kept: list[tuple[int, np.ndarray, np.ndarray]] = []
    for group in _groups(vols, max_items):
        patch, truth = read(np.concatenate([vols[v] for v in group]))
        lengths = [len(vols[v]) for v in group]
        maps = predict(patch, lengths)
        del patch
        pred = maps if rule is None else (maps > 0.5).astype(np.uint8)
        starts = np.cumsum([0, *lengths])
        for v, a, b in zip(group, starts[:-1], starts[1:], strict=True):
            sp = None if spacing is None else spacing[ids[v]]
            per[v] = volume_scores(pred[a:b], truth[a:b], k, sp)
            if inst is not None and rule is not None:
                inst[v] = unit_scores(maps[a:b], truth[a:b], rule)
            if wanted is not None:
                at = [j for j, item in enumerate(vols[v]) if int(item) in wanted]
                kept += [(int(vols[v][j]), pred[a + j], truth[a + j]) for j in at]
            elif v < 3:
                j = int(np.argmax((truth[a:b] > 0).sum((1, 2))))
                kept.append((int(vols[v][j]), pred[a + j], truth[a + j]))
    none = np.zeros((0, 0, 0), np.uint8)
    examples = Examples(
        item=np.array([s[0] for s in kept], np.int64),
        pred=np.stack([s[1] for s in kept]) if kept else none,
        truth=np.stack([s[2] for s in kept]) if kept else none,
    )
    return Scored(per, inst, examples)
