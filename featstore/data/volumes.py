"""Volumes stored as named arrays inside one file (`format: hdf5`, `format: zarr`), as
connectomics data ship them (CREMI: `volumes/raw`, `volumes/labels/neuron_ids`).

The dataset's `volume:` block names the arrays by internal path (settings.Volume). A
sample is one file (or a `sections: "a:b"` block of its z slices, as for stacks); its
items are the z slices of the (z, y, x) raw array, and they are read slice run by
slice run with the library's own slicing (`array[a:b]`), so memory follows the run,
never the volume: the reader is tiled. The per-sample intensity mapping stays the
whole sample's: for `minmax` the reader finds the sample's min and max block by block
(`BLOCK_BYTES` at a time, once per sample and process) and hands them on as
`Loaded.span`; `percentile` is refused by the manifest; a window needs nothing.

Labels are class ids, the same shape as raw, checked as every mask is
(samples.finish_mask: ids past 255 or past `classes` are refused, never wrapped;
`mask_map` applies). Spacing comes from the raw array's `resolution` attribute when
the block names it, in the block's `unit` (or the array's own `unit`/`units`
attribute, which must agree), recorded in mm (native.py).

The format modules (hdf5.py, zarr_arrays.py) only open a file and look an array up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from featstore.data.manifest import Dataset
from featstore.data.pictures import MAX_PIXELS, TOO_BIG
from featstore.data.reader import Reader, Skip
from featstore.data.samples import Header, Loaded, Sample, check_finite, finish_mask
from featstore.data.settings import Volume
from featstore.data.stacks import section_block
from featstore.errors import BadInputError

# The most raw bytes read at once while a sample's (min, max) is found.
BLOCK_BYTES = 16 << 20
UNITS_PER_MM = {"nm": 1e6, "um": 1e3, "mm": 1.0}
# how files spell the units of `volume.unit`
UNIT_NAMES = {"nm": "nm", "nanometer": "nm", "nanometers": "nm", "um": "um", "µm": "um"}
UNIT_NAMES |= {"micron": "um", "micrometer": "um", "micrometers": "um", "mm": "mm"}
UNIT_NAMES |= {"millimeter": "mm", "millimeters": "mm"}


class Array(Protocol):
    """What an h5py Dataset and a zarr Array both are, as far as this reader goes."""

    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def dtype(self) -> np.dtype[Any]: ...
    @property
    def attrs(self) -> Mapping[str, Any]: ...
    def __getitem__(self, key: slice) -> Any: ...


# An opened file: internal path -> its array (a BadInputError naming both otherwise).
Lookup = Callable[[str], Array]


@dataclass(frozen=True)
class Geometry:
    """A volume's raw array from its metadata: (z, y, x) shape, dtype and spacing (mm)."""

    shape: tuple[int, int, int]
    dtype: np.dtype[Any]
    spacing: tuple[float, float, float] | None


def named(path: Path, inner: str) -> str:
    """How messages name an array: the file and its internal path."""
    return f"{path} [{inner}]"


