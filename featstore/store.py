"""Feature sets: Zarr v3 groups that `xarray.open_zarr(path)` opens (no torch here).

Layout of one set (see DESIGN.md, "Feature set contract"):

    cls    (item, channel) or (item, layer, channel)   float16 | float32
    patch  (item, row, col, channel)                    float16 | float32
    mask   (item, y, x)                                 uint8, segmentation only
    label  (item,) or (item, class)                     int64, classification only
    coords on item: sample (str), slice (int32), split (str)
    _featstore/done (unit,)  uint8, one chunk per unit: the resume marks

A unit of work is one chunk of `chunk_items` items along `item`; its data is
written first and its mark after, so a killed run resumes at the first unmarked
unit. `complete: true` is written once every unit is marked and verified.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr
from zarr.codecs import BloscCodec

from featstore.errors import StoreIncompleteError, StoreMismatchError
from featstore.identity import FORMAT_VERSION, SetIdentity, canonical

MARKS = "_featstore/done"
# Chosen by benchmarks/codecs.py on ViT features: blosc-zstd with bit-shuffle
# compresses float16 tokens better than zstd alone at similar speed.
CODEC = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
UNIT_BYTES = 64 << 20  # cap on a unit's patch chunk
VERSIONED = ("torch", "transformers", "zarr", "xarray", "numpy", "scikit-learn")


@dataclass(frozen=True)
class Layout:
    """Shapes of one feature set; everything else follows from these numbers."""

    n_items: int
    chunk_items: int
    channels: int
    layers: int  # 1: cls is (item, channel)
    rows: int  # patch grid; 0 when patch tokens are not stored
    cols: int
    mask_size: int  # 0 without masks
    n_classes: int  # 0: single label (item,); k: multi-hot (item, k); -1: no label
    dtype: str

    @property
    def n_units(self) -> int:
        """Number of units (= chunks along `item`); the last one may be short."""
        return -(-self.n_items // self.chunk_items)

    def unit_slice(self, unit: int) -> slice:
        """The items of `unit`, as a slice along `item`."""
        return slice(unit * self.chunk_items, min((unit + 1) * self.chunk_items, self.n_items))


def layout_for(
    ident: SetIdentity, n_items: int, n_classes: int, batch_size: int, unit_items: int
) -> Layout:
    """Shapes of a set; a unit (= one chunk) is a whole number of batches, its patch
    chunk capped at `UNIT_BYTES`. n_classes: 0 single label, k multi-hot, -1 none."""
    w = ident.weights
    r = ident.recipe
    if w is None:
        raise ValueError("layout_for needs the loaded encoder: ident.with_weights(info)")
    grid = r.resolution // w.patch_size
    per_item = (grid * grid if r.patch else 1) * w.hidden_size * np.dtype(r.dtype).itemsize
    batches = max(1, min(-(-unit_items // batch_size), UNIT_BYTES // (batch_size * per_item)))
    return Layout(
        n_items=n_items,
        chunk_items=batch_size * batches,
        channels=w.hidden_size,
        layers=r.layers,
        rows=grid if r.patch else 0,
        cols=grid if r.patch else 0,
        mask_size=r.resolution if r.task == "segmentation" else 0,
        n_classes=n_classes,
        dtype=r.dtype,
    )


@dataclass(frozen=True)
class Items:
    """Per-item coordinates and labels of a set, in item order.

    labels: (n,) or (n, classes) int64, or None for segmentation; metadata: extra
    per-item coordinates (numeric when every value parses as one).
    """

    sample: Sequence[str]
    slice: Sequence[int]
    split: Sequence[str]
    labels: np.ndarray | None
    metadata: dict[str, Sequence[str]] = field(default_factory=dict)


def store_path(cache: Path, key: str) -> Path:
    """Where the set with cache key `key` lives under `cache`."""
    return Path(cache) / f"{key[:24]}.zarr"


def _diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: stored {va!r}, requested {vb!r}")
    return out


def versions() -> dict[str, str]:
    """Installed versions of featstore and the packages that shape the features."""
    out = {}
    for name in ("featstore", *VERSIONED):
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _attrs(ident: SetIdentity, layout: Layout, describe: dict[str, Any]) -> dict[str, Any]:
    """Root attributes: the identity (machine-readable) and readable copies of it."""
    assert ident.weights is not None
    return canonical(
        {
            "featstore_format": FORMAT_VERSION,
            "cache_key": ident.key(),
            "identity": ident.to_attrs(),
            "requests": [ident.request()],
            "dataset": {**describe, "fingerprint": ident.recipe.dataset},
            "encoder": ident.weights.to_dict(),
            "preprocess": ident.preprocess().to_dict(),
            "storage": {
                "dtype": layout.dtype,
                "codec": CODEC.to_dict(),
                "chunk_items": layout.chunk_items,
            },
            "layout": asdict(layout),
            "versions": versions(),
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "complete": False,
        }
    )


def _skeleton(layout: Layout, items: Items) -> tuple[xr.Dataset, dict[str, Any]]:
    """The empty dataset (lazy data variables, real coordinates) and its encoding."""
    n, c = layout.n_items, layout.chunk_items
    cls_dims = ("item", "channel") if layout.layers == 1 else ("item", "layer", "channel")
    cls_shape = (n, layout.channels) if layout.layers == 1 else (n, layout.layers, layout.channels)
    variables: dict[str, Any] = {
        "cls": (cls_dims, da.empty(cls_shape, dtype=layout.dtype, chunks=c))
    }
    if layout.rows:
        patch_shape = (n, layout.rows, layout.cols, layout.channels)
        variables["patch"] = (
            ("item", "row", "col", "channel"),
            da.empty(patch_shape, dtype=layout.dtype, chunks=(c, -1, -1, -1)),
        )
    if layout.mask_size:
        mask_shape = (n, layout.mask_size, layout.mask_size)
        variables["mask"] = (
            ("item", "y", "x"),
            da.empty(mask_shape, dtype="uint8", chunks=(c, -1, -1)),
        )
    if items.labels is not None:
        labels = items.labels
        variables["label"] = (("item",) if labels.ndim == 1 else ("item", "class"), labels)
    coords: dict[str, Any] = {
        "sample": ("item", np.asarray(items.sample, dtype=object)),
        "slice": ("item", np.asarray(items.slice, dtype=np.int32)),
        "split": ("item", np.asarray(items.split, dtype=object)),
    }
    for name, values in items.metadata.items():
        try:
            coords[name] = ("item", np.asarray(values, dtype=np.float64))
        except ValueError:
            coords[name] = ("item", np.asarray(values, dtype=object))
    ds = xr.Dataset(variables, coords=coords)
    encoding = {
        str(name): {"compressors": [CODEC], "chunks": var.data.chunksize}
        for name, var in ds.data_vars.items()
        if name != "label"
    }
    for name in ("cls", "patch"):
        if name in encoding:
            encoding[name]["fill_value"] = np.nan  # a missing chunk reads as NaN: verify sees it
    return ds, encoding


def create(
    path: Path, ident: SetIdentity, layout: Layout, items: Items, describe: dict[str, Any]
) -> bool:
    """Allocate an empty feature set (attributes, coordinates, labels, marks).

    Data variables are allocated, not written: each unit fills its own chunk later.
    `describe` holds readable facts about the dataset (name, format, path, ...).
    The set is built in a temporary sibling folder and renamed into place, so another
    process (a second --shard) sees either nothing or a whole skeleton. Returns False
    when another process created `path` first (its skeleton is kept).
    """
    ds, encoding = _skeleton(layout, items)
    ds.attrs.update(_attrs(ident, layout, describe))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    ds.to_zarr(tmp, mode="w-", compute=False, zarr_format=3, encoding=encoding, consolidated=False)
    root = zarr.open_group(tmp, mode="r+")
    root.create_group("_featstore").create_array(
        "done", shape=(layout.n_units,), chunks=(1,), dtype="uint8", fill_value=0
    )
    try:
        os.rename(tmp, path)
    except OSError:  # another shard won the race: use its skeleton
        shutil.rmtree(tmp)
        return False
    return True


def read_attrs(path: Path) -> dict[str, Any]:
    """The root attributes of the set at `path` (KeyError/FileNotFoundError if none)."""
    return dict(zarr.open_group(path, mode="r", use_consolidated=False).attrs)


def check_matches(path: Path, ident: SetIdentity, layout: Layout | None = None) -> None:
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


def _old_format(path: Path, attrs: dict[str, Any]) -> StoreMismatchError:
    return StoreMismatchError(
        f"{path} was written by another featstore format "
        f"({attrs.get('featstore_format')!r}, this one reads {FORMAT_VERSION}); "
        "re-extract it with `featstore extract` (the old folder can then be deleted)"
    )


def replace_aside(path: Path) -> None:
    """Delete a set so that a kill midway leaves either the whole old set or nothing:
    it is renamed aside first (one atomic step), then removed."""
    aside = path.with_name(f".{path.name}.old{os.getpid()}")
    os.rename(path, aside)
    shutil.rmtree(aside)


def record_skipped(path: Path, skipped: dict[str, str]) -> None:
    """Add unreadable samples (id -> reason) to the set's `skipped` attribute."""
    if not skipped:
        return
    root = zarr.open_group(path, mode="r+", use_consolidated=False)
    attrs: dict[str, Any] = dict(root.attrs)
    root.attrs["skipped"] = {**attrs.get("skipped", {}), **skipped}


