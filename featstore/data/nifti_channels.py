"""Multi-channel NIfTI samples (`channels:`): co-registered images as index columns
(CT and PET), or the sequences of one 4D volume (MSD BrainTumour, Prostate).

A sample decodes to (D, H, W, K) float32, K = `Channels.sources` in order: one
channel per distinct source, each reoriented to RAS+ and sliced like a 3D volume.
Every image of a sample must lie on one grid: the same shape, and affines equal
within `affine_tolerance` mm; anything else is a `BadInputError` naming both files
and both shapes or affines. Nothing is resampled.

A 4D volume's sequence axis is the first or the last array axis. The NIfTI affine
maps the three spatial axes, in their order, whichever end the sequences are at.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featstore.data.manifest import Dataset
from featstore.data.nifti import AXES, check_voxels, load_nifti, open_nifti
from featstore.data.samples import Header, Sample, check_finite
from featstore.data.settings import MAX_SEQUENCES, Channels
from featstore.errors import BadInputError


@dataclass(frozen=True)
class Grid:
    """What a header says about one image's voxel grid (no pixels read).

    shape: the spatial (x, y, z) array shape; affine: (4, 4) voxel -> mm;
    sequences: how many sequences a 4D volume holds along `axis` (0 first, 3 last).
    """

    path: Path
    shape: tuple[int, int, int]
    affine: np.ndarray
    sequences: int = 1
    axis: int | None = None


def sequence_axis(path: Path, shape: tuple[int, ...], declared: str) -> int:
    """The array axis (0 or 3) holding the sequences of a 4D volume of `shape`."""
    if len(shape) != 4:
        raise BadInputError(
            f"{path}: shape {shape} is not a 4D volume; `channels:` sources that are "
            "sequence indices read 4D NIfTI files (x, y, z, sequence), or name index "
            "columns (one 3D file per channel) instead"
        )
    if declared != "auto":
        return 0 if declared == "first" else 3
    small = [a for a in (0, 3) if shape[a] <= MAX_SEQUENCES]
    if len(small) != 1:
        raise BadInputError(
            f"{path}: a 4D volume of shape {shape} whose sequence axis is ambiguous "
            f"({'both' if small else 'neither'} of its first and last axes could hold "
            f"the sequences, at most {MAX_SEQUENCES}); declare it in the dataset's "
            "`channels: {sequence_axis: first}` (or `last`)"
        )
    return small[0]


def grid(path: Path, channels: Channels) -> Grid:
    """The header's grid of one image of a multi-channel sample."""
    img = open_nifti(path)
    shape = tuple(int(n) for n in img.shape)
    check_voxels(path, shape)
    if not channels.sequences:
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        if len(shape) != 3:
            raise BadInputError(
                f"{path}: expected a 3D volume, got shape {shape}; a channel named by an "
                "index column is one 3D image (a 4D file's sequences are sources 0, 1, ...)"
            )
        return Grid(path, (shape[0], shape[1], shape[2]), np.asarray(img.affine, np.float64))
    axis = sequence_axis(path, shape, channels.sequence_axis)
    spatial = [n for a, n in enumerate(shape) if a != axis]
    return Grid(
        path,
        (spatial[0], spatial[1], spatial[2]),
        np.asarray(img.affine, np.float64),
        sequences=shape[axis],
        axis=axis,
    )


def _matrix(a: np.ndarray) -> str:
    return "[" + "; ".join(" ".join(f"{v:.4g}" for v in row) for row in a[:3]) + "]"


