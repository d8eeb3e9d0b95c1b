"""Evaluation: cached feature sets -> scores with intervals (CPU; never an encoder).

For each dataset x encoder x resolution of a manifest (plus the raw-pixel
baseline) it finds the feature set, fits the probes that fit the task and scores
the test split with bootstrap intervals. It returns rows; writing them is the
probe stage's job (`pipelines/probe.py`).

torch is imported (from `featstore.probing.heads`) only for the trainable heads: the dense
decoder of segmentation sets, `--pool abmil` and `protocol: seed`'s linear probe. How to
probe is one `ProbeOptions` (`featstore.probing.options`); the rows are `ResultRow`s.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import xarray as xr
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]  # no stubs

from featstore.data.evaluations import ExternalTest, label_map
from featstore.data.manifest import Dataset, Manifest
from featstore.errors import (
    ChunkChecksumError,
    FeatstoreError,
    ManifestError,
    ProbeError,
    StoreCorruptError,
)
from featstore.identity import SetIdentity, labelled, requested, short
from featstore.places import Place, place, reachable
from featstore.probing import classification, external, geometry
from featstore.probing.curves import Curve, class_curve, manifest_curve, seg_curve
from featstore.probing.items import item_str
from featstore.probing.options import ProbeOptions
from featstore.probing.predictions import Predictions, set_key
from featstore.probing.rows import Outcome, ResultRow, SetColumns, result_rows
from featstore.probing.seeds import run_seeds, trainable
from featstore.probing.segmentation import probe_segmentation, seg_set
from featstore.probing.segscores import Examples
from featstore.store import catalog, sets
from featstore.store.schema import EXAMPLE_ITEM

# The fingerprint of a dataset's data on this machine, or None where its data is absent
# (`featstore.data.native.present`); the probe itself never reads the data.
DataCheck = Callable[[Dataset], str | None]


@dataclass(frozen=True)
class SetResult:
    """Every score of one feature set, and (segmentation) a few example predictions."""

    path: Place
    key: str  # the set's cache key, 12 characters (as in results rows)
    rows: list[ResultRow]
    examples: Examples | None = None
    skipped: tuple[str, ...] = ()  # label-efficiency points not drawn, with the reason
    left_out: tuple[str, ...] = ()  # samples extraction skipped: "id: reason"
    attention: classification.Attention | None = None  # --pool abmil: test items' weights
    # the test predictions of each ordinary probe, curve point repeat and seed refit
    predictions: tuple[Predictions, ...] = ()


def probe_set(path: Place, ds: Dataset, opts: ProbeOptions = ProbeOptions()) -> SetResult:
    """Every probe that fits `ds.task`, on the feature set at `path`.

    HD95 is in mm where the set records each sample's spacing
    (`featstore.probing.geometry`), in pixels otherwise. Only the set is read, never
    the raw data. A chunk that fails its checksum while being read is a
    `StoreCorruptError`, never a score.
    """
    xs = sets.open_set(path)
    try:
        # One BLAS/OpenMP thread: the probes' matrices are small, and on a shared CPU
        # multi-threaded OpenBLAS spin-waits (a 1.7 s linear segmentation fit took 69 s
        # on this project's 2-core machine while another test run was going).
        with threadpool_limits(limits=1):
            return _probe_open_set(path, xs, ds, opts)
    except ChunkChecksumError as exc:  # a chunk's bytes changed after it was written
        raise sets.corrupt(path, exc) from None


def usable_items(path: Place, xs: xr.Dataset) -> tuple[xr.Dataset, np.ndarray]:
    """The set without its skipped samples, CLS tokens loaded (checked once, here), and
    the set's item number of each item kept."""
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
    return (xs.isel(item=~listed) if listed.any() else xs), np.flatnonzero(~listed)


def set_columns(xs: xr.Dataset, ds: Dataset, opts: ProbeOptions) -> SetColumns:
    """The columns that name this set in its result rows."""
    ident = SetIdentity.from_attrs(xs.attrs["identity"])  # checked against the key on open
    assert ident.weights is not None
    return SetColumns(
        dataset=ds.name,
        encoder=ident.weights.name,
        random_init=ident.weights.random_init,
        resolution=ident.recipe.resolution,
        feature_set=short(str(xs.attrs["cache_key"])),
        pool=opts.pool if ds.bags else "",
        protocol=opts.protocol,
        task=ds.task,
    )


