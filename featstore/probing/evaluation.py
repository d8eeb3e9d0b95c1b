"""Evaluation: cached feature sets -> scores with intervals (CPU; never an encoder).

For each dataset x encoder x resolution of a manifest (plus the raw-pixel
baseline) it finds the feature set, fits the probes that fit the task and scores
the test split with bootstrap intervals. It returns rows; writing them is the
probe stage's job (`pipelines/probe.py`).

torch is imported (from `featstore.probing.heads`) only for the trainable heads: the dense
decoder of segmentation sets, `--pool abmil` and `protocol: seed`'s linear probe.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]  # no stubs

from featstore.data.manifest import Dataset, Manifest
from featstore.errors import ChunkChecksumError, FeatstoreError, ProbeError, StoreCorruptError
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
from featstore.store.schema import EXAMPLE_ITEM

Row = dict[str, Any]
POOLS = ("mean", "max", "cls+patch", "abmil")  # 3D volume pooling (`--pool`)
# The fingerprint of a dataset's data on this machine, or None where its data is absent
# (`featstore.data.native.present`); the probe itself never reads the data.
DataCheck = Callable[[Dataset], str | None]


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
    if ds.dims == 3:
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
    stream_mb: float | None = None,
) -> SetResult:
    """Every probe that fits `ds.task`, on the feature set at `path`.

    protocol "medmnist+" scores kNN as MedMNIST+ does (k=11, Euclidean, majority vote);
    "seed" trains the paper's linear layer (BCE, lr 0.005, batch 1024, 50 epochs) and
    runs kNN per label of a multi-label set. HD95 is in mm where the set records each
    sample's spacing (`featstore.probing.geometry`), in pixels otherwise. Only the set
    is read, never the raw data. A chunk that fails its checksum while being read is
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
            return _probe_open_set(path, xs, ds, pool, seed, protocol, stream_mb)
    except ChunkChecksumError as exc:  # a chunk's bytes changed after it was written
        raise sets.corrupt(path, exc) from None


def _probe_open_set(
    path: Place,
    xs: xr.Dataset,
    ds: Dataset,
    pool: str,
    seed: int,
    protocol: str,
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
        pool=pool if ds.dims == 3 else "",
        protocol=protocol,
    )
    examples = None
    if ds.task == "segmentation":
        coords = {
            str(n): np.asarray(c.values)
            for n, c in xs.coords.items()
            if c.dims == ("item",) and n not in ("sample", "slice", "split")
        }
        fit = ident.preprocess().fit
        spacing = geometry.grid_spacing(ds.dims, coords, item_str(xs.sample), xs.sizes["y"], fit)
        kept = np.flatnonzero(~listed)  # the set's item number of each item probed
        shown = _positions(kept, xs[EXAMPLE_ITEM].values if EXAMPLE_ITEM in xs.coords else [])
        found, examples = probe_segmentation(xs, ds, seed, spacing, stream_mb, shown.tolist())
        examples = replace(examples, item=kept[examples.item])
    else:
        found = list(_classification(xs, ds, pool, seed, protocol, stream_mb))
    return SetResult(path, key, [{**row_ident, **row} for row in found], examples)


def _positions(kept: np.ndarray, items: Sequence[int] | np.ndarray) -> np.ndarray:
    """Where each of the set's `items` lies among the `kept` ones (absent ones left out)."""
    items = np.asarray(items, np.int64)
    pos = np.searchsorted(kept, items)
    ok = (items >= 0) & (pos < len(kept))
    ok[ok] = kept[pos[ok]] == items[ok]
    return pos[ok]


@dataclass
class Evaluation:
    """What probing a manifest gave: scored sets, and the cells that could not be scored."""

    results: list[SetResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. a data folder that is absent

    @property
    def rows(self) -> list[Row]:
        """Every result row of every scored set, in probing order."""
        return [row for r in self.results for row in r.rows]


def _missing(
    where: str, manifest: Manifest, ds: Dataset, spec: str, res: int, src: str, found: catalog.Found
) -> str:
    """The problem line of a cell without a set, naming the command that makes it."""
    cmd = (
        f"`featstore extract{src} --cache {shlex.quote(str(manifest.cache))} "
        f"--dataset {shlex.quote(ds.name)} --encoder {shlex.quote(spec)} --resolution {res}`"
    )
    if found.stale:  # sets of this request exist, made from other files
        recorded = ", ".join(f[:12] for f in found.stale)
        return (
            f"{where}: the data in {ds.path} changed since its feature set was extracted "
            f"(fingerprint {recorded} recorded, another now); re-extract it with {cmd}"
        )
    return f"{where}: no feature set in {manifest.cache}; make it with {cmd}"


def probe_manifest(
    manifest: Manifest,
    *,
    pool: str = "mean",
    seed: int = 0,
    stream_mb: float | None = None,
    baseline: bool = True,
    manifest_file: Path | None = None,
    on_set: Callable[[str, SetResult], object] | None = None,
    data_check: DataCheck | None = None,
) -> Evaluation:
    """Probe every cell of `manifest` whose feature set exists.

    A cell without a set, or whose dataset or set is bad, becomes a problem line
    (naming the command that fixes it) and the others are still probed. `on_set`
    is called with each (cell name, SetResult) as it is done. `data_check` gives the
    fingerprint of each dataset's data where it is here; a set must then match it.
    Where it gives None (or is not passed) sets are found by their recorded identity
    alone, and a note says so.
    """
    out = Evaluation()
    reachable(place(manifest.cache))
    fingerprints: dict[str, str | None] = {}
    unreadable: set[str] = set()  # data here but not readable: one problem line each
    src = f" --manifest {shlex.quote(str(manifest_file))}" if manifest_file else ""
    for ds, spec, res in manifest.cells(baseline):
        where = f"{ds.name} / {spec} @ {res}px"
        if ds.name not in fingerprints and ds.name not in unreadable:
            try:
                fingerprints[ds.name] = data_check(ds) if data_check else None
            except FeatstoreError as exc:
                out.problems.append(f"{ds.name}: {exc}")
                unreadable.add(ds.name)
                continue
            if fingerprints[ds.name] is None:
                out.notes.append(catalog.unchecked_note(ds.name, ds.path))
        if ds.name in unreadable:
            continue
        fp = fingerprints[ds.name]
        request = requested(ds, manifest, fp or "", spec, res).request()
        found = catalog.find_cell(manifest.cache, request, ds.name, checked=fp is not None)
        if found.path is None:
            out.problems.append(_missing(where, manifest, ds, spec, res, src, found))
            continue
        try:
            result = probe_set(found.path, ds, pool, seed, manifest.protocol, stream_mb)
        except FeatstoreError as exc:
            out.problems.append(f"{where}: {exc}")
            continue
        out.results.append(result)
        if on_set is not None:
            on_set(where, result)
    return out
