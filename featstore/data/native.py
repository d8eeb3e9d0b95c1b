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

from PIL import UnidentifiedImageError
from PIL.Image import DecompressionBombError

from featstore.data import readers
from featstore.data.fingerprint import memo_for
from featstore.data.manifest import Dataset
from featstore.data.medmnist import npz
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


def _medmnist(ds: Dataset, samples: Sequence[Sample]) -> list[Native]:
    arrays = npz(ds.path)
    out = []
    for s in samples:
        shape = arrays[f"{s.image.split(':')[0]}_images"].shape  # (N, [D,] H, W[, 3])
        h, w = shape[2:4] if ds.dims == 3 else shape[1:3]
        out.append(Native(int(h), int(w)))
    return out


def native(ds: Dataset, sample: Sample) -> Native:
    """The native geometry of one (non-MedMNIST) sample, from its reader's header.

    A header that cannot be read gives `UNKNOWN`: extraction refuses (or, with
    --skip-bad, skips) that sample when it decodes it.
    """
    import nibabel as nib  # their errors; imported here, where headers are read
    import pydicom

    try:
        head = readers.header(ds, sample)
    except (
        OSError,
        ValueError,  # BadInputError among them
        EOFError,
        AttributeError,
        IndexError,
        UnidentifiedImageError,
        DecompressionBombError,  # refused (or skipped) by its header when decoded
        nib.filebasedimages.ImageFileError,
        pydicom.errors.InvalidDicomError,
    ):
        return UNKNOWN
    sp = head.spacing or ()
    spacing = (NAN,) * (3 - len(sp)) + tuple(float(v) for v in sp)  # (slice, row, col)
    return Native(head.size[0], head.size[1], (spacing[0], spacing[1], spacing[2]))


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