def spacing_of(xs: xr.Dataset, ds: Dataset) -> dict[str, geometry.Spacing] | None:
    """Each volume's grid spacing for HD95, from the set's recorded geometry (None
    where any sample's spacing is unknown)."""
    coords = {
        str(n): np.asarray(c.values)
        for n, c in xs.coords.items()
        if c.dims == ("item",) and n not in ("sample", "slice", "split")
    }
    fit = SetIdentity.from_attrs(xs.attrs["identity"]).preprocess().fit
    return geometry.grid_spacing(ds.dims, coords, item_str(xs.sample), xs.sizes["y"], fit)


def _probe_open_set(
    path: Place,
    xs: xr.Dataset,
    ds: Dataset,
    opts: ProbeOptions,
) -> SetResult:
    xs, kept = usable_items(path, xs)
    where = set_columns(xs, ds, opts)
    examples = attention = None
    curve = Curve()
    key = set_key(where, opts.seed)
    refit = trainable(ds.task, opts, ds.bags)
    fit: Callable[[int], Outcome]

    if ds.task == "segmentation":
        seg = seg_set(xs, ds, spacing_of(xs, ds))
        shown = _positions(kept, xs[EXAMPLE_ITEM].values if EXAMPLE_ITEM in xs.coords else [])
        found, examples = probe_segmentation(seg, opts, shown.tolist(), key=key)
        examples = replace(examples, item=kept[examples.item])  # the set's item numbers
        if opts.curve is not None:
            curve = seg_curve(seg, opts, opts.curve, where, found)

        def fit(seed: int) -> Outcome:
            again = replace(opts, seed=seed, seeds=())
            return probe_segmentation(seg, again, heads=refit, boot_seed=opts.seed, key=key)[0]

    else:
        arrays = classification.class_arrays(xs, ds, opts)
        runs = classification.predict(arrays, opts)
        found = classification.outcome(arrays, runs, opts.seed, key=key, task=ds.task)
        attention = classification.test_attention(arrays, runs)
        if attention is not None:  # the set's item numbers
            attention = replace(attention, item=kept[attention.item])
        if opts.curve is not None:
            curve = class_curve(arrays, opts, opts.curve, where, found)

        def fit(seed: int) -> Outcome:
            again = classification.predict(arrays, replace(opts, seed=seed, seeds=()), which=refit)
            return classification.outcome(arrays, again, opts.seed, key=key, task=ds.task)

    seeds = run_seeds(where, opts, refit, fit, found)
    rows = [row for f in found.fitted for row in result_rows(where, f)] + curve.rows
    rows = [replace(r, seed=opts.seed) for r in rows] + seeds.rows
    left_out = tuple(f"{k}: {v}" for k, v in sorted(xs.attrs.get("skipped", {}).items()))
    return SetResult(
        path,
        where.feature_set,
        rows,
        examples,
        tuple(curve.skipped),
        left_out,
        attention,
        (*found.predictions, *curve.predictions, *seeds.predictions),
    )


def _positions(kept: np.ndarray, items: Sequence[int] | np.ndarray) -> np.ndarray:
    """Where each of the set's `items` lies among the `kept` ones (absent ones left out)."""
    items = np.asarray(items, np.int64)
    pos = np.searchsorted(kept, items)
    ok = (items >= 0) & (pos < len(kept))
    ok[ok] = kept[pos[ok]] == items[ok]
    return pos[ok]


def probe_pair(
    train: FoundCell, test: FoundCell, ev: ExternalTest, opts: ProbeOptions = ProbeOptions()
) -> SetResult:
    """The probes of the task fitted on `train`'s set (train split; val for the
    hyper-parameters) and scored on `test`'s set (its test split, or every item with
    `ev.split` "all"), test labels (masks) carried to the train dataset's classes by
    name (`featstore.data.evaluations.label_map`). Both sets are read from the cache;
    rows and kept predictions name both (`test_dataset`, `test_feature_set`). No
    label-efficiency points, examples or attention maps."""
    xa, xb = sets.open_set(train.path), sets.open_set(test.path)
    try:
        with threadpool_limits(limits=1):  # as `probe_set`
            return _probe_pair(train, test, xa, xb, ev, opts)
    except ChunkChecksumError as exc:  # a chunk of one of the two
        raise StoreCorruptError(
            f"a chunk failed to decode ({exc}) while {train.path} and {test.path} were "
            "read; run `featstore verify` on both to list the bad units, then `featstore "
            "extract --repair` with the same options"
        ) from None


