"""What the probes and the report need from the raw data, recorded when a set is made.

A feature set must be probed where its data is not (a cache on S3, scans on another
machine), so whatever a probe or a report would otherwise read from the source files
is written into the set when it is allocated (or its coordinates repaired):

- per item, the native slice size and header spacing (`featstore.data.native`), from
  which `featstore.probing.geometry` scales HD95 to millimetres;
- a few example thumbnails: for each of the first `N_EXAMPLES` test samples (slides:
  other slides too when there are fewer test slides), the
  slice the report shows (segmentation: the one with most foreground in the stored
  mask; otherwise, and for HDF5/Zarr volumes, which are read in blocks, the middle
  slice), as the encoder saw it (channel 0, in [0, 1]) in uint8, at the input
  resolution or shrunk to `THUMB_MAX`;
- for slides, also each example slide's overview at about `tiling.tissue_mpp` with its
  tissue mask, for the report's slide figure (`schema.OVERVIEWS`).

Costs: one header read per sample and the decoding of `N_EXAMPLES` samples, once per
set; a cached set reads nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from featstore.data import native, readers, wsi
from featstore.data.readers import Prepared
from featstore.encode.preprocess import preprocess
from featstore.errors import BadInputError
from featstore.identity import Preprocess
from featstore.store import schema
from featstore.store.schema import N_EXAMPLES, NATIVE, THUMB_MAX, Items


def _thumbnail(prep: Prepared, i: int, pre: Preprocess) -> tuple[int, np.ndarray]:
    """(item shown, counted within the sample; (t, t) uint8 thumbnail) of sample `i`."""
    sample, first = prep.samples[i], 0
    if readers.tiled(prep.ds):  # a slide's middle tile, an HDF5/Zarr volume's middle
        # slice: never the whole sample
        first = sample.n_items // 2
        loaded = readers.load(prep.ds, sample, items=range(first, first + 1))
    else:
        loaded = readers.load(prep.ds, sample)
    pixels, masks = preprocess(loaded.image, loaded.mask, pre, loaded.span)
    k = int(np.argmax((masks > 0).sum((1, 2)))) if masks is not None else len(pixels) // 2
    unit = np.clip(pixels[k, 0] * pre.std[0] + pre.mean[0], 0.0, 1.0)
    if pre.resolution > THUMB_MAX:
        shrunk = Image.fromarray(unit.astype(np.float32)).resize(
            (THUMB_MAX, THUMB_MAX), Image.Resampling.BILINEAR
        )
        unit = np.clip(np.asarray(shrunk), 0.0, 1.0)
    return first + k, np.round(unit * 255).astype(np.uint8)


@dataclass(frozen=True)
class Examples:
    """What a set keeps of its example samples: `example_item` (n,) int64 (-1: not
    decodable, with --skip-bad), `thumbnails` (n, t, t) uint8, and for slides
    `schema.OVERVIEWS` by name (else {})."""

    example_item: np.ndarray
    thumbnails: np.ndarray
    overviews: dict[str, np.ndarray]


def examples(prep: Prepared, pre: Preprocess, skip_bad: bool) -> Examples:
    """The example samples' thumbnails (and, for slides, overviews), in one pass.

    A sample that cannot be decoded is refused as extraction would refuse it, or with
    `skip_bad` kept as item -1 with a blank thumbnail (its items are skipped too); a
    slide whose overview cannot be read is left blank with a NaN scale.
    """
    first = np.cumsum([0] + [s.n_items for s in prep.samples])
    chosen = prep.example_samples(N_EXAMPLES)
    t = min(pre.resolution, THUMB_MAX) if chosen else 0  # as `schema.layout_for` says
    items = np.full(len(chosen), -1, np.int64)
    thumbs = np.zeros((len(chosen), t, t), np.uint8)
    slides = bool(chosen) and prep.ds.tiling is not None
    side = schema.OVERVIEW_MAX
    rgb = np.full((len(chosen), side, side, 3), 255, np.uint8) if slides else None
    codes = np.full((len(chosen), side, side), schema.TISSUE_CODES["outside"], np.uint8)
    scale = np.full(len(chosen), np.nan)
    for j, i in enumerate(chosen):
        try:
            k, thumbs[j] = _thumbnail(prep, i, pre)
            items[j] = first[i] + k
        except BadInputError:
            if not skip_bad:
                raise
        if rgb is None:
            continue
        sample, tiling = prep.samples[i], prep.ds.tiling
        assert tiling is not None and sample.tiles is not None
        try:  # the tissue mask is the one its tiles were planned on
            found = wsi.overview(Path(sample.image), tiling, sample.tiles.mpp)
            rgb[j], codes[j], scale[j] = shrunk(*found, side)
        except BadInputError:
            if not skip_bad:
                raise
    shown = {} if rgb is None else dict(zip(schema.OVERVIEWS, (rgb, codes, scale), strict=True))
    return Examples(items, thumbs, shown)


def shrunk(
    thumb: np.ndarray, mask: np.ndarray, per_px: float, side: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """A slide's overview (`wsi.overview`: RGB, tissue mask, level-0 pixels per pixel)
    shrunk by a whole factor to fit side x side: ((side, side, 3) uint8 padded white,
    (side, side) uint8 `schema.TISSUE_CODES`, the level-0 pixels per pixel)."""
    f = -(-max(mask.shape) // side)
    h, w = mask.shape[0] // f, mask.shape[1] // f
    rgb = np.full((side, side, 3), 255, np.uint8)
    rgb[:h, :w] = np.rint(thumb[: h * f, : w * f].reshape(h, f, w, f, 3).mean((1, 3)))
    codes = np.full((side, side), schema.TISSUE_CODES["outside"], np.uint8)
    tissue = mask[: h * f, : w * f].reshape(h, f, w, f).mean((1, 3)) >= 0.5
    codes[:h, :w] = np.where(tissue, schema.TISSUE_CODES["tissue"], 0)
    return rgb, codes, per_px * f


def with_raw_facts(items: Items, prep: Prepared, pre: Preprocess, skip_bad: bool) -> Items:
    """`items` with the native geometry of every item and the example thumbnails."""
    table = native.native_table(prep.ds, prep.samples)
    per_item = [table[i] for i, _ in prep.index]
    columns: list[list[float]] = [
        [n.rows for n in per_item],
        [n.cols for n in per_item],
        *([n.spacing[a] for n in per_item] for a in range(3)),
    ]
    shown = examples(prep, pre, skip_bad)
    return dataclasses.replace(
        items,
        native=dict(zip(NATIVE, columns, strict=True)),
        example_item=shown.example_item.tolist(),
        thumbnails=shown.thumbnails,
        overviews=shown.overviews,
    )
