"""Segmentation probes of one feature set: the linear head and the dense decoder,
scored per image (2D) or re-stacked volume (3D) and class (no torch here: the
decoder's torch lives in `featstore.probing.heads`, imported when it runs).

Also the small readers of a set's items that classification shares: string
coordinates, volumes in slice order, patch tokens with or without a `layer` dim.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from featstore.data.manifest import Dataset
from featstore.errors import ProbeError
from featstore.probing import geometry, probes
from featstore.probing import metrics as fm
from featstore.probing.streaming import BYTES_PER_ELEMENT, StreamedHead, fit_streaming
from featstore.store import sets

if TYPE_CHECKING:
    from featstore.probing.heads import DenseHead  # torch: imported where a decoder is fitted

Row = dict[str, Any]


def item_str(var: xr.DataArray) -> np.ndarray:
    """A string coordinate as a plain '<U' array (`sets.open_set` already made it one)."""
    return sets.plain(np.asarray(var.values))


def volume_items(sample: np.ndarray, slice_: np.ndarray) -> list[np.ndarray]:
    """Item indices of each volume, volumes in order of first appearance, items by slice."""
    out: dict[str, list[int]] = {}
    for i, v in enumerate(sample):
        out.setdefault(v, []).append(i)
    return [np.asarray(sorted(ix, key=lambda i: slice_[i])) for ix in out.values()]


def patch_tokens(xs: xr.Dataset, items: np.ndarray, last_only: bool = False) -> np.ndarray:
    """Patch tokens of `items` as (n, rows, cols, C). A set that stores several blocks
    (`patch` with a `patch_layer` dim, blocks in increasing depth as the manifest's
    `patch_layers` sorts them) gives the deepest stored block (`last_only`) or all of
    them concatenated along channels, shallowest first."""
    var = xs.patch
    dim = "patch_layer"
    if dim not in var.dims:
        return np.asarray(var[items].values)
    if last_only:
        return np.asarray(var[items].isel({dim: -1}).values)
    arr = np.asarray(var[items].transpose("item", "row", "col", dim, "channel").values)
    return arr.reshape(*arr.shape[:3], -1)


@dataclass(frozen=True)
class Examples:
    """A few test predictions of a segmentation head, for the report.

    item: (n,) item indices into the set; pred, truth: (n, R, R) uint8 label maps.
    """

    item: np.ndarray
    pred: np.ndarray
    truth: np.ndarray


METRICS = ("dice", "iou", "precision", "recall", "hd95")
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
    return np.stack(
        [
            *fm.dice_iou(pred, truth, k),
            *fm.precision_recall(pred, truth, k),
            fm.hd95_per_class(pred, truth, k, spacing),
        ]
    )


def summarise(
    per: np.ndarray, names: Sequence[str], seed: int
) -> dict[str, tuple[float, float, float]]:
    """Scores averaged over volumes (NaN, nothing to score, left out), with intervals.

    per: (V, 5, K-1) `volume_scores` of each volume. Gives every metric of `METRICS`
    (averaged over classes first), and dice and hd95 per class name.
    """

    def scores(i: np.ndarray) -> dict[str, float]:
        with np.errstate(all="ignore"):
            out = {m: float(np.nanmean(np.nanmean(per[i, j], 1))) for j, m in enumerate(METRICS)}
            for c, name in enumerate(names):
                out[f"dice:{name}"] = float(np.nanmean(per[i, 0, c]))
                out[f"hd95:{name}"] = float(np.nanmean(per[i, 4, c]))
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN resamples of a rare class
        return fm.with_intervals(scores, len(per), seed)


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
    ids = list(dict.fromkeys(volumes))
    per = []
    for v in ids:
        sp = None if spacing is None else spacing[v]
        per.append(volume_scores(pred[volumes == v], truth[volumes == v], k, sp))
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
    shown: Sequence[int] | None = None,
) -> tuple[dict[str, tuple[float, float, float]], Examples]:
    """`seg_scores` of a head, predicted and scored a block of whole volumes at a time.

    vols: the set's item indices of each test volume, in slice order; ids: their
    volume ids; max_items: items per block (a larger volume is a block on its own).
    Only one block's tokens, predictions and masks are held, plus each volume's
    scores, so memory follows `max_items` and the largest volume, not the test split.
    Examples: the items `shown` (the set's example items) that are scored here;
    without it, per volume (first 3), its slice with most foreground.
    """
    k = len(names) + 1
    per = np.zeros((len(vols), len(METRICS), k - 1))
    wanted = None if shown is None else {int(i) for i in shown}
    kept: list[tuple[int, np.ndarray, np.ndarray]] = []
    for group in _groups(vols, max_items):
        patch, truth = read(np.concatenate([vols[v] for v in group]))
        lengths = [len(vols[v]) for v in group]
        pred = predict(patch, lengths)
        del patch
        starts = np.cumsum([0, *lengths])
        for v, a, b in zip(group, starts[:-1], starts[1:], strict=True):
            sp = None if spacing is None else spacing[ids[v]]
            per[v] = volume_scores(pred[a:b], truth[a:b], k, sp)
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
    return summarise(per, names, seed), examples


def fit_decoder_head(
    xs: xr.Dataset, ds: Dataset, idx: dict[str, np.ndarray], n_classes: int, seed: int
) -> DenseHead:
    """The dense decoder fitted on (a budget-sized sample of) the train items."""
    from featstore.probing import heads

    cfg = heads.DecoderConfig()
    rng = np.random.default_rng(seed)
    sample, slice_ = item_str(xs.sample), np.asarray(xs.slice.values)
    budget = cfg.steps(ds.dims) * (cfg.batch if ds.dims == 2 else 1)  # what it can see
    if ds.dims == 2:
        tr = idx["train"]
        if len(tr) > budget:
            tr = np.sort(rng.choice(tr, budget, replace=False))
        vols: list[np.ndarray] = []
    else:
        train_vols = volume_items(sample[idx["train"]], slice_[idx["train"]])
        if len(train_vols) > budget:
            train_vols = [
                train_vols[j] for j in sorted(rng.choice(len(train_vols), budget, replace=False))
            ]
        tr = np.concatenate([idx["train"][v] for v in train_vols])
        offsets = np.cumsum([0] + [len(v) for v in train_vols])
        vols = [np.arange(a, b) for a, b in itertools.pairwise(offsets)]
    return heads.fit_decoder(
        patch_tokens(xs, tr), np.asarray(xs.mask[tr].values), vols, n_classes, ds.dims, seed, cfg
    )


def probe_segmentation(
    xs: xr.Dataset,
    ds: Dataset,
    seed: int,
    spacing: Mapping[str, geometry.Spacing] | None,
    stream_mb: float | None = None,
    shown: Sequence[int] | None = None,
) -> tuple[list[Row], Examples]:
    """Rows for the linear head and the dense decoder, and a few test predictions.

    stream_mb: train the linear head on every training patch, streaming blocks of at
    most this many MB (`featstore.probing.streaming`), instead of on a sample of patches; and
    score both heads in blocks of whole test volumes that fit it (`score_volumes`;
    without it, blocks of `SCORE_ITEMS` items). The decoder's training sample is
    capped by its step budget (`heads.DecoderConfig`), not by `stream_mb`. shown: the
    items whose linear-head predictions come back as Examples (`score_volumes`).
    """
    split = item_str(xs.split)
    sample = item_str(xs.sample)
    idx = {s: np.flatnonzero(split == s) for s in ("train", "val", "test")}
    if len(idx["test"]) == 0:
        raise ProbeError("the test split is empty")
    per_item = max(1, xs.sizes["row"] * xs.sizes["col"])
    rng = np.random.default_rng(seed)
    tr = idx["train"]
    if len(tr) * per_item > 4 * probes.SEG_MAX_PATCHES:  # read only what the head will see
        tr = np.sort(rng.choice(tr, 4 * probes.SEG_MAX_PATCHES // per_item, replace=False))
    mask = xs.mask
    n_classes = len(ds.classes) if ds.classes else int(mask.max().values) + 1
    head: probes.SegModel | StreamedHead
    if stream_mb is not None:  # every training patch, in blocks of bounded memory
        rows_, cols_ = xs.sizes["row"], xs.sizes["col"]
        train = idx["train"]
        head = fit_streaming(
            lambda a, b: (
                patch_tokens(xs, train[a:b], last_only=True),
                np.asarray(mask[train[a:b]].values),
            ),
            len(train),
            per_item * xs.sizes["channel"],
            lambda m: probes.patch_targets(m, rows_, cols_, n_classes),
            n_classes,
            stream_mb,
            seed=seed,
        )
    else:
        head = probes.seg_probe(
            patch_tokens(xs, tr, last_only=True).astype(np.float32),
            np.asarray(mask[tr].values),
            patch_tokens(xs, idx["val"], last_only=True).astype(np.float32),
            np.asarray(mask[idx["val"]].values),
            sample[idx["val"]],
            n_classes,
            seed=seed,
        )
    # Test items volume by volume, each in slice order (3D distances run across slices),
    # scored a block of whole volumes at a time: with a bound, blocks that fit it.
    test_vols = [
        idx["test"][v] for v in volume_items(sample[idx["test"]], xs.slice.values[idx["test"]])
    ]
    ids = [str(sample[v[0]]) for v in test_vols]
    names = list(ds.classes[1:]) if ds.classes else [str(c) for c in range(1, n_classes)]
    size = mask.shape[-1]
    depth = xs.sizes.get("patch_layer", 1)

    def read(last_only: bool) -> Read:
        return lambda items: (
            patch_tokens(xs, items, last_only),
            np.asarray(mask[items].values),
        )

    tokens = per_item * xs.sizes["channel"]
    lin_scores, examples = score_volumes(
        lambda p, _: head.predict(p, size),
        read(True),
        test_vols,
        ids,
        names,
        spacing,
        seed,
        block_items(stream_mb, tokens, size * size, n_classes),
        shown,
    )
    dec = fit_decoder_head(xs, ds, idx, n_classes, seed)

    def dec_predict(p: np.ndarray, lengths: list[int]) -> np.ndarray:
        if ds.dims == 2:
            return dec.predict(p, size)
        cuts = np.cumsum(lengths)[:-1]
        return np.concatenate([dec.predict(v, size) for v in np.split(p, cuts)])

    items = block_items(stream_mb, tokens * depth, size * size, n_classes)
    dec_scores, _ = score_volumes(
        dec_predict, read(False), test_vols, ids, names, spacing, seed, items
    )
    n_vol = {s: len(np.unique(sample[idx[s]])) for s in idx}
    rows = []
    for probe, found, pname, param, seconds in (
        ("seg-linear", lin_scores, "alpha" if stream_mb else "C", head.param, head.seconds),
        ("seg-decoder", dec_scores, "lr", dec.param, dec.seconds),
    ):
        for metric, (v, lo, hi) in found.items():
            rows.append(
                dict(
                    probe=probe,
                    metric=metric,
                    value=v,
                    ci_low=lo,
                    ci_high=hi,
                    unit=("mm" if spacing else "px") if metric.startswith("hd95") else "",
                    n_train=n_vol["train"],
                    n_val=n_vol["val"],
                    n_test=n_vol["test"],
                    param_name=pname,
                    param=param,
                    fit_seconds=round(seconds, 3),
                )
            )
    return rows, examples
