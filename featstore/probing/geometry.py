"""Pixel spacing of the stored mask grid, so that HD95 can be in millimetres (no torch).

Masks are stored at the preprocessed resolution (R x R per slice), not at the
original size, so a native spacing must be scaled: along each in-plane axis,
grid spacing = native spacing x original size / R (`fit: resize` stretches each axis
to R; `fit: pad` keeps the native spacing of images no larger than R). Slices are
never resampled, so the slice spacing of a volume is the native one.

Where the native spacing comes from, first found per sample:

1. per-item coordinates of the feature set, written through the manifest's
   `metadata:` (an index CSV column): `spacing_mm` or `pixel_spacing_mm` (one number,
   square in-plane pixels, of the original image) and, for volumes, `slice_spacing_mm`;
2. for volumes, the file header's spacing, recorded in the set at extraction
   (`native_slice_mm`, `native_row_mm`, `native_col_mm`: NIfTI voxel sizes in the RAS+
   orientation the reader slices, DICOM `PixelSpacing` and the gap between slices).

The original in-plane size is recorded in the set too (`native_rows`, `native_cols`),
so nothing here reads the raw data. When any sample's spacing is unknown (MedMNIST,
synthetic PNGs, a CSV without the column) the whole set is scored in pixels of the
stored grid (`None`), so that units never mix within one result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from featstore.store.schema import NATIVE, NATIVE_SIZE, NATIVE_SPACING

SPACING_COORDS = ("spacing_mm", "pixel_spacing_mm")  # native in-plane spacing, mm
SLICE_COORD = "slice_spacing_mm"  # native slice spacing of a volume, mm
Spacing = tuple[float, ...]  # (row, col) for 2D, (slice, row, col) for 3D, in mm


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
    dims: int,
    coords: Mapping[str, np.ndarray],
    item_sample: np.ndarray,
    resolution: int,
    fit: str,
) -> dict[str, Spacing] | None:
    """Spacing (mm) of each sample's stored mask grid, or None when any is unknown.

    dims: 2 or 3; coords: per-item coordinate arrays of the feature set by name (the
    `NATIVE` ones and any `metadata:` columns); item_sample: (n_items,) sample id of
    each item; resolution: the stored mask size R; fit: the set's `preprocess.fit`.
    Returns {sample id: (row, col)} for 2D, {sample id: (slice, row, col)} for 3D.
    """
    if any(name not in coords for name in NATIVE):
        return None  # not a set of this format (open_set refuses those anyway)
    first = {str(s): i for i, s in reversed(list(enumerate(item_sample)))}
    out: dict[str, Spacing] = {}
    for sid, i in first.items():
        size = (int(coords[NATIVE_SIZE[0]][i]), int(coords[NATIVE_SIZE[1]][i]))
        if min(size) < 1:
            return None
        in_plane = _coord(coords, SPACING_COORDS, i)
        fy, fx = _scale(size, resolution, fit)
        if dims == 2:
            if in_plane is None:
                return None
            out[sid] = (in_plane * fy, in_plane * fx)
            continue
        dz, dy, dx = (float(coords[name][i]) for name in NATIVE_SPACING)
        if in_plane is not None:
            dy = dx = in_plane
        dz = _coord(coords, (SLICE_COORD,), i) or dz
        if not all(np.isfinite(v) and v > 0 for v in (dz, dy, dx)):
            return None
        out[sid] = (dz, dy * fy, dx * fx)
    return out
