"""Feature sets: Zarr v3 groups that `xarray.open_zarr(path)` opens (no torch here).

Layout of one set (see DESIGN.md, "Feature set contract"):

    cls    (item, channel) or (item, layer, channel)   float16 | float32
    patch  (item, row, col, channel)                    float16 | float32
    mask   (item, y, x)                                 uint8, segmentation only
    label  (item,) or (item, class)                     int64, classification only
    coords on item: sample (str), slice (int32), split (str), native_* (size, spacing)
    thumbnail (example, thumb_y, thumb_x)             uint8, coord example_item
    _featstore/done (unit,)  uint8, one chunk per unit: the resume marks

A unit of work is one chunk of `chunk_items` items along `item`; its data is
written first and its mark after, so a killed run resumes at the first unmarked
unit. `complete: true` is written once every unit is marked and verified.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr
from zarr.codecs import Crc32cCodec
from zarr.core.array_spec import ArrayConfigParams

from featstore.errors import (
    StoreCorruptError,
    StoreIncompleteError,
    StoreMismatchError,
)
from featstore.identity import FORMAT_VERSION, SetIdentity, canonical
from featstore.store.location import (
    Place,
    Remote,
    files,
    place,
    publish,
)
from featstore.store.schema import (
    ITEM_DATA,
    MARKS,
    Items,
    Layout,
    layout_for,
    root_attrs,
    skeleton,
)

LOCAL_BUILD = "featstore-build-"  # + pid: local folders where remote skeletons are built


def store_path(cache: Place | str, key: str) -> Place:
    """Where the set with cache key `key` lives under `cache` (a folder or a URL)."""
    return place(cache) / f"{key[:24]}.zarr"


def _diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: stored {va!r}, requested {vb!r}")
    return out


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
    `compute` how its units are computed (see `integrity.check_compute`).
    The set is built in a temporary sibling folder and renamed into place, so another
    process (a second --shard) sees either nothing or a whole skeleton. Returns False
    when another process created `path` first (its skeleton is kept).
    """
    ds, encoding = skeleton(layout, items)
    ds.attrs.update(root_attrs(ident, layout, describe, compute))
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(path, Remote):  # built here, uploaded whole by `publish`
        tmp = Path(tempfile.mkdtemp(prefix=f"{LOCAL_BUILD}{os.getpid()}-")) / path.name
    else:  # a sibling, so that `publish` is one atomic rename
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
    ds.to_zarr(
        tmp,
        mode="w-",
        compute=False,
        zarr_format=3,
        encoding=encoding,
        consolidated=False,
        write_empty_chunks=True,  # every chunk on disk: a missing one is damage, not zeros
    )
    root = zarr.open_group(tmp, mode="r+")
    root.create_group("_featstore").create_array(
        "done",
        shape=(layout.n_units,),
        chunks=(1,),
        dtype="uint8",
        fill_value=0,
        compressors=[Crc32cCodec()],
    )
    published = publish(tmp, path)  # False: another shard won the race; use its skeleton
    if isinstance(path, Remote):
        shutil.rmtree(tmp.parent, ignore_errors=True)
    return published


def read_attrs(path: Place) -> dict[str, Any]:
    """The root attributes of the set at `path`.

    Raises StoreCorruptError when its zarr.json is not valid JSON, FileNotFoundError
    when there is no set.
    """
    meta = place(path) / "zarr.json"
    try:
        return dict(zarr.open_group(str(path), mode="r", use_consolidated=False).attrs)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreCorruptError(
            f"{meta} is not valid JSON ({exc}); the set cannot be trusted: re-extract it "
            "with --overwrite"
        ) from None


def arrays(root: zarr.Group, prefix: str = "") -> Iterator[tuple[str, zarr.Array]]:
    """(name, array) of every array under `root`, nested groups included, by name."""
    for name, node in sorted(root.members()):
        if isinstance(node, zarr.Array):
            yield prefix + name, node
        else:
            yield from arrays(node, f"{prefix}{name}/")