def _probe_pair(
    train: FoundCell,
    test: FoundCell,
    xa: xr.Dataset,
    xb: xr.Dataset,
    ev: ExternalTest,
    opts: ProbeOptions,
) -> SetResult:
    (xa, _), (xb, _) = usable_items(train.path, xa), usable_items(test.path, xb)
    where, there = set_columns(xa, train.ds, opts), set_columns(xb, test.ds, opts)
    if replace(there, dataset=where.dataset, feature_set=where.feature_set) != where:
        raise ProbeError(
            f"{train.path} and {test.path} are of other encoders, resolutions, pools or "
            "tasks; an external evaluation needs one of each"
        )
    classes = label_map(train.ds, test.ds, ev)
    where = replace(where, test_dataset=test.ds.name, test_feature_set=there.feature_set)

    key = set_key(where, opts.seed)
    if train.ds.task == "segmentation":
        xs = external.join_sets(xa, xb, ev.split, classes)
        seg = seg_set(xs, train.ds, spacing_of(xb, test.ds))
        found, _ = probe_segmentation(seg, opts, [], key=key)
    else:
        a = classification.class_arrays(xa, train.ds, opts, need_test=False)
        b = classification.class_arrays(xb, test.ds, opts, need_test=False)
        joined = external.join(a, b, ev.split, classes)
        runs = classification.predict(joined, opts)
        found = classification.outcome(joined, runs, opts.seed, key=key, task=test.ds.task)
    rows = [replace(r, seed=opts.seed) for f in found.fitted for r in result_rows(where, f)]
    return SetResult(train.path, where.feature_set, rows, predictions=found.predictions)


def _external(
    manifest: Manifest,
    found_sets: Sequence[FoundCell],
    opts: ProbeOptions,
    out: Evaluation,
    on_set: Callable[[str, SetResult], object] | None,
) -> None:
    """Every external evaluation of `manifest` on each encoder x resolution cell where
    both datasets' sets were found, added to `out` (each one's cell left out of the
    grid: a note; a set not found: a problem line)."""
    at = {(c.ds.name, c.spec, c.resolution): c for c in found_sets}
    grid = {(c.dataset.name, c.encoder, c.resolution) for c in manifest.cells(opts.baseline)}
    for ev in manifest.evaluations:
        for cell in (c for c in found_sets if c.ds.name == ev.train):
            where = f"{ev.name}: {ev.train} -> {ev.test} / {cell.spec} @ {cell.resolution}px"
            other = at.get((ev.test, cell.spec, cell.resolution))
            if other is None and (ev.test, cell.spec, cell.resolution) not in grid:
                out.notes.append(
                    f"{where}: not run, {ev.test} is not probed at this encoder x resolution "
                    "(its `resolutions:` or the study's datasets leave it out)"
                )
                continue
            if other is None:
                out.problems.append(f"{where}: no set of {ev.test} to test on (see its line)")
                continue
            try:
                result = probe_pair(cell, other, ev, opts)
            except FeatstoreError as exc:
                out.problems.append(f"{where}: {exc}")
                continue
            out.results.append(result)
            if on_set is not None:
                on_set(where, result)


SEEDS_NOTE = (
    "--seeds refits only the probes whose fit draws from the seed: the segmentation "
    "decoder, every probe under --pool abmil (linear and kNN read its learnt pooling), "
    "the linear layer of protocol: seed; linear and kNN on fixed features are "
    "deterministic, fitted once, and have no seed rows"
)


