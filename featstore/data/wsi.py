"""Whole-slide images (`format: wsi`): pyramidal TIFF/SVS/OME-TIFF read tile by tile.

Slides are read with tiffslide (tifffile + imagecodecs), region by region: no level
is ever loaded whole. Listing a slide reads its header, checks the plan (`check_plan`)
and reads one low-resolution image for tissue detection (`featstore.data.tissue`) to
plan its tiles; decoding reads each tile from the closest level at or finer than
`tile_mpp` (at level 0 a row's overlapping tiles in one region: `spans`), resized to
`tile_size`.

The level-0 pixel size is decided in `featstore.data.pixel_size` (the index's `mpp`
column where the user wrote one, else the file's own calibration).

Pixels follow `featstore.data.layouts` (min-is-white inverted, palette expanded,
alpha composited on white, uncompressed YCbCr converted, CMYK refused), checked for
every level when the slide is opened. Tiles are 8-bit RGB, what tissue detection and
the encoders of brightfield slides expect: grey levels are repeated to three
channels, and levels of other bit depths (16-bit fluorescence, float) are refused
rather than cast modulo 256, as are planar-separate levels, which tiffslide cannot
read by region.
"""

from __future__ import annotations

import os
import threading
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tifffile
from PIL import Image

from featstore.data.layouts import Layout, convert, page_layout
from featstore.data.manifest import Dataset
from featstore.data.pictures import MAX_PIXELS
from featstore.data.pixel_size import PixelSize, pixel_size
from featstore.data.reader import Reader, Skip
from featstore.data.samples import Header, Loaded, Sample, Tiles
from featstore.data.settings import Tiling
from featstore.data.tissue import MIN_SATURATION, overview_mpp, speck_um2, tile_grid, tissue_mask
from featstore.errors import BadInputError

if TYPE_CHECKING:
    from tiffslide import TiffSlide

# A plan past these is refused before a pixel is read: a wrong pixel size (a 300 dpi
# tag), or a tile_mpp far from the slide's, would otherwise tile millions of regions.
MAX_GRID = 5_000_000  # tile positions laid on one slide (before `max_tiles` samples them)
MIN_STRIDE = 8  # level-0 px between neighbouring tiles, at least
BLOCK = 2048  # pixels per side of the blocks a thumbnail is assembled from
# What tifffile, imagecodecs and zarr raise on truncated, corrupt or unsupported files.
READ_ERRORS = (
    tifffile.TiffFileError,
    OSError,
    ValueError,
    KeyError,
    IndexError,
    EOFError,
    RuntimeError,
    NotImplementedError,
)

# One slide kept open per thread and process (DataLoader workers, dask worker threads):
# reopening a slide per batch costs its header parse. A handle inherited through fork
# is never reused: parent and child would share its file offset.
_local = threading.local()


def open_slide(path: Path) -> TiffSlide:
    """The slide at `path`, opened once per thread; `BadInputError` naming it."""
    try:
        from tiffslide import TiffSlide
    except ImportError:
        raise BadInputError(
            f"{path}: reading slides needs tiffslide: pip install 'featstore[slides]'"
        ) from None
    key = (os.getpid(), str(path))
    current: tuple[tuple[int, str], TiffSlide] | None = getattr(_local, "slide", None)
    if current is not None and current[0] == key:
        return current[1]
    if current is not None and current[0][0] == key[0]:
        current[1].close()
    _local.slide = None
    try:
        slide = TiffSlide(path)
        check_levels(path, slide)
    except BadInputError:
        raise
    except READ_ERRORS as exc:
        _check_pages(path)  # a layout tiffslide cannot open is named by its property
        raise BadInputError(
            f"{path}: cannot read it as a slide ({type(exc).__name__}: {exc}); the file is "
            "truncated, corrupt or not a tiled TIFF/SVS: replace it or remove its row"
        ) from None
    _local.slide = (key, slide)
    return slide


