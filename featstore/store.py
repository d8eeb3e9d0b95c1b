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
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr
from zarr.codecs import BloscCodec

from featstore.errors import StoreIncompleteError, StoreMismatchError

FORMAT_VERSION = 1
MARKS = "_featstore/done"
# Chosen by benchmarks/codecs.py on ViT features: blosc-zstd with bit-shuffle
# compresses float16 tokens better than zstd alone at similar speed.
CODEC = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")


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
        return -(-self.n_items // self.chunk_items)

    def unit_slice(self, unit: int) -> slice:
        return slice(unit * self.chunk_items, min((unit + 1) * self.chunk_items, self.n_items))


def cache_key(config: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of everything that determines the content."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def store_path(cache: Path, key: str) -> Path:
    return Path(cache) / f"{key[:24]}.zarr"


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: stored {va!r}, requested {vb!r}")
    return out


def _json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def create(
    path: Path,
    layout: Layout,
    sample: Sequence[str],
    slice_: Sequence[int],
    split: Sequence[str],
    labels: np.ndarray | None,
    config: dict[str, Any],
    attrs: dict[str, Any],
    metadata: dict[str, Sequence[str]] | None = None,
) -> bool:
    """Allocate an empty feature set (metadata, coordinates, labels, marks).

    Data variables are allocated, not written: each unit fills its own chunk later.
    `metadata` adds per-item coordinates (numeric when every value parses as one).
    The set is built in a temporary sibling folder and renamed into place, so another
    process (a second --shard) sees either nothing or a whole skeleton. Returns False
    when another process created `path` first (its skeleton is kept).
    """
    n, c = layout.n_items, layout.chunk_items
    cls_dims = ("item", "channel") if layout.layers == 1 else ("item", "layer", "channel")
    cls_shape = (n, layout.channels) if layout.layers == 1 else (n, layout.layers, layout.channels)
    variables: dict[str, Any] = {
        "cls": (cls_dims, da.empty(cls_shape, dtype=layout.dtype, chunks=c))
    }
    if layout.rows:
        shape = (n, layout.rows, layout.cols, layout.channels)
        variables["patch"] = (
            ("item", "row", "col", "channel"),
            da.empty(shape, dtype=layout.dtype, chunks=(c, -1, -1, -1)),
        )
    if layout.mask_size:
        shape = (n, layout.mask_size, layout.mask_size)
        variables["mask"] = (("item", "y", "x"), da.empty(shape, dtype="uint8", chunks=(c, -1, -1)))
    if labels is not None:
        variables["label"] = (("item",) if labels.ndim == 1 else ("item", "class"), labels)
    coords = {
        "sample": ("item", np.asarray(sample, dtype=object)),
        "slice": ("item", np.asarray(slice_, dtype=np.int32)),
        "split": ("item", np.asarray(split, dtype=object)),
    }
    for name, values in (metadata or {}).items():
        try:
            coords[name] = ("item", np.asarray(values, dtype=np.float64))
        except ValueError:
            coords[name] = ("item", np.asarray(values, dtype=object))
    ds = xr.Dataset(variables, coords=coords)
    ds.attrs.update(
        _json_safe(
            {
                **attrs,
                "featstore_format": FORMAT_VERSION,
                "config": config,
                "cache_key": cache_key(config),
                "layout": asdict(layout),
                "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "complete": False,
            }
        )
    )
    encoding = {
        name: {"compressors": [CODEC], "chunks": var.data.chunksize}
        for name, var in ds.data_vars.items()
        if name != "label"
    }
    for name in ("cls", "patch"):
        if name in encoding:
            encoding[name]["fill_value"] = np.nan  # a missing chunk reads as NaN: verify sees it
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
    return dict(zarr.open_group(path, mode="r", use_consolidated=False).attrs)


def check_matches(path: Path, config: dict[str, Any], layout: Layout) -> None:
    """Raise `StoreMismatchError` when the set at `path` was made for something else."""
    attrs = read_attrs(path)
    stored_cfg = attrs.get("config", {})
    diffs = _diff(stored_cfg, _json_safe(config))
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


def remove(path: Path) -> None:
    shutil.rmtree(path)


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
    done = zarr.open_array(path / MARKS, mode="r")[:]
    return [int(u) for u in np.flatnonzero(done == 0)]


class UnitWriter:
    """Writes whole units into an allocated set; arrays are opened once, not per unit."""

    def __init__(self, path: Path, layout: Layout):
        root = zarr.open_group(path, mode="r+", use_consolidated=False)
        self.layout = layout
        self.arrays = {name: root[name] for name in ("cls", "patch", "mask") if name in root}
        self.marks = root[MARKS]

    def write(
        self, unit: int, cls: np.ndarray, patch: np.ndarray | None, mask: np.ndarray | None
    ) -> int:
        """Write one unit into its own chunks, then mark it done. Returns bytes written.

        cls: (n, channel) or (n, layer, channel); patch: (n, rows, cols, channel);
        mask: (n, y, x) uint8; n = the unit's item count.
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
    requests = list(root.attrs.get("requests", []))
    if _json_safe(request) not in requests:
        root.attrs["requests"] = [*requests, _json_safe(request)]
        _consolidate(path)


def find_set(cache: Path, request: dict[str, Any]) -> Path | None:
    """The newest complete feature set under `cache` that answers `request`."""
    want = _json_safe(request)
    hits = []
    for path in Path(cache).glob("*.zarr"):
        try:
            attrs = read_attrs(path)
        except (FileNotFoundError, ValueError, KeyError):
            continue
        if attrs.get("complete") and want in attrs.get("requests", []):
            hits.append((attrs.get("completed", ""), path))
    return max(hits)[1] if hits else None


def open_set(path: Path) -> xr.Dataset:
    """Open a complete feature set lazily (dask-backed)."""
    if not (Path(path) / "zarr.json").is_file():
        raise StoreIncompleteError(f"{path}: no feature set here; run `featstore extract` first")
    ds = xr.open_zarr(path, consolidated=None)
    if not ds.attrs.get("complete"):
        raise StoreIncompleteError(
            f"{path} is incomplete (an extract was interrupted); rerun "
            "the same `featstore extract` to resume it"
        )
    return ds


def verify(path: Path, require_complete: bool = True, values: bool = True) -> list[str]:
    """Problems found in a feature set (empty when it is sound).

    Checks marks, that every chunk of cls/patch/mask exists, shapes against the
    recorded layout, and that no stored feature is NaN/Inf (except skipped samples).
    """
    path = Path(path)
    if not (path / "zarr.json").is_file():
        return [f"{path}: not a feature set (no zarr.json)"]
    root = zarr.open_group(path, mode="r", use_consolidated=False)
    attrs = dict(root.attrs)
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
    samples = np.asarray(root["sample"][:]) if skipped else None
    for name in ("cls", "patch", "mask"):
        if name not in root:
            continue
        arr = root[name]
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
    rows = []
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
                "key": attrs.get("cache_key", "")[:12],
                "path": str(path),
            }
        )
    return rows
