"""The reader interface: every file format is one `Reader`, registered in `readers.py`.

A reader lists a dataset's samples (cheaply: headers, never pixels), reads one
sample's header (size, spacing) and decodes the items of one sample: all of them for
a 2D image or a volume, or any run of them for a tiled format, whose items (tiles of a
slide) are decoded region by region so that memory never grows with the sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import numpy as np

from featstore.data.manifest import SPLITS, Dataset
from featstore.data.samples import (
    Header,
    Loaded,
    Sample,
    exists,
    image_columns,
    inside,
    parse_label,
    read_index,
    splits_from_column,
)
from featstore.errors import BadInputError


@dataclass(frozen=True)
class Skip:
    """A sample left out of the listing, and why (recorded in the feature set)."""

    id: str
    reason: str


@dataclass(frozen=True)
class Listing:
    """A dataset's samples (item order) and the samples left out, by id, with reasons."""

    samples: list[Sample]
    skipped: dict[str, str] = field(default_factory=dict)


class Reader:
    """One file format. Subclasses set the class attributes and override `count`,
    `header` and `decode`; the index-based `listing` serves every format with a CSV."""

    # a sample's image is a folder (DICOM series: True), a file (False), or either (None)
    folder: ClassVar[bool | None] = False
    tiled: ClassVar[bool] = False  # items are regions of a sample, decoded on their own
    columns: ClassVar[frozenset[str]] = frozenset()  # index columns besides the usual ones
    # a segmentation sample's labels are an array inside its image file (HDF5, Zarr),
    # not a `mask` file of the index
    inner_labels: ClassVar[bool] = False

    def count(self, ds: Dataset, path: Path) -> int:
        """Items (slices) of the sample at `path`, from its header."""
        raise NotImplementedError

    def describe(self, ds: Dataset, base: Sample, row: dict[str, str], where: str) -> Sample | Skip:
        """`base` (an index row) completed with its items, or a `Skip` saying why it is
        left out (a slide without tissue). Tiled readers plan their regions here."""
        return replace(base, n_items=self.count(ds, Path(base.image)))

    def header(self, ds: Dataset, sample: Sample) -> Header:
        """Item size and native spacing of `sample`, from its header."""
        raise NotImplementedError

    def decode(self, ds: Dataset, sample: Sample, items: range, as_read: bool) -> Loaded:
        """Decode `items` of `sample`. Non-tiled readers are always asked for all items.

        as_read: keep the stored integer dtype (uint8, uint16, ...) instead of float32
        where the format allows it, with the same values.
        """
        raise NotImplementedError

    def files(self, ds: Dataset, sample: Sample) -> list[Path]:
        """Every file whose bytes determine `sample` (for the dataset's fingerprint)."""
        out = []
        for p in dict.fromkeys(filter(None, (sample.image, *sample.sources, sample.mask))):
            path = Path(p)
            out += sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path]
        return out

    def coords(self, ds: Dataset, samples: list[Sample]) -> dict[str, np.ndarray]:
        """Per-item coordinates besides sample/slice/split, in item order (tiles: x, y)."""
        return {}

    def listing(self, ds: Dataset) -> Listing:
        """The sample table from the index CSV (or glob); splits not yet assigned."""
        out = []
        skipped: dict[str, str] = {}
        width: tuple[int, str] | None = None  # multi-hot length, and the line that set it
        for where, row in read_index(ds, self.columns, mask_column=not self.inner_labels):
            sample = self._row(ds, where, row)
            if isinstance(sample, Skip):
                skipped[sample.id] = sample.reason
                continue
            if ds.task == "multilabel":
                width = width or (len(sample.label), where)
                if len(sample.label) != width[0]:
                    raise BadInputError(
                        f"{where}: multilabel has {len(sample.label)} values but {width[1]} "
                        f"has {width[0]}; every row needs one 0/1 per class"
                    )
            out.append(sample)
        return Listing(out, skipped)

    def _image(self, ds: Dataset, where: str, row: dict[str, str], column: str) -> Path:
        """The image file that `column` of an index row names, checked."""
        if not row[column].strip():
            raise BadInputError(f"{where}: the {column} cell is empty; give the file's path")
        image = inside(ds, row[column], column, where)
        if not exists(image):
            raise BadInputError(f"{where}: {column} {image} does not exist")
        if self.folder and not image.is_dir():
            raise BadInputError(f"{where}: {column} {image} is not a folder (format {ds.format})")
        if self.folder is False and image.is_dir():
            raise BadInputError(f"{where}: {column} {image} is a folder, not an image file")
        return image

    def _row(self, ds: Dataset, where: str, row: dict[str, str]) -> Sample | Skip:
        columns = image_columns(ds)
        images = [self._image(ds, where, row, c) for c in columns]
        image = images[0]
        mask = inside(ds, row["mask"], "mask", where) if row.get("mask", "").strip() else None
        if mask is not None and self.inner_labels:
            raise BadInputError(
                f"{where}: format {ds.format} reads labels from the array that "
                "`volume.labels` names inside the image file; leave the mask cell empty"
            )
        if ds.task == "segmentation" and not self.inner_labels and not (mask and exists(mask)):
            raise BadInputError(f"{where}: mask {mask or '(empty)'} does not exist")
        # a mask is a file, but for stacks (a folder of sections); DICOM masks are NIfTI
        if mask is not None and mask.is_dir() and self.folder is not None:
            raise BadInputError(f"{where}: mask {mask} is a folder, not a label file")
        label = () if ds.task == "segmentation" else parse_label(row.get("label", ""), ds, where)
        split = row.get("split", "").strip()
        if splits_from_column(ds) and split not in SPLITS:
            raise BadInputError(
                f"{where}: split {split!r} must be one of {SPLITS}, or give the "
                "dataset `splits: {ratios: [0.7, 0.1, 0.2], seed: 0}`"
            )
        sid = row.get("id", "").strip() or Path(row[columns[0]]).name.split(".")[0]
        base = Sample(
            id=sid,
            split=split,
            label=label,
            n_items=0,
            image=str(image),
            mask=str(mask) if mask else None,
            group=row.get("patient", "").strip() or sid,
            meta=tuple((name, row[col]) for col, name in ds.metadata.items()),
            sources=tuple(map(str, images)) if columns != ("image",) else (),
        )
        return self.describe(ds, base, row, where)