class Volumes(Reader):
    """The reader of a format whose files hold named arrays; subclasses open them."""

    tiled = True  # items (z slices) are read run by run
    inner_labels = True  # the label array is inside the image file
    kind: ClassVar[str] = ""  # the format's name in messages ("HDF5", "Zarr")
    read_errors: ClassVar[tuple[type[Exception], ...]] = (OSError,)  # while reading chunks

    def open(self, path: Path, wanted: str) -> AbstractContextManager[Lookup]:
        """The file opened read-only, as a lookup of arrays by internal path; `wanted`
        (the raw array's path) names what was being read when the file cannot be."""
        raise NotImplementedError

    # ---------------------------------------------------------------- metadata

    def geometry(self, ds: Dataset, path: Path) -> Geometry:
        """The raw array's shape, dtype and spacing, with the label array checked."""
        vol = _volume(ds)
        with self.open(path, vol.raw) as lookup:
            raw = lookup(vol.raw)
            shape = _check_raw(path, vol.raw, raw)
            if vol.labels is not None:
                labels = lookup(vol.labels)
                if tuple(labels.shape) != shape or labels.dtype.kind not in "biuf":
                    raise BadInputError(
                        f"{named(path, vol.labels)}: label array of shape "
                        f"{tuple(labels.shape)} ({labels.dtype}) does not match the raw array "
                        f"{vol.raw} {shape}; labels must be integer class ids of the raw "
                        "array's shape, voxel for voxel"
                    )
            return Geometry(shape, np.dtype(raw.dtype), _spacing(path, vol, raw.attrs))

    def describe(self, ds: Dataset, base: Sample, row: dict[str, str], where: str) -> Sample | Skip:
        n = self.geometry(ds, Path(base.image)).shape[0]
        block = section_block(row.get("sections", ""), n, where)
        meta = (*base.meta, ("_sections", f"{block.start}:{block.stop}"))
        mask = base.image if _volume(ds).labels is not None else None
        return replace(base, n_items=len(block), meta=meta, mask=mask)

    def header(self, ds: Dataset, sample: Sample) -> Header:
        geo = self.geometry(ds, Path(sample.image))
        return Header(geo.shape[1:], geo.spacing)

    def files(self, ds: Dataset, sample: Sample) -> list[Path]:
        path = Path(sample.image)  # labels live in the same file or folder
        return sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]

    # ---------------------------------------------------------------- pixels

    def decode(self, ds: Dataset, sample: Sample, items: range, as_read: bool) -> Loaded:
        """Slices `items` of the sample (counted within its sections block):
        image (len(items), H, W, 1) as stored (float32 unless `as_read`), mask
        (len(items), H, W) uint8 or None, and the sample's span for `minmax`."""
        path, vol = Path(sample.image), _volume(ds)
        first, stop = (int(v) for v in dict(sample.meta)["_sections"].split(":"))
        run = slice(first + items.start, first + items.stop)
        with self.open(path, vol.raw) as lookup:
            raw = lookup(vol.raw)
            _check_raw(path, vol.raw, raw)
            image = self._read(path, vol.raw, raw, run)
            if image.dtype.kind == "f":
                check_finite(image, named(path, vol.raw))
            span = None
            if ds.intensity.mode == "minmax":
                span = self._span(path, vol.raw, raw, range(first, stop))
            mask = None
            if vol.labels is not None:
                labels = self._read(path, vol.labels, lookup(vol.labels), run)
                mask = finish_mask(ds, labels, named(path, vol.labels), path, image.shape)
        image = image if as_read else image.astype(np.float32)
        return Loaded(image=image[..., None], mask=mask, span=span)

    def _read(self, path: Path, inner: str, arr: Array, run: slice) -> np.ndarray:
        """arr[run] as a numpy array; a damaged chunk is a BadInputError naming it."""
        try:
            return np.asarray(arr[run])
        except self.read_errors as exc:
            raise BadInputError(
                f"{named(path, inner)}: cannot read slices {run.start}:{run.stop} ({exc}); "
                f"the {self.kind} data is truncated or corrupt: replace it or remove its row"
            ) from None

    def _span(self, path: Path, inner: str, arr: Array, zs: range) -> tuple[float, float]:
        """(min, max) of arr[zs], read BLOCK_BYTES at a time; memoised per process."""
        stat = path.stat()
        key = (str(path), inner, zs.start, zs.stop, stat.st_mtime_ns, stat.st_size)
        if key not in _SPANS:
            lo, hi = np.inf, -np.inf
            for block in _blocks(arr, zs):
                part = self._read(path, inner, arr, block)
                if part.dtype.kind == "f":
                    check_finite(part, named(path, inner))
                lo, hi = min(lo, float(part.min())), max(hi, float(part.max()))
            _SPANS[key] = (lo, hi)
        return _SPANS[key]