def discard_partials(path: Path, units: Sequence[int]) -> int:
    """Delete half-written chunk files (zarr's `*.partial` temporaries) of `units`.

    A killed writer can leave one behind; it is never part of the data, but it would
    linger beside the chunk that the resumed run writes. Only the given units' files
    are touched, so a concurrent shard's in-flight writes are left alone.
    """
    wanted = {str(u) for u in units}
    removed = 0
    for name in ("cls", "patch", "mask", MARKS):
        chunks = Path(path) / name / "c"
        for f in chunks.rglob("*.partial") if chunks.is_dir() else ():
            if f.relative_to(chunks).parts[0].split(".")[0] in wanted:
                f.unlink()
                removed += 1
    return removed


def pending_units(path: Path) -> list[int]:
    """The units of the set at `path` not yet marked done, in order."""
    done = zarr.open_array(path / MARKS, mode="r")[:]
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

    def __init__(self, path: Path, layout: Layout):
        root = zarr.open_group(path, mode="r+", use_consolidated=False)
        self.layout = layout
        self.arrays = {
            name: _array(root, name) for name in ("cls", "patch", "mask") if name in root
        }
        self.marks = _array(root, MARKS)

    def write(
        self, unit: int, cls: np.ndarray, patch: np.ndarray | None, mask: np.ndarray | None
    ) -> int:
        """Write one unit into its own chunks, then mark it done. Returns bytes written.

        cls: (n, channel) or (n, layer, channel); patch: (n, rows, cols, channel), both
        cast to the set's dtype (float16 | float32); mask: (n, y, x) uint8; n = the
        unit's item count.
        """
        region = self.layout.unit_slice(unit)
        nbytes = 0
        for name, data in (("cls", cls), ("patch", patch), ("mask", mask)):
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


