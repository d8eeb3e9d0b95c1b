"""Sample tables: what a dataset holds, listed from its index without decoding pixels.

Every reader lists its samples into the same `Sample` rows and decodes them into the
same `Loaded` arrays; the index CSV (or a glob of file names) is parsed here once for
all formats. Shapes:

    image: (D, H, W, C) float32 (or the stored integers), C in {1, 3}; D items
           (a `channels:` dataset: C = its distinct sources, in `Channels.sources` order)
    mask:  (D, H, W) uint8 class ids, or None
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featstore.data.manifest import MAX_LABEL, Dataset
from featstore.data.settings import GlobIndex
from featstore.errors import BadInputError


@dataclass(frozen=True)
class Tiles:
    """Where a slide's items are: the tiling plan applied to one slide.

    xy: (n_tiles, 2) int64 level-0 (x, y) of each tile's top-left corner; mpp: the
    slide's level-0 pixel size (um) and where it came from; level: the pyramid level
    read; read: tile side read at that level (resized to the tile size); mpp_note:
    which pixel size won where the index and the file disagree ("" where they agree).
    """

    xy: np.ndarray = field(compare=False, repr=False)
    mpp: float
    mpp_source: str
    level: int
    read: int
    mpp_note: str = ""


@dataclass(frozen=True)
class Sample:
    """One row of a dataset's sample table (no pixels).

    tiles: for slides, the tile of each item; None where items are whole slices.
    """

    id: str
    split: str  # train | val | test ("" until assigned)
    label: tuple[int, ...]  # () without labels, (k,) single-label, multi-hot for multilabel
    n_items: int  # slices (1 for a 2D image), or tiles of a slide
    image: str  # file path, folder, or "split:index" inside a MedMNIST npz
    mask: str | None = None
    group: str = ""  # patient id: samples of one group never cross splits
    meta: tuple[tuple[str, str], ...] = ()  # (coordinate name, value) from `metadata:`
    tiles: Tiles | None = None
    # `channels:` from index columns: the file of each source, in `Channels.sources`
    # order (`image` is the first of them); () otherwise
    sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class Loaded:
    """Decoded items of one sample: raw intensities and, for segmentation, class ids."""

    image: np.ndarray  # (D, H, W, C)
    mask: np.ndarray | None  # (D, H, W) uint8
    # (min, max) of the whole sample's raw intensities, where `image` holds only some
    # of its slices (a volume read in blocks): a per-sample `minmax` mapping uses it,
    # so that every slice run of a volume is mapped as the whole volume would be
    span: tuple[float, float] | None = None


@dataclass(frozen=True)
class Header:
    """What a file's header says, without decoding pixels.

    size: (rows, cols) of one item as stored; spacing: native (row, col) for 2D or
    (slice, row, col) for a volume, in mm, or None when the file does not say.
    """

    size: tuple[int, int]
    spacing: tuple[float, ...] | None = None


def natural_key(text: str) -> list[object]:
    """Sort key that orders "2.png" before "10.png" (sections of a stack)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def check_finite(arr: np.ndarray, where: str) -> np.ndarray:
    """`arr` unchanged; a `BadInputError` naming `where` when it holds NaN/Inf."""
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise BadInputError(
            f"{where}: {bad} NaN/Inf values; fix or exclude the file "
            "(or run with --skip-bad to record and skip it)"
        )
    return arr


def read_csv(path: Path) -> list[tuple[str, dict[str, str]]]:
    """(where, row) per CSV row; `where` is "<file>, line <n>". Short rows read as empty
    cells; a row with more cells than the header, or a file that is not a UTF-8 CSV,
    is a `BadInputError` naming the file and line."""
    out: list[tuple[str, dict[str, str]]] = []
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, [])
            repeated = sorted({c for c in header if header.count(c) > 1})
            if repeated:
                raise BadInputError(f"{path}: header repeats column(s) {repeated}; rename them")
            for cells in reader:
                if not "".join(cells).strip():  # blank line, or only commas (Excel)
                    continue
                where = f"{path}, line {reader.line_num}"
                if len(cells) > len(header):
                    raise BadInputError(
                        f"{where}: {len(cells)} cells but the header has {len(header)}; "
                        "quote cells that contain commas"
                    )
                out.append((where, dict(zip(header, cells + [""] * len(header), strict=False))))
    except UnicodeDecodeError as exc:
        raise BadInputError(
            f"{path}: not a UTF-8 text CSV (byte {exc.start}); save the index as CSV (UTF-8)"
        ) from None
    except csv.Error as exc:
        raise BadInputError(f"{path}: not a valid CSV ({exc}); fix or re-export it") from None
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read the index ({exc})") from None
    return out


