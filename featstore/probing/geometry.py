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
2. the file header, through the dataset's reader (`readers.header`): NIfTI voxel
   sizes (in the RAS+ orientation the reader slices), DICOM `PixelSpacing` and the
   gap between slice positions.

The original in-plane size comes from the same header; nothing here decodes pixels.
When any sample's spacing is unknown (MedMNIST, synthetic PNGs, a CSV without the
column) the whole set is scored in pixels of the
stored grid (`None`), so that units never mix within one result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from featstore.data import readers
from featstore.data.manifest import Dataset
from featstore.data.readers import Sample
from featstore.errors import BadInputError, ProbeError

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
    first = {str(s): i for i, s in reversed(list(enumerate(item_sample)))}
    by_id = {s.id: s for s in samples}
    out: dict[str, Spacing] = {}
    for sid, i in first.items():
        sample = by_id.get(sid)
        if sample is None:
            return None
        in_plane = _coord(coords, SPACING_COORDS, i)
        if ds.dims == 2 and in_plane is None:
            return None  # 2D files carry no spacing a probe trusts: only `metadata:`
        try:
            head = readers.header(ds, sample)
        except BadInputError as exc:
            raise ProbeError(f"{sample.image}: cannot read its header for HD95 ({exc})") from None
        size = head.size
        if ds.dims == 2:
            assert in_plane is not None  # checked above
            fy, fx = _scale(size, resolution, fit)
            out[sid] = (in_plane * fy, in_plane * fx)
            continue
        if head.spacing is None and in_plane is None:
            return None
        dz, dy, dx = head.spacing or (float("nan"), 0.0, 0.0)
        if in_plane is not None:
            dy = dx = in_plane
        dz = _coord(coords, (SLICE_COORD,), i) or dz
        if not all(np.isfinite(v) and v > 0 for v in (dz, dy, dx)):
            return None
        fy, fx = _scale(size, resolution, fit)
        out[sid] = (dz, dy * fy, dx * fx)
    return out
