"""Zarr-level reads and writes of one feature set (no torch, no checks of trust).

Layout of one set (docs/cache.md, "Feature sets"; `schema` derives every name):

    cls    (item, channel) or (item, layer, channel)   float16 | float32
    patch  (item, row, col, channel)                    float16 | float32 | int8
    patch_scale (item, channel)                         float32, int8 patches only
    mask   (item, y, x)                                 uint8, segmentation only
    label  (item,) or (item, class)                     int64, classification only
    coords on item: sample (str), slice (int32), split (str), metadata columns
    _featstore/done (unit,)  uint8, one chunk per unit (not sharded): the resume marks

A unit of work is one zarr shard of `unit_items` items along `item` (of
`shard_chunks` chunks, each with its checksum): one object per array, written whole
by one writer (zarr rewrites a shard whole, so two writers never share one). Its data
is written first and its mark after, so a killed run resumes at the first unmarked
unit. `complete: true` is written once every unit is marked and checked. The
`FeatureSet` handle (`store.sets`) is the only caller outside the store.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.array_spec import ArrayConfigParams
from zarr.core.common import AccessModeLiteral

from featstore.errors import ChunkChecksumError, StoreCorruptError, is_read_only
from featstore.identity import SetIdentity, canonical
from featstore.places import Place, Remote, place
from featstore.store.location import leftover, publish
from featstore.store.schema import (
    CHECKSUM,
    ITEM_DATA,
    MARKS,
    UNIT_ARRAYS,
    Items,
    Layout,
    item_arrays,
    root_attrs,
    skeleton,
)

LOCAL_BUILD = "featstore-build-"  # + pid: local folders where remote skeletons are built
# Chunks equal to the fill value (an all-background mask) are written too: on disk,
# every chunk exists, so a missing one is always damage.
FULL: ArrayConfigParams = {"write_empty_chunks": True}


def create(
    path: Place,
    ident: SetIdentity,
    layout: Layout,
    items: Items,
    describe: dict[str, Any],
    compute: dict[str, str] | None = None,
) -> bool:
    """Allocate an empty feature set (attributes, coordinates, labels, marks).

    Data variables are allocated, not written: each unit fills its own chunk later.
    `describe` holds readable facts about the dataset (name, format, path, ...);
    `compute` how its units are computed (see `mismatch.check_compute`).
    The set is built in a temporary sibling folder and renamed into place, so another
    process (a second --shard) sees either nothing or a whole skeleton. Returns False
    when another process created `path` first (its skeleton is kept).
    """
    xs, encoding = skeleton(layout, items)
    xs.attrs.update(root_attrs(ident, layout, describe, compute))
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(path, Remote):  # built here, uploaded whole by `publish`
        tmp = Path(tempfile.mkdtemp(prefix=f"{LOCAL_BUILD}{os.getpid()}-")) / path.name
    else:  # a sibling, so that `publish` is one atomic rename
        tmp = leftover(path, "tmp")
        shutil.rmtree(tmp, ignore_errors=True)
    xs.to_zarr(
        tmp,
        mode="w-",
        compute=False,
        zarr_format=3,
        encoding=encoding,
        consolidated=False,
        write_empty_chunks=True,  # every chunk on disk: a missing one is damage, not zeros
    )
    folder, name = MARKS.rsplit("/", 1)
    zarr.open_group(tmp, mode="r+").create_group(folder).create_array(
        name, shape=(layout.n_units,), chunks=(1,), dtype="uint8", fill_value=0,
        compressors=[CHECKSUM],
    )  # fmt: skip
    published = publish(tmp, path)  # False: another shard won the race; use its skeleton
    if isinstance(path, Remote):
        shutil.rmtree(tmp.parent, ignore_errors=True)
    return published


def group(path: Place, mode: AccessModeLiteral = "r") -> zarr.Group:
    """The set's root group, read by each array's own metadata (never consolidated)."""
    return zarr.open_group(str(path), mode=mode, use_consolidated=False)


def read_attrs(path: Place) -> dict[str, Any]:
    """The root attributes of the set at `path`.

    Raises StoreCorruptError when its zarr.json is not valid JSON, FileNotFoundError
    when there is no set.
    """
    try:
        return dict(group(path).attrs)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreCorruptError(
            f"{place(path) / 'zarr.json'} is not valid JSON ({exc}); the set cannot be "
            "trusted: re-extract it with --overwrite"
        ) from None


def array(root: zarr.Group, name: str) -> zarr.Array[Any]:
    """The array `name` of a set's group (a path like '_featstore/done' allowed)."""
    node = root[name]
    if not isinstance(node, zarr.Array):
        raise StoreCorruptError(
            f"{root.store_path}/{name}: a group where a feature-set array belongs; "
            "re-extract with --overwrite"
        )
    return node