def finish(path: Path) -> None:
    """Check marks and chunks, then write `complete: true` and consolidated metadata.

    Values were checked for NaN/Inf before they were written; `verify` re-reads them.
    """
    problems = verify(path, require_complete=False, values=False)
    if problems:
        raise StoreIncompleteError(f"{path} failed verification:\n  " + "\n  ".join(problems))
    root = zarr.open_group(path, mode="r+", use_consolidated=False)
    root.attrs["complete"] = True
    root.attrs["completed"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    _consolidate(path)


def _consolidate(path: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(path)


def add_request(path: Path, request: dict[str, Any]) -> None:
    """Record another request that this (complete) set answers, so probe finds it by it."""
    root = zarr.open_group(path, mode="r+", use_consolidated=False)
    attrs: dict[str, Any] = dict(root.attrs)
    requests = list(attrs.get("requests", []))
    if canonical(request) not in requests:
        root.attrs["requests"] = [*requests, canonical(request)]
        _consolidate(path)


def _sets(cache: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(path, attributes) of every readable feature set of this format under `cache`."""
    out = []
    for path in sorted(Path(cache).glob("*.zarr")):
        try:
            attrs = read_attrs(path)
        except (FileNotFoundError, ValueError, KeyError):
            continue
        if attrs.get("featstore_format") == FORMAT_VERSION:
            out.append((path, attrs))
    return out


def find_set(cache: Path, request: dict[str, Any]) -> Path | None:
    """The newest complete feature set under `cache` that answers `request`."""
    want = canonical(request)
    hits = [
        (attrs.get("completed", ""), path)
        for path, attrs in _sets(cache)
        if attrs.get("complete") and want in attrs.get("requests", [])
    ]
    return max(hits)[1] if hits else None


def find_by_key(cache: Path, key: str) -> Path | None:
    """The feature set whose cache key starts with `key` (results record 12 characters)."""
    hits = [p for p, attrs in _sets(cache) if str(attrs.get("cache_key", "")).startswith(key)]
    return hits[0] if hits else None


def open_set(path: Path) -> xr.Dataset:
    """Open a complete feature set: data variables lazy (dask), coordinates loaded."""
    if not (Path(path) / "zarr.json").is_file():
        raise StoreIncompleteError(f"{path}: no feature set here; run `featstore extract` first")
    ds = xr.open_zarr(path, consolidated=None)
    if ds.attrs.get("featstore_format") != FORMAT_VERSION:
        raise _old_format(Path(path), ds.attrs)
    if not ds.attrs.get("complete"):
        raise StoreIncompleteError(
            f"{path} is incomplete (an extract was interrupted); rerun "
            "the same `featstore extract` to resume it"
        )
    # Coordinates are small: in memory (plain '<U' strings, not zarr's StringDType,
    # which pandas and xarray's groupby reject), `groupby("sample")` just works.
    return ds.assign_coords({name: (ds[name].dims, _plain(ds[name].values)) for name in ds.coords})


def _plain(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values)
    if values.dtype.kind in ("T", "O"):
        return np.array(values.tolist(), dtype=str)
    return values


def verify(path: Path, require_complete: bool = True, values: bool = True) -> list[str]:
    """Problems found in a feature set (empty when it is sound).

    Checks marks, that every chunk of cls/patch/mask exists, shapes against the
    recorded layout, and that no stored feature is NaN/Inf (except skipped samples).
    """
    path = Path(path)
    if not (path / "zarr.json").is_file():
        return [f"{path}: not a feature set (no zarr.json)"]
    root = zarr.open_group(path, mode="r", use_consolidated=False)
    attrs: dict[str, Any] = dict(root.attrs)
    problems = []
    if require_complete and not attrs.get("complete"):
        problems.append("not marked complete")
    layout = Layout(**attrs["layout"])
    missing = pending_units(path)
    if missing:
        problems.append(
            f"{len(missing)} of {layout.n_units} units not marked done (first: {missing[:5]})"
        )
    skipped = set(attrs.get("skipped", {}))
    samples = np.asarray(_array(root, "sample")[:]) if skipped else None
    for name in ("cls", "patch", "mask"):
        if name not in root:
            continue
        arr = _array(root, name)
        if arr.shape[0] != layout.n_items:
            problems.append(f"{name}: {arr.shape[0]} items, layout says {layout.n_items}")
        nchunks = arr.nchunks_initialized
        if nchunks != arr.nchunks:
            problems.append(
                f"{name}: {arr.nchunks - nchunks} of {arr.nchunks} chunks missing "
                "on disk; rerun the extract with --overwrite"
            )
            continue
        if name == "mask" or not values:
            continue
        for unit in range(layout.n_units):
            block = np.asarray(arr[layout.unit_slice(unit)], dtype=np.float32)
            bad = ~np.isfinite(block.reshape(len(block), -1)).all(axis=1)
            if samples is not None:
                bad &= ~np.isin(samples[layout.unit_slice(unit)], list(skipped))
            if bad.any():
                first = layout.unit_slice(unit).start + int(np.flatnonzero(bad)[0])
                problems.append(
                    f"{name}: {int(bad.sum())} items with NaN/Inf in unit {unit} "
                    f"(first item {first})"
                )
    return problems


def list_sets(cache: Path) -> list[dict[str, Any]]:
    """One summary row per feature set under `cache` (for `featstore ls`)."""
    rows: list[dict[str, Any]] = []
    for path in sorted(Path(cache).glob("*.zarr")):
        try:
            attrs = read_attrs(path)
        except (FileNotFoundError, ValueError, KeyError) as exc:
            rows.append({"path": str(path), "error": str(exc)})
            continue
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        enc, pre = attrs.get("encoder", {}), attrs.get("preprocess", {})
        rows.append(
            {
                "dataset": attrs.get("dataset", {}).get("name"),
                "encoder": enc.get("name") + (" (random_init)" if enc.get("random_init") else ""),
                "resolution": pre.get("resolution"),
                "items": attrs.get("layout", {}).get("n_items"),
                "size_mb": round(size / 1e6, 1),
                "complete": bool(attrs.get("complete")),
                "format": attrs.get("featstore_format"),
                "key": attrs.get("cache_key", "")[:12],
                "path": str(path),
            }
        )
    return rows