def chunk_key(name: str, arr: zarr.Array, unit: int) -> str:
    """The file of chunk `unit` (along the first axis) of array `name`, relative to
    the set's folder."""
    coords = (unit,) + (0,) * (arr.ndim - 1)
    return f"{name}/{arr.metadata.encode_chunk_key(coords)}"


def missing_chunks(path: Place, present: set[str] | None = None) -> list[str]:
    """'<array> unit <u>: chunk file missing' for every absent chunk of a complete set.

    present: `location.files(path)` when the caller has listed the set already.
    """
    root = zarr.open_group(str(path), mode="r", use_consolidated=False)
    present = files(path) if present is None else present  # one listing, not one per chunk
    out = []
    for name, arr in arrays(root):
        for unit in range(-(-arr.shape[0] // arr.chunks[0])):
            if chunk_key(name, arr, unit) not in present:
                out.append(f"{name} unit {unit}: chunk file missing")
    return out


def absent_arrays(path: Place, attrs: dict[str, Any], present: set[str] | None = None) -> list[str]:
    """'metadata: array ...' for each array of the recorded layout whose zarr.json is
    gone (zarr would skip it, and a re-consolidation would drop it for good).

    present: `location.files(path)` when the caller has listed the set already.
    """
    try:
        names = Layout.from_attrs(attrs.get("layout")).arrays()
    except (TypeError, ValueError):
        return []  # a malformed layout is an `attribute_problems` line
    present = files(path) if present is None else present
    return [
        f"metadata: array '{name}' is missing (no {name}/zarr.json); re-extract with --overwrite"
        for name in names
        if f"{name}/zarr.json" not in present
    ]


def attribute_problems(path: Place, attrs: dict[str, Any]) -> list[str]:
    """Root attributes that disagree with the recorded identity or the folder name."""
    if attrs.get("featstore_format") != FORMAT_VERSION:
        return [f"attributes: {_old_format(path, attrs)}"]
    try:
        ident = SetIdentity.from_attrs(attrs["identity"])
        key = ident.key()
    except (KeyError, TypeError, ValueError) as exc:
        return [f"attributes: the recorded identity is missing or malformed ({exc!r})"]
    out = []
    edited = "(the attributes were edited: re-extract with --overwrite)"
    if attrs.get("cache_key") != key or place(path).name != f"{key[:24]}.zarr":
        out.append(
            f"attributes: the recorded identity hashes to {key[:24]}, but cache_key is "
            f"{str(attrs.get('cache_key'))[:24]} and the folder {place(path).name} {edited}"
        )
    assert ident.weights is not None  # from_attrs always sets it
    copies = {"encoder": ident.weights.to_dict(), "preprocess": ident.preprocess().to_dict()}
    for name, value in copies.items():
        if attrs.get(name) != canonical(value):
            out.append(f"attributes: '{name}' disagrees with the recorded identity {edited}")
    try:  # the shapes follow from the identity; only the counts and chunking are free
        rec = Layout.from_attrs(attrs.get("layout"))
        chunks = (rec.chunk_items, rec.chunk_items)
        derived = layout_for(ident, rec.n_items, rec.n_classes, *chunks, rec.codec, rec.examples)
        if derived != rec:
            out.append(f"attributes: 'layout' disagrees with the recorded identity {edited}")
    except (TypeError, ValueError) as exc:
        out.append(f"attributes: 'layout' is malformed ({exc}) {edited}")
    mine = {k: v for k, v in ident.request().items() if k != "encoder"}
    for req in attrs.get("requests", []):
        if {k: v for k, v in req.items() if k != "encoder"} != mine:
            out.append(f"attributes: a recorded request asks for other content {edited}")
            break
    return out


def skipped_problems(path: Place, attrs: dict[str, Any]) -> list[str]:
    """`skipped` must name exactly the samples whose items hold NaN features."""
    root = zarr.open_group(str(path), mode="r", use_consolidated=False)
    cls = np.asarray(_array(root, "cls")[:], np.float32)
    nan = ~np.isfinite(cls.reshape(len(cls), -1)).all(1)
    sample = plain(np.asarray(_array(root, "sample")[:]))
    listed = np.isin(sample, list(attrs.get("skipped", {})))
    written = np.ones(len(sample), bool)
    layout = Layout.from_attrs(attrs["layout"])
    for unit in pending_units(path):  # not written yet: NaN fill, not a skipped sample
        written[layout.unit_slice(unit)] = False
    disagree = (nan != listed) & written
    if not disagree.any():
        return []
    wrong = sorted({str(v) for v in sample[disagree]})[:5]
    return [
        f"attributes: 'skipped' disagrees with the features of samples {wrong} (NaN items "
        "belong to skipped samples only; the attributes were edited: re-extract with --overwrite)"
    ]


def check_matches(path: Place, ident: SetIdentity, layout: Layout | None = None) -> None:
    """Raise `StoreMismatchError` when the set at `path` was made for something else.

    layout None: check the identity only (a complete set keeps its own chunking).
    """
    attrs = read_attrs(path)
    if attrs.get("featstore_format") != FORMAT_VERSION:
        raise _old_format(path, attrs)
    stored = SetIdentity.from_attrs(attrs["identity"])
    diffs = _diff(stored.content(), ident.content())
    if layout is not None:
        diffs += _diff(attrs.get("layout", {}), asdict(layout), "layout.")
    if diffs:
        hint = (
            "the chunk size follows --batch-size: rerun with the stored one, or "
            if any(d.startswith("layout.chunk_items") for d in diffs)
            else ""
        )
        raise StoreMismatchError(
            f"{path} holds a feature set with another configuration:\n  "
            + "\n  ".join(diffs)
            + f"\n{hint}pass --overwrite to replace it (its features will be deleted)"
        )


def _old_format(path: Place, attrs: dict[str, Any]) -> StoreMismatchError:
    return StoreMismatchError(
        f"{path} was written by another featstore format "
        f"({attrs.get('featstore_format')!r}, this one reads {FORMAT_VERSION}); "
        "re-extract it with `featstore extract` (the old folder can then be deleted)"
    )


def record_skipped(path: Place, skipped: dict[str, str]) -> None:
    """Add unreadable samples (id -> reason) to the set's `skipped` attribute."""
    if not skipped:
        return
    root = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    attrs: dict[str, Any] = dict(root.attrs)
    root.attrs["skipped"] = {**attrs.get("skipped", {}), **skipped}


def discard_partials(path: Place, units: Sequence[int]) -> int:
    """Delete half-written chunk files (zarr's `*.partial` temporaries) of `units`.

    A killed writer can leave one behind; it is never part of the data, but it would
    linger beside the chunk that the resumed run writes. Only the given units' files
    are touched, so a concurrent shard's in-flight writes are left alone.
    """
    if isinstance(path, Remote):
        return 0  # an object is written by one PUT: an object store has no temporaries
    wanted = {str(u) for u in units}
    removed = 0
    for rel in sorted(files(path)):
        if not rel.endswith(".partial"):
            continue
        for name in ("cls", "patch", "mask", MARKS):
            if rel.startswith(f"{name}/c/"):
                unit = rel[len(name) + 3 :].split("/")[0].split(".")[0]
                if unit in wanted:
                    (place(path) / rel).unlink(missing_ok=True)
                    removed += 1
    return removed


def pending_units(path: Place) -> list[int]:
    """The units of the set at `path` not yet marked done, in order."""
    done = zarr.open_array(str(place(path) / MARKS), mode="r")[:]
    return [int(u) for u in np.flatnonzero(done == 0)]


def _array(group: zarr.Group, name: str) -> zarr.Array:
    """The array `name` of a set's group (zarr types members as array or group)."""
    node = group[name]
    if not isinstance(node, zarr.Array):
        raise StoreIncompleteError(
            f"{group.store_path}/{name}: a group where a feature-set array belongs; "
            "re-extract with --overwrite"
        )
    return node


class UnitWriter:
    """Writes whole units into an allocated set; arrays are opened once, not per unit."""

    def __init__(self, path: Place, layout: Layout):
        root = zarr.open_group(str(path), mode="r+", use_consolidated=False)
        self.layout = layout
        # Chunks equal to the fill value (an all-background mask) are written too:
        # on disk, every chunk exists, so a missing one is always damage.
        full: ArrayConfigParams = {"write_empty_chunks": True}
        self.arrays = {
            name: _array(root, name).with_config(full) for name in ITEM_DATA if name in root
        }
        self.marks = _array(root, MARKS).with_config(full)

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
            arr[region] = data.astype(arr.dtype, copy=False)
            nbytes += data.size * arr.dtype.itemsize
        self.marks[unit] = 1
        return nbytes


def mark_complete(path: Place) -> None:
    """Write `complete: true` and consolidated metadata (after `integrity.finish` checks)."""
    root = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    root.attrs["complete"] = True
    root.attrs["completed"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    _consolidate(path)


def _consolidate(path: Place) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(str(path))


def add_request(path: Place, request: dict[str, Any]) -> None:
    """Record another request that this (complete) set answers, so probe finds it by it."""
    root = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    attrs: dict[str, Any] = dict(root.attrs)
    requests = list(attrs.get("requests", []))
    if canonical(request) not in requests:
        root.attrs["requests"] = [*requests, canonical(request)]
        _consolidate(path)


def open_set(path: Place | str) -> xr.Dataset:
    """Open a complete, trusted feature set: data lazy (dask), coordinates in memory.

    Checked here (cheaply, on every open): the format, that the attributes agree with
    the recorded identity, and that every chunk of every array is on disk. Every chunk
    read later checks its own crc32c. Consolidated metadata is not used: reads go by
    each array's own metadata.
    """
    path = place(path)
    if not (path / "zarr.json").is_file():
        raise StoreIncompleteError(f"{path}: no feature set here; run `featstore extract` first")
    attrs = read_attrs(path)
    if attrs.get("featstore_format") != FORMAT_VERSION:
        raise _old_format(path, attrs)
    if not attrs.get("complete"):
        raise StoreIncompleteError(
            f"{path} is incomplete (an extract was interrupted); rerun "
            "the same `featstore extract` to resume it"
        )
    present = files(path)  # one listing for both checks
    problems = absent_arrays(path, attrs, present) + attribute_problems(path, attrs)
    problems += missing_chunks(path, present)
    if problems:
        raise StoreCorruptError(
            f"{path} cannot be trusted:\n  "
            + "\n  ".join(problems[:10])
            + f"\nrun `featstore verify {path}` for every problem, then "
            "`featstore extract --repair` (or --overwrite) with the same options"
        )
    try:
        ds = xr.open_zarr(str(path), consolidated=False)
        # Coordinates are small: in memory (plain '<U' strings, not zarr's StringDType,
        # which pandas and xarray's groupby reject), `groupby("sample")` just works.
        loaded = {name: (ds[name].dims, plain(ds[name].values)) for name in ds.coords}
    except ValueError as exc:  # a coordinate chunk failed its checksum
        raise corrupt(path, exc) from None
    ds = ds.assign_coords(loaded)
    if "patch_scale" in ds:  # int8 x per-channel scale, dequantized lazily
        ds["patch"] = (ds.patch.astype(np.float32) * ds.patch_scale).transpose(*ds.patch.dims)
        ds = ds.drop_vars("patch_scale")
    return ds


def corrupt(path: Place, exc: BaseException) -> StoreCorruptError:
    """The error for a chunk of `path` that failed to decode while being read."""
    return StoreCorruptError(
        f"{path}: a chunk failed to decode ({exc}); run `featstore verify {path}` to "
        "list the bad units, then `featstore extract --repair` with the same options"
    )


def plain(values: np.ndarray) -> np.ndarray:
    """Strings (zarr's StringDType or objects) as a plain '<U' array; others as they are."""
    values = np.asarray(values)
    if values.dtype.kind in ("T", "O"):
        return np.array(values.tolist(), dtype=str)
    return values