def arrays(root: zarr.Group, prefix: str = "") -> Iterator[tuple[str, zarr.Array[Any]]]:
    """(name, array) of every array under `root`, nested groups included, by name."""
    for name, node in sorted(root.members()):
        if isinstance(node, zarr.Array):
            yield prefix + name, node
        else:
            yield from arrays(node, f"{prefix}{name}/")


def chunk_key(name: str, arr: zarr.Array[Any], unit: int) -> str:
    """The file of unit `unit` (its shard, or chunk where unsharded, along the first
    axis) of array `name`, relative to the set's folder."""
    coords = (unit,) + (0,) * (arr.ndim - 1)
    return f"{name}/{arr.metadata.encode_chunk_key(coords)}"


def pending_units(path: Place) -> list[int]:
    """The units of the set at `path` not yet marked done, in order; a mark whose
    chunk fails its checksum counts as not done (the unit is written again)."""
    marks = array(group(path), MARKS)
    try:
        done = np.asarray(marks[:])
    except ChunkChecksumError:
        done = np.array([_mark(marks, u) for u in range(marks.shape[0])])
    return [int(u) for u in np.flatnonzero(done == 0)]


def _mark(marks: zarr.Array[Any], unit: int) -> int:
    try:
        return int(np.asarray(marks[unit]))
    except ChunkChecksumError:
        return 0


def record_skipped(path: Place, skipped: dict[str, str]) -> None:
    """Add unreadable samples (id -> reason) to the set's `skipped` attribute."""
    if not skipped:
        return
    root = group(path, "r+")
    attrs: dict[str, Any] = dict(root.attrs)
    root.attrs["skipped"] = {**attrs.get("skipped", {}), **skipped}


