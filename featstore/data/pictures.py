"""2D pictures (PNG, JPEG, ... via PIL; TIFF via tifffile), one image per file; masks likewise.

The size is read from the header and refused before any pixel is decoded when the
image is too large (a 30000 x 30000 PNG of a few KB would otherwise take gigabytes).

Pixels follow the rules of `featstore.data.layouts`, for TIFF (decoded by tifffile,
every layout) and PIL formats alike: values as stored (16-bit kept), alpha composited
on white, palettes expanded, CMYK refused; an RGB image whose three channels are equal
everywhere is grey (C = 1). A TIFF is one image: its full-resolution page. A TIFF of
several full-resolution pages is refused rather than read as its first page, because
dropping the other pages of a stack silently loses data (`format: stack` reads them).
Masks are class ids and are read by PIL as stored (palette indices, not colours).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from featstore.data.layouts import (
    TIFF_ERRORS,
    composite,
    full_pages,
    grey_if_equal,
    is_tiff,
    page_layout,
    read_page,
)
from featstore.data.manifest import Dataset
from featstore.data.reader import Reader
from featstore.data.samples import Header, Loaded, Sample, check_finite, finish_mask
from featstore.errors import BadInputError

# Largest 2D image decoded (8192 x 8192), checked on the header before any pixel is
# decoded. PIL's own check (which Image.open raises over ~179M pixels) is caught too.
MAX_PIXELS = 1 << 26
TOO_BIG = (
    f"images are decoded up to {MAX_PIXELS:,} pixels (8192 x 8192): downscale it, or "
    "exclude it (--skip-bad records and skips it); a whole-slide image is read tile by "
    "tile with `format: wsi`"
)


def load_picture(path: Path, is_mask: bool, as_read: bool = False) -> np.ndarray:
    """(H, W, C) float32 (or the stored integers with `as_read`), C in {1, 3}; a mask
    is (H, W) as stored."""
    dtype = None if as_read else np.float32
    if not is_mask and is_tiff(path):
        arr = grey_if_equal(tiff_picture(path))
        return arr if as_read else arr.astype(np.float32)
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:  # from the header, before a pixel is decoded
                raise BadInputError(f"{path}: its header claims {w} x {h} pixels; {TOO_BIG}")
            im.load()
            if is_mask:
                return np.asarray(im.convert("I") if im.mode not in ("L", "P", "I") else im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(im, dtype=dtype)[..., None]
            elif im.mode == "CMYK":
                raise BadInputError(
                    f"{path}: photometric CMYK (ink separations) is never read as RGB; "
                    "convert the image to RGB with a colour-managed tool"
                )
            elif im.mode in ("LA", "RGBA", "PA") or "transparency" in im.info:
                # alpha composited on white, the rule of featstore.data.layouts
                rgba = im.convert("LA" if im.mode == "LA" else "RGBA")
                arr = composite(np.asarray(rgba), "unassociated", 255).astype(dtype or np.uint8)
                arr = arr if arr.shape[-1] == 1 else grey_if_equal(arr)
            elif im.mode in ("L", "1"):
                arr = np.asarray(im.convert("L"), dtype=dtype)[..., None]
            else:
                arr = grey_if_equal(np.asarray(im.convert("RGB"), dtype=dtype))
            return arr
    except BadInputError:
        raise
    except Image.DecompressionBombError as exc:  # Image.open's own check, over 2x its limit
        raise BadInputError(
            f"{path}: its header claims an image too large to decode ({exc}); {TOO_BIG}"
        ) from None
    # What Pillow raises on corrupt files besides OSError: SyntaxError, ValueError
    # (e.g. unsupported mode conversions), EOFError.
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadInputError(
            f"{path}: cannot decode image ({exc}); the file is corrupt or "
            "truncated: replace it or run with --skip-bad"
        ) from None


def _tiff_page(path: Path, tf: tifffile.TiffFile) -> tifffile.TiffPage:
    """The one full-resolution page of a TIFF picture, or a `BadInputError`."""
    pages = full_pages(tf)
    if len(pages) != 1:
        raise BadInputError(
            f"{path}: {len(pages)} full-resolution pages; format `images` reads one image "
            "per file: give a stack `format: stack`, a slide `format: wsi`, or save each "
            "page as its own file"
        )
    return pages[0]


def tiff_size(path: Path) -> tuple[int, int]:
    """(rows, cols) of a TIFF picture, from its tags."""
    try:
        with tifffile.TiffFile(path) as tf:
            return page_layout(path, _tiff_page(path, tf)).shape
    except BadInputError:
        raise
    except TIFF_ERRORS as exc:
        raise BadInputError(f"{path}: cannot read the TIFF header ({exc})") from None


def tiff_picture(path: Path) -> np.ndarray:
    """(H, W, C) of a TIFF picture as stored, by the rules of featstore.data.layouts."""
    try:
        with tifffile.TiffFile(path) as tf:
            page = _tiff_page(path, tf)
            rows, cols = page_layout(path, page).shape
            if rows * cols > MAX_PIXELS:
                raise BadInputError(f"{path}: its header claims {cols} x {rows} pixels; {TOO_BIG}")
            return read_page(path, page)
    except BadInputError:
        raise
    except TIFF_ERRORS as exc:
        raise BadInputError(
            f"{path}: cannot decode image ({exc}); the file is corrupt or "
            "truncated: replace it or run with --skip-bad"
        ) from None


def picture_size(path: Path) -> tuple[int, int]:
    """(rows, cols) from the header only."""
    if is_tiff(path):
        return tiff_size(path)
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadInputError(f"{path}: cannot read the image header ({exc})") from None


class Pictures(Reader):
    """`format: images`: one 2D picture per index row (pixel spacing only from `metadata`)."""

    def count(self, ds: Dataset, path: Path) -> int:
        return 1

    def header(self, ds: Dataset, sample: Sample) -> Header:
        return Header(picture_size(Path(sample.image)))

    def decode(self, ds: Dataset, sample: Sample, items: range, as_read: bool) -> Loaded:
        path = Path(sample.image)
        image = load_picture(path, is_mask=False, as_read=as_read)[None]
        if image.dtype.kind == "f":
            check_finite(image, str(path))
        mask = None
        if sample.mask:
            mpath = Path(sample.mask)
            raw = load_picture(mpath, True)[None]
            mask = finish_mask(ds, raw, mpath, path, image.shape[:3])
        return Loaded(image=image, mask=mask)
