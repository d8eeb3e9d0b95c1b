"""The feature-set schema: shapes, array names, codecs, attributes and the empty skeleton.

A set's `Layout` follows from its identity and the manifest's storage settings; its
skeleton is the xarray Dataset (lazy data variables, real coordinates) that
`arrays.create` writes, with the encoding every array gets (chunked by unit, a
compressor, and a crc32c checksum on every chunk). Every list of array names used by
the store is derived here. No file is read or written in this module.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata as importlib_metadata
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.array_spec import ArraySpec
from zarr.core.buffer import Buffer
from zarr.registry import register_codec

if TYPE_CHECKING:
    import xarray as xr

from featstore.errors import BadInputError, ChunkChecksumError
from featstore.identity import FORMAT_VERSION, SetIdentity, canonical

MARKS = "_featstore/done"  # (unit,) uint8, one chunk per unit: the resume marks
MARKS_GROUP = MARKS.rsplit("/", 1)[0]
ITEM_DATA = ("cls", "patch", "patch_scale", "mask")  # written unit by unit by extract
FLOAT_DATA = ("cls", "patch", "patch_scale")  # NaN only for skipped samples
UNIT_ARRAYS = (*ITEM_DATA, MARKS)  # chunk u belongs to unit u and is rewritten with it
COORDS = ("sample", "slice", "split")  # on `item`, in every set; labels and metadata aside
# Compressors of the data arrays (the manifest's `codec`; lz4 by default, the fastest
# to write at a ratio close to zstd's on float16 tokens), measured in benchmarks/codecs.py.
CODECS: dict[str, tuple[BloscCodec, ...]] = {
    "none": (),
    "lz4": (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),),
    "zstd-1": (BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"),),
    "zstd-3": (BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),),
}
# Coordinates and labels are small and compress well.
COORD_CODEC = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


class Checksum(Crc32cCodec):
    """zarr's crc32c codec (same bytes, same metadata) whose failure has a type of its
    own, `ChunkChecksumError`, so that a reader recognises a damaged chunk by it."""

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> Buffer:
        try:
            return super()._decode_sync(chunk_bytes, chunk_spec)
        except ValueError as exc:  # the only failure of crc32c's decode: a mismatch
            raise ChunkChecksumError(
                f"{exc} (the chunk's bytes changed after it was written)"
            ) from None


# Every chunk of every array ends in a crc32c of its bytes: a flipped or truncated
# chunk fails to decode instead of reading as other numbers. Reads of any crc32c
# array in this process go through `Checksum` (it only types zarr's ValueError).
register_codec("crc32c", Checksum)
zarr.config.set({"codecs.crc32c": f"{Checksum.__module__}.{Checksum.__qualname__}"})
CHECKSUM = Checksum()
CHUNK_BYTES = 64 << 20  # cap on one chunk of a set's largest array (a read's granule)
# A unit of work is one shard: `Layout.shard_chunks` chunks along `item`, written whole
# (zarr rewrites a shard whole, so one writer owns it). Units grow with the set so that
# it has at most `max_units` of them (each array: one object per unit), up to this cap
# on a unit's bytes of its largest array (what a writer holds in memory per unit).
SHARD_BYTES = 128 << 20
MAX_UNITS = 256  # the manifest's `max_units` default
# What the probes and the report need from the raw data, recorded at allocation so that
# a set is probed where its data is not (docs/cache.md, "Probing without the data"). Per item:
# the original image's (slice's) size, and its header spacing (NaN where unknown).
NATIVE_SIZE = ("native_rows", "native_cols")  # int32, pixels; 0 where unknown
NATIVE_SPACING = ("native_slice_mm", "native_row_mm", "native_col_mm")  # float64, mm
NATIVE = (*NATIVE_SIZE, *NATIVE_SPACING)
# A few test items as the encoder saw them (channel 0, in [0, 1] as uint8), for the
# report's example figures: one per sample, on their own `example` dimension.
EXAMPLE_DIM = "example"
THUMBNAIL = "thumbnail"  # (example, thumb_y, thumb_x) uint8
EXAMPLE_ITEM = "example_item"  # (example,) int64: the item shown; -1 unreadable sample
N_EXAMPLES = 3  # the first test samples, in item order
THUMB_MAX = 224  # thumbnails of larger inputs are shrunk to this many pixels
# Slides also keep, per example, the whole slide at about `tiling.tissue_mpp` (shrunk by
# a whole factor to fit `OVERVIEW_MAX` px, padded) and its tissue mask, for the report's
# slide figure; a tile's place on it is its level-0 `tile_x`, `tile_y` / `overview_scale`.
OVERVIEW = "overview"  # (example, overview_y, overview_x, rgb) uint8, padded white
OVERVIEW_TISSUE = "overview_tissue"  # (example, overview_y, overview_x) uint8: TISSUE_CODES
OVERVIEW_SCALE = "overview_scale"  # (example,) float64: level-0 px per overview px; NaN unread
OVERVIEWS = (OVERVIEW, OVERVIEW_TISSUE, OVERVIEW_SCALE)
TISSUE_CODES = {"background": 0, "tissue": 1, "outside": 2}  # outside: padding beyond the slide
OVERVIEW_MAX = 512
EXAMPLES = (THUMBNAIL, EXAMPLE_ITEM)  # of every set with test samples
ON_EXAMPLE = (*EXAMPLES, *OVERVIEWS)  # the arrays on `example`: one chunk each
VERSIONED = ("torch", "transformers", "zarr", "xarray", "numpy", "scikit-learn")


# What a set's `label` holds: nothing (segmentation), one class id per item, or a
# multi-hot row of `label_width` labels per item.
Labels = Literal["none", "single", "multi"]


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
    # how `labels` and `label_width` are recorded in a set's `layout` attribute (kept
    # for the sets on disk): 0 single, k multi-hot of k, -1 none; read them by name
    n_classes: int
    dtype: str
    codec: str = "lz4"  # a key of CODECS, for cls/patch/mask
    quantize: str = "none"  # "int8": patch int8 and patch_scale (item, channel) float32
    patch_layers: int = 1  # > 1: patch is (item, patch_layer, row, col, channel)
    examples: int = 0  # example thumbnails (0: none, e.g. no test split)
    thumb_size: int = 0  # their side, min(resolution, THUMB_MAX)
    overview_size: int = 0  # slides: the side of the examples' overviews (0: none)
    shard_chunks: int = 1  # chunks per shard = per unit of work (format 4)

    @property
    def labels(self) -> Labels:
        """What `label` holds (see `Labels`)."""
        return "none" if self.n_classes < 0 else "multi" if self.n_classes else "single"

    @property
    def label_width(self) -> int:
        """Labels per item of a multi-label set (its `class` dimension); 0 otherwise."""
        return max(self.n_classes, 0)

    @property
    def patch_dtype(self) -> str:
        return "int8" if self.quantize == "int8" else self.dtype

    @property
    def item_bytes(self) -> int:
        """Uncompressed bytes of one item's cls, patch tokens (and scales) and mask."""
        size = np.dtype(self.dtype).itemsize
        cls = self.layers * self.channels * size
        patch = self.patch_layers * self.rows * self.cols * self.channels
        patch *= np.dtype(self.patch_dtype).itemsize
        scale = self.patch_layers * self.channels * 4 if self.quantize == "int8" else 0
        return int(cls + patch + scale + self.mask_size**2)

    def unit_arrays(self) -> list[str]:
        """The arrays written unit by unit (data and marks) that this layout holds."""
        held = {
            "cls": True,
            "patch": bool(self.rows),
            "patch_scale": bool(self.rows) and self.quantize == "int8",
            "mask": bool(self.mask_size),
            MARKS: True,
        }
        return [name for name in UNIT_ARRAYS if held[name]]

    def arrays(self) -> list[str]:
        """The arrays every set of this layout holds (metadata columns aside), by name."""
        out = [*self.unit_arrays(), *COORDS, *NATIVE]
        if self.examples:
            out += [*EXAMPLES, *(OVERVIEWS if self.overview_size else ())]
        out += ["label"] if self.labels != "none" else []
        return sorted(out)

    @classmethod
    def from_attrs(cls, d: Any) -> Layout:
        """The recorded layout; ValueError when keys or types were edited."""
        names = {f.name for f in fields(cls)}
        if not isinstance(d, dict) or not set(d) <= names:
            raise ValueError(
                f"unknown layout keys {sorted(set(d) - names) if isinstance(d, dict) else d!r}"
            )
        layout = cls(**d)
        for f in fields(cls):
            value = getattr(layout, f.name)
            if type(value) is not (str if f.type == "str" else int):
                raise ValueError(f"layout.{f.name} = {value!r}")
        if layout.n_items < 1 or layout.chunk_items < 1 or layout.shard_chunks < 1:
            raise ValueError(
                f"layout has {layout.n_items} items in chunks of {layout.chunk_items}, "
                f"{layout.shard_chunks} chunks a shard"
            )
        return layout

    @property
    def unit_items(self) -> int:
        """Items per unit of work = per shard (`shard_chunks` chunks)."""
        return self.chunk_items * self.shard_chunks

    @property
    def n_units(self) -> int:
        """Number of units (= shards along `item`); the last one may be short."""
        return -(-self.n_items // self.unit_items)

    def unit_slice(self, unit: int) -> slice:
        """The items of `unit` (its shard), as a slice along `item`."""
        return slice(unit * self.unit_items, min((unit + 1) * self.unit_items, self.n_items))


def layout_for(
    ident: SetIdentity,
    n_items: int,
    labels: Labels,
    batch_size: int,
    unit_items: int,
    codec: str = "lz4",
    examples: int = 0,
    label_width: int = 0,
    max_units: int = MAX_UNITS,
) -> Layout:
    """Shapes of a set. A chunk is a whole number of batches (about `unit_items`
    items), its bytes of the largest array capped at `CHUNK_BYTES`; a unit of work is
    one shard of whole chunks, as few as keep the set within `max_units` units, its
    bytes capped at `SHARD_BYTES`. labels: what `label` holds (multi: `label_width`
    labels per item); examples: how many example thumbnails it keeps."""
    if (labels == "multi") != (label_width > 0):
        raise ValueError(f"labels {labels!r} with label_width {label_width}")
    w = ident.weights
    r = ident.recipe
    if w is None:
        raise ValueError("layout_for needs the loaded encoder: ident.with_weights(info)")
    grid = r.resolution // w.patch_size
    if grid % r.patch_pool:
        raise BadInputError(
            f"patch_pool {r.patch_pool} does not divide the {grid}x{grid} patch grid of "
            f"{r.resolution} px / {w.patch_size} px patches; choose a divisor of {grid}"
        )
    grid //= r.patch_pool
    itemsize = 1 if r.quantize == "int8" else np.dtype(r.dtype).itemsize
    width = w.hidden_size if r.channels is None else r.channels.width(w.hidden_size)
    per_item = (grid * grid * len(r.patch_layers) if r.patch else 1) * width * itemsize
    batches = max(1, min(-(-unit_items // batch_size), CHUNK_BYTES // (batch_size * per_item)))
    chunk = batch_size * batches
    n_chunks = -(-n_items // chunk)
    wanted = -(-n_chunks // max(1, max_units))  # chunks a shard, for at most max_units
    shard_chunks = max(1, min(wanted, SHARD_BYTES // (chunk * per_item)))
    return Layout(
        n_items=n_items,
        chunk_items=chunk,
        channels=width,
        layers=r.layers,
        rows=grid if r.patch else 0,
        cols=grid if r.patch else 0,
        mask_size=r.resolution if r.task == "segmentation" else 0,
        n_classes={"none": -1, "single": 0, "multi": label_width}[labels],
        dtype=r.dtype,
        codec=codec,
        quantize=r.quantize if r.patch else "none",
        patch_layers=len(r.patch_layers),
        examples=examples,
        thumb_size=min(r.resolution, THUMB_MAX) if examples else 0,
        overview_size=OVERVIEW_MAX if examples and r.tiling is not None else 0,
        shard_chunks=shard_chunks,
    )


@dataclass(frozen=True)
class Items:
    """Per-item coordinates and labels of a set, in item order.

    labels: (n,) or (n, classes) int64, or None for segmentation; metadata: extra
    per-item coordinates (numeric when every value parses as one); native: the
    `NATIVE` facts per item (absent names are unknown: 0 size, NaN spacing);
    example_item: (examples,) int64 and thumbnails: (examples, t, t) uint8; overviews
    (slides): `OVERVIEWS` by name, (examples, s, s, 3), (examples, s, s), (examples,); coords:
    per-item coordinates a format adds, as typed arrays (slides: level-0 `tile_x`,
    `tile_y`, `tile_mpp`, `slide_mpp` and `mpp_source`).
    """

    sample: Sequence[str]
    slice: Sequence[int]
    split: Sequence[str]
    labels: np.ndarray | None
    metadata: dict[str, Sequence[str]] = field(default_factory=dict)
    native: dict[str, Sequence[float]] = field(default_factory=dict)
    example_item: Sequence[int] = ()
    thumbnails: np.ndarray | None = None
    overviews: dict[str, np.ndarray] = field(default_factory=dict)
    coords: dict[str, np.ndarray] = field(default_factory=dict)


def versions() -> dict[str, str]:
    """Installed versions of featstore and the packages that shape the features."""
    out = {}
    for name in ("featstore", *VERSIONED):
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def root_attrs(
    ident: SetIdentity,
    layout: Layout,
    describe: dict[str, Any],
    compute: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Root attributes: the identity (machine-readable) and readable copies of it.

    `compute` is provenance, not identity: how the units are computed (`device`:
    cpu | cuda, `preprocess_on`: cpu | device), which changes the features only within
    float rounding (docs/scaling-out.md, "Preprocessing on the device")."""
    assert ident.weights is not None
    return canonical(
        {
            **({"compute": compute} if compute else {}),
            "featstore_format": FORMAT_VERSION,
            "cache_key": ident.key(),
            "identity": ident.to_attrs(),
            "requests": [ident.request()],
            "dataset": {**describe, "fingerprint": ident.recipe.dataset},
            "encoder": ident.weights.to_dict(),
            "preprocess": ident.preprocess().to_dict(),
            "storage": {
                "dtype": layout.dtype,
                "codec": layout.codec,
                "chunk_items": layout.chunk_items,
            },
            "layout": asdict(layout),
            "versions": versions(),
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "complete": False,
        }
    )


def skeleton(layout: Layout, items: Items) -> tuple[xr.Dataset, dict[str, Any]]:
    """The empty dataset (lazy data variables, real coordinates) and its encoding."""
    import dask.array as da  # only a new set needs them: a cached extract never loads them
    import xarray as xr

    n, c = layout.n_items, layout.unit_items  # dask chunks: one per unit (shard)
    cls_dims = ("item", "channel") if layout.layers == 1 else ("item", "layer", "channel")
    cls_shape = (n, layout.channels) if layout.layers == 1 else (n, layout.layers, layout.channels)
    variables: dict[str, Any] = {
        "cls": (cls_dims, da.empty(cls_shape, dtype=layout.dtype, chunks=(c, *cls_shape[1:])))
    }
    if layout.rows:
        several = layout.patch_layers > 1
        dims = ("item", *(("patch_layer",) if several else ()), "row", "col", "channel")
        lead = (n, layout.patch_layers) if several else (n,)
        patch_shape = (*lead, layout.rows, layout.cols, layout.channels)
        variables["patch"] = (
            dims,
            da.empty(patch_shape, dtype=layout.patch_dtype, chunks=(c, *patch_shape[1:])),
        )
        if layout.quantize == "int8":  # patch = int8 value x scale of (item[, layer], channel)
            scale_dims = tuple(d for d in dims if d not in ("row", "col"))
            scale_shape = (*lead, layout.channels)
            variables["patch_scale"] = (
                scale_dims,
                da.empty(scale_shape, dtype="float32", chunks=(c, *scale_shape[1:])),
            )
    if layout.mask_size:
        mask_shape = (n, layout.mask_size, layout.mask_size)
        variables["mask"] = (
            ("item", "y", "x"),
            da.empty(mask_shape, dtype="uint8", chunks=(c, -1, -1)),
        )
    arrays = item_arrays(items)
    if "label" in arrays:
        labels = arrays.pop("label")
        variables["label"] = (("item",) if labels.ndim == 1 else ("item", "class"), labels)
    examples = _examples(layout, arrays)  # taken out of `arrays`
    coords = {name: ("item", values) for name, values in arrays.items()}
    for name, (dims, values) in examples.items() if layout.examples else ():
        (coords if values.ndim == 1 else variables)[name] = (dims, values)
    xs = xr.Dataset(variables, coords=coords)
    # Every array on `item`, coordinates too, is sharded by unit: shard u of any array
    # is unit u, one object, of `shard_chunks` chunks that each carry their crc32c (the
    # few examples are one chunk).
    u, c = layout.unit_items, layout.chunk_items
    encoding: dict[str, dict[str, Any]] = {
        str(name): {
            "compressors": [
                *(CODECS[layout.codec] if name in ITEM_DATA else (COORD_CODEC,)),
                CHECKSUM,
            ],
            **(
                {"chunks": var.shape}
                if name in ON_EXAMPLE
                else {"chunks": (c, *var.shape[1:]), "shards": (u, *var.shape[1:])}
            ),
        }
        for name, var in xs.variables.items()
    }
    for name in FLOAT_DATA:
        if name in encoding and xs[name].dtype.kind == "f":
            encoding[name]["fill_value"] = np.nan  # a missing chunk reads as NaN: verify sees it
    return xs, encoding


def _examples(layout: Layout, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """The example arrays (popped from `arrays`) that the layout holds, as (dims, values)
    on `example`; ValueError when their shapes disagree with it."""
    n, t, side = layout.examples, layout.thumb_size, layout.overview_size
    dims = {THUMBNAIL: ("thumb_y", "thumb_x"), OVERVIEW: ("overview_y", "overview_x", "rgb")}
    dims |= {OVERVIEW_TISSUE: ("overview_y", "overview_x")}
    shape = {THUMBNAIL: (n, t, t), OVERVIEW: (n, side, side, 3), OVERVIEW_TISSUE: (n, side, side)}
    got = {name: arrays.pop(name) for name in ON_EXAMPLE if name in arrays}
    out = {}
    for name in [*EXAMPLES, *(OVERVIEWS if side else ())]:
        value = got.get(name, np.zeros((0,) * len(shape.get(name, (n,)))))
        if value.shape != shape.get(name, (n,)):
            raise ValueError(f"{name} {value.shape}; the layout has {shape.get(name, (n,))}")
        out[name] = ((EXAMPLE_DIM, *dims.get(name, ())), value)
    return out


def item_arrays(items: Items) -> dict[str, np.ndarray]:
    """The per-item arrays written at allocation: coordinates and labels, by name."""
    out = {
        "sample": np.asarray(items.sample, dtype=object),
        "slice": np.asarray(items.slice, dtype=np.int32),
        "split": np.asarray(items.split, dtype=object),
    }
    for name, values in items.metadata.items():
        try:
            out[name] = np.asarray(values, dtype=np.float64)
        except ValueError:
            out[name] = np.asarray(values, dtype=object)
    n = len(items.sample)
    for name in NATIVE:
        size = name in NATIVE_SIZE
        default = np.zeros(n) if size else np.full(n, np.nan)
        out[name] = np.asarray(items.native.get(name, default), np.int32 if size else np.float64)
    out |= items.coords
    if items.labels is not None:
        out["label"] = items.labels
    out[EXAMPLE_ITEM] = np.asarray(items.example_item, np.int64)
    if items.thumbnails is not None:
        out[THUMBNAIL] = np.asarray(items.thumbnails, np.uint8)
    dtypes = {OVERVIEW: np.uint8, OVERVIEW_TISSUE: np.uint8, OVERVIEW_SCALE: np.float64}
    out |= {name: np.asarray(v, dtypes[name]) for name, v in items.overviews.items()}
    return out
