"""DICOM series (pydicom): one folder of single-frame slices per volume, ordered by
position along the series normal (InstanceNumber without geometry); masks are NIfTI.

Pixels: the stored values, then the modality rescale (RescaleSlope/Intercept: CT in
HU). Photometric interpretations:
- MONOCHROME2 (min is black): as stored.
- MONOCHROME1 (min is white, common for CR/DX radiographs): the stored range is
  reflected before the rescale, v -> (2^BitsStored - 1) - v (unsigned) or -1 - v
  (signed), so that bright means dense as in MONOCHROME2 and a window applies the same.
- Anything else (PALETTE COLOR, RGB, YBR_*): refused, naming the file and the value;
  a palette's indices are never read as grey.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from featstore.data.manifest import Dataset
from featstore.data.nifti import volume_mask
from featstore.data.reader import Reader
from featstore.data.samples import Header, Loaded, Sample, check_finite
from featstore.errors import BadInputError

if TYPE_CHECKING:
    import pydicom


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def slice_positions(slices: Sequence[pydicom.Dataset]) -> np.ndarray:
    """Position of each slice along the series normal (InstanceNumber without geometry)."""
    try:
        normal = np.cross(*np.reshape(np.asarray(slices[0].ImageOrientationPatient, float), (2, 3)))
        return np.array([np.dot(normal, np.asarray(s.ImagePositionPatient, float)) for s in slices])
    except AttributeError:
        return np.array([float(getattr(s, "InstanceNumber", i)) for i, s in enumerate(slices)])


def _ordered(folder: Path, slices: Sequence[pydicom.Dataset]) -> np.ndarray:
    """The order of `slices` by position; refuses gaps and inconsistent spacing."""
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
    return order


def _monochrome2(s: pydicom.Dataset, path: Path) -> np.ndarray:
    """The stored values of one slice, as MONOCHROME2 (see the module docstring)."""
    kind = str(getattr(s, "PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if kind not in ("MONOCHROME1", "MONOCHROME2"):
        raise BadInputError(
            f"{path}: PhotometricInterpretation {kind}; featstore reads grey DICOM only "
            "(MONOCHROME1/2): convert the series to grey first"
        )
    px = s.pixel_array
    if kind == "MONOCHROME2":
        return px
    bits = int(getattr(s, "BitsStored", px.dtype.itemsize * 8))
    if int(getattr(s, "PixelRepresentation", 0)) == 1:  # signed
        return (-1 - px.astype(np.int64)).astype(px.dtype)
    return ((1 << bits) - 1 - px.astype(np.int64)).astype(px.dtype)


def load_dicom(folder: Path) -> np.ndarray:
    """(slices, rows, cols) float32 with the rescale slope and intercept applied."""
    import pydicom  # 0.3 s to import: only when a series is read

    files = _files(folder)
    slices = []
    for f in files:
        try:
            slices.append(pydicom.dcmread(f))
        except (pydicom.errors.InvalidDicomError, OSError, EOFError) as exc:
            raise BadInputError(f"{f}: not a readable DICOM file ({exc})") from None
    if not slices:
        raise BadInputError(f"{folder}: no DICOM files in the series folder")
    vol = []
    for i in _ordered(folder, slices):
        s = slices[i]
        # pydicom: AttributeError without pixel data, ValueError when it is short,
        # NotImplementedError/RuntimeError for a compression it has no decoder for
        try:
            px = _monochrome2(s, files[i]).astype(np.float32)
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


class Dicom(Reader):
    """`format: dicom`: each index row's image is a series folder."""

    folder = True

    def count(self, ds: Dataset, path: Path) -> int:
        n = len(_files(path))
        if n == 0:
            raise BadInputError(f"{path}: no DICOM files in the series folder")
        return n

    def header(self, ds: Dataset, sample: Sample) -> Header:
        import pydicom

        folder = Path(sample.image)
        try:
            heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in _files(folder)]
            size = (int(heads[0].Rows), int(heads[0].Columns))
        except (pydicom.errors.InvalidDicomError, OSError, AttributeError, ValueError) as exc:
            raise BadInputError(f"{folder}: no usable Rows/Columns ({exc})") from None
        # A series may lack the geometry tags (the reader then orders slices by
        # InstanceNumber): its size is still known, its spacing is not (NaN).
        row = col = gap = float("nan")
        if "PixelSpacing" in heads[0]:
            row, col = (float(v) for v in heads[0].PixelSpacing)
        if len(heads) > 1 and all(
            "ImageOrientationPatient" in h and "ImagePositionPatient" in h for h in heads
        ):
            gap = float(np.median(np.diff(np.sort(slice_positions(heads)))))
        return Header(size, (gap, row, col))

    def files(self, ds: Dataset, sample: Sample) -> list[Path]:
        return _files(Path(sample.image)) + ([Path(sample.mask)] if sample.mask else [])

    def decode(self, ds: Dataset, sample: Sample, items: range, as_read: bool) -> Loaded:
        path = Path(sample.image)
        image = check_finite(load_dicom(path), str(path))[..., None]
        return Loaded(image=image, mask=volume_mask(ds, sample, image))
