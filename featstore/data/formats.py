"""Decoding one file of each format into arrays, with the checks a hostile file needs.

`readers.load` dispatches here: pictures (PNG/JPEG/TIFF via PIL), NIfTI (nibabel,
reoriented to RAS+ and sliced along an axis), DICOM series (pydicom, ordered by
position), MedMNIST .npz files. Sizes are read from headers and refused before any
pixel is decoded when they are too large; NaN/Inf is refused with the file's name.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from scipy import ndimage

from featstore.data.manifest import Dataset
from featstore.errors import BadInputError

AXES = {"sagittal": 0, "coronal": 1, "axial": 2}  # in RAS+ canonical orientation
# Largest 2D image decoded (8192 x 8192), checked on the header before any pixel is
# decoded: a 30000 x 30000 PNG of a few KB would otherwise take gigabytes. PIL's own
# check (which Image.open raises over ~179M pixels) is caught too.
MAX_PIXELS = 1 << 26
_TOO_BIG = (
    f"images are decoded up to {MAX_PIXELS:,} pixels (8192 x 8192): downscale it, or "
    "exclude it (--skip-bad records and skips it)"
)
MAX_VOXELS = 1 << 30  # the same for a NIfTI header (4 GiB as float32)


class _LastNpz:
    """The arrays of the last MedMNIST file read, so that decoding its samples one by
    one does not re-read the whole file; one file at most, dropped by `release_npz`
    (an extract calls it when it ends) or when the file changes on disk."""

    key: tuple[str, int, int] | None = None
    arrays: dict[str, np.ndarray] = {}  # noqa: RUF012 - replaced whole, never mutated


def npz(path: Path) -> dict[str, np.ndarray]:
    """The named arrays of a MedMNIST .npz file (read once while it is the last one)."""
    try:
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size)
        if _LastNpz.key == key:
            return _LastNpz.arrays
        release_npz()  # the previous file is not kept alive beside this one
        z = np.load(path)
        if not isinstance(z, np.lib.npyio.NpzFile):  # a plain .npy array
            raise ValueError(f"holds one {type(z).__name__}, not named arrays")
        with z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise BadInputError(
            f"{path}: not a readable MedMNIST .npz ({exc}); give the official .npz file"
        ) from None
    _LastNpz.key, _LastNpz.arrays = key, arrays
    return arrays


def release_npz() -> None:
    """Drop the arrays of the last MedMNIST file read (they may be gigabytes)."""
    _LastNpz.key, _LastNpz.arrays = None, {}


def check_finite(arr: np.ndarray, where: str) -> np.ndarray:
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise BadInputError(
            f"{where}: {bad} NaN/Inf values; fix or exclude the file "
            "(or run with --skip-bad to record and skip it)"
        )
    return arr


def load_picture(path: Path, is_mask: bool, as_read: bool = False) -> np.ndarray:
    # as_read: keep PIL's integer dtype (uint8, uint16, ...) instead of float32
    dtype = None if as_read else np.float32
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:  # from the header, before a pixel is decoded
                raise BadInputError(f"{path}: its header claims {w} x {h} pixels; {_TOO_BIG}")
            im.load()
            if is_mask:
                return np.asarray(im.convert("I") if im.mode not in ("L", "P", "I") else im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(im, dtype=dtype)[..., None]
            elif im.mode in ("L", "LA", "1"):
                arr = np.asarray(im.convert("L"), dtype=dtype)[..., None]
            else:
                arr = np.asarray(im.convert("RGB"), dtype=dtype)
                if np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(
                    arr[..., 0], arr[..., 2]
                ):
                    arr = arr[..., :1]
            return arr
    except BadInputError:
        raise
    except Image.DecompressionBombError as exc:  # Image.open's own check, over 2x its limit
        raise BadInputError(
            f"{path}: its header claims an image too large to decode ({exc}); {_TOO_BIG}"
        ) from None
    # What Pillow raises on corrupt files besides OSError: SyntaxError, ValueError
    # (e.g. unsupported mode conversions), EOFError.
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadInputError(
            f"{path}: cannot decode image ({exc}); the file is corrupt or "
            "truncated: replace it or run with --skip-bad"
        ) from None


def check_voxels(path: Path, shape: tuple[int, ...]) -> None:
    if int(np.prod(shape, dtype=np.float64)) > MAX_VOXELS:
        raise BadInputError(
            f"{path}: its header says {' x '.join(map(str, shape))} voxels, over the "
            f"{MAX_VOXELS:,}-voxel limit; crop or resample it, or exclude it"
        )


def load_nifti(path: Path, axis: str) -> np.ndarray:
    try:
        img = nib.as_closest_canonical(nib.load(path))
        check_voxels(path, img.shape)
        arr = np.asarray(img.dataobj, dtype=np.float32)
    except BadInputError:
        raise
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


def slice_positions(slices: Sequence[pydicom.Dataset]) -> np.ndarray:
    """Position of each slice along the series normal (InstanceNumber without geometry)."""
    try:
        normal = np.cross(*np.reshape(np.asarray(slices[0].ImageOrientationPatient, float), (2, 3)))
        return np.array([np.dot(normal, np.asarray(s.ImagePositionPatient, float)) for s in slices])
    except AttributeError:
        return np.array([float(getattr(s, "InstanceNumber", i)) for i, s in enumerate(slices)])


def load_dicom(folder: Path) -> np.ndarray:
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
        pos = slice_positions(slices)
    except (ValueError, TypeError) as exc:
        raise BadInputError(
            f"{folder}: unreadable slice geometry (ImageOrientationPatient, "
            f"ImagePositionPatient or InstanceNumber: {exc}); re-export the series"
        ) from None
    if not np.isfinite(pos).all():
        raise BadInputError(f"{folder}: slice positions are not finite numbers; re-export it")
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
        # pydicom: AttributeError without pixel data, ValueError when it is short,
        # NotImplementedError/RuntimeError for a compression it has no decoder for
        try:
            px = s.pixel_array.astype(np.float32)
            slope = float(getattr(s, "RescaleSlope", 1))
            intercept = float(getattr(s, "RescaleIntercept", 0))
        except (AttributeError, ValueError, TypeError, NotImplementedError, RuntimeError) as exc:
            raise BadInputError(
                f"{files[i]}: cannot decode its pixel data ({exc}); replace the file or "
                "run with --skip-bad"
            ) from None
        if px.ndim != 2:
            raise BadInputError(
                f"{files[i]}: pixel data of shape {px.shape}; give one grey 2D slice per "
                "file (multi-frame and colour DICOM are not supported)"
            )
        vol.append(px * slope + intercept)
    shapes = {v.shape for v in vol}
    if len(shapes) != 1:
        raise BadInputError(f"{folder}: slices have different sizes {sorted(shapes)}")
    return np.stack(vol)


def fill_outlines(mask: np.ndarray) -> np.ndarray:
    """Closed 1-pixel outlines to filled regions, per slice: (D, H, W) uint8 -> same."""
    out = np.zeros_like(mask)
    for d in range(mask.shape[0]):
        for cls in np.unique(mask[d])[1:]:
            out[d][ndimage.binary_fill_holes(mask[d] == cls)] = cls
    return out


def load_mask(ds: Dataset, mpath: Path, image: Path, shape: tuple[int, ...]) -> np.ndarray:
    """The mask of `image` as (D, H, W) uint8 class ids: checked against the image's
    `shape` (D, H, W), mapped by `mask_map`, outlines filled, ids checked against
    `classes`."""
    m = load_nifti(mpath, ds.slice_axis) if ds.dims == 3 else load_picture(mpath, True)[None]
    if m.ndim == 4:
        m = m[..., 0]
    if m.shape != shape:
        raise BadInputError(
            f"{mpath}: mask shape {m.shape[1:] if ds.dims == 2 else m.shape} "
            f"differs from its image {image} "
            f"{shape[1:3] if ds.dims == 2 else shape}"
        )
    check_finite(m.astype(np.float32), str(mpath))
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
