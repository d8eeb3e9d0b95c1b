"""What a probe needs from a dataset's files besides the pixels, read from headers.

Extraction records, per sample, the native in-plane size (rows, cols) of each slice or
image and the voxel spacing that the file header states; probes then compute HD95 in
millimetres from the feature set alone (`featstore.probing.geometry`). Nothing here
decodes pixels:

- NIfTI: voxel sizes and shape, in the RAS+ orientation and slicing that the reader uses;
- DICOM: `PixelSpacing`, `Rows`/`Columns` and the gap between slice positions;
- PNG/JPEG/TIFF: the size only (such files carry no spacing a probe may trust);
- MedMNIST: the array's size; no spacing.

Also whether a dataset's data is here at all (`present`): a probe checks the data's
fingerprint only then.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from PIL.Image import DecompressionBombError

from featstore.data import readers
from featstore.data.fingerprint import memo_for
from featstore.data.formats import AXES, npz
from featstore.data.manifest import Dataset
from featstore.data.readers import Sample

NAN = float("nan")


@dataclass(frozen=True)
class Native:
    """One sample's native geometry: slice size in pixels (0: unknown) and the header's
    spacing in mm, (slice, row, col), NaN where unknown."""

    rows: int
    cols: int
    spacing: tuple[float, float, float] = (NAN, NAN, NAN)


UNKNOWN = Native(0, 0)


def present(ds: Dataset) -> bool:
    """Whether the dataset's data (its folder, or its MedMNIST file) is on this machine."""
    try:
        return ds.path.exists()
    except (OSError, ValueError):  # names the OS refuses
        return False


def _nifti(path: Path, axis: str) -> Native:
    img = nib.load(path)
    if not isinstance(img, nib.spatialimages.SpatialImage):  # extract refuses it anyway
        return UNKNOWN
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    shape = list(img.shape[:3])
    canon_z, canon_n = [0.0] * 3, [0] * 3
    for i, (out_axis, _) in enumerate(nib.orientations.io_orientation(img.affine)):
        canon_z[int(out_axis)], canon_n[int(out_axis)] = zooms[i], shape[i]
    s = AXES[axis]
    rest = [a for a in range(3) if a != s]  # np.moveaxis keeps the others in order
    spacing = (canon_z[s], canon_z[rest[0]], canon_z[rest[1]])
    return Native(canon_n[rest[0]], canon_n[rest[1]], spacing)


def _dicom(folder: Path) -> Native:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    # A series may lack the geometry tags (the reader then orders slices by
    # InstanceNumber): its size is still known, its spacing is not (NaN).
    row = col = gap = NAN
    if "PixelSpacing" in heads[0]:
        row, col = (float(v) for v in heads[0].PixelSpacing)
    if len(heads) > 1 and all(
        "ImageOrientationPatient" in h and "ImagePositionPatient" in h for h in heads
    ):
        normal = np.cross(*np.reshape(np.asarray(heads[0].ImageOrientationPatient, float), (2, 3)))
        pos = np.sort([np.dot(normal, np.asarray(h.ImagePositionPatient, float)) for h in heads])
        gap = float(np.median(np.diff(pos)))
    return Native(int(heads[0].Rows), int(heads[0].Columns), (gap, row, col))


def _picture(path: Path) -> Native:
    with Image.open(path) as im:  # reads the header only
        return Native(im.height, im.width)


def _medmnist(ds: Dataset, samples: Sequence[Sample]) -> list[Native]:
    arrays = npz(ds.path)
    out = []
    for s in samples:
        shape = arrays[f"{s.image.split(':')[0]}_images"].shape  # (N, [D,] H, W[, 3])
        h, w = shape[2:4] if ds.dims == 3 else shape[1:3]
        out.append(Native(int(h), int(w)))
    return out


def native(ds: Dataset, sample: Sample) -> Native:
    """The native geometry of one (non-MedMNIST) sample, from its file's header.

    A header that cannot be read gives `UNKNOWN`: extraction refuses (or, with
    --skip-bad, skips) that sample when it decodes it.
    """
    path = Path(sample.image)
    try:
        if ds.format == "dicom":
            return _dicom(path)
        if ds.dims == 3:
            return _nifti(path, ds.slice_axis)
        return _picture(path)
    except (
        OSError,
        ValueError,
        EOFError,
        AttributeError,
        IndexError,
        UnidentifiedImageError,
        DecompressionBombError,  # refused (or skipped) by its header when decoded
        nib.filebasedimages.ImageFileError,
        pydicom.errors.InvalidDicomError,
    ):
        return UNKNOWN


def native_table(ds: Dataset, samples: Sequence[Sample]) -> list[Native]:
    """`native` of every sample, in order (MedMNIST: one look at the array shapes)."""
    if ds.format == "medmnist":
        return _medmnist(ds, samples)
    return [native(ds, s) for s in samples]


def data_fingerprint(ds: Dataset, memo: Path | None = None) -> str | None:
    """The fingerprint of the dataset's data on this machine (`readers.prepare`: every
    file listed and hashed, memoised in `memo`), or None where it is absent."""
    return readers.prepare(ds, memo).fingerprint if present(ds) else None


def data_check(cache: Path | str) -> Callable[[Dataset], str | None]:
    """`data_fingerprint` with the file-hash memo that belongs to `cache`: what a probe
    passes as its `data_check`."""
    memo = memo_for(cache)
    return lambda ds: data_fingerprint(ds, memo)
