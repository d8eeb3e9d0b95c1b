"""One reader per on-disk format; each lists samples cheaply and loads one on demand.

A reader never knows about models. `list_samples` returns the sample table (ids,
labels, splits, slice counts) without decoding pixels; `load` returns one sample as
raw float32 intensities, slices first:

    image: (D, H, W, C) float32, C in {1, 3}; D = 1 for 2D images
    mask:  (D, H, W) uint8 class ids, or None
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from scipy import ndimage

from featstore.errors import BadInputError
from featstore.fingerprint import fingerprint
from featstore.manifest import SPLITS, Dataset, GlobIndex
from featstore.synthetic import generate

AXES = {"sagittal": 0, "coronal": 1, "axial": 2}  # in RAS+ canonical orientation


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


def _glob_rows(ds: Dataset, spec: GlobIndex) -> list[tuple[str, dict[str, str]]]:
    """(where, row) per image found by the glob; `where` names the join CSV's line."""
    images = sorted(p for p in ds.path.glob(spec.glob) if p.is_file())
    if not images:
        raise BadInputError(
            f"{ds.path}: index.glob {spec.glob!r} matches no file; check the "
            "pattern (relative to the dataset path)"
        )
    joined: dict[str, tuple[int, dict[str, str]]] = {}
    join = ds.path / spec.join if spec.join else None
    if join is not None:
        if not join.is_file():
            raise BadInputError(
                f"{join}: index.join names a CSV that does not exist; fix the name "
                "(relative to the dataset path) or drop `join`"
            )
        with join.open(newline="", encoding="utf-8-sig") as f:
            table = list(csv.DictReader(f))
        if table and spec.key not in table[0]:
            raise BadInputError(
                f"{join}: no column {spec.key!r} (index.key); columns are {list(table[0])}"
            )
        joined = {row[spec.key]: (n, row) for n, row in enumerate(table, start=2)}
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
            line, extra = joined[img.name]
            row |= {k: v for k, v in extra.items() if k != spec.key}
            where = f"{join}, line {line}"
        rows.append((where, row))
    return rows


def _read_index(ds: Dataset) -> list[tuple[str, dict[str, str]]]:
    """(where, row) per sample; `where` names the file and line for messages."""
    if isinstance(ds.index, GlobIndex):
        path, located = ds.path / ds.index.glob, _glob_rows(ds, ds.index)
    else:
        path = ds.path / (ds.index or "index.csv")
        with path.open(newline="", encoding="utf-8-sig") as f:
            located = [(f"{path}, line {n}", r) for n, r in enumerate(csv.DictReader(f), start=2)]
    rows = [r for _, r in located]
    if not rows:
        raise BadInputError(f"{path}: index has no rows; add one row per sample")
    need = {"image"} | ({"mask"} if ds.task == "segmentation" else {"label"}) | set(ds.metadata)
    missing = need - set(rows[0])
    if missing:
        raise BadInputError(
            f"{path}: index lacks column(s) {sorted(missing)}; columns are "
            f"{list(rows[0])} (see README, 'Formats')"
        )
    return located


def _parse_label(text: str, ds: Dataset, where: str) -> tuple[int, ...]:
    text = (text or "").strip()
    if not text:
        raise BadInputError(f"{where}: label is missing; every {ds.task} sample needs one")
    try:
        if ds.task == "multilabel":  # multi-hot, e.g. "0;1;0;0"
            return tuple(int(v) for v in text.replace(" ", ";").split(";") if v)
        return (int(float(text)),)
    except ValueError:
        raise BadInputError(f"{where}: label {text!r} is not an integer class id") from None