def _glob_rows(ds: Dataset, spec: GlobIndex) -> list[tuple[str, dict[str, str]]]:
    """(where, row) per image found by the glob; `where` names the join CSV's line."""
    try:
        images = sorted(p for p in ds.path.glob(spec.glob) if p.is_file())
    except (ValueError, NotImplementedError) as exc:  # "", "/abs/*.png"
        raise BadInputError(
            f"{ds.path}: index.glob {spec.glob!r} is not a usable pattern ({exc}); give one "
            "relative to the dataset path, e.g. 'imagesTr/*.nii.gz'"
        ) from None
    if not images:
        raise BadInputError(
            f"{ds.path}: index.glob {spec.glob!r} matches no file; check the "
            "pattern (relative to the dataset path)"
        )
    joined: dict[str, tuple[str, dict[str, str]]] = {}
    join = ds.path / spec.join if spec.join else None
    if join is not None:
        if not join.is_file():
            raise BadInputError(
                f"{join}: index.join names a CSV that does not exist; fix the name "
                "(relative to the dataset path) or drop `join`"
            )
        table = read_csv(join)
        if table and spec.key not in table[0][1]:
            raise BadInputError(
                f"{join}: no column {spec.key!r} (index.key); columns are {list(table[0][1])}"
            )
        joined = {row[spec.key]: (w, row) for w, row in table}
    rows = []
    for img in images:
        row = {"image": img.relative_to(ds.path).as_posix()}
        if spec.mask:
            mask = img.parent / spec.mask.format(name=img.name, stem=img.name.split(".")[0])
            row["mask"] = os.path.relpath(mask, ds.path)
        where = str(img)
        if join is not None:
            if img.name not in joined:
                raise BadInputError(f"{join}: no row for {img.name} (column {spec.key!r})")
            where, extra = joined[img.name]
            row |= {k: v for k, v in extra.items() if k != spec.key}
        rows.append((where, row))
    return rows


def index_path(ds: Dataset) -> Path:
    """The index CSV of `ds` (inside `path`; the manifest may point elsewhere)."""
    return ds.path / (ds.index if isinstance(ds.index, str) else "index.csv")


def read_index(
    ds: Dataset, extra: frozenset[str] = frozenset(), mask_column: bool = True
) -> list[tuple[str, dict[str, str]]]:
    """(where, row) per sample; `where` names the file and line for messages.
    `extra`: columns this format needs besides image, label/mask, split, metadata;
    mask_column False: segmentation labels live inside the image file (no `mask`)."""
    if isinstance(ds.index, GlobIndex):
        path, located = ds.path / ds.index.glob, _glob_rows(ds, ds.index)
    else:
        path = index_path(ds)
        located = read_csv(path)
    rows = [r for _, r in located]
    if not rows:
        raise BadInputError(f"{path}: index has no rows; add one row per sample")
    seg = ds.task == "segmentation"
    need = set(image_columns(ds)) | (
        {"mask"} if seg and mask_column else set() if seg else {"label"}
    )
    need |= set(ds.metadata)
    need |= extra
    if splits_from_column(ds):
        need.add("split")
    missing = need - set(rows[0])
    if missing:
        raise BadInputError(
            f"{path}: index lacks column(s) {sorted(missing)}; columns are "
            f"{list(rows[0])} (see docs/formats.md, 'Formats')"
        )
    return located


def image_columns(ds: Dataset) -> tuple[str, ...]:
    """The index columns naming a sample's image files: `image`, or the sources of a
    `channels:` block that reads index columns (ct, pet, ...)."""
    if ds.channels is not None and not ds.channels.sequences:
        return tuple(str(c) for c in ds.channels.sources)
    return ("image",)


def splits_from_column(ds: Dataset) -> bool:
    """Whether each row's `split` cell decides its split (no `splits: {ratios: ...}`)."""
    return ds.splits is None or ds.splits.from_ == "column"


