"""Image stacks (`format: stack`): one volume per sample, as a multi-page TIFF or an
ordered folder of 2D sections (electron microscopy, serial sections); masks likewise.

Sections of a folder are ordered naturally (2.png before 10.png). Every page or
section is decoded by the rules of `featstore.data.layouts` (values as stored: 8-, 16-,
32-bit and float; min-is-white inverted; alpha on white; palette expanded; planar
pages reordered; CMYK refused), then made grey, because a stack is a volume of one
intensity per voxel as NIfTI and DICOM volumes are: a colour section becomes its
ITU-R BT.601 luma, Y = 0.299 R + 0.587 G + 0.114 B, rounded to the stored type. That
is exact for grey sections saved as RGB (the usual colour stack), and unlike keeping
the red channel it keeps what the green and blue stains show. Mask pages are class
ids: one sample per pixel, or samples that are equal everywhere. An optional index
column `sections` ("0:18", half-open) takes a contiguous block of a stack as the
sample, so one acquired stack can give train, val and test volumes that do not
interleave.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import tifffile

from featstore.data.layouts import TIFF_ERRORS, full_pages, luma, page_layout, read_page
from featstore.data.manifest import Dataset
from featstore.data.nifti import check_voxels
from featstore.data.pictures import MAX_PIXELS, TOO_BIG, load_picture, picture_size
from featstore.data.reader import Reader, Skip
from featstore.data.samples import Header, Loaded, Sample, check_finite, finish_mask, natural_key
from featstore.errors import BadInputError


def sections(path: Path) -> list[Path]:
    """The section files of a folder, in natural order (hidden files left out)."""
    files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    return sorted(files, key=lambda p: natural_key(p.name))


def _tiff_shape(path: Path) -> tuple[int, int, int]:
    """(sections, rows, cols) of a multi-page TIFF, from its headers."""
    try:
        with tifffile.TiffFile(path) as tf:
            pages = full_pages(tf)
            if not pages:
                raise ValueError("no image pages")
            shapes = {page_layout(path, p).shape for p in pages}
    except BadInputError:
        raise
    except TIFF_ERRORS as exc:
        raise BadInputError(f"{path}: not a readable TIFF stack ({exc})") from None
    if len(shapes) != 1:
        raise BadInputError(f"{path}: pages differ in size ({sorted(shapes)[:3]})")
    ((rows, cols),) = shapes
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
        files = sections(path)
        planes = [load_picture(f, is_mask=is_mask, as_read=True) for f in files]
        planes = [_plane(f, p, is_mask) for f, p in zip(files, planes, strict=True)]
        if {p.shape for p in planes} != {(rows, cols)}:
            raise BadInputError(f"{path}: sections differ in size; every section must match")
        arr = np.stack(planes)
    else:
        try:
            with tifffile.TiffFile(path) as tf:
                pages = full_pages(tf)
                if is_mask:
                    planes = [_plane(path, _mask_page(path, p), True) for p in pages]
                else:
                    planes = [_plane(path, read_page(path, p), False) for p in pages]
        except BadInputError:
            raise
        except TIFF_ERRORS as exc:
            raise BadInputError(f"{path}: cannot decode the TIFF stack ({exc})") from None
        arr = np.stack(planes)
    return arr if as_read or is_mask else arr.astype(np.float32)


def _mask_page(path: Path, page: tifffile.TiffPage) -> np.ndarray:
    """(H, W, S) class ids of one mask page as stored (palette indices, not colours)."""
    arr = page.asarray()
    if page.axes.startswith("S"):
        arr = np.moveaxis(arr, 0, -1)
    return arr


def _plane(path: Path, arr: np.ndarray, is_mask: bool) -> np.ndarray:
    """(H, W) of one section: the image made grey by `luma`; a mask's one sample."""
    if arr.ndim == 2:
        return arr
    if not is_mask:
        return luma(arr)
    if not (arr[..., :1] == arr).all():
        raise BadInputError(
            f"{path}: a mask section of {arr.shape[-1]} different samples per pixel; a mask "
            "holds one class id per pixel: save it grey (one sample)"
        )
    return arr[..., 0]


def section_block(text: str, n: int, where: str) -> range:
    """The sections "a:b" (half-open) of a stack of n; all of them when empty (the
    index's `sections` cell, for stacks and HDF5/Zarr volumes alike)."""
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
        block = section_block(row.get("sections", ""), n, where)
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
