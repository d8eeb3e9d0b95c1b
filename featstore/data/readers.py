"""Datasets as sample tables, listed cheaply; items decoded on demand.

Every format is one `Reader` (featstore.data.reader) in its own module, registered
here in `READERS` and nowhere else. `list_samples` returns the sample table (ids,
labels, splits, item counts) without decoding pixels; `load` decodes items of one
sample as raw intensities, items first:

    image: (D, H, W, C) float32, C in {1, 3}; D = 1 for 2D images; a `channels:`
           dataset: C = its distinct sources (featstore.data.nifti_channels)
    mask:  (D, H, W) uint8 class ids, or None
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np

from featstore.data.dicom import Dicom
from featstore.data.fingerprint import fingerprint
from featstore.data.hdf5 import Hdf5
from featstore.data.manifest import SPLITS, Dataset
from featstore.data.medmnist import MedMnist
from featstore.data.nifti import Nifti
from featstore.data.pictures import Pictures
from featstore.data.reader import Listing, Reader
from featstore.data.samples import Header, Loaded, Sample, index_path, natural_key
from featstore.data.settings import GlobIndex
from featstore.data.stacks import Stacks
from featstore.data.synthetic import generate
from featstore.data.wsi import Slides
from featstore.data.zarr_arrays import ZarrArrays
from featstore.errors import BadInputError

__all__ = ["READERS", "Header", "Loaded", "Prepared", "Sample", "list_samples", "load"]

# The one place a format is registered: manifest `format:` -> its reader.
READERS: dict[str, Reader] = {
    "images": Pictures(),
    "nifti": Nifti(),
    "dicom": Dicom(),
    "medmnist": MedMnist(),
    "wsi": Slides(),
    "stack": Stacks(),
    "hdf5": Hdf5(),
    "zarr": ZarrArrays(),
}
# Synthetic datasets are written as real files of one of those formats.
SYNTHETIC = {"cls2d": "images", "seg2d": "images", "cls3d": "nifti", "seg3d": "nifti"}
SYNTHETIC |= {"slides": "wsi", "petct3d": "nifti"}


def reader_for(ds: Dataset) -> Reader:
    """The reader of `ds`'s format (synthetic data: the format it is written in)."""
    name = SYNTHETIC[ds.synthetic.kind] if ds.synthetic is not None else ds.format
    return READERS[name]


def assign_splits(
    samples: list[Sample],
    ratios: tuple[float, float, float],
    seed: int,
    contiguous: bool = False,
) -> list[Sample]:
    """Deterministic split by ratio, whole groups (patients/volumes) at a time.

    contiguous: groups in their natural order (section 2 before 10) are cut into
    train, val, test blocks, so that neighbouring sections of a stack do not leak
    across splits; otherwise groups are shuffled with `seed`.
    """
    groups = sorted({s.group for s in samples})
    if contiguous:
        groups.sort(key=natural_key)
        order = np.arange(len(groups))
    else:
        order = np.random.default_rng(seed).permutation(len(groups))
    cuts = np.round(np.cumsum(ratios)[:2] * len(groups)).astype(int)
    split_of = {}
    for rank, g in enumerate(order):
        split_of[groups[g]] = SPLITS[int(np.searchsorted(cuts, rank, side="right"))]
    return [replace(s, split=split_of[s.group]) for s in samples]


def listing(ds: Dataset) -> Listing:
    """The dataset's samples, splits assigned, and those left out with their reasons.
    Decodes no pixels (headers; a slide's low-resolution level for its tissue)."""
    if ds.synthetic is not None:
        generate(ds.synthetic, ds.path)
    found = reader_for(ds).listing(ds)
    samples = found.samples
    if not samples:
        reasons = "; ".join(f"{k}: {v}" for k, v in list(found.skipped.items())[:3])
        raise BadInputError(f"{ds.path}: no sample left to extract ({reasons or 'empty'})")
    if ds.splits is not None and ds.splits.ratios is not None:
        contiguous = ds.splits.order == "contiguous"
        samples = assign_splits(samples, ds.splits.ratios, ds.splits.seed, contiguous)
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise BadInputError(f"{ds.path}: sample ids repeat ({dup}); add a unique `id` column")
    return Listing(samples, found.skipped)