def _integer(text: str) -> int | None:
    """An integer cell: "3", or "3.0" as pandas writes a float column; else None."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() else None


def parse_label(text: str, ds: Dataset, where: str) -> tuple[int, ...]:
    """A label cell -> (class id,) or, for multilabel, a multi-hot tuple ("0;1;0;0").

    Refused where it is read, so a probe never meets it: a non-integer ("1.7"), a
    negative id, an id past `classes` (or past MAX_LABEL without them), a multi-hot
    value other than 0/1 or of the wrong length."""
    text = text.strip()
    if not text:
        raise BadInputError(f"{where}: label is missing; every {ds.task} sample needs one")
    n_classes = len(ds.classes) if ds.classes else None
    if ds.task == "multilabel":
        values = [_integer(v) for v in text.replace(" ", ";").split(";") if v]
        if not values or any(v not in (0, 1) for v in values):
            raise BadInputError(
                f"{where}: multilabel {text!r} must be 0/1 values separated by ';', e.g. 0;1;0"
            )
        if n_classes is not None and len(values) != n_classes:
            raise BadInputError(
                f"{where}: multilabel {text!r} has {len(values)} values but `classes` names "
                f"{n_classes}; give one 0/1 per class"
            )
        return tuple(v for v in values if v is not None)
    value = _integer(text)
    if value is None:
        raise BadInputError(
            f"{where}: label {text!r} is not an integer class id (0, 1, 2, ...); "
            "fix the index (a fractional value is not rounded)"
        )
    top = n_classes - 1 if n_classes is not None else MAX_LABEL
    if not 0 <= value <= top:
        named = (
            f"`classes` names {n_classes} (ids 0..{top})"
            if n_classes is not None
            else f"ids are 0..{MAX_LABEL}"
        )
        raise BadInputError(f"{where}: label {value} is out of range: {named}; fix the index")
    return (value,)


def inside(ds: Dataset, cell: str, column: str, where: str) -> Path:
    """The file an index cell names (relative to `ds.path`), refused unless the
    dataset allows outside paths (`allow_outside_paths`) when it is absolute or
    resolves, through `..` or symlinks, outside the dataset's folder: a shared index
    must not make featstore read, hash or show (thumbnails) files it does not hold."""
    path = ds.path / cell
    if ds.allow_outside_paths:
        return path
    if Path(cell).is_absolute():
        problem = "is an absolute path"
    else:
        try:
            real, root = path.resolve(), ds.path.resolve()
        except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
            return path  # not a file: the existence check names it
        if real.is_relative_to(root):
            return path
        problem = f"resolves to {real}, outside the dataset folder {root}"
    raise BadInputError(
        f"{where}: {column} {cell!r} {problem}; give a path relative to the dataset "
        f"folder {ds.path}, or set `allow_outside_paths: true` on dataset '{ds.name}' in "
        "the manifest to let its index name files elsewhere"
    )


def exists(path: Path) -> bool:
    """Path.exists, False for names the OS refuses rather than an exception."""
    try:
        return path.exists()
    except (OSError, ValueError):  # NUL bytes, over-long names
        return False


def fill_outlines(mask: np.ndarray) -> np.ndarray:
    """Closed 1-pixel outlines to filled regions, per slice: (D, H, W) uint8 -> same."""
    from scipy import ndimage  # 0.4 s to import; only masks with outlines need it

    out = np.zeros_like(mask)
    for d in range(mask.shape[0]):
        for cls in np.unique(mask[d])[1:]:
            out[d][ndimage.binary_fill_holes(mask[d] == cls)] = cls
    return out


def id_boundaries(ids: np.ndarray) -> np.ndarray:
    """Neuron ids (D, H, W) any integers -> their boundaries (D, H, W) uint8: 1 where a
    pixel's id differs from that of an in-plane 4-neighbour (both sides of every
    change, so two touching neurons are split by a 2-pixel line), else 0. In-plane
    only: a sample is decoded a run of slices at a time."""
    edge = np.zeros(ids.shape, bool)
    rows = ids[:, 1:, :] != ids[:, :-1, :]
    edge[:, 1:, :] |= rows
    edge[:, :-1, :] |= rows
    cols = ids[:, :, 1:] != ids[:, :, :-1]
    edge[:, :, 1:] |= cols
    edge[:, :, :-1] |= cols
    return edge.astype(np.uint8)


def finish_mask(
    ds: Dataset, m: np.ndarray, mpath: Path | str, image: Path, shape: tuple[int, ...]
) -> np.ndarray:
    """A decoded mask `m` (D, H, W) as uint8 class ids: checked against the image's
    `shape` (D, H, W), mapped by `mask_map`, outlines filled, ids checked against
    `classes`. `mpath` names the mask in messages (a file, or a file and its array).
    With `instances: {labels: ids}` the mask holds neuron ids (any integers), and
    comes back as their boundaries (`id_boundaries`)."""
    if m.ndim == 4:
        m = m[..., 0]
    if m.shape != shape:
        raise BadInputError(
            f"{mpath}: mask shape {m.shape[1:] if shape[0] == 1 else m.shape} "
            f"differs from its image {image} {shape[1:3] if shape[0] == 1 else shape}"
        )
    if m.dtype.kind == "f":  # integers are always finite (and may be 8 bytes a voxel)
        check_finite(m, str(mpath))
    if ds.instances is not None and ds.instances.labels == "ids":
        if m.dtype.kind not in "biu" and not np.array_equal(m, np.round(m)):
            raise BadInputError(f"{mpath}: neuron ids must be integers")
        return id_boundaries(m)
    if m.min() < 0 or m.max() > 255 or not np.array_equal(m, np.round(m)):
        raise BadInputError(f"{mpath}: mask values must be integer class ids in 0..255")
    mask = m.astype(np.uint8)
    if ds.mask_map:
        lut = np.arange(256, dtype=np.uint8)
        for value, cls in ds.mask_map.items():
            lut[value] = cls
        mask = lut[mask]
    if ds.fill_outlines:
        mask = fill_outlines(mask)
    if ds.classes and int(mask.max()) >= len(ds.classes):
        extra = sorted(int(v) for v in np.unique(mask) if v >= len(ds.classes))
        raise BadInputError(
            f"{mpath}: mask values {extra[:8]} are not class ids of `classes` "
            f"({len(ds.classes)} names, ids 0..{len(ds.classes) - 1}); add the classes, "
            "or map the values with `mask_map` (e.g. {255: 1})"
        )
    return mask