def check_grids(ds: Dataset, sample: Sample) -> Grid:
    """The grid shared by every image of `sample`, checked from their headers: one
    shape, affines within tolerance, every sequence asked for present."""
    channels = ds.channels
    assert channels is not None  # only called for datasets with a `channels:` block
    if channels.sequences:
        g = grid(Path(sample.image), channels)
        wanted = [int(s) for s in channels.sources]
        missing = [s for s in wanted if s >= g.sequences]
        if missing:
            end = "first" if g.axis == 0 else "last"
            raise BadInputError(
                f"{g.path}: the 4D volume holds {g.sequences} sequence(s) along its {end} "
                f"axis (shape {'x'.join(map(str, _shape4(g)))}), but `channels:` asks for "
                f"sequence(s) {missing}; give every sample all sequences {wanted}, or "
                "exclude it"
            )
        return g
    grids = [grid(Path(p), channels) for p in sample.sources]
    first = grids[0]
    for g in grids[1:]:
        if g.shape != first.shape:
            raise BadInputError(
                f"{g.path}: grid {g.shape} differs from {first.path} {first.shape} (sample "
                f"{sample.id}); featstore never resamples: resample the channels of a "
                "sample onto one grid before extraction"
            )
        off = float(np.abs(g.affine - first.affine).max())
        if off > channels.affine_tolerance:
            raise BadInputError(
                f"{g.path}: affine {_matrix(g.affine)} differs from {first.path} "
                f"{_matrix(first.affine)} by up to {off:.4g} mm (sample {sample.id}; "
                f"`channels.affine_tolerance` is {channels.affine_tolerance}); "
                "co-register and resample the channels onto one grid, or raise the "
                "tolerance if the difference is only rounding"
            )
    return first


def _shape4(g: Grid) -> tuple[int, ...]:
    s = list(g.shape)
    s.insert(0 if g.axis == 0 else 3, g.sequences)
    return tuple(s)


def _canonical(g: Grid) -> tuple[list[int], list[float]]:
    """Spatial shape and voxel size in RAS+ order, from a grid."""
    import nibabel as nib

    zooms = [float(z) for z in nib.affines.voxel_sizes(g.affine)]
    n, z = [0, 0, 0], [0.0, 0.0, 0.0]
    for i, (out_axis, _) in enumerate(nib.orientations.io_orientation(g.affine)):
        n[int(out_axis)], z[int(out_axis)] = g.shape[i], zooms[i]
    return n, z


def count(ds: Dataset, sample: Sample) -> int:
    """Slices of a multi-channel sample, once its grids agree."""
    shape, _ = _canonical(check_grids(ds, sample))
    n = shape[AXES[ds.slice_axis]]
    if n == 0:
        raise BadInputError(f"{sample.image}: the volume {tuple(shape)} has no slices")
    return n


def header(ds: Dataset, sample: Sample) -> Header:
    """Item size and spacing of a multi-channel sample (its shared grid)."""
    shape, zooms = _canonical(check_grids(ds, sample))
    s = AXES[ds.slice_axis]
    rest = [a for a in range(3) if a != s]
    return Header((shape[rest[0]], shape[rest[1]]), (zooms[s], zooms[rest[0]], zooms[rest[1]]))


def _load_4d(path: Path, g: Grid, wanted: list[int], axis: str) -> np.ndarray:
    """The `wanted` sequences of a 4D volume: (slices, rows, cols, K) float32, RAS+."""
    import nibabel as nib

    try:
        img = open_nifti(path)
        arr = np.asarray(img.dataobj, dtype=np.float32)
    except MemoryError:
        raise BadInputError(
            f"{path}: the 4D volume does not fit in this machine's memory as float32"
        ) from None
    except (OSError, EOFError, ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise BadInputError(
            f"{path}: cannot read NIfTI ({exc}); the file is corrupt or truncated"
        ) from None
    if arr.ndim != 4:
        raise BadInputError(f"{path}: expected a 4D volume, got shape {arr.shape}")
    if g.axis == 0:
        arr = np.moveaxis(arr, 0, 3)
    arr = arr[..., wanted]
    # reorient the spatial axes (the affine's) to RAS+, sequences riding along
    ornt = nib.orientations.io_orientation(g.affine)
    arr = nib.orientations.apply_orientation(arr, ornt)
    return np.moveaxis(np.ascontiguousarray(arr), AXES[axis], 0)


def load(ds: Dataset, sample: Sample) -> np.ndarray:
    """A multi-channel sample: (D, H, W, K) float32 raw intensities, K sources."""
    channels = ds.channels
    assert channels is not None
    g = check_grids(ds, sample)  # the headers again: a file may change after listing
    if channels.sequences:
        arr = _load_4d(Path(sample.image), g, [int(s) for s in channels.sources], ds.slice_axis)
        return check_finite(arr, sample.image)
    planes = [check_finite(load_nifti(Path(p), ds.slice_axis), p) for p in sample.sources]
    return np.stack(planes, axis=-1)
