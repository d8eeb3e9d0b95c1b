"""NIfTI volumes (nibabel): reoriented to RAS+ and sliced along the dataset's axis."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from featstore.data.manifest import Dataset
from featstore.data.reader import Reader, Skip
from featstore.data.samples import Header, Loaded, Sample, check_finite, finish_mask
from featstore.errors import BadInputError

AXES = {"sagittal": 0, "coronal": 1, "axial": 2}  # in RAS+ canonical orientation
MAX_VOXELS = 1 << 30  # refused from the header (4 GiB as float32)


def check_voxels(path: Path, shape: tuple[int, ...]) -> None:
    """A `BadInputError` when a header claims more than `MAX_VOXELS` voxels."""
    if int(np.prod(shape, dtype=np.float64)) > MAX_VOXELS:
        raise BadInputError(
            f"{path}: its header says {' x '.join(map(str, shape))} voxels, over the "
            f"{MAX_VOXELS:,}-voxel limit; crop or resample it, or exclude it"
        )


def load_nifti(path: Path, axis: str) -> np.ndarray:
    """(slices, rows, cols) float32 in RAS+ orientation, slices along `axis`."""
    import nibabel as nib  # 0.3 s to import: only when a NIfTI file is read

    try:
        img = nib.as_closest_canonical(nib.load(path))
        check_voxels(path, img.shape)
        arr = np.asarray(img.dataobj, dtype=np.float32)
    except BadInputError:
        raise
    except MemoryError:  # a header under MAX_VOXELS that this machine still cannot hold
        raise BadInputError(
            f"{path}: the volume its header describes does not fit in this machine's "
            "memory as float32; use a smaller volume or a machine with more memory"
        ) from None
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


def open_nifti(path: Path) -> Any:
    """The nibabel image of `path`, its header read (the voxels lazily); a
    `BadInputError` naming the file where it is no NIfTI volume."""
    import nibabel as nib  # 0.3 s to import: only when a NIfTI file is read

    try:
        img = nib.load(path)
    except (OSError, EOFError, ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise BadInputError(f"{path}: cannot read NIfTI header ({exc})") from None
    if not isinstance(img, nib.spatialimages.SpatialImage):  # e.g. a GIFTI surface
        raise BadInputError(f"{path}: not a NIfTI volume ({type(img).__name__})")
    return img


def _canonical(path: Path) -> tuple[list[int], list[float]]:
    """Shape and voxel size in RAS+ order, from the header only."""
    import nibabel as nib

    img = open_nifti(path)
    shape = img.shape[:3] if len(img.shape) == 4 and img.shape[3] == 1 else img.shape
    if len(shape) != 3:
        raise BadInputError(f"{path}: expected a 3D volume, got shape {img.shape}")
    check_voxels(path, shape)
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    n, z = [0, 0, 0], [0.0, 0.0, 0.0]
    for i, (out_axis, _) in enumerate(nib.orientations.io_orientation(img.affine)):
        n[int(out_axis)], z[int(out_axis)] = int(shape[i]), zooms[i]
    return n, z


def volume_mask(ds: Dataset, sample: Sample, image: np.ndarray) -> np.ndarray | None:
    """The NIfTI label volume of `sample` (None without one), checked against its
    decoded `image` (D, H, W, C): a volume's mask, whatever format the image is in."""
    if not sample.mask:
        return None
    mpath = Path(sample.mask)
    shape, _ = _canonical(mpath)  # its header first: a mask of another size is not read
    if int(np.prod(shape, dtype=np.float64)) != int(np.prod(image.shape[:3])):
        raise BadInputError(
            f"{mpath}: mask shape {tuple(shape)} (its header) differs from its image "
            f"{sample.image} {tuple(image.shape[:3])}; give the label volume of that image"
        )
    raw = load_nifti(mpath, ds.slice_axis)
    return finish_mask(ds, raw, mpath, Path(sample.image), image.shape[:3])


class Nifti(Reader):
    """`format: nifti`: one volume per file; masks are NIfTI label volumes. With a
    `channels:` block, several co-registered images per sample (nifti_channels)."""

    def describe(self, ds: Dataset, base: Sample, row: dict[str, str], where: str) -> Sample | Skip:
        if ds.channels is None:
            return super().describe(ds, base, row, where)
        from featstore.data import nifti_channels  # imports this module

        return replace(base, n_items=nifti_channels.count(ds, base))

    def count(self, ds: Dataset, path: Path) -> int:
        shape, _ = _canonical(path)
        n = shape[AXES[ds.slice_axis]]
        if n == 0:
            raise BadInputError(f"{path}: the volume {tuple(shape)} has no {ds.slice_axis} slices")
        return n

    def header(self, ds: Dataset, sample: Sample) -> Header:
        if ds.channels is not None:
            from featstore.data import nifti_channels

            return nifti_channels.header(ds, sample)
        shape, zooms = _canonical(Path(sample.image))
        s = AXES[ds.slice_axis]
        rest = [a for a in range(3) if a != s]  # np.moveaxis keeps the others in order
        return Header((shape[rest[0]], shape[rest[1]]), (zooms[s], zooms[rest[0]], zooms[rest[1]]))

    def decode(self, ds: Dataset, sample: Sample, items: range, as_read: bool) -> Loaded:
        path = Path(sample.image)
        if ds.channels is not None:
            from featstore.data import nifti_channels

            image = nifti_channels.load(ds, sample)  # each file checked for NaN/Inf
        else:
            image = check_finite(load_nifti(path, ds.slice_axis), str(path))[..., None]
        return Loaded(image=image, mask=volume_mask(ds, sample, image))