def blank_samples(path: Place, layout: Layout, ids: Sequence[str]) -> int:
    """Give every item of samples `ids` the values of a skipped item (NaN features,
    zero int8 patches and masks); returns the units rewritten.

    A slide decoded tile run by tile run can fail part-way (one tile unreadable),
    after other runs of it were written with features, possibly by another shard or
    worker; called once every unit is written, this makes the whole sample skipped,
    so that `skipped` names exactly the samples whose items hold NaN.
    """
    root = group(path, "r+")
    rows = np.isin(plain(np.asarray(array(root, "sample")[:])), list(ids))
    units = sorted({int(i) // layout.unit_items for i in np.flatnonzero(rows)})
    names = [n for n in layout.unit_arrays() if n != MARKS]
    cls = array(root, "cls")
    rewritten = 0
    for unit in units:
        region = layout.unit_slice(unit)
        sel = rows[region]
        block = np.asarray(cls[region], np.float32)
        if not np.isfinite(block[sel]).any():
            continue  # already blank: every item of these samples in this unit failed
        for name in names:
            arr = array(root, name).with_config(FULL)
            data = np.asarray(arr[region])
            data[sel] = np.nan if data.dtype.kind == "f" else 0
            arr[region] = data
        rewritten += 1
    return rewritten


def discard_partials(path: Place, present: set[str], units: Sequence[int]) -> int:
    """Delete half-written shard files (zarr's `*.partial` temporaries) of `units`.

    A killed writer can leave one behind; it is never part of the data, but it would
    linger beside the chunk that the resumed run writes. Only the given units' files
    are touched, so a concurrent shard's in-flight writes are left alone.
    present: the set's listing (`location.files`).
    """
    wanted = {str(u) for u in units}
    removed = 0
    for rel in sorted(r for r in present if r.endswith(".partial")):
        for name in UNIT_ARRAYS:
            if rel.startswith(f"{name}/c/"):
                unit = rel[len(name) + 3 :].split("/")[0].split(".")[0]
                if unit in wanted:
                    (place(path) / rel).unlink(missing_ok=True)
                    removed += 1
    return removed


class UnitWriter:
    """Writes whole units into an allocated set; arrays are opened once, not per unit."""

    def __init__(self, path: Place, layout: Layout):
        root = group(path, "r+")
        self.layout = layout
        self.arrays = {
            name: array(root, name).with_config(FULL) for name in ITEM_DATA if name in root
        }
        self.marks = array(root, MARKS).with_config(FULL)
        self.path = path

    def write(
        self,
        unit: int,
        cls: np.ndarray,
        patch: np.ndarray | None,
        mask: np.ndarray | None,
        patch_scale: np.ndarray | None = None,
    ) -> int:
        """Write one unit into its own chunks, then mark it done. Returns bytes written.

        cls: (n, channel) or (n, layer, channel); patch: (n, rows, cols, channel), both
        cast to the set's dtype (float16 | float32); mask: (n, y, x) uint8; n = the
        unit's item count.
        """
        region = self.layout.unit_slice(unit)
        nbytes = 0
        data_of = {"cls": cls, "patch": patch, "mask": mask, "patch_scale": patch_scale}
        for name, data in data_of.items():
            if data is None or name not in self.arrays:
                continue
            arr = self.arrays[name]
            expected = (region.stop - region.start, *arr.shape[1:])
            if data.shape != expected:  # zarr would silently crop a wider array
                raise ValueError(f"{name}: got {data.shape} for unit {unit}, expected {expected}")
            # zarr writes into a shard by reading what is there first: a shard left by a
            # killed run (or damaged) is deleted, so the unit's shard is written whole
            (self.path / chunk_key(name, arr, unit)).unlink(missing_ok=True)
            arr[region] = data.astype(arr.dtype, copy=False)
            nbytes += data.size * arr.dtype.itemsize
        self.marks[unit] = 1
        return nbytes


def reset_units(path: Place, units: list[int]) -> None:
    """Forget `units`: delete their data shards and marks, and unmark the set complete.

    A unit is one shard: the whole object goes, so the rerun writes it whole again
    (never a read-modify-write of a damaged shard)."""
    root = group(path, "r+")
    for name in UNIT_ARRAYS:
        if name not in root:
            continue
        arr = array(root, name)
        for unit in units:
            (path / chunk_key(name, arr, unit)).unlink(missing_ok=True)
    root.attrs["complete"] = False


def rewrite_items(path: Place, items: Items, names: list[str]) -> None:
    """Rewrite coordinate/label arrays `names` whole from `items` (allocation-time data)."""
    root = group(path, "r+")
    fresh = item_arrays(items)
    for name in names:
        if name not in fresh:
            raise StoreCorruptError(f"{path}: cannot rebuild '{name}'; re-extract with --overwrite")
        arr = array(root, name)
        if arr.shards is not None:  # written whole, never read first (a shard is damaged)
            for unit in range(-(-arr.shape[0] // arr.shards[0])):
                (path / chunk_key(name, arr, unit)).unlink(missing_ok=True)
        arr.with_config(FULL)[...] = fresh[name]


def mark_complete(path: Place) -> None:
    """Write `complete: true` and consolidated metadata (after the checks of `finish`)."""
    root = group(path, "r+")
    root.attrs["complete"] = True
    root.attrs["completed"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    consolidate(path)


def consolidate(path: Place) -> None:
    """Rewrite the consolidated copy of every array's metadata in the root zarr.json."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(str(path))


def add_request(path: Place, request: dict[str, Any]) -> None:
    """Record another request that this (complete) set answers, so probe finds it by it.

    Nothing is written when it is recorded already. On a read-only cache the request
    is not recorded (skipped, not an error): a probe of that request finds the set
    only once an extract with write access has recorded it."""
    requests = list(read_attrs(path).get("requests", []))
    if canonical(request) in requests:
        return
    try:
        root = group(path, "r+")
        root.attrs["requests"] = [*requests, canonical(request)]
        consolidate(path)
    except OSError as exc:
        if not is_read_only(exc):
            raise


def plain(values: np.ndarray) -> np.ndarray:
    """Strings (zarr's StringDType or objects) as a plain '<U' array; others as they are."""
    values = np.asarray(values)
    if values.dtype.kind in ("T", "O"):
        return np.array(values.tolist(), dtype=str)
    return values
