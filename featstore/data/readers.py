"""Datasets as sample tables, listed cheaply; one sample decoded on demand.

Decoding each file format is `formats`'s job; nothing here knows about models.
`list_samples` returns the sample table (ids, labels, splits, slice counts) without
decoding pixels; `load` returns one sample as raw float32 intensities, slices first:

    image: (D, H, W, C) float32, C in {1, 3}; D = 1 for 2D images
    mask:  (D, H, W) uint8 class ids, or None
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import nibabel as nib
import numpy as np

from featstore.data.fingerprint import fingerprint
from featstore.data.formats import (
    AXES,
    check_finite,
    check_voxels,
    load_dicom,
    load_mask,
    load_nifti,
    load_picture,
    npz,
)
from featstore.data.manifest import MAX_LABEL, SPLITS, Dataset, GlobIndex, path_exists
from featstore.data.synthetic import generate
from featstore.errors import BadInputError


@dataclass(frozen=True)
class Sample:
    """One row of a dataset's sample table (no pixels)."""

    id: str
    split: str  # train | val | test ("" until assigned)
    label: tuple[int, ...]  # () without labels, (k,) single-label, multi-hot for multilabel
    n_items: int  # slices (1 for a 2D image)
    image: str  # file path, DICOM folder, or "split:index" inside a MedMNIST npz
    mask: str | None = None
    group: str = ""  # patient id: samples of one group never cross splits
    meta: tuple[tuple[str, str], ...] = ()  # (coordinate name, value) from `metadata:`


@dataclass(frozen=True)
class Loaded:
    """One decoded sample: raw intensities and, for segmentation, its class ids."""

    image: np.ndarray  # (D, H, W, C) float32
    mask: np.ndarray | None  # (D, H, W) uint8


# ------------------------------------------------------------------ listing


def _read_csv(path: Path) -> list[tuple[str, dict[str, str]]]:
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
        table = _read_csv(join)
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


def _read_index(ds: Dataset) -> list[tuple[str, dict[str, str]]]:
    """(where, row) per sample; `where` names the file and line for messages."""
    if isinstance(ds.index, GlobIndex):
        path, located = ds.path / ds.index.glob, _glob_rows(ds, ds.index)
    else:
        path = ds.path / (ds.index or "index.csv")
        located = _read_csv(path)
    rows = [r for _, r in located]
    if not rows:
        raise BadInputError(f"{path}: index has no rows; add one row per sample")
    need = {"image"} | ({"mask"} if ds.task == "segmentation" else {"label"}) | set(ds.metadata)
    if _splits_from_column(ds):
        need.add("split")
    missing = need - set(rows[0])
    if missing:
        raise BadInputError(
            f"{path}: index lacks column(s) {sorted(missing)}; columns are "
            f"{list(rows[0])} (see README, 'Formats')"
        )
    return located


def _splits_from_column(ds: Dataset) -> bool:
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


def _parse_label(text: str, ds: Dataset, where: str) -> tuple[int, ...]:
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


