"""Evaluation: cached feature sets -> scores with intervals (CPU; never torch).

For each dataset x encoder x resolution of a manifest (plus the raw-pixel
baseline) it finds the feature set, fits the probes that fit the task and scores
the test split with bootstrap intervals. It returns rows; writing them is the
probe stage's job (`pipelines/probe.py`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from featstore import probes, store
from featstore.errors import FeatstoreError, ProbeError, StoreCorruptError
from featstore.fingerprint import memo_for
from featstore.identity import SetIdentity, requested
from featstore.manifest import Dataset, Manifest
from featstore.metrics import classification_scores, with_intervals
from featstore.readers import Prepared, prepare

Row = dict[str, Any]


def _str(var) -> np.ndarray:
    """A string coordinate as a plain '<U' array (zarr may hand back StringDType)."""
    return np.array(np.asarray(var.values).tolist(), dtype=str)


def _split_arrays(x: np.ndarray, y: np.ndarray, split: np.ndarray):
    return [(x[split == s], y[split == s]) for s in ("train", "val", "test")]


def _classification(
    xs: xr.Dataset, ds: Dataset, pool: str, seed: int, knn_metric: str, knn_k: tuple[int, ...]
) -> Iterator[Row]:
    """Rows (without the set's identity) for linear and kNN probes."""
    cls = np.asarray(xs.cls.values, np.float64).reshape(xs.sizes["item"], -1)
    label = np.asarray(xs.label.values)
    split = _str(xs.split)
    if ds.dims == 3:
        sample = _str(xs.sample)
        patch_mean = (
            np.asarray(xs.patch.mean(("row", "col")).values, np.float64)
            if pool == "cls+patch" and "patch" in xs
            else None
        )
        ids, cls = probes.pool_volumes(cls, sample, pool, patch_mean)
        first = {s: i for i, s in reversed(list(enumerate(sample)))}
        label = label[[first[v] for v in ids]]
        split = split[[first[v] for v in ids]]
    if not np.isfinite(cls).all():
        raise ProbeError("features contain NaN/Inf; run `featstore verify` on the set")
    (xtr, ytr), (xva, yva), (xte, yte) = _split_arrays(cls, label, split)
    if len(yte) == 0:
        raise ProbeError("the test split is empty")
    n_classes = label.shape[1] if label.ndim == 2 else int(label.max()) + 1
    runs = {
        "linear": ("C", probes.linear_probe(xtr, ytr, xva, yva, xte, n_classes, seed=seed)),
        "knn": (
            "k",
            probes.knn_probe(
                xtr,
                ytr,
                xva,
                yva,
                xte,
                n_classes,
                metric=knn_metric,
                grid=knn_k,
            ),
        ),
    }
    for name, (pname, pred) in runs.items():

        def score(i: np.ndarray, p: probes.Prediction = pred) -> dict[str, float]:
            return classification_scores(yte[i], p.proba[i])

        for metric, (v, lo, hi) in with_intervals(score, len(yte), seed).items():
            yield dict(
                probe=name,
                metric=metric,
                value=v,
                ci_low=lo,
                ci_high=hi,
                n_train=len(ytr),
                n_val=len(yva),
                n_test=len(yte),
                param_name=pname,
                param=pred.param,
                fit_seconds=round(pred.seconds, 3),
            )


@dataclass(frozen=True)
class Examples:
    """A few test predictions of a segmentation head, for the report.

    item: (n,) item indices into the set; pred, truth: (n, R, R) uint8 label maps.
    """

    item: np.ndarray
    pred: np.ndarray
    truth: np.ndarray


@dataclass(frozen=True)
class SetResult:
    """Every score of one feature set, and (segmentation) a few example predictions."""

    path: Path
    key: str  # the set's cache key, 12 characters (as in results rows)
    rows: list[Row]
    examples: Examples | None = None


def _segmentation(xs: xr.Dataset, ds: Dataset, seed: int) -> tuple[list[Row], Examples]:
    """Rows for the linear segmentation head, and a few test predictions."""
    split = _str(xs.split)
    sample = _str(xs.sample)
    idx = {s: np.flatnonzero(split == s) for s in ("train", "val", "test")}
    per_item = max(1, xs.sizes["row"] * xs.sizes["col"])
    rng = np.random.default_rng(seed)
    tr = idx["train"]
    if len(tr) * per_item > 4 * probes.SEG_MAX_PATCHES:  # read only what the head will see
        tr = np.sort(rng.choice(tr, 4 * probes.SEG_MAX_PATCHES // per_item, replace=False))
    mask = xs.mask
    n_classes = len(ds.classes) if ds.classes else int(mask.max().values) + 1
    patch_tr = np.asarray(xs.patch[tr].values, np.float32)
    patch_va = np.asarray(xs.patch[idx["val"]].values, np.float32)
    mask_va = np.asarray(mask[idx["val"]].values)
    head = probes.seg_probe(
        patch_tr,
        np.asarray(mask[tr].values),
        patch_va,
        mask_va,
        sample[idx["val"]],
        n_classes,
        seed=seed,
    )
    te = idx["test"]
    if len(te) == 0:
        raise ProbeError("the test split is empty")
    pred = np.concatenate(
        [
            head.predict(np.asarray(xs.patch[te[s : s + 256]].values), mask.shape[-1])
            for s in range(0, len(te), 256)
        ]
    )
    truth = np.asarray(mask[te].values)
    dice, iou = probes.per_volume_scores(pred, truth, sample[te], n_classes)
    # Examples for the report: per test volume (first 3), its slice with most foreground.
    shown = [
        int(np.flatnonzero(sample[te] == v)[np.argmax((truth[sample[te] == v] > 0).sum((1, 2)))])
        for v in list(dict.fromkeys(sample[te]))[:3]
    ]
    examples = Examples(item=te[shown], pred=pred[shown], truth=truth[shown])
    names = list(ds.classes[1:]) if ds.classes else [str(c) for c in range(1, n_classes)]

    def scores(i: np.ndarray) -> dict[str, float]:
        with np.errstate(all="ignore"):
            out = {
                "dice": float(np.nanmean(np.nanmean(dice[i], 1))),
                "iou": float(np.nanmean(np.nanmean(iou[i], 1))),
            }
            for c, name in enumerate(names):
                out[f"dice:{name}"] = float(np.nanmean(dice[i, c]))
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN resamples of a rare class
        result = with_intervals(scores, len(dice), seed)
    n_vol = {s: len(np.unique(sample[idx[s]])) for s in idx}
    rows = [
        dict(
            probe="seg-linear",
            metric=metric,
            value=v,
            ci_low=lo,
            ci_high=hi,
            n_train=n_vol["train"],
            n_val=n_vol["val"],
            n_test=n_vol["test"],
            param_name="C",
            param=head.param,
            fit_seconds=round(head.seconds, 3),
        )
        for metric, (v, lo, hi) in result.items()
    ]
    return rows, examples


def probe_set(
    path: Path, ds: Dataset, pool: str = "mean", seed: int = 0, protocol: str = "default"
) -> SetResult:
    """Every probe that fits `ds.task`, on the feature set at `path`.

    protocol "medmnist+" scores kNN as MedMNIST+ does (k=11, Euclidean, majority vote).
    A chunk that fails its checksum while being read is a `StoreCorruptError`, never
    a score.
    """
    xs = store.open_set(path)
    try:
        return _probe_open_set(path, xs, ds, pool, seed, protocol)
    except (ValueError, RuntimeError, OSError) as exc:
        if isinstance(exc, FeatstoreError) or not _from_storage(exc):
            raise
        raise store.corrupt(path, exc) from None


def _from_storage(exc: BaseException) -> bool:
    """Whether `exc` was raised while zarr or numcodecs decoded a chunk."""
    tb = exc.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if f"{os.sep}zarr{os.sep}" in name or f"{os.sep}numcodecs{os.sep}" in name:
            return True
        tb = tb.tb_next
    return False


def _probe_open_set(
    path: Path, xs: xr.Dataset, ds: Dataset, pool: str, seed: int, protocol: str
) -> SetResult:
    ident = SetIdentity.from_attrs(xs.attrs["identity"])  # checked against the key on open
    assert ident.weights is not None
    sample = _str(xs.sample)
    listed = np.isin(sample, list(xs.attrs.get("skipped", {})))
    cls = np.asarray(xs.cls.values, np.float32).reshape(len(sample), -1)
    nan = ~np.isfinite(cls).all(1)
    if not np.array_equal(nan, listed):
        raise StoreCorruptError(
            f"{path}: the 'skipped' attribute disagrees with the features of samples "
            f"{sorted({str(v) for v in sample[nan != listed]})[:5]}; run `featstore verify "
            f"{path}` and re-extract the set with --overwrite"
        )
    if listed.any():
        xs = xs.isel(item=~listed)
    key = str(xs.attrs["cache_key"])[:12]
    row_ident = dict(
        dataset=ds.name,
        encoder=ident.weights.name,
        random_init=ident.weights.random_init,
        resolution=ident.recipe.resolution,
        feature_set=key,
        pool=pool if ds.dims == 3 else "",
        protocol=protocol,
    )
    examples = None
    if ds.task == "segmentation":
        found, examples = _segmentation(xs, ds, seed)
    else:
        knn = ("euclidean", (11,)) if protocol == "medmnist+" else ("cosine", probes.K_GRID)
        found = list(_classification(xs, ds, pool, seed, *knn))
    return SetResult(path, key, [{**row_ident, **row} for row in found], examples)


@dataclass
class Evaluation:
    """What probing a manifest gave: scored sets, and the cells that could not be scored."""

    results: list[SetResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def rows(self) -> list[Row]:
        """Every result row of every scored set, in probing order."""
        return [row for r in self.results for row in r.rows]


def _missing(where: str, manifest: Manifest, ds: Dataset, spec: str, res: int, src: str) -> str:
    return (
        f"{where}: no feature set in {manifest.cache}; make it with "
        f"`featstore extract{src} --cache {manifest.cache} --dataset {ds.name} "
        f"--encoder {spec} --resolution {res}`"
    )


def probe_manifest(
    manifest: Manifest,
    *,
    pool: str = "mean",
    seed: int = 0,
    baseline: bool = True,
    manifest_file: Path | None = None,
    on_set: Callable[[str, SetResult], object] | None = None,
) -> Evaluation:
    """Probe every cell of `manifest` whose feature set exists.

    A cell without a set, or whose dataset or set is bad, becomes a problem line
    (naming the command that fixes it) and the others are still probed. `on_set`
    is called with each (cell name, SetResult) as it is done.
    """
    out = Evaluation()
    memo = memo_for(manifest.cache)
    prepared: dict[str, Prepared | None] = {}
    src = f" --manifest {manifest_file}" if manifest_file else ""
    for ds, spec, res in manifest.cells(baseline):
        where = f"{ds.name} / {spec} @ {res}px"
        if ds.name not in prepared:
            try:
                prepared[ds.name] = prepare(ds, memo)
            except FeatstoreError as exc:
                prepared[ds.name] = None
                out.problems.append(f"{ds.name}: {exc}")
        prep = prepared[ds.name]
        if prep is None:
            continue
        request = requested(ds, manifest, prep.fingerprint, spec, res).request()
        path = store.find_set(manifest.cache, request)
        if path is None:
            out.problems.append(_missing(where, manifest, ds, spec, res, src))
            continue
        try:
            result = probe_set(path, ds, pool, seed, manifest.protocol)
        except FeatstoreError as exc:
            out.problems.append(f"{where}: {exc}")
            continue
        out.results.append(result)
        if on_set is not None:
            on_set(where, result)
    return out
