"""Segmentation probes of one feature set: the linear head and the dense decoder,
scored per image (2D) or re-stacked volume (3D) and class (no torch here: the
decoder's torch lives in `featstore.heads`, imported when it runs).

Also the small readers of a set's items that classification shares: string
coordinates, volumes in slice order, patch tokens with or without a `layer` dim.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from featstore import geometry, probes, store
from featstore import metrics as fm
from featstore.errors import ProbeError
from featstore.manifest import Dataset
from featstore.streaming import StreamedHead, fit_streaming

Row = dict[str, Any]


def item_str(var: xr.DataArray) -> np.ndarray:
    """A string coordinate as a plain '<U' array (`store.open_set` already made it one)."""
    return store.plain(np.asarray(var.values))


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
    volumes: (n,) ids; spacing: grid spacing per id (None: pixels).
    """
    k = len(names) + 1
    ids = list(dict.fromkeys(volumes))
    per = {m: np.zeros((len(ids), k - 1)) for m in ("dice", "iou", "precision", "recall", "hd95")}
    for i, v in enumerate(ids):
        sel = volumes == v
        p, t = pred[sel], truth[sel]
        if len(p) == 1 and (spacing is None or len(spacing[v]) == 2):  # a 2D image
            p, t = p[0], t[0]
        per["dice"][i], per["iou"][i] = fm.dice_iou(p, t, k)
        per["precision"][i], per["recall"][i] = fm.precision_recall(p, t, k)
        per["hd95"][i] = fm.hd95_per_class(p, t, k, None if spacing is None else spacing[v])

    def scores(i: np.ndarray) -> dict[str, float]:
        with np.errstate(all="ignore"):
            out = {m: float(np.nanmean(np.nanmean(a[i], 1))) for m, a in per.items()}
            for c, name in enumerate(names):
                out[f"dice:{name}"] = float(np.nanmean(per["dice"][i, c]))
                out[f"hd95:{name}"] = float(np.nanmean(per["hd95"][i, c]))
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN resamples of a rare class
        return fm.with_intervals(scores, len(ids), seed)


def decoder_predictions(
    xs: xr.Dataset,
    ds: Dataset,
    idx: dict[str, np.ndarray],
    test_vols: list[np.ndarray],
    n_classes: int,
    seed: int,
) -> tuple[np.ndarray, float, float]:
    """Fit the dense decoder on train items, predict the test items (in `test_vols`
    order). Returns (pred (n_test, H, W) uint8, lr, seconds)."""
    from featstore import heads  # torch: the one trainable segmentation head

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
        vols = [np.arange(a, b) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    head = heads.fit_decoder(
        patch_tokens(xs, tr), np.asarray(xs.mask[tr].values), vols, n_classes, ds.dims, seed, cfg
    )
    size = xs.sizes["y"]
    if ds.dims == 2:
        te = np.concatenate(test_vols)
        pred = np.concatenate(
            [head.predict(patch_tokens(xs, te[s : s + 256]), size) for s in range(0, len(te), 256)]
        )
    else:
        pred = np.concatenate([head.predict(patch_tokens(xs, v), size) for v in test_vols])
    return pred, head.param, head.seconds


def probe_segmentation(
    xs: xr.Dataset,
    ds: Dataset,
    seed: int,
    spacing: Mapping[str, geometry.Spacing] | None,
    stream_mb: float | None = None,
) -> tuple[list[Row], Examples]:
    """Rows for the linear head and the dense decoder, and a few test predictions.

    stream_mb: train the linear head on every training patch, streaming blocks of at
    most this many MB (`featstore.streaming`), instead of on a sample of patches.
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
    # Test items volume by volume, each in slice order (3D distances run across slices).
    test_vols = [
        idx["test"][v] for v in volume_items(sample[idx["test"]], xs.slice.values[idx["test"]])
    ]
    te = np.concatenate(test_vols)
    pred = np.concatenate(
        [
            head.predict(patch_tokens(xs, te[s : s + 256], last_only=True), mask.shape[-1])
            for s in range(0, len(te), 256)
        ]
    )
    truth = np.asarray(mask[te].values)
    # Examples for the report: per test volume (first 3), its slice with most foreground.
    shown = [
        int(np.flatnonzero(sample[te] == v)[np.argmax((truth[sample[te] == v] > 0).sum((1, 2)))])
        for v in list(dict.fromkeys(sample[te]))[:3]
    ]
    examples = Examples(item=te[shown], pred=pred[shown], truth=truth[shown])
    names = list(ds.classes[1:]) if ds.classes else [str(c) for c in range(1, n_classes)]
    dec_pred, dec_lr, dec_seconds = decoder_predictions(xs, ds, idx, test_vols, n_classes, seed)
    n_vol = {s: len(np.unique(sample[idx[s]])) for s in idx}
    rows = []
    for probe, p, pname, param, seconds in (
        ("seg-linear", pred, "alpha" if stream_mb else "C", head.param, head.seconds),
        ("seg-decoder", dec_pred, "lr", dec_lr, dec_seconds),
    ):
        for metric, (v, lo, hi) in seg_scores(p, truth, sample[te], names, spacing, seed).items():
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