def _count_items(ds: Dataset, path: Path) -> int:
    if ds.dims == 2:
        return 1
    if ds.format == "dicom":
        n = sum(1 for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if n == 0:
            raise BadInputError(f"{path}: no DICOM files in the series folder")
        return n
    try:
        img = nib.load(path)
    except (OSError, EOFError, ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise BadInputError(f"{path}: cannot read NIfTI header ({exc})") from None
    if not isinstance(img, nib.spatialimages.SpatialImage):  # e.g. a GIFTI surface
        raise BadInputError(f"{path}: not a NIfTI volume ({type(img).__name__})")
    shape = img.shape[:3] if len(img.shape) == 4 and img.shape[3] == 1 else img.shape
    if len(shape) != 3:
        raise BadInputError(f"{path}: expected a 3D volume, got shape {img.shape}")
    check_voxels(path, shape)
    ornt = nib.orientations.io_orientation(img.affine)
    canonical = [0, 0, 0]
    for i, (out_axis, _) in enumerate(ornt):
        canonical[int(out_axis)] = shape[i]
    n = int(canonical[AXES[ds.slice_axis]])
    if n == 0:
        raise BadInputError(f"{path}: the volume {tuple(img.shape)} has no {ds.slice_axis} slices")
    return n


def _list_indexed(ds: Dataset) -> list[Sample]:
    out = []
    width: tuple[int, str] | None = None  # multi-hot length, and the line that set it
    for where, row in _read_index(ds):
        if not row["image"].strip():
            raise BadInputError(f"{where}: the image cell is empty; give the file's path")
        image = ds.path / row["image"]
        if not path_exists(image):
            raise BadInputError(f"{where}: image {image} does not exist")
        if ds.format == "dicom" and not image.is_dir():
            raise BadInputError(
                f"{where}: image {image} is not a folder; a DICOM series is a folder of files"
            )
        if ds.format != "dicom" and image.is_dir():
            raise BadInputError(f"{where}: image {image} is a folder, not an image file")
        mask = ds.path / row["mask"] if row.get("mask", "").strip() else None
        if ds.task == "segmentation" and (mask is None or not path_exists(mask)):
            raise BadInputError(f"{where}: mask {mask or '(empty)'} does not exist")
        if mask is not None and mask.is_dir():
            raise BadInputError(f"{where}: mask {mask} is a folder, not a label file")
        label = () if ds.task == "segmentation" else _parse_label(row.get("label", ""), ds, where)
        if ds.task == "multilabel":
            width = width or (len(label), where)
            if len(label) != width[0]:
                raise BadInputError(
                    f"{where}: multilabel has {len(label)} values but {width[1]} has "
                    f"{width[0]}; every row needs one 0/1 per class"
                )
        split = row.get("split", "").strip()
        if _splits_from_column(ds) and split not in SPLITS:
            raise BadInputError(
                f"{where}: split {split!r} must be one of {SPLITS}, or give the "
                "dataset `splits: {ratios: [0.7, 0.1, 0.2], seed: 0}`"
            )
        sid = row.get("id", "").strip() or Path(row["image"]).name.split(".")[0]
        out.append(
            Sample(
                id=sid,
                split=split,
                label=label,
                n_items=_count_items(ds, image),
                image=str(image),
                mask=str(mask) if mask else None,
                group=row.get("patient", "").strip() or sid,
                meta=tuple((name, row[col]) for col, name in ds.metadata.items()),
            )
        )
    return out


def _list_medmnist(ds: Dataset) -> list[Sample]:
    data = npz(ds.path)
    out = []
    for split in SPLITS:
        key = f"{split}_images"
        if key not in data or f"{split}_labels" not in data:
            raise BadInputError(
                f"{ds.path}: MedMNIST file lacks '{key}' / '{split}_labels'; "
                f"keys are {sorted(data)}"
            )
        images, labels = data[key], data[f"{split}_labels"].reshape(len(data[key]), -1)
        if ds.dims == 3 and images.ndim != 4:
            raise BadInputError(
                f"{ds.path}: dims 3 expects (N, D, H, W) images, got {images.shape}"
            )
        if ds.dims == 2 and images.ndim not in (3, 4):
            raise BadInputError(f"{ds.path}: dims 2 expects (N, H, W[, 3]), got {images.shape}")
        n_items = images.shape[1] if ds.dims == 3 else 1
        for i in range(len(images)):
            sid = f"{split}-{i:05d}"
            out.append(
                Sample(
                    id=sid,
                    split=split,
                    label=tuple(int(v) for v in labels[i]),
                    n_items=n_items,
                    image=f"{split}:{i}",
                    group=sid,
                )
            )
    return out


def assign_splits(
    samples: list[Sample], ratios: tuple[float, float, float], seed: int
) -> list[Sample]:
    """Deterministic split by ratio, whole groups (patients/volumes) at a time."""
    groups = sorted({s.group for s in samples})
    order = np.random.default_rng(seed).permutation(len(groups))
    cuts = np.round(np.cumsum(ratios)[:2] * len(groups)).astype(int)
    split_of = {}
    for rank, g in enumerate(order):
        split_of[groups[g]] = SPLITS[int(np.searchsorted(cuts, rank, side="right"))]
    return [replace(s, split=split_of[s.group]) for s in samples]


def list_samples(ds: Dataset) -> list[Sample]:
    """The dataset's sample table, splits assigned. Decodes no pixels (NIfTI: headers only)."""
    if ds.synthetic is not None:
        generate(ds.synthetic, ds.path)
    samples = _list_medmnist(ds) if ds.format == "medmnist" else _list_indexed(ds)
    if ds.splits is not None and ds.splits.ratios is not None:
        samples = assign_splits(samples, ds.splits.ratios, ds.splits.seed)
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise BadInputError(f"{ds.path}: sample ids repeat ({dup}); add a unique `id` column")
    return samples


def dataset_files(ds: Dataset, samples: list[Sample]) -> list[Path]:
    """Every file whose bytes determine the dataset (for its fingerprint)."""
    if ds.format == "medmnist":
        return [ds.path]
    if isinstance(ds.index, GlobIndex):
        files = [ds.path / ds.index.join] if ds.index.join else []
    else:
        files = [ds.path / (ds.index or "index.csv")]
    for s in samples:
        for p in filter(None, (s.image, s.mask)):
            path = Path(p)
            files.extend(
                sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path]
            )
    return files


@dataclass(frozen=True)
class Prepared:
    """A dataset listed and fingerprinted once, reused for every encoder and resolution."""

    ds: Dataset
    samples: list[Sample]
    fingerprint: str

    @cached_property
    def index(self) -> list[tuple[int, int]]:
        """(sample index, slice) of every item, in item order."""
        return [(i, k) for i, s in enumerate(self.samples) for k in range(s.n_items)]


def prepare(ds: Dataset, memo: Path | None = None) -> Prepared:
    """List and fingerprint `ds`; `memo` is the file-hash memo (None: hash afresh)."""
    samples = list_samples(ds)
    table = [(s.id, s.split, s.label, s.n_items, s.group, s.meta) for s in samples]
    fp = fingerprint(dataset_files(ds, samples), table, ds.path, memo)
    return Prepared(ds, samples, fp)


# ------------------------------------------------------------------ loading


def load(ds: Dataset, sample: Sample, as_read: bool = False) -> Loaded:
    """Decode one sample; raises `BadInputError` naming the file on any problem.

    as_read: MedMNIST and PNG/JPEG/TIFF images keep the integer dtype they are stored
    in (uint8, uint16, int32) instead of float32, with the same values; NIfTI and DICOM
    are float32 either way (their scaling is applied here).
    """
    mask = None
    if ds.format == "medmnist":
        split, i = sample.image.split(":")
        arr = npz(ds.path)[f"{split}_images"][int(i)]
        arr = arr if as_read else arr.astype(np.float32)
        if arr.ndim == ds.dims:  # grey: add the channel axis
            arr = arr[..., None]
        return Loaded(image=arr if ds.dims == 3 else arr[None], mask=None)
    path = Path(sample.image)
    if ds.format == "dicom":
        image = load_dicom(path)[..., None]
    elif ds.dims == 3:
        image = load_nifti(path, ds.slice_axis)[..., None]
    else:
        image = load_picture(path, is_mask=False, as_read=as_read)[None]
    if image.dtype.kind == "f":
        check_finite(image, str(path))
    if sample.mask:
        mask = load_mask(ds, Path(sample.mask), path, image.shape[:3])
    return Loaded(image=image, mask=mask)
