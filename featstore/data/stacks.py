"""Image stacks (`format: stack`): one volume per sample, as a multi-page TIFF or an
ordered folder of 2D sections (electron microscopy, serial sections); masks likewise.

Sections of a folder are ordered naturally (2.png before 10.png). 8- and 16-bit data
are both read as stored. An optional index column `sections` ("0:18", half-open)
takes a contiguous block of a stack as the sample, so one acquired stack can give
train, val and test volumes that do not interleave.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import tifffile

from featstore.data.manifest import Dataset
from featstore.data.nifti import check_voxels
from featstore.data.pictures import MAX_PIXELS, TOO_BIG, load_picture, picture_size
from featstore.data.reader import Reader, Skip
from featstore.data.samples import Header, Loaded, Sample, check_finite, finish_mask, natural_key
from featstore.errors import BadInputError

TIFF_ERRORS = (tifffile.TiffFileError, OSError, ValueError, KeyError, RuntimeError, EOFError)


def sections(path: Path) -> list[Path]:
    """The section files of a folder, in natural order (hidden files left out)."""
    files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    return sorted(files, key=lambda p: natural_key(p.name))


def _tiff_shape(path: Path) -> tuple[int, int, int]:
    """(sections, rows, cols) of a multi-page TIFF, from its headers."""
    try:
        with tifffile.TiffFile(path) as tf:
            pages = [p for p in tf.pages if p.shape]
            if not pages:
                raise ValueError("no image pages")
            first = pages[0]
            shapes = {tuple(p.shape[:2]) for p in pages}
    except TIFF_ERRORS as exc:
        raise BadInputError(f"{path}: not a readable TIFF stack ({exc})") from None
    if len(shapes) != 1 or first.ndim not in (2, 3):
        raise BadInputError(f"{path}: pages differ in size or are not 2D ({sorted(shapes)[:3]})")
    rows, cols = first.shape[:2]
    if rows * cols > MAX_PIXELS:
        raise BadInputError(f"{path}: sections of {cols} x {rows} pixels; {TOO_BIG}")
    return len(pages), int(rows), int(cols)


def stack_shape(path: Path) -> tuple[int, int, int]:
    """(sections, rows, cols) of a stack file or folder, from headers only."""
    if path.is_dir():
        files = sections(path)
        if not files:
            raise BadInputError(f"{path}: the section folder holds no files")
        return (len(files), *picture_size(files[0]))
    return _tiff_shape(path)


def load_stack(path: Path, as_read: bool, is_mask: bool = False) -> np.ndarray:
    """(sections, rows, cols) as stored (uint8/uint16; float32 unless `as_read`)."""
    n, rows, cols = stack_shape(path)
    check_voxels(path, (n, rows, cols))
    if path.is_dir():
        planes = [load_picture(f, is_mask=is_mask, as_read=True) for f in sections(path)]
        planes = [p[..., 0] if p.ndim == 3 else p for p in planes]
        if {p.shape for p in planes} != {(rows, cols)}:
            raise BadInputError(f"{path}: sections differ in size; every section must match")
        arr = np.stack(planes)
    else:
        try:
            arr = tifffile.imread(path, key=range(n))
        except TIFF_ERRORS as exc:
            raise BadInputError(f"{path}: cannot decode the TIFF stack ({exc})") from None
        arr = arr.reshape(n, rows, cols, -1)[..., 0] if arr.ndim != 3 else arr
    return arr if as_read or is_mask else arr.astype(np.float32)


def _block(text: str, n: int, where: str) -> range:
    """The sections "a:b" (half-open) of a stack of n; all of them when empty."""
    if not text.strip():
        return range(n)
    try:
        a, b = (int(v) for v in text.split(":"))
    except ValueError:
        raise BadInputError(f"{where}: sections {text!r} must be 'first:stop', e.g. 0:18") from None
    if not 0 <= a < b <= n:
        raise BadInputError(f"{where}: sections {text!r} is outside the stack's 0:{n}")
    return range(a, b)


class Stacks(Reader):
    """`format: stack` (dims 3): a multi-page TIFF or a folder of sections per volume."""

    folder = None  # either

    def describe(self, ds: Dataset, base: Sample, row: dict[str, str], where: str) -> Sample | Skip:
        n = stack_shape(Path(base.image))[0]
        block = _block(row.get("sections", ""), n, where)
        meta = (*base.meta, ("_sections", f"{block.start}:{block.stop}"))
        return replace(base, n_items=len(block), meta=meta)

    def header(self, ds: Dataset, sample: Sample) -> Header:
        _, rows, cols = stack_shape(Path(sample.image))
        return Header((rows, cols))

    def decode(self, ds: Dataset, sample: Sample, items: range, as_read: bool) -> Loaded:
        path = Path(sample.image)
        a, b = (int(v) for v in dict(sample.meta)["_sections"].split(":"))
        image = load_stack(path, as_read)[a:b]
        if image.dtype.kind == "f":
            check_finite(image, str(path))
        mask = None
        if sample.mask:
            mpath = Path(sample.mask)
            raw = load_stack(mpath, as_read=True, is_mask=True)[a:b]
            mask = finish_mask(ds, raw, mpath, path, image.shape[:3])
        return Loaded(image=image[..., None], mask=mask)
