"""Pixel spacing of the stored mask grid, so that HD95 can be in millimetres (no torch).

Masks are stored at the preprocessed resolution (R x R per slice), not at the
original size, so a native spacing must be scaled: along each in-plane axis,
grid spacing = native spacing x original size / R (`fit: resize` stretches each axis
to R; `fit: pad` keeps the native spacing of images no larger than R). Slices are
never resampled, so the slice spacing of a volume is the native one.

Where the native spacing comes from, first found per dataset:

1. per-item coordinates of the feature set, written through the manifest's
   `metadata:` (an index CSV column): `spacing_mm` or `pixel_spacing_mm` (one number,
   square in-plane pixels, of the original image) and, for volumes without a header,
   `slice_spacing_mm`;
2. the file header: NIfTI voxel sizes (in the RAS+ orientation the reader slices) or
   DICOM `PixelSpacing` and the gap between slice positions.

The original in-plane size comes from the file header (PNG/JPEG/TIFF, NIfTI, DICOM);
nothing here decodes pixels. When any sample's spacing is unknown (MedMNIST,
synthetic PNGs, a CSV without the column) the whole set is scored in pixels of the
stored grid (`None`), so that units never mix within one result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image

from featstore.data.formats import AXES
from featstore.data.manifest import Dataset
from featstore.data.readers import Sample
from featstore.errors import ProbeError

SPACING_COORDS = ("spacing_mm", "pixel_spacing_mm")  # native in-plane spacing, mm
SLICE_COORD = "slice_spacing_mm"  # native slice spacing of a volume, mm
Spacing = tuple[float, ...]  # (row, col) for 2D, (slice, row, col) for 3D, in mm


def _nifti(path: Path, axis: str) -> tuple[Spacing, tuple[int, int]]:
    """(slice, row, col) voxel size and (rows, cols) in the reader's slicing."""
    img = nib.load(path)
    if not isinstance(img, nib.spatialimages.SpatialImage):  # extract refused it already
        raise ProbeError(f"{path}: not a NIfTI volume ({type(img).__name__})")
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    shape = list(img.shape[:3])
    canon_z, canon_n = [0.0] * 3, [0] * 3
    for i, (out_axis, _) in enumerate(nib.orientations.io_orientation(img.affine)):
        canon_z[int(out_axis)], canon_n[int(out_axis)] = zooms[i], shape[i]
    s = AXES[axis]
    rest = [a for a in range(3) if a != s]  # np.moveaxis keeps the others in order
    return (canon_z[s], canon_z[rest[0]], canon_z[rest[1]]), (canon_n[rest[0]], canon_n[rest[1]])


def _dicom(folder: Path) -> tuple[Spacing, tuple[int, int]]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    row, col = (float(v) for v in heads[0].PixelSpacing)
    normal = np.cross(*np.reshape(np.asarray(heads[0].ImageOrientationPatient, float), (2, 3)))
    pos = np.sort([np.dot(normal, np.asarray(h.ImagePositionPatient, float)) for h in heads])
    gap = float(np.median(np.diff(pos))) if len(pos) > 1 else float("nan")
    return (gap, row, col), (int(heads[0].Rows), int(heads[0].Columns))


def _picture_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:  # reads the header only
        return im.height, im.width


def _scale(size: tuple[int, int], resolution: int, fit: str) -> tuple[float, float]:
    """Native -> grid factor per in-plane axis (see the module docstring)."""
    h, w = size
    if fit == "pad" and h <= resolution and w <= resolution:
        return 1.0, 1.0
    return h / resolution, w / resolution


def _coord(coords: Mapping[str, np.ndarray], names: Sequence[str], i: int) -> float | None:
    for name in names:
        if name in coords:
            try:
                v = float(coords[name][i])
            except (TypeError, ValueError):
                return None
            return v if np.isfinite(v) and v > 0 else None
    return None


def grid_spacing(
    ds: Dataset,
    samples: Sequence[Sample],
    coords: Mapping[str, np.ndarray],
    item_sample: np.ndarray,
    resolution: int,
    fit: str,
) -> dict[str, Spacing] | None:
    """Spacing (mm) of each sample's stored mask grid, or None when any is unknown.

    samples: the dataset's listing (file paths); coords: per-item coordinate arrays of
    the feature set by name; item_sample: (n_items,) sample id of each item;
    resolution: the stored mask size R; fit: the set's `preprocess.fit`.
    Returns {sample id: (row, col)} for 2D, {sample id: (slice, row, col)} for 3D.
    """
    if ds.format == "medmnist":
        return None  # MedMNIST files carry no spacing
    first = {str(s): i for i, s in reversed(list(enumerate(item_sample)))}
    by_id = {s.id: s for s in samples}
    out: dict[str, Spacing] = {}
    for sid, i in first.items():
        sample = by_id.get(sid)
        if sample is None:
            return None
        path = Path(sample.image)
        in_plane = _coord(coords, SPACING_COORDS, i)
        if ds.dims == 2:
            if in_plane is None:
                return None
            fy, fx = _scale(_picture_size(path), resolution, fit)
            out[sid] = (in_plane * fy, in_plane * fx)
            continue
        if ds.format == "dicom":
            (dz, dy, dx), size = _dicom(path)
        elif ds.format in ("nifti", "synthetic"):
            (dz, dy, dx), size = _nifti(path, ds.slice_axis)
        else:
            return None
        if in_plane is not None:
            dy = dx = in_plane
        dz = _coord(coords, (SLICE_COORD,), i) or dz
        if not all(np.isfinite(v) and v > 0 for v in (dz, dy, dx)):
            return None
        fy, fx = _scale(size, resolution, fit)
        out[sid] = (dz, dy * fy, dx * fx)
    return out