@dataclass
class Evaluation:
    """What probing a manifest gave: scored sets, and the cells that could not be scored."""

    results: list[SetResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. a data folder that is absent

    @property
    def skipped(self) -> list[str]:
        """Label-efficiency points that were not drawn, with the reason."""
        return [s for r in self.results for s in r.skipped]

    @property
    def rows(self) -> list[ResultRow]:
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
        recorded = ", ".join(short(f) for f in found.stale)
        return (
            f"{where}: the data in {ds.path} changed since its feature set was extracted "
            f"(fingerprint {recorded} recorded, another now); re-extract it with {cmd}"
        )
    return f"{where}: no feature set in {manifest.cache}; make it with {cmd}"


@dataclass(frozen=True)
class FoundCell:
    """A manifest cell whose feature set was found, to probe."""

    where: str  # "dataset / encoder @ resolution px", for people
    spec: str  # the encoder as the manifest names it
    ds: Dataset
    path: Place
    resolution: int = 0


def one_label_each(cells: Sequence[FoundCell]) -> None:
    """A `ManifestError` when two encoders of the manifest would show as one: their sets'
    rows would share a cell (dataset, encoder label, random_init, resolution), so one
    would hide or supersede the other in results.csv, the report and its plots. Two
    checkpoint folders `a/model` and `b/model` both show as `model`."""
    seen: dict[tuple[str, str, bool, int], set[str]] = {}
    for c in cells:
        try:
            ident = SetIdentity.from_attrs(sets.FeatureSet(c.path).attrs["identity"])
        except (FeatstoreError, KeyError, TypeError):  # left to `probe_set`'s problem line
            continue
        assert ident.weights is not None  # from_attrs reads them
        cell = (c.ds.name, ident.weights.name, ident.weights.random_init, ident.recipe.resolution)
        seen.setdefault(cell, set()).add(c.spec)
    for (name, label, random_init, res), specs in seen.items():
        if len(specs) > 1:
            raise ManifestError(
                f"encoders {', '.join(repr(s) for s in sorted(specs))} all show as "
                f"'{labelled(label, random_init)}' ({name} @ {res}px): their results would "
                "share rows, report cells and plot lines; give each folder its own name "
                "(an encoder is labelled by its folder's name), or list them in separate "
                "manifests probed into separate --out folders"
            )


def probe_manifest(
    manifest: Manifest,
    opts: ProbeOptions,
    *,
    manifest_file: Path | None = None,
    on_set: Callable[[str, SetResult], object] | None = None,
    data_check: DataCheck | None = None,
) -> Evaluation:
    """Probe every cell of `manifest` whose feature set exists.

    A cell without a set, or whose dataset or set is bad, becomes a problem line
    (naming the command that fixes it) and the others are still probed. `on_set`
    is called with each (cell name, SetResult) as it is done. Label-efficiency points
    come from `opts.curve`, else from the manifest (`curves.manifest_curve`). `data_check` gives the
    fingerprint of each dataset's data where it is here; a set must then match it.
    Where it gives None (or is not passed) sets are found by their recorded identity
    alone, and a note says so.
    """
    out = Evaluation()
    reachable(place(manifest.cache))
    fingerprints: dict[str, str | None] = {}
    unreadable: set[str] = set()  # data here but not readable: one problem line each
    src = f" --manifest {shlex.quote(str(manifest_file))}" if manifest_file else ""
    found_sets: list[FoundCell] = []
    for cell in manifest.cells(opts.baseline):
        ds, spec, res = cell.dataset, cell.encoder, cell.resolution
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
        found_sets.append(FoundCell(where, spec, ds, found.path, res))
    one_label_each(found_sets)
    if opts.seeds:
        out.notes.append(SEEDS_NOTE)
    for found_cell in found_sets:
        where, ds = found_cell.where, found_cell.ds
        curve = opts.curve or manifest_curve(manifest, ds)
        try:
            result = probe_set(found_cell.path, ds, replace(opts, curve=curve))
        except FeatstoreError as exc:
            out.problems.append(f"{where}: {exc}")
            continue
        out.results.append(result)
        out.notes += [
            f"{where}: left out {line} (skipped at extraction)" for line in result.left_out
        ]
        if on_set is not None:
            on_set(where, result)
    _external(manifest, found_sets, opts, out, on_set)  # after the internal ones
    return out