_SPANS: dict[tuple[object, ...], tuple[float, float]] = {}


def _blocks(arr: Array, zs: range) -> Iterator[slice]:
    """Runs of z slices of at most BLOCK_BYTES (at least one slice each)."""
    plane = int(np.prod(arr.shape[1:])) * np.dtype(arr.dtype).itemsize
    depth = max(1, BLOCK_BYTES // max(plane, 1))
    for z in range(zs.start, zs.stop, depth):
        yield slice(z, min(z + depth, zs.stop))


def _volume(ds: Dataset) -> Volume:
    if ds.volume is None:  # the manifest requires it for these formats
        raise BadInputError(f"dataset '{ds.name}': format {ds.format} needs a `volume:` block")
    return ds.volume


def _check_raw(path: Path, inner: str, raw: Array) -> tuple[int, int, int]:
    """The raw array's (z, y, x) shape; a BadInputError for any other rank or dtype."""
    shape = tuple(int(n) for n in raw.shape)
    if len(shape) != 3:
        raise BadInputError(
            f"{named(path, inner)}: array of rank {len(shape)} {shape}; the raw volume must "
            "be a (z, y, x) array of rank 3 (split channels or time points first)"
        )
    if raw.dtype.kind not in "biuf":
        raise BadInputError(
            f"{named(path, inner)}: dtype {raw.dtype} holds no intensities; the raw volume "
            "must be integers or floats"
        )
    if shape[0] == 0 or shape[1] * shape[2] == 0:
        raise BadInputError(f"{named(path, inner)}: the volume {shape} is empty")
    if shape[1] * shape[2] > MAX_PIXELS:
        raise BadInputError(f"{named(path, inner)}: slices of {shape[2]} x {shape[1]}; {TOO_BIG}")
    return shape[0], shape[1], shape[2]


def _spacing(
    path: Path, vol: Volume, attrs: Mapping[str, Any]
) -> tuple[float, float, float] | None:
    """(z, y, x) voxel size in mm from the attribute `vol.resolution` (None: unknown)."""
    if vol.resolution is None:
        return None
    where = f"{named(path, vol.raw)}: attribute {vol.resolution!r}"
    if vol.resolution not in attrs:
        raise BadInputError(
            f"{where} is missing (attributes: {sorted(attrs)[:8]}); name the attribute "
            "that holds the voxel size in `volume.resolution`, or leave it out (spacing unknown)"
        )
    try:
        values = [float(v) for v in np.asarray(attrs[vol.resolution]).reshape(-1)]
    except (TypeError, ValueError):
        values = []
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise BadInputError(
            f"{where} is {attrs[vol.resolution]!r}; give three positive (z, y, x) voxel "
            f"sizes in {vol.unit}, e.g. [40, 4, 4]"
        )
    stated = _file_unit(named(path, vol.raw), attrs)
    if stated is not None and stated != vol.unit:
        raise BadInputError(
            f"{where}: the array says its unit is {stated!r}, the manifest's `volume.unit` "
            f"is {vol.unit!r}; set `volume.unit: {stated}`"
        )
    z, y, x = (v / UNITS_PER_MM[vol.unit] for v in values)
    return z, y, x


def _file_unit(where: str, attrs: Mapping[str, Any]) -> str | None:
    """The unit an array's `unit` / `units` attribute states, or None where it is silent."""
    for name in ("unit", "units"):
        if name not in attrs:
            continue
        raw = attrs[name]
        values = np.asarray(raw).reshape(-1).tolist()
        said = {(v.decode() if isinstance(v, bytes) else str(v)).strip().lower() for v in values}
        if len(said) == 1 and (unit := UNIT_NAMES.get(said.pop())) is not None:
            return unit
        raise BadInputError(
            f"{where}: attribute {name!r} is {raw!r}; featstore reads one of "
            f"{sorted(set(UNIT_NAMES.values()))} for all three axes: convert the "
            "resolution, or remove the attribute"
        )
    return None
