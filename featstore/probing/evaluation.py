"""Evaluation: cached feature sets -> scores with intervals (CPU; never an encoder).

For each dataset x encoder x resolution of a manifest (plus the raw-pixel
baseline) it finds the feature set, fits the probes that fit the task and scores
the test split with bootstrap intervals. It returns rows; writing them is the
probe stage's job (`pipelines/probe.py`).

torch is imported (from `featstore.probing.heads`) only for the trainable heads: the dense
decoder of segmentation sets, `--pool abmil` and `protocol: seed`'s linear probe.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]  # no stubs

from featstore.data.fingerprint import memo_for
from featstore.data.manifest import Dataset, Manifest
from featstore.data.readers import Prepared, Sample, prepare
from featstore.errors import FeatstoreError, ProbeError, StoreCorruptError
from featstore.identity import SetIdentity, requested
from featstore.probing import geometry, probes
from featstore.probing import metrics as fm
from featstore.probing.knn import knn_blockwise
from featstore.probing.segmentation import (
    Examples,
    item_str,
    patch_tokens,
    probe_segmentation,
    volume_items,
)
from featstore.store import catalog, sets
from featstore.store.location import Place, place, reachable

Row = dict[str, Any]
POOLS = ("mean", "max", "cls+patch", "abmil")  # 3D volume pooling (`--pool`)


def _split_arrays(x: np.ndarray, y: np.ndarray, split: np.ndarray):
    return [(x[split == s], y[split == s]) for s in ("train", "val", "test")]


def _classification(
    xs: xr.Dataset, ds: Dataset, pool: str, seed: int, protocol: str, stream_mb: float | None
) -> Iterator[Row]:
    """Rows (without the set's identity) for linear and kNN probes (and ABMIL).

    stream_mb: run kNN in blocks of at most this many MB (`featstore.probing.knn`; the same
    predictions) instead of scikit-learn's on the whole matrices.
    """
    cls = np.asarray(xs.cls.values, np.float64).reshape(xs.sizes["item"], -1)
    label = np.asarray(xs.label.values)
    split = item_str(xs.split)
    n_classes = label.shape[1] if label.ndim == 2 else int(label.max()) + 1
    extra: dict[str, tuple[str, probes.Prediction]] = {}
    if ds.bags:  # slices of a volume, tiles of a slide: pooled per sample
        sample = item_str(xs.sample)
        vols = sorted(volume_items(sample, np.asarray(xs.slice.values)), key=lambda v: sample[v[0]])
        first = np.array([v[0] for v in vols])  # volumes by id, as `pool_volumes` orders them
        label, split = label[first], split[first]
        if pool == "abmil":
            from featstore.probing import heads

            bags = [cls[v] for v in vols]
            mil = heads.fit_abmil(bags, label, split == "train", split == "test", n_classes, seed)
            cls = np.stack([w @ b for w, b in zip(mil.weights, bags, strict=True)])
            extra["abmil"] = ("lr", probes.Prediction(mil.proba, mil.lr, mil.seconds))
        else:
            patch_mean = (
                patch_tokens(xs, np.arange(xs.sizes["item"]), last_only=True)
                .astype(np.float64)
                .mean((1, 2))
                if pool == "cls+patch" and "patch" in xs
                else None
            )
            _, cls = probes.pool_volumes(cls, sample, pool, patch_mean)
    if not np.isfinite(cls).all():
        raise ProbeError("features contain NaN/Inf; run `featstore verify` on the set")
    (xtr, ytr), (xva, yva), (xte, yte) = _split_arrays(cls, label, split)
    if len(yte) == 0:
        raise ProbeError("the test split is empty")
    if protocol == "seed":
        from featstore.probing import heads

        probes.check_split(ytr, "train")
        t0 = time.perf_counter()
        proba = heads.seed_linear(xtr, ytr, xte, n_classes, seed)
        linear = ("lr", probes.Prediction(proba, heads.SEED_LR, time.perf_counter() - t0))
    else:
        linear = ("C", probes.linear_probe(xtr, ytr, xva, yva, xte, n_classes, seed=seed))
    metric, grid = ("euclidean", (11,)) if protocol == "medmnist+" else ("cosine", probes.K_GRID)
    per_label = protocol == "seed"
    if stream_mb is None:
        knn = probes.knn_probe(xtr, ytr, xva, yva, xte, n_classes, grid, metric, per_label)
    else:
        knn = knn_blockwise(xtr, ytr, xva, yva, xte, n_classes, grid, metric, per_label, stream_mb)
    runs = {"linear": linear, "knn": ("k", knn), **extra}
    for name, (pname, pred) in runs.items():

        def score(i: np.ndarray, p: probes.Prediction = pred) -> dict[str, float]:
            return fm.classification_scores(yte[i], p.proba[i])

        for metric_name, (v, lo, hi) in fm.with_intervals(score, len(yte), seed).items():
            yield dict(
                probe=name,
                metric=metric_name,
                value=v,
                ci_low=lo,
                ci_high=hi,
                unit="",
                n_train=len(ytr),
                n_val=len(yva),
                n_test=len(yte),
                param_name=pname,
                param=pred.param,
                fit_seconds=round(pred.seconds, 3),
            )


@dataclass(frozen=True)
class SetResult:
    """Every score of one feature set, and (segmentation) a few example predictions."""

    path: Place
    key: str  # the set's cache key, 12 characters (as in results rows)
    rows: list[Row]
    examples: Examples | None = None


def probe_set(
    path: Place,
    ds: Dataset,
    pool: str = "mean",
    seed: int = 0,
    protocol: str = "default",
    samples: Sequence[Sample] | None = None,
    stream_mb: float | None = None,
) -> SetResult:
    """Every probe that fits `ds.task`, on the feature set at `path`.

    protocol "medmnist+" scores kNN as MedMNIST+ does (k=11, Euclidean, majority vote);
    "seed" trains the paper's linear layer (BCE, lr 0.005, batch 1024, 50 epochs) and
    runs kNN per label of a multi-label set. `samples` (the dataset's listing) lets
    segmentation find each image's spacing for HD95 in mm (`featstore.probing.geometry`);
    without it HD95 is in pixels. A chunk that fails its checksum while being read is
    a `StoreCorruptError`, never a score.
    """
    if pool not in POOLS:
        raise ProbeError(f"unknown pooling '{pool}'; use {', '.join(POOLS)}")
    xs = sets.open_set(path)
    try:
        # One BLAS/OpenMP thread: the probes' matrices are small, and on a shared CPU
        # multi-threaded OpenBLAS spin-waits (a 1.7 s linear segmentation fit took 69 s
        # on this project's 2-core machine while another test run was going).
        with threadpool_limits(limits=1):
            return _probe_open_set(path, xs, ds, pool, seed, protocol, samples, stream_mb)
    except (ValueError, RuntimeError, OSError) as exc:
        if isinstance(exc, FeatstoreError) or not _from_storage(exc):
            raise
        raise sets.corrupt(path, exc) from None


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
    path: Place,
    xs: xr.Dataset,
    ds: Dataset,
    pool: str,
    seed: int,
    protocol: str,
    samples: Sequence[Sample] | None,
    stream_mb: float | None,
) -> SetResult:
    ident = SetIdentity.from_attrs(xs.attrs["identity"])  # checked against the key on open
    assert ident.weights is not None
    sample = item_str(xs.sample)
    listed = np.isin(sample, list(xs.attrs.get("skipped", {})))
    xs = xs.assign(cls=xs.cls.load())  # read once: checked here, probed below
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
        pool=pool if ds.bags else "",
        protocol=protocol,
    )
    examples = None
    if ds.task == "segmentation":
        spacing = None
        if samples is not None:
            coords = {
                str(n): np.asarray(c.values)
                for n, c in xs.coords.items()
                if c.dims == ("item",) and n not in ("sample", "slice", "split")
            }
            fit = ident.preprocess().fit
            spacing = geometry.grid_spacing(
                ds, samples, coords, item_str(xs.sample), xs.sizes["y"], fit
            )
        found, examples = probe_segmentation(xs, ds, seed, spacing, stream_mb)
    else:
        found = list(_classification(xs, ds, pool, seed, protocol, stream_mb))
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
    stream_mb: float | None = None,
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
    reachable(place(manifest.cache))
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
        path = catalog.find_set(manifest.cache, request)
        if path is None:
            out.problems.append(_missing(where, manifest, ds, spec, res, src))
            continue
        try:
            result = probe_set(path, ds, pool, seed, manifest.protocol, prep.samples, stream_mb)
        except FeatstoreError as exc:
            out.problems.append(f"{where}: {exc}")
            continue
        out.results.append(result)
        if on_set is not None:
            on_set(where, result)
    return out