def check_levels(path: Path, slide: TiffSlide) -> None:
    """Refuse levels that cannot be read by region: untiled and over the pixel limit,
    or compressed with a codec that is not installed."""
    series = slide.ts_tifffile.series[slide.properties.get("tiffslide.series-index") or 0]
    for i, level in enumerate(series.levels):
        page = level.keyframe
        pixels = int(page.imagewidth) * int(page.imagelength)
        if not page.is_tiled and pixels > MAX_PIXELS:
            raise BadInputError(
                f"{path}: level {i} is {page.imagewidth} x {page.imagelength} pixels and not "
                f"tiled, so no region of it can be read alone (limit {MAX_PIXELS:,} pixels); "
                "convert it to a tiled pyramidal TIFF (e.g. `vips tiffsave --tile --pyramid`)"
            )
        try:
            tifffile.TIFF.DECOMPRESSORS[page.compression]
        except KeyError:
            raise BadInputError(
                f"{path}: level {i} is compressed with {page.compression!r} and no decoder "
                "for it is installed; install imagecodecs (pip install 'featstore[slides]')"
            ) from None
        check_pixels(path, i, page_layout(path, page))


def _check_pages(path: Path) -> None:
    """Refuse, naming the property, a page whose layout slides cannot be read in
    (tiffslide raises its own errors on some of them before `check_levels` runs)."""
    try:
        with tifffile.TiffFile(path) as tf:
            for i, page in enumerate(tf.series[0].levels if tf.series else []):
                check_pixels(path, i, page_layout(path, page.keyframe))
    except BadInputError:
        raise
    except READ_ERRORS:
        return  # not even tifffile reads it: the caller's message says so


def check_pixels(path: Path, i: int, lay: Layout) -> None:
    """Refuse a level whose pixels do not decode to 8-bit RGB by the layout rules."""
    fix = "convert it to an 8-bit RGB pyramidal TIFF (e.g. `vips tiffsave --tile --pyramid`)"
    if lay.separate:
        raise BadInputError(
            f"{path}: level {i} has planar configuration separate (one plane per colour), "
            f"which cannot be read by region; {fix}"
        )
    wide_palette = lay.colormap is not None and bool((np.asarray(lay.colormap) % 257).any())
    if lay.dtype != np.uint8 or wide_palette:
        what = "a 16-bit palette" if wide_palette else f"{lay.bits}-bit {lay.dtype} samples"
        raise BadInputError(
            f"{path}: level {i} holds {what}; slides are read as 8-bit RGB and never cast "
            f"modulo 256: {fix}, or read the image with `format: images` or `format: stack`"
        )


def level_layout(slide: TiffSlide, level: int) -> Layout:
    """The layout of a level of `slide` (checked by `check_levels` when opened)."""
    series = slide.ts_tifffile.series[slide.properties.get("tiffslide.series-index") or 0]
    return page_layout(Path(slide.ts_tifffile.filehandle.path), series.levels[level].keyframe)


def best_level(slide: TiffSlide, mpp0: float, target: float) -> int:
    """The coarsest level whose pixels are at most `target` um (level 0 if none is)."""
    finer = [i for i, d in enumerate(slide.level_downsamples) if mpp0 * d <= target * 1.001]
    return max(finer, key=lambda i: slide.level_downsamples[i]) if finer else 0


def read_rgb(
    slide: TiffSlide, xy: tuple[int, int], level: int, size: tuple[int, int]
) -> np.ndarray:
    """(h, w, 3) uint8 of a region: level-0 top-left `xy`, `size` (w, h) at `level`,
    by the rules of featstore.data.layouts (grey repeated to RGB)."""
    arr = np.asarray(slide.read_region(xy, level, size, as_array=True))
    arr = convert(arr, level_layout(slide, level))
    return np.repeat(arr, 3, -1) if arr.shape[-1] == 1 else arr


