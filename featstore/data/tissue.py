"""Tissue detection and the tile grid of a slide (numpy + scipy; no file access).

Tissue is found on a low-resolution RGB image of the slide: the saturation channel,
median-blurred, thresholded with Otsu (never below `MIN_SATURATION`, so that a blank
slide is not split in two by its noise), then specks and holes removed: regions
smaller than `MIN_AREA_UM2`, or than the tissue one tile must hold (`speck_um2`),
whichever is smaller. The image is at `tiling.tissue_mpp`, or finer for a slide
that would be under `MIN_OVERVIEW` pixels there (`overview_mpp`): at 8 um/px a
256 um slide is 32 pixels, too few for the median and the speck rule to leave its
tissue. Tiles are laid on a regular level-0 grid and kept where enough of their
footprint is tissue; `max_tiles` keeps a seeded sample of them.
"""

from __future__ import annotations

import zlib

import numpy as np

from featstore.data.settings import Tiling

# Bump when tissue detection or the grid change the tiles of a slide, or a set of
# slides records more of them (2: the examples' overviews and tissue masks; 3: small
# slides' tissue found on a finer image, specks no larger than a tile's tissue share,
# the index's `mpp` column before the file's tags).
PLAN_VERSION = 3
MIN_SATURATION = 20  # of 255: glass and white background stay below it
MIN_AREA_UM2 = 10_000.0  # specks (dust) and holes smaller than 0.1 x 0.1 mm
MEDIAN = 5  # median blur, in thumbnail pixels
MIN_OVERVIEW = 64  # pixels on the shorter side of the image tissue is found on, at least


def overview_mpp(size0: tuple[int, int], mpp0: float, tiling: Tiling) -> float:
    """um per pixel of the image tissue is found on: `tiling.tissue_mpp`, finer where
    the slide's shorter side (size0: level-0 width, height at `mpp0` um) would have
    fewer than MIN_OVERVIEW pixels there, never finer than level 0."""
    return max(mpp0, min(tiling.tissue_mpp, min(size0) * mpp0 / MIN_OVERVIEW))


def speck_um2(tiling: Tiling) -> float:
    """Largest speck (or hole) removed, in um2: MIN_AREA_UM2, or less where a tile's
    tissue share (min_tissue of its footprint) is smaller, since a region that can
    fill a tile on its own is tissue, not dust."""
    side = tiling.tile_size * tiling.tile_mpp
    return min(MIN_AREA_UM2, tiling.min_tissue * side * side)


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation of an (h, w, 3) uint8 image, as (h, w) uint8."""
    hi, lo = rgb.max(-1).astype(np.uint16), rgb.min(-1).astype(np.uint16)
    return ((hi - lo) * 255 // np.maximum(hi, 1)).astype(np.uint8)  # 255 * 255 fits uint16


def otsu(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values: the t maximising the between-class variance
    of (values <= t, values > t)."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    p = hist / max(hist.sum(), 1.0)
    w0 = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * w0 - mu) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    return int(np.argmax(between))


def _drop_small(mask: np.ndarray, min_px: int) -> np.ndarray:
    from scipy import ndimage  # 0.3 s to import: only when a slide is tiled

    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels]


def tissue_mask(rgb: np.ndarray, mpp: float, speck: float = MIN_AREA_UM2) -> np.ndarray:
    """(h, w) bool tissue mask of an (h, w, 3) uint8 thumbnail whose pixels are `mpp`
    um; regions and holes under `speck` um2 are removed."""
    from scipy import ndimage

    sat = ndimage.median_filter(saturation(rgb), size=MEDIAN)
    mask = sat > max(otsu(sat), MIN_SATURATION)
    min_px = max(1, int(speck / (mpp * mpp)))
    mask = _drop_small(mask, min_px)  # specks
    background = _drop_small(~mask, min_px)  # background regions large enough to stay
    return ~background  # tissue with its small holes filled


def tile_grid(
    mask: np.ndarray,
    scale: tuple[float, float],
    size0: tuple[int, int],
    foot: int,
    tiling: Tiling,
    slide_id: str,
) -> np.ndarray:
    """Level-0 (x, y) of the tiles to extract, in raster order: (n, 2) int64.

    mask: (h, w) tissue mask; scale: level-0 pixels per mask pixel along (x, y);
    size0: level-0 (width, height); foot: a tile's side in level-0 pixels.
    """
    width, height = size0
    stride = max(1, round(foot * (1 - tiling.overlap)))
    xs = np.arange(0, width - foot + 1, stride)
    ys = np.arange(0, height - foot + 1, stride)
    if len(xs) == 0 or len(ys) == 0:
        return np.zeros((0, 2), np.int64)
    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    h, w = mask.shape

    def cells(start: np.ndarray, step: float, n: int) -> tuple[np.ndarray, np.ndarray]:
        lo = np.clip(np.floor(start / step).astype(np.int64), 0, n)
        hi = np.clip(np.ceil((start + foot) / step).astype(np.int64), 0, n)
        return lo, np.maximum(hi, lo + 1).clip(max=n)

    x0, x1 = cells(xs, scale[0], w)
    y0, y1 = cells(ys, scale[1], h)
    yy0, xx0 = np.meshgrid(y0, x0, indexing="ij")
    yy1, xx1 = np.meshgrid(y1, x1, indexing="ij")
    area = np.maximum((yy1 - yy0) * (xx1 - xx0), 1)
    inside = integral[yy1, xx1] - integral[yy0, xx1] - integral[yy1, xx0] + integral[yy0, xx0]
    keep = inside / area >= tiling.min_tissue
    gy, gx = np.nonzero(keep)
    xy = np.stack([xs[gx], ys[gy]], axis=1).astype(np.int64)
    if tiling.max_tiles is not None and len(xy) > tiling.max_tiles:
        rng = np.random.default_rng([tiling.seed, zlib.crc32(slide_id.encode())])
        chosen = np.sort(rng.choice(len(xy), tiling.max_tiles, replace=False))
        xy = xy[chosen]
    return xy
