"""TIFF pixel layouts: every page a TIFF can hold is converted by one stated rule, or
refused with a `BadInputError` naming the file and the property. Nothing is
reinterpreted silently. A page becomes (H, W, C), C in {1, 3}:

  bit depth     8/16/32-bit integers (signed or not) and floats keep their real
                values and dtype, never cast modulo 256 (the preprocessing window or
                normalisation handles the range); 1-bit pages read as 0 and 255
                (uint8), as PIL reads them. Complex samples: refused.
  MINISBLACK    grey, as stored.
  MINISWHITE    inverted to min-is-black within the bit depth, (2**bits - 1) - v, so
                that dense is bright as in every other grey image (DICOM
                MONOCHROME1 is the same idea). Signed or float min-is-white has no
                maximum to invert against: refused.
  RGB           kept, 3 channels.
  alpha         one alpha sample (RGBA, grey + alpha; unassociated or premultiplied)
                is composited on white, the background of slides and scanned film:
                v' = v a + max (1 - a), premultiplied v' = v + max (1 - a), with
                a = alpha / max, rounded to the stored type; an opaque image is
                unchanged. Alpha over float or signed samples: refused (no white).
  PALETTE       expanded through its colormap to RGB. A TIFF colormap is 16-bit; one
                whose entries are all multiples of 257 (an 8-bit palette, as PIL and
                most writers store it) gives uint8 (entry // 257), any other uint16.
  YCBCR         JPEG-compressed: the JPEG decoder already returns RGB. Otherwise,
                without chroma subsampling and 8-bit: converted to RGB by the JFIF
                (ITU-R BT.601 full-range) formulas. Subsampled outside JPEG, another
                bit depth or a non-default ReferenceBlackWhite: refused, because no
                installed decoder upsamples such chroma exactly.
  SEPARATED     (CMYK and other ink sets) refused: ink coverage is not an intensity,
                and C, M, Y read as R, G, B is the image inverted; convert it to RGB
                with a colour-managed tool.
  others        (CIELAB, LogLuv, CFA, transparency masks, ...) refused, naming it.
  extra samples beyond one alpha (fluorescence channels, spectral bands): refused;
                such an image is not grey or RGB for any encoder here.
  planar        separate planes (S, H, W) are reordered to contiguous (H, W, S),
                never taken as rows or as a stack of pages.

Each reader then states what it makes of the result: `images` keeps one page per file
(an RGB image whose channels are equal everywhere is grey, C = 1), `stack` makes every
page grey (`luma`), `wsi` needs 8-bit levels and repeats grey to RGB.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tifffile

from featstore.errors import BadInputError

# A change to a rule here bumps DECODE_VERSION (featstore.data.settings).
# What tifffile and imagecodecs raise on truncated, corrupt or unsupported pages.
TIFF_ERRORS = (
    tifffile.TiffFileError,
    OSError,
    ValueError,
    KeyError,
    IndexError,
    RuntimeError,
    EOFError,
    NotImplementedError,
)
MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
JPEG = (6, 7)  # OJPEG, JPEG: the decoder converts YCbCr to RGB
ALPHA = {1: "associated", 2: "unassociated"}  # ExtraSamples values
COLOUR = {"MINISBLACK": 1, "MINISWHITE": 1, "PALETTE": 1, "RGB": 3, "YCBCR": 3}
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B
REFERENCE_BW = (0.0, 255.0, 128.0, 255.0, 128.0, 255.0)  # JFIF full range

Alpha = Literal["none", "associated", "unassociated"]


@dataclass(frozen=True)
class Layout:
    """How one TIFF page's samples are laid out, checked against the rules above.

    shape: (rows, cols) decoded; photometric: tifffile's name (RGB, MINISWHITE, ...);
    separate: planes first (S, H, W); ycbcr: converted to RGB here (not by a codec).
    """

    shape: tuple[int, int]
    photometric: str
    dtype: np.dtype[Any]
    bits: int
    alpha: Alpha = "none"
    separate: bool = False
    ycbcr: bool = False
    colormap: np.ndarray | None = field(default=None, compare=False, repr=False)


def is_tiff(path: Path) -> bool:
    """Whether `path` starts with a TIFF or BigTIFF signature."""
    try:
        with open(path, "rb") as f:
            return f.read(4) in MAGIC
    except OSError:
        return False


def page_layout(path: Path, page: tifffile.TiffPage) -> Layout:
    """The layout of `page` of `path`, from its tags only; `BadInputError` naming the
    file and the property when no rule reads it."""
    try:
        photometric = tifffile.PHOTOMETRIC(page.photometric).name
    except ValueError:
        photometric = f"code {page.photometric}"
    bits = int(page.bitspersample)

    def refuse(what: str, fix: str) -> BadInputError:
        return BadInputError(f"{path}: {what}; {fix}")

    if photometric == "SEPARATED":
        raise refuse(
            f"photometric SEPARATED (CMYK, {page.samplesperpixel} ink samples)",
            "ink coverage is not an intensity and is never read as RGB: convert the "
            "image to RGB with a colour-managed tool (e.g. `vips icc_transform`)",
        )
    if photometric not in COLOUR:
        raise refuse(
            f"photometric {photometric} has no decode rule",
            "featstore reads grey, min-is-white, RGB, palette and YCbCr TIFFs: convert it",
        )
    dtype = page.dtype
    if dtype is None or dtype.kind not in "buif":
        raise refuse(
            f"{bits}-bit samples of sample format {page.sampleformat}",
            "featstore reads integer and float samples: convert it",
        )
    axes = page.axes
    if set(axes) - set("YXS") or "Y" not in axes:
        raise refuse(f"page axes {axes!r} (tiled depth or other dimensions)", "save 2D pages")
    samples, colour = int(page.samplesperpixel), COLOUR[photometric]
    extra = tuple(int(e) for e in page.extrasamples)
    alpha: Alpha = "none"
    if samples == colour + 1 and len(extra) == 1 and extra[0] in ALPHA:
        alpha = "associated" if ALPHA[extra[0]] == "associated" else "unassociated"
    elif samples != colour:
        raise refuse(
            f"{samples} samples per pixel with photometric {photometric} ({colour} colour, "
            f"extra samples {list(extra)})",
            "featstore reads grey or RGB with at most one alpha sample: save one file "
            "per channel, or an RGB rendering",
        )
    if alpha != "none" and dtype.kind not in "bu":
        raise refuse(f"an alpha sample over {dtype} samples", "save unsigned integers")
    if photometric == "MINISWHITE" and dtype.kind not in "bu":
        raise refuse(
            f"photometric MINISWHITE with {dtype} samples has no maximum to invert against",
            "save it min-is-black",
        )
    colormap = None
    if photometric == "PALETTE":
        colormap = page.colormap
        if colormap is None or dtype.kind != "u" or alpha != "none":
            raise refuse("photometric PALETTE without a colormap over indices", "save it RGB")
    ycbcr = photometric == "YCBCR" and page.compression not in JPEG
    if ycbcr:
        sub = tuple(getattr(page, "subsampling", None) or (1, 1))
        ref = page.tags.valueof("ReferenceBlackWhite")  # rationals: (num, den) pairs
        if ref is not None:
            ref = tuple(float(n) / float(d) for n, d in zip(ref[::2], ref[1::2], strict=True))
        ref_ok = ref is None or ref == REFERENCE_BW
        if sub != (1, 1) or bits != 8 or not ref_ok or alpha != "none":
            raise refuse(
                f"photometric YCbCr with chroma subsampling {sub}, {bits}-bit samples and "
                f"ReferenceBlackWhite {ref} outside JPEG compression",
                "featstore converts only unsubsampled 8-bit full-range YCbCr: save it RGB",
            )
    shape = page.shape[1:3] if axes[0] == "S" else page.shape[:2]
    return Layout(
        shape=(int(shape[0]), int(shape[1])),
        photometric=photometric,
        dtype=dtype,
        bits=bits,
        alpha=alpha,
        separate=axes[0] == "S",
        ycbcr=ycbcr,
        colormap=colormap,
    )


def composite(arr: np.ndarray, alpha: Alpha, top: int) -> np.ndarray:
    """(H, W, C + 1) colour + alpha -> (H, W, C) composited on white (`top`: the
    bit depth's maximum), rounded to the same dtype."""
    colour, a = arr[..., :-1].astype(np.float64), arr[..., -1:] / float(top)
    out = colour + top * (1.0 - a) if alpha == "associated" else colour * a + top * (1.0 - a)
    return np.clip(np.rint(out), 0, top).astype(arr.dtype)


def ycbcr_to_rgb(arr: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 full-range YCbCr -> RGB by the JFIF (ITU-R BT.601) formulas."""
    y, cb, cr = (arr[..., i].astype(np.float64) for i in range(3))
    cb, cr = cb - 128.0, cr - 128.0
    rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], -1)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def convert(arr: np.ndarray, lay: Layout) -> np.ndarray:
    """A page as tifffile decodes it -> (H, W, C), C in {1, 3}, by the rules above."""
    if lay.separate:
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 2:
        arr = arr[..., None]
    bits = lay.bits
    if arr.dtype == np.bool_:
        arr, bits = arr.astype(np.uint8) * 255, 8
    top = (1 << bits) - 1
    if lay.photometric == "MINISWHITE":  # the grey sample only, then alpha on white
        arr = np.concatenate([top - arr[..., :1], arr[..., 1:]], -1).astype(arr.dtype)
    if lay.alpha != "none":
        arr = composite(arr, lay.alpha, top)
    if lay.colormap is not None:
        cmap = np.asarray(lay.colormap)
        if not (cmap % 257).any():
            cmap = (cmap // 257).astype(np.uint8)
        arr = np.moveaxis(cmap[:, arr[..., 0]], 0, -1)
    if lay.ycbcr:
        arr = ycbcr_to_rgb(arr)
    return np.ascontiguousarray(arr)


def read_page(path: Path, page: tifffile.TiffPage) -> np.ndarray:
    """(H, W, C) of one page by the rules above; `BadInputError` naming the file."""
    lay = page_layout(path, page)
    try:
        arr = page.asarray()
    except TIFF_ERRORS as exc:
        raise BadInputError(
            f"{path}: cannot decode page {page.index} ({type(exc).__name__}: {exc}); the file "
            "is truncated or corrupt: replace it or run with --skip-bad"
        ) from None
    return convert(arr, lay)


def grey_if_equal(arr: np.ndarray) -> np.ndarray:
    """(H, W, 3) whose channels are equal everywhere -> (H, W, 1); others unchanged."""
    if arr.shape[-1] == 3 and (arr[..., :1] == arr[..., 1:]).all():
        return arr[..., :1]
    return arr


def luma(arr: np.ndarray) -> np.ndarray:
    """(H, W, C) -> (H, W) grey: C = 1 as is; colour by ITU-R BT.601 luma
    Y = 0.299 R + 0.587 G + 0.114 B, rounded to the stored integer type (exact for
    pages whose channels are equal, i.e. grey saved as RGB)."""
    grey = grey_if_equal(arr)
    if grey.shape[-1] == 1:
        return grey[..., 0]
    y = sum(w * arr[..., i].astype(np.float64) for i, w in enumerate(LUMA))
    if arr.dtype.kind in "iu":
        info = np.iinfo(arr.dtype)
        return np.clip(np.rint(y), info.min, info.max).astype(arr.dtype)
    return np.asarray(y, dtype=arr.dtype)


def full_pages(tf: tifffile.TiffFile) -> list[tifffile.TiffPage]:
    """The pages of a file that hold an image, reduced-resolution copies left out."""
    return [
        p for p in tf.pages if isinstance(p, tifffile.TiffPage) and p.shape and not p.is_reduced
    ]