def _count_items(ds: Dataset, path: Path) -> int:
    if ds.dims == 2:
        return 1
    if ds.format == "dicom":
        return sum(1 for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    try:
        img = nib.load(path)
    except (OSError, nib.filebasedimages.ImageFileError) as exc:
        raise BadInputError(f"{path}: cannot read NIfTI header ({exc})") from None
    if not isinstance(img, nib.spatialimages.SpatialImage):  # e.g. a GIFTI surface
        raise BadInputError(f"{path}: not a NIfTI volume ({type(img).__name__})")
    shape = img.shape[:3] if len(img.shape) == 4 and img.shape[3] == 1 else img.shape
    if len(shape) != 3:
        raise BadInputError(f"{path}: expected a 3D volume, got shape {img.shape}")
    ornt = nib.orientations.io_orientation(img.affine)
    canonical = [0, 0, 0]
    for i, (out_axis, _) in enumerate(ornt):
        canonical[int(out_axis)] = shape[i]
    return int(canonical[AXES[ds.slice_axis]])


def _list_indexed(ds: Dataset) -> list[Sample]:
    out = []
    for where, row in _read_index(ds):
        image = ds.path / row["image"]
        if not image.exists():
            raise BadInputError(f"{where}: image {image} does not exist")
        mask = ds.path / row["mask"] if row.get("mask") else None
        if ds.task == "segmentation" and (mask is None or not mask.exists()):
            raise BadInputError(f"{where}: mask {mask or '(empty)'} does not exist")
        label = () if ds.task == "segmentation" else _parse_label(row.get("label", ""), ds, where)
        split = (row.get("split") or "").strip()
        if ds.splits is None and split not in SPLITS:
            raise BadInputError(
                f"{where}: split {split!r} must be one of {SPLITS}, or give the "
                "dataset `splits: {ratios: [0.7, 0.1, 0.2], seed: 0}`"
            )
        sid = row.get("id") or Path(row["image"]).name.split(".")[0]
        out.append(
            Sample(
                id=sid,
                split=split,
                label=label,
                n_items=_count_items(ds, image),
                image=str(image),
                mask=str(mask) if mask else None,
                group=row.get("patient") or sid,
                meta=tuple((name, row[col]) for col, name in ds.metadata.items()),
            )
        )
    return out


@lru_cache(maxsize=4)
def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _list_medmnist(ds: Dataset) -> list[Sample]:
    data = _npz(ds.path)
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


def _check_finite(arr: np.ndarray, where: str) -> np.ndarray:
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise BadInputError(
            f"{where}: {bad} NaN/Inf values; fix or exclude the file "
            "(or run with --skip-bad to record and skip it)"
        )
    return arr


def _load_picture(path: Path, is_mask: bool) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            if is_mask:
                return np.asarray(im.convert("I") if im.mode not in ("L", "P", "I") else im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(im, dtype=np.float32)[..., None]
            elif im.mode in ("L", "LA", "1"):
                arr = np.asarray(im.convert("L"), dtype=np.float32)[..., None]
            else:
                arr = np.asarray(im.convert("RGB"), dtype=np.float32)
                if np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(
                    arr[..., 0], arr[..., 2]
                ):
                    arr = arr[..., :1]
            return arr
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise BadInputError(
            f"{path}: cannot decode image ({exc}); the file is corrupt or "
            "truncated: replace it or run with --skip-bad"
        ) from None


def _load_nifti(path: Path, axis: str) -> np.ndarray:
    try:
        img = nib.as_closest_canonical(nib.load(path))
        arr = np.asarray(img.dataobj, dtype=np.float32)
    except (OSError, EOFError, ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise BadInputError(
            f"{path}: cannot read NIfTI ({exc}); the file is corrupt or truncated"
        ) from None
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise BadInputError(
            f"{path}: expected a 3D volume, got shape {arr.shape}; "
            "give one volume per file (split 4D series first)"
        )
    return np.moveaxis(arr, AXES[axis], 0)  # slices first


def _load_dicom(folder: Path) -> np.ndarray:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    slices = []
    for f in files:
        try:
            slices.append(pydicom.dcmread(f))
        except (pydicom.errors.InvalidDicomError, OSError, EOFError) as exc:
            raise BadInputError(f"{f}: not a readable DICOM file ({exc})") from None
    if not slices:
        raise BadInputError(f"{folder}: no DICOM files in the series folder")
    try:
        normal = np.cross(*np.reshape(np.asarray(slices[0].ImageOrientationPatient, float), (2, 3)))
        pos = np.array([np.dot(normal, np.asarray(s.ImagePositionPatient, float)) for s in slices])
    except AttributeError:
        pos = np.array([float(getattr(s, "InstanceNumber", i)) for i, s in enumerate(slices)])
    order = np.argsort(pos)
    if len(slices) > 2:
        gaps = np.diff(pos[order])
        med = np.median(gaps)
        if med <= 0 or np.any(np.abs(gaps - med) > 0.1 * med + 1e-3):
            raise BadInputError(
                f"{folder}: slices are missing or inconsistently spaced (gaps "
                f"{np.unique(gaps.round(3))[:6]} mm); export the complete series or run with "
                "--skip-bad"
            )
    vol = []
    for i in order:
        s = slices[i]
        px = s.pixel_array.astype(np.float32)
        vol.append(
            px * float(getattr(s, "RescaleSlope", 1)) + float(getattr(s, "RescaleIntercept", 0))
        )
    shapes = {v.shape for v in vol}
    if len(shapes) != 1:
        raise BadInputError(f"{folder}: slices have different sizes {sorted(shapes)}")
    return np.stack(vol)


def load(ds: Dataset, sample: Sample) -> Loaded:
    """Decode one sample; raises `BadInputError` naming the file on any problem."""
    mask = None
    if ds.format == "medmnist":
        split, i = sample.image.split(":")
        arr = _npz(ds.path)[f"{split}_images"][int(i)].astype(np.float32)
        if arr.ndim == ds.dims:  # grey: add the channel axis
            arr = arr[..., None]
        return Loaded(image=arr if ds.dims == 3 else arr[None], mask=None)
    path = Path(sample.image)
    if ds.format == "dicom":
        image = _load_dicom(path)[..., None]
    elif ds.dims == 3:
        image = _load_nifti(path, ds.slice_axis)[..., None]
    else:
        image = _load_picture(path, is_mask=False)[None]
    _check_finite(image, str(path))
    if sample.mask:
        mpath = Path(sample.mask)
        m = _load_nifti(mpath, ds.slice_axis) if ds.dims == 3 else _load_picture(mpath, True)[None]
        if m.ndim == 4:
            m = m[..., 0]
        if m.shape != image.shape[:3]:
            raise BadInputError(
                f"{mpath}: mask shape {m.shape[1:] if ds.dims == 2 else m.shape} "
                f"differs from its image {path} "
                f"{image.shape[1:3] if ds.dims == 2 else image.shape[:3]}"
            )
        _check_finite(m.astype(np.float32), str(mpath))
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
    return Loaded(image=image, mask=mask)


def fill_outlines(mask: np.ndarray) -> np.ndarray:
    """Closed 1-pixel outlines to filled regions, per slice: (D, H, W) uint8 -> same."""
    out = np.zeros_like(mask)
    for d in range(mask.shape[0]):
        for cls in np.unique(mask[d])[1:]:
            out[d][ndimage.binary_fill_holes(mask[d] == cls)] = cls
    return out