def list_samples(ds: Dataset) -> list[Sample]:
    """The dataset's sample table, splits assigned (see `listing`)."""
    return listing(ds).samples


def dataset_files(ds: Dataset, samples: list[Sample]) -> list[Path]:
    """Every file whose bytes determine the dataset (for its fingerprint)."""
    reader = reader_for(ds)
    if isinstance(ds.index, GlobIndex):
        files = [ds.path / ds.index.join] if ds.index.join else []
    elif isinstance(reader, MedMnist):
        files = []
    else:
        files = [index_path(ds)]
    for s in samples:
        files += reader.files(ds, s)
    return files


@dataclass(frozen=True)
class Prepared:
    """A dataset listed and fingerprinted once, reused for every encoder and resolution.

    skipped: samples left out at listing (a slide without tissue), by id, with reasons.
    """

    ds: Dataset
    samples: list[Sample]
    fingerprint: str
    skipped: dict[str, str] = field(default_factory=dict)

    @cached_property
    def index(self) -> list[tuple[int, int]]:
        """(sample index, item within it) of every item, in item order."""
        return [(i, k) for i, s in enumerate(self.samples) for k in range(s.n_items)]

    def example_samples(self, n: int) -> list[int]:
        """Indices (into `samples`) of the `n` samples whose thumbnails a set keeps: the
        first test samples; slides with fewer test slides add others (the slide figure)."""
        order = sorted(range(len(self.samples)), key=lambda i: self.samples[i].split != "test")
        if self.ds.tiling is None:
            order = [i for i in order if self.samples[i].split == "test"]
        return order[:n]

    @cached_property
    def pixel_size_notes(self) -> dict[str, str]:
        """Slide id -> which pixel size it uses, where its file and the index disagree
        (recorded in the set's `dataset.pixel_size_notes`)."""
        return {s.id: s.tiles.mpp_note for s in self.samples if s.tiles and s.tiles.mpp_note}

    def notes(self) -> list[str]:
        """What listing decided that the user should see before the sets are made."""
        return [f"note: {self.ds.name} / {k}: {v}" for k, v in self.pixel_size_notes.items()]

    def coords(self) -> dict[str, np.ndarray]:
        """Per-item coordinates the format adds (tiles: level-0 x, y and pixel size)."""
        return reader_for(self.ds).coords(self.ds, self.samples)


def prepare(ds: Dataset, memo: Path | None = None) -> Prepared:
    """List and fingerprint `ds`; `memo` is the file-hash memo (None: hash afresh)."""
    found = listing(ds)
    samples = found.samples
    table: list[tuple[object, ...]] = [
        (s.id, s.split, s.label, s.n_items, s.group, s.meta) for s in samples
    ]
    if any(s.sources for s in samples):  # which file feeds which channel (not only which files)
        rel = [tuple(os.path.relpath(p, ds.path) for p in s.sources) for s in samples]
        table = [(*row, r) for row, r in zip(table, rel, strict=True)]
    fp = fingerprint(dataset_files(ds, samples), table, ds.path, memo)
    return Prepared(ds, samples, fp, found.skipped)


def header(ds: Dataset, sample: Sample) -> Header:
    """Item size and native spacing of `sample`, from its header."""
    return reader_for(ds).header(ds, sample)


def tiled(ds: Dataset) -> bool:
    """Whether `ds`'s items are regions decoded on their own (tiles of a slide, slice
    runs of an HDF5/Zarr volume)."""
    return reader_for(ds).tiled


def load(ds: Dataset, sample: Sample, as_read: bool = False, items: range | None = None) -> Loaded:
    """Decode `items` of one sample (default all); `BadInputError` naming the file on
    any problem. Non-tiled formats always decode the whole sample; tiled ones (slides,
    HDF5/Zarr volumes) only `items`.

    as_read: MedMNIST and PNG/JPEG/TIFF images keep the integer dtype they are stored
    in (uint8, uint16, int32) instead of float32, with the same values; NIfTI and DICOM
    are float32 either way (their scaling is applied here).
    """
    reader = reader_for(ds)
    wanted = range(sample.n_items) if items is None or not reader.tiled else items
    return reader.decode(ds, sample, wanted, as_read)
