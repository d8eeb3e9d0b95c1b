"""Slide tiles/s: featstore's read + tile + resize + preprocess against tifffile
reading the same level's raw tiles (the ceiling), with 1 and 2 worker processes,
and the workers' peak RSS.

    python benchmarks/slides.py [--slide PATH] [--mpp MPP] [--tile-mpp 0.5]
        [--tile-size 224] [--overlap 0.5] [--repeat 3]

featstore: the slide is listed (tissue, tile plan) once, then each worker decodes
batches of 32 tiles through `readers.load` (tiffslide regions from the closest level
at or finer than --tile-mpp, a row's overlapping tiles read as one region and
cropped, resized to --tile-size; "tile by tile": every tile read on its own, as
before, measured in the same rounds) and `preprocess` (x / 255,
ImageNet mean/std, float32 (n, 3, R, R)), as the DataLoader workers of `featstore
extract` do. Ceiling: tifffile decodes every stored tile of the level read
(`TiffPage.segments`), the same tiles split over the same number of processes; its
rate is given in stored tiles/s and both in megapixels/s. Default slide:
../shared/data/wsi/CMU-1-Small-Region.svs (Aperio JPEG).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

from featstore.data import readers, wsi
from featstore.data.manifest import Dataset
from featstore.data.settings import Intensity
from featstore.encode.preprocess import preprocess
from featstore.identity import Preprocess

# the real data root: $FEATSTORE_DATA (the Makefile's), else ../shared/data
DATA = Path(
    os.environ.get("FEATSTORE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
DEFAULT = DATA / "wsi" / "CMU-1-Small-Region.svs"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BATCH = 32


def _featstore_part(
    args: tuple[Dataset, readers.Sample, list[range], int, bool, int],
) -> tuple[int, int]:
    ds, sample, batches, size, cpu_preprocess, span_pixels = args
    wsi.SPAN_PIXELS = span_pixels  # 0: every tile read on its own (as before spans)
    pre = Preprocess(size, ds.intensity, MEAN, STD)
    n = 0
    for items in batches:
        # as_read: the stored uint8, as workers hand it over with --preprocess-on device
        loaded = readers.load(ds, sample, as_read=not cpu_preprocess, items=items)
        if cpu_preprocess:
            preprocess(loaded.image, None, pre)
        n += len(loaded.image)
    return n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def _tifffile_part(args: tuple[str, int, int, int]) -> tuple[int, int, int]:
    path, page_index, worker, workers = args
    n = pixels = 0
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[page_index]
        for k, (tile, _, shape) in enumerate(page.segments()):
            if k % workers == worker and tile is not None:
                n += 1
                pixels += int(np.prod(shape[1:3]))
    return n, pixels, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def _page_of_level(path: Path, level: int) -> int:
    with tifffile.TiffFile(path) as tf:
        keyframe = tf.series[0].levels[level].keyframe
        return next(i for i, p in enumerate(tf.pages) if p.offset == keyframe.offset)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slide", type=Path, default=DEFAULT)
    ap.add_argument("--mpp", default="", help="level-0 um/px when the slide has none")
    ap.add_argument("--tile-mpp", type=float, default=0.5)
    ap.add_argument("--tile-size", type=int, default=224)
    ap.add_argument("--overlap", type=float, default=0.5)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    args.slide = args.slide.resolve()  # the index lies in a temporary folder
    if not args.slide.is_file():
        raise SystemExit(f"{args.slide}: no such slide (--slide)")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "index.csv").write_text(
            f"image,label,split,mpp\n{args.slide},0,train,{args.mpp}\n"
        )
        ds = Dataset.model_validate(
            dict(name="bench", format="wsi", path=tmp, index="index.csv", task="classification",
                 dims=2, intensity=Intensity(mode="window", center=127.5, width=255),
                 tiling={"tile_mpp": args.tile_mpp, "tile_size": args.tile_size,
                         "overlap": args.overlap})
        )  # fmt: skip
        t0 = time.perf_counter()
        (sample,) = readers.list_samples(ds)
        plan_s = time.perf_counter() - t0
    assert sample.tiles is not None
    tiles, read = sample.n_items, sample.tiles.read
    page = _page_of_level(args.slide, sample.tiles.level)
    print(f"slide {args.slide.name}: {tiles} tissue tiles of {args.tile_size} px at "
          f"{args.tile_mpp} um/px, read {read} px from level {sample.tiles.level} "
          f"(plan: tissue + grid in {plan_s:.2f} s)")  # fmt: skip
    runs = [range(s, min(s + BATCH, tiles)) for s in range(0, tiles, BATCH)]
    print(f"{'workers':>7}  {'featstore tiles/s':>17}  {'Mpx/s':>6}  {'+CPU preprocess':>15}  "
          f"{'tile by tile':>12}  {'tifffile tiles/s':>16}  {'Mpx/s':>6}  {'ratio (Mpx)':>11}  "
          f"{'peak RSS MB/worker':>18}")  # fmt: skip
    ctx = mp.get_context("spawn")
    for workers in (1, 2):
        with ctx.Pool(workers) as pool:
            pool.map(_tifffile_part, [(str(args.slide), page, w, workers) for w in range(workers)])
            best = {"spans": float("inf"), "preprocess": float("inf"), "tiles": float("inf")}
            best_t = float("inf")
            for _ in range(args.repeat):
                for side in best:  # the three featstore sides back to back, then tifffile
                    t0 = time.perf_counter()
                    parts = [
                        (ds, sample, runs[w::workers], args.tile_size, side == "preprocess",
                         0 if side == "tiles" else wsi.SPAN_PIXELS)
                        for w in range(workers)
                    ]  # fmt: skip
                    got = pool.map(_featstore_part, parts)
                    best[side] = min(best[side], time.perf_counter() - t0)
                t0 = time.perf_counter()
                raw = pool.map(
                    _tifffile_part, [(str(args.slide), page, w, workers) for w in range(workers)]
                )
                best_t = min(best_t, time.perf_counter() - t0)
            best_f, best_p = best["spans"], best["preprocess"]
        assert sum(n for n, _ in got) == tiles
        f_mpx = tiles * read * read / 1e6 / best_f
        n_raw, px_raw = sum(r[0] for r in raw), sum(r[1] for r in raw)
        t_mpx = px_raw / 1e6 / best_t
        rss = max(r for _, r in got)
        print(f"{workers:>7}  {tiles / best_f:>17.1f}  {f_mpx:>6.1f}  {tiles / best_p:>15.1f}  "
              f"{tiles / best['tiles']:>12.1f}  {n_raw / best_t:>16.1f}  {t_mpx:>6.1f}  "
              f"{f_mpx / t_mpx:>11.2f}  "
              f"{rss:>18}")  # fmt: skip


if __name__ == "__main__":
    main()
