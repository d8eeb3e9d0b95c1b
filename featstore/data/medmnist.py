"""MedMNIST .npz files: one file holds every split's images and labels."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from featstore.data.manifest import SPLITS, Dataset
from featstore.data.reader import Listing, Reader
from featstore.data.samples import Header, Loaded, Sample
from featstore.errors import BadInputError


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


class MedMnist(Reader):
    """`format: medmnist`: the official .npz (keys `<split>_images`, `<split>_labels`)."""

    def listing(self, ds: Dataset) -> Listing:
        data = npz(ds.path)
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
                label = tuple(int(v) for v in labels[i])
                out.append(Sample(sid, split, label, n_items, f"{split}:{i}", group=sid))
        return Listing(out)

    def files(self, ds: Dataset, sample: Sample) -> list[Path]:
        return [ds.path]

    def header(self, ds: Dataset, sample: Sample) -> Header:
        split, i = sample.image.split(":")
        shape = npz(ds.path)[f"{split}_images"][int(i)].shape
        rows, cols = shape[1:3] if ds.dims == 3 else shape[:2]
        return Header((int(rows), int(cols)))  # MedMNIST files carry no spacing

    def decode(self, ds: Dataset, sample: Sample, items: range, as_read: bool) -> Loaded:
        split, i = sample.image.split(":")
        arr = npz(ds.path)[f"{split}_images"][int(i)]
        arr = arr if as_read else arr.astype(np.float32)
        if arr.ndim == ds.dims:  # grey: add the channel axis
            arr = arr[..., None]
        return Loaded(image=arr if ds.dims == 3 else arr[None], mask=None)