def thumbnail(slide: TiffSlide, mpp0: float, target: float) -> tuple[np.ndarray, float]:
    """An (h, w, 3) uint8 image of the whole slide at about `target` um/px, and its
    level-0 pixels per thumbnail pixel. Assembled block by block from the closest
    level at or finer than `target`, each block averaged f x f: memory stays at one
    block plus the thumbnail however large the slide."""
    level = best_level(slide, mpp0, target)
    down = float(slide.level_downsamples[level])
    width, height = slide.level_dimensions[level]
    f = max(1, int(target / (mpp0 * down)))
    out = np.empty((height // f, width // f, 3), np.uint8)
    block = max(f, BLOCK // f * f)
    for by in range(0, out.shape[0] * f, block):
        for bx in range(0, out.shape[1] * f, block):
            bw, bh = min(block, out.shape[1] * f - bx), min(block, out.shape[0] * f - by)
            arr = read_rgb(slide, (round(bx * down), round(by * down)), level, (bw, bh))
            if f > 1:
                arr = np.rint(arr.reshape(bh // f, f, bw // f, f, 3).mean((1, 3), dtype=np.float32))
            out[by // f : (by + bh) // f, bx // f : (bx + bw) // f] = arr
    return out, down * f


def plan(path: Path, slide_id: str, tiling: Tiling, column: str) -> Tiles | str:
    """The tiles of one slide, or the reason it has none (no tissue, too small). A plan
    that cannot be meant (see `check_plan`) is a `BadInputError` before a pixel is read."""
    slide = open_slide(path)
    size = pixel_size(path, slide, column)
    mpp0 = size.mpp
    level = best_level(slide, mpp0, tiling.tile_mpp)
    read = max(
        1, round(tiling.tile_size * tiling.tile_mpp / (mpp0 * slide.level_downsamples[level]))
    )
    w0, h0 = slide.dimensions
    check_plan(path, size, tiling, (w0, h0), (level, read))
    foot = max(1, round(tiling.tile_size * tiling.tile_mpp / mpp0))
    if foot > min(w0, h0):
        return (
            f"the slide ({w0} x {h0} px at {mpp0:g} um) is smaller than one tile "
            f"({foot} level-0 px); lower tiling.tile_mpp or tile_size"
        )
    _, mask, _ = overview(path, tiling, mpp0)
    if not mask.any():
        return (
            "no tissue found: no region more saturated than the background "
            f"(Otsu threshold, at least {MIN_SATURATION}/255) and larger than "
            f"{speck_um2(tiling):g} um2"
        )
    scale = (w0 / mask.shape[1], h0 / mask.shape[0])
    xy = tile_grid(mask, scale, (w0, h0), foot, tiling, slide_id)
    if len(xy) == 0:
        return (
            f"no tile of {foot} level-0 px has {tiling.min_tissue:.0%} tissue "
            "(lower tiling.min_tissue or tile_mpp)"
        )
    return Tiles(
        xy=xy, mpp=mpp0, mpp_source=size.source, level=level, read=read, mpp_note=size.note
    )


def check_plan(
    path: Path, size: PixelSize, tiling: Tiling, size0: tuple[int, int], reads: tuple[int, int]
) -> None:
    """Refuse, naming the slide, its pixel size and the fix, a plan that cannot be
    meant: tiles finer than level 0 without `upsample`, tiles covering less than one
    level-0 pixel, tiles laid closer than MIN_STRIDE level-0 px or more than MAX_GRID
    of them, or tiles read as regions wider than SPAN_PIXELS (`reads`: the level read
    and a tile's side there)."""
    mpp0, (w0, h0), (level, read) = size.mpp, size0, reads
    at = f"the slide's base level is {mpp0:g} um/px ({size.source})"
    if tiling.tile_mpp < mpp0 * 0.999 and not tiling.upsample:
        raise BadInputError(
            f"{path}: tile_mpp {tiling.tile_mpp} is finer than the slide's base level "
            f"({mpp0:g} um/px, {size.source}); give a tile_mpp of at least {mpp0:g}, or set "
            "`tiling: {upsample: true}` to enlarge level-0 pixels"
        )
    cover = tiling.tile_size * tiling.tile_mpp / mpp0
    if cover < 1:
        raise BadInputError(
            f"{path}: a tile of {tiling.tile_size} px at {tiling.tile_mpp} um covers "
            f"{cover:.3g} level-0 pixels ({at}); a tile must cover at least one: raise "
            "tiling.tile_mpp or tile_size, or correct the slide's pixel size"
        )
    foot = max(1, round(cover))
    stride = max(1, round(foot * (1 - tiling.overlap)))
    grid = (max(0, w0 - foot) // stride + 1) * (max(0, h0 - foot) // stride + 1)
    if stride < MIN_STRIDE:
        raise BadInputError(
            f"{path}: the plan lays tiles every {stride} level-0 px ({grid:,} tiles on this "
            f"{w0} x {h0} px slide; {at}), closer than {MIN_STRIDE}: each tile would enlarge "
            "a few pixels. Correct the slide's pixel size (the index's mpp column), or raise "
            "tiling.tile_mpp or lower its overlap"
        )
    if grid > MAX_GRID:
        raise BadInputError(
            f"{path}: the plan lays {grid:,} tiles of {foot} level-0 px on this "
            f"{w0} x {h0} px slide ({at}), more than {MAX_GRID:,}; raise tiling.tile_mpp "
            "or lower its overlap, or correct the slide's pixel size (the index's mpp column)"
        )
    if read > SPAN_PIXELS:
        raise BadInputError(
            f"{path}: each tile would be read as {read} x {read} px from level {level}, "
            f"the coarsest at or finer than tile_mpp {tiling.tile_mpp} ({at}); lower "
            "tiling.tile_mpp or tile_size, or give the slide a pyramid (e.g. `vips "
            "tiffsave --tile --pyramid`)"
        )


def overview(path: Path, tiling: Tiling, mpp0: float) -> tuple[np.ndarray, np.ndarray, float]:
    """What a pathologist checks first: the slide's thumbnail at about
    `tissue.overview_mpp` ((h, w, 3) uint8), its tissue mask ((h, w) bool) and level-0
    pixels per thumbnail pixel, exactly as `plan` computed them (`mpp0`: the slide's
    level-0 um/px, `Tiles.mpp`). `BadInputError` naming the slide when it cannot be read."""
    slide = open_slide(path)
    try:
        target = overview_mpp(slide.dimensions, mpp0, tiling)
        thumb, per_px = thumbnail(slide, mpp0, target)
    except READ_ERRORS as exc:
        raise BadInputError(
            f"{path}: cannot decode its low-resolution level ({type(exc).__name__}: {exc}); "
            "the file is truncated or corrupt: replace it or remove its row"
        ) from None
    return thumb, tissue_mask(thumb, mpp0 * per_px, speck_um2(tiling)), per_px


class Slides(Reader):
    """`format: wsi`: one slide per index row; an item is a tile, a sample a slide."""

    tiled = True
    columns = frozenset()  # `mpp` is optional: the file usually has it

    def describe(self, ds: Dataset, base: Sample, row: dict[str, str], where: str) -> Sample | Skip:
        assert ds.tiling is not None  # the manifest requires it for slides
        tiles = plan(Path(base.image), base.id, ds.tiling, row.get("mpp", ""))
        if isinstance(tiles, str):
            return Skip(base.id, f"{base.image}: {tiles}")
        return replace(base, n_items=len(tiles.xy), tiles=tiles)

    def header(self, ds: Dataset, sample: Sample) -> Header:
        assert ds.tiling is not None and sample.tiles is not None
        mm = ds.tiling.tile_mpp / 1000
        return Header((ds.tiling.tile_size, ds.tiling.tile_size), (mm, mm))

    def coords(self, ds: Dataset, samples: list[Sample]) -> dict[str, np.ndarray]:
        assert ds.tiling is not None
        tiles = [s.tiles for s in samples if s.tiles is not None]
        xy = np.concatenate([t.xy for t in tiles]) if tiles else np.zeros((0, 2), np.int64)
        return {
            "tile_x": xy[:, 0],
            "tile_y": xy[:, 1],
            "tile_mpp": np.full(len(xy), ds.tiling.tile_mpp),
            "slide_mpp": np.concatenate([np.full(len(t.xy), t.mpp) for t in tiles]),
            "mpp_source": np.concatenate(
                [np.full(len(t.xy), t.mpp_source, dtype=object) for t in tiles]
            ),
        }

    def decode(self, ds: Dataset, sample: Sample, items: range, as_read: bool) -> Loaded:
        assert ds.tiling is not None and sample.tiles is not None
        path, t, size = Path(sample.image), sample.tiles, ds.tiling.tile_size
        slide = open_slide(path)
        out = np.empty((len(items), size, size, 3), np.uint8)
        xy = [(int(t.xy[k][0]), int(t.xy[k][1])) for k in items]
        j = 0
        for first, n, width in spans(xy, t.level, t.read):
            try:
                region = read_rgb(slide, xy[first], t.level, (width, t.read))
            except READ_ERRORS as exc:
                for x, y in xy[first : first + n]:  # name the tile that fails
                    _read_tile(slide, path, (x, y), t.level, t.read)
                x, y = xy[first]  # the region failed, none of its tiles alone did
                raise BadInputError(
                    f"{path}: cannot decode the {width} x {t.read} px region at level-0 "
                    f"({x}, {y}) ({type(exc).__name__}: {exc}); the file is truncated or "
                    "corrupt: replace it, or run with --skip-bad"
                ) from None
            x0 = xy[first][0]
            for x, _ in xy[first : first + n]:
                tile = region[:, x - x0 : x - x0 + t.read]
                if t.read != size:
                    tile = np.asarray(
                        Image.fromarray(tile).resize((size, size), Image.Resampling.BILINEAR)
                    )
                out[j] = tile
                j += 1
        assert j == len(items)
        return Loaded(image=out if as_read else out.astype(np.float32), mask=None)


def _read_tile(
    slide: TiffSlide, path: Path, xy: tuple[int, int], level: int, read: int
) -> np.ndarray:
    """One tile, or a BadInputError naming the slide, the tile and the fix."""
    try:
        return read_rgb(slide, xy, level, (read, read))
    except READ_ERRORS as exc:
        raise BadInputError(
            f"{path}: cannot decode the tile at level-0 ({xy[0]}, {xy[1]}) "
            f"({type(exc).__name__}: {exc}); the file is truncated or corrupt: "
            "replace it, or run with --skip-bad"
        ) from None


SPAN_PIXELS = 8192  # widest region read at once: 8192 x 443 px RGB is 11 MB


def spans(xy: list[tuple[int, int]], level: int, read: int) -> list[tuple[int, int, int]]:
    """(first tile, tiles, width in px) of each region to read: a run of consecutive
    tiles of one row whose reads overlap or touch is read as one region and cropped,
    so the stored tiles they share are decoded once, not once per tile (at 50%
    overlap each stored tile was decoded twice per row). Only level 0, where a
    level-0 location is a pixel of the level read; other levels keep one read per
    tile, with tiffslide's own rounding of the location."""
    out: list[tuple[int, int, int]] = []
    for k, (x, y) in enumerate(xy):
        if out and level == 0:
            first, n, width = out[-1]
            x0, y0 = xy[first]
            end = x + read - x0
            if y == y0 and x0 <= x <= x0 + width and end <= SPAN_PIXELS:
                out[-1] = (first, n + 1, max(width, end))
                continue
        out.append((k, 1, read))
    return out
