"""2D pictures (PNG, JPEG, TIFF, ... via PIL), one image per file; masks likewise.

The size is read from the header and refused before any pixel is decoded when the
image is too large (a 30000 x 30000 PNG of a few KB would otherwise take gigabytes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

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
            elif im.mode in ("L", "LA", "1"):
                arr = np.asarray(im.convert("L"), dtype=dtype)[..., None]
            else:
                arr = np.asarray(im.convert("RGB"), dtype=dtype)
                if np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(
                    arr[..., 0], arr[..., 2]
                ):
                    arr = arr[..., :1]
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


def picture_size(path: Path) -> tuple[int, int]:
    """(rows, cols) from the header only."""
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
