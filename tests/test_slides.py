"""Whole-slide images: pixel size, tissue, tiling, hostile slides, bounded memory.

Slides are real pyramidal TIFFs written by the tests with tifffile (as scanners write
them: JPEG tiles, SubIFD levels, resolution tags) and the two real Aperio slides of
../shared/data/wsi when that folder is present.
"""

from __future__ import annotations

import dataclasses
import functools
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile

from featstore.data import readers, tissue, wsi
from featstore.data.manifest import Dataset
from featstore.data.synthetic_slides import GLASS, slide_image, write_pyramid, write_slide
from featstore.errors import BadInputError

pytest.importorskip("tiffslide")


def _dataset(path: Path, rows: list[str], outside: bool = False, **tiling: object) -> Dataset:
    (path / "index.csv").write_text("image,label,split,mpp\n" + "\n".join(rows) + "\n")
    spec = {"tile_mpp": 1.0, "tile_size": 64, **tiling}
    return Dataset.model_validate(
        dict(name="s", format="wsi", path=path, index="index.csv", task="classification",
             dims=2, tiling=spec, allow_outside_paths=outside)
    )  # fmt: skip


def _slide(path: Path, label: int = 1, size: int = 1024, seed: int = 0) -> Path:
    write_slide(path, slide_image(np.random.default_rng(seed), size, label))
    return path


def test_tissue_mask_otsu_specks_and_holes():
    rgb = np.full((200, 200, 3), GLASS, np.uint8)
    rgb[50:150, 50:150] = (220, 140, 190)  # tissue, 100 x 100 px
    rgb[95:100, 95:100] = GLASS  # a small hole in it
    rgb[10:12, 10:12] = (90, 60, 150)  # a speck of dust
    mask = tissue.tissue_mask(rgb, mpp=8.0)  # 10,000 um2 = 156 px at 8 um/px
    assert mask[60:140, 60:140].all() and mask[97, 97]  # hole filled
    assert not mask[11, 11] and not mask[:40].any()  # speck and glass
    assert not tissue.tissue_mask(np.full((64, 64, 3), GLASS, np.uint8), 8.0).any()
    rgb = np.array([[[255, 0, 0], [200, 100, 100], [0, 0, 0], [250, 250, 250]]], np.uint8)
    np.testing.assert_array_equal(tissue.saturation(rgb)[0], [255, 127, 0, 0])
    values = np.r_[np.full(100, 10), np.full(100, 200)].astype(np.uint8)
    assert 10 <= tissue.otsu(values) < 200


def test_tiles_come_from_the_closest_finer_level_resized(tmp_path):
    _slide(tmp_path / "a.tif")
    ds = _dataset(tmp_path, ["a.tif,1,train,"], tile_mpp=1.0, tile_size=64)
    (s,) = readers.list_samples(ds)
    assert s.tiles is not None and s.tiles.mpp == 0.5 and "resolution tags" in s.tiles.mpp_source
    assert (s.tiles.level, s.tiles.read) == (1, 64)  # level 1 is 1.0 um/px: read as is
    got = readers.load(ds, s, as_read=True, items=range(2, 4)).image
    slide = wsi.open_slide(Path(s.image))
    x, y = s.tiles.xy[3]
    direct = np.asarray(slide.read_region((int(x), int(y)), 1, (64, 64), as_array=True))
    np.testing.assert_array_equal(got[1], direct[..., :3])
    # 0.75 um/px: level 0 (0.5) is the closest at or finer; 96 px read, resized to 64
    ds2 = _dataset(tmp_path, ["a.tif,1,train,"], tile_mpp=0.75, tile_size=64)
    (s2,) = readers.list_samples(ds2)
    assert s2.tiles is not None and (s2.tiles.level, s2.tiles.read) == (0, 96)
    assert readers.load(ds2, s2, items=range(1)).image.shape == (1, 64, 64, 3)
    # footprints: 128 level-0 px at 1.0 um x 64 px, on a 128-px grid
    assert set(np.unique(s.tiles.xy % 128)) == {0}


def _direct_tiles(s, items: range) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Each tile read on its own with tiffslide (the reference for span reads)."""
    slide = wsi.open_slide(Path(s.image))
    t = s.tiles
    return np.stack(
        [
            np.asarray(
                slide.read_region(
                    tuple(int(v) for v in t.xy[k]), t.level, (t.read,) * 2, as_array=True
                )
            )[..., :3]
            for k in items
        ]
    )


def test_a_row_of_overlapping_tiles_is_read_once_and_equals_tile_by_tile_reads(
    tmp_path, monkeypatch
):
    """At level 0 a batch's tiles of one row are read as one region and cropped: every
    tile equals its own tiffslide read, at 50% overlap, across rows, with a span cap
    that splits a row, and for tiles reaching past the slide's edges (tiffslide pads
    those with zeros; the plan never places one there, a hand-made one does)."""
    _slide(tmp_path / "a.tif", size=1000)
    ds = _dataset(tmp_path, ["a.tif,1,train,"], tile_mpp=0.5, tile_size=64, overlap=0.5)
    (s,) = readers.list_samples(ds)
    assert s.tiles is not None and s.tiles.level == 0 and s.n_items > 40
    calls = []
    real = wsi.read_rgb
    monkeypatch.setattr(wsi, "read_rgb", lambda *a: calls.append(a) or real(*a))
    for items in (range(0, 32), range(32, s.n_items)):
        got = readers.load(ds, s, as_read=True, items=items).image
        np.testing.assert_array_equal(got, _direct_tiles(s, items))
    rows = len({int(y) for _, y in s.tiles.xy})
    assert len(calls) < s.n_items and len(calls) <= rows + 2  # a read per row and batch
    monkeypatch.setattr(wsi, "SPAN_PIXELS", 100)  # at most 2 overlapping 64-px tiles
    calls.clear()
    got = readers.load(ds, s, as_read=True, items=range(0, 32)).image
    np.testing.assert_array_equal(got, _direct_tiles(s, range(0, 32)))
    assert len(calls) >= 16
    monkeypatch.setattr(wsi, "SPAN_PIXELS", 8192)
    edges = np.array([[-40, 0], [-8, 0], [16, 0], [950, 980], [970, 980]], np.int64)
    off = dataclasses.replace(s, n_items=5, tiles=dataclasses.replace(s.tiles, xy=edges))
    got = readers.load(ds, off, as_read=True, items=range(5)).image
    np.testing.assert_array_equal(got, _direct_tiles(off, range(5)))
    assert got[0][:, :40].max() == 0 and got[3][20:].max() == 0  # padded, as tiffslide pads
    assert wsi.spans([(0, 0), (32, 0), (200, 0), (200, 32)], 0, 64) == [
        (0, 2, 96), (2, 1, 64), (3, 1, 64),
    ]  # fmt: skip
    assert wsi.spans([(0, 0), (32, 0)], 1, 64) == [(0, 1, 64), (1, 1, 64)]  # not level 0


def test_max_tiles_is_a_seeded_sample_and_overlap_adds_tiles(tmp_path):
    _slide(tmp_path / "a.tif")
    all_ = readers.list_samples(_dataset(tmp_path, ["a.tif,1,train,"]))[0].tiles
    few = readers.list_samples(_dataset(tmp_path, ["a.tif,1,train,"], max_tiles=5))[0].tiles
    again = readers.list_samples(_dataset(tmp_path, ["a.tif,1,train,"], max_tiles=5))[0].tiles
    other = readers.list_samples(_dataset(tmp_path, ["a.tif,1,train,"], max_tiles=5, seed=1))
    assert all_ is not None and few is not None and again is not None
    assert len(all_.xy) > 5 and len(few.xy) == 5
    np.testing.assert_array_equal(few.xy, again.xy)
    assert {tuple(v) for v in few.xy} <= {tuple(v) for v in all_.xy}
    assert not np.array_equal(few.xy, other[0].tiles.xy)  # type: ignore[union-attr]
    half = readers.list_samples(_dataset(tmp_path, ["a.tif,1,train,"], overlap=0.5))[0].tiles
    assert half is not None and len(half.xy) > 2 * len(all_.xy)


def test_no_tissue_is_a_skipped_slide_with_its_reason(tmp_path):
    _slide(tmp_path / "a.tif")
    blank = np.full((1024, 1024, 3), GLASS, np.uint8)
    write_slide(tmp_path / "blank.tif", blank)
    found = readers.listing(_dataset(tmp_path, ["a.tif,1,train,", "blank.tif,0,train,"]))
    assert [s.id for s in found.samples] == ["a"]
    assert "no tissue" in found.skipped["blank"] and "blank.tif" in found.skipped["blank"]
    with pytest.raises(BadInputError, match="no sample left"):
        readers.listing(_dataset(tmp_path, ["blank.tif,0,train,"]))


def test_pixel_size_from_the_column_or_an_error_naming_both_fixes(tmp_path):
    img = slide_image(np.random.default_rng(0), 1024, 1)

    def tile(level: int, y: int, x: int, side: int) -> np.ndarray:
        out = np.full((side, side, 3), GLASS, np.uint8)
        part = img[:: 2**level, :: 2**level][y : y + side, x : x + side]
        out[: part.shape[0], : part.shape[1]] = part
        return out

    write_pyramid(tmp_path / "nompp.tif", (1024, 1024), tile, levels=2, mpp=None)
    with pytest.raises(BadInputError) as err:
        readers.list_samples(_dataset(tmp_path, ["nompp.tif,1,train,"]))
    msg = str(err.value)
    assert "nompp.tif" in msg and "`mpp` column" in msg and "resolution tags" in msg
    assert "never guesses" in msg
    (s,) = readers.list_samples(_dataset(tmp_path, ["nompp.tif,1,train,0.5"]))
    assert s.tiles is not None and s.tiles.mpp_source == "index: mpp column"
    with pytest.raises(BadInputError, match="not a pixel size"):
        readers.list_samples(_dataset(tmp_path, ["nompp.tif,1,train,500"]))


def test_tile_mpp_finer_than_the_base_level_is_refused_or_upsampled(tmp_path):
    _slide(tmp_path / "a.tif")
    with pytest.raises(BadInputError, match=r"a.tif: tile_mpp 0.25 is finer .*upsample: true"):
        readers.list_samples(_dataset(tmp_path, ["a.tif,1,train,"], tile_mpp=0.25))
    ds = _dataset(tmp_path, ["a.tif,1,train,"], tile_mpp=0.25, upsample=True)
    (s,) = readers.list_samples(ds)
    assert s.tiles is not None and (s.tiles.level, s.tiles.read) == (0, 32)
    assert readers.load(ds, s, items=range(1)).image.shape == (1, 64, 64, 3)


def test_truncated_and_corrupt_slides_are_errors_naming_them(tmp_path):
    data = _slide(tmp_path / "a.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 3])
    (tmp_path / "junk.tif").write_bytes(b"II*\x00" + bytes(200))
    for name in ("cut.tif", "junk.tif"):
        with pytest.raises(BadInputError, match=name):
            readers.list_samples(_dataset(tmp_path, [f"{name},1,train,"]))


def test_untiled_tiff_over_the_pixel_limit_is_refused(tmp_path):
    side = 8200  # 8200^2 > 2^26 pixels in strips (67 MB while the test writes it)
    tifffile.imwrite(
        tmp_path / "flat.tif", np.zeros((side, side), np.uint8), rowsperstrip=64,
        compression="zlib", resolution=(2e4, 2e4), resolutionunit="CENTIMETER",
    )  # fmt: skip
    with pytest.raises(BadInputError, match=r"flat.tif: level 0 .* not tiled"):
        readers.list_samples(_dataset(tmp_path, ["flat.tif,1,train,"]))


def test_a_codec_that_is_not_installed_is_named(tmp_path):
    path = _slide(tmp_path / "a.tif")
    with tifffile.TiffFile(path, mode="r+b") as tf:
        tf.pages[0].tags["Compression"].overwrite(32809)  # ThunderScan: no decoder
    with pytest.raises(BadInputError, match=r"a.tif: level 0 .* no decoder .*imagecodecs"):
        readers.list_samples(_dataset(tmp_path, ["a.tif,1,train,"]))


@pytest.mark.parametrize("name", ["CMU-1-Small-Region.svs", "TCGA-CR-7395-01A-01-TS1.svs"])
def test_real_aperio_slides(shared_data, tmp_path, name):
    src = shared_data / "wsi" / name
    (tmp_path / name).symlink_to(src)  # a link out of the dataset folder: allowed here
    ds = _dataset(tmp_path, [f"{name},0,train,"], True, tile_mpp=0.5, tile_size=224, max_tiles=4)
    if name.startswith("TCGA"):  # JPEG 2000 tiles and no MPP in its description
        with pytest.raises(BadInputError, match=f"{name}: the slide records no pixel size"):
            readers.list_samples(ds)
        ds = _dataset(tmp_path, [f"{name},0,train,0.2527"], True, tile_mpp=0.5, tile_size=224)
    (s,) = readers.list_samples(ds)
    assert s.tiles is not None and s.n_items > 0
    want = "index: mpp column" if name.startswith("TCGA") else "file: Aperio MPP"
    assert s.tiles.mpp_source == want
    tiles = readers.load(ds, s, items=range(min(3, s.n_items))).image
    assert tiles.shape[1:] == (224, 224, 3) and 0 < tiles.mean() < 255
    if s.tiles.read == 224:  # read as is: equal to tiffslide's own tile-by-tile reads
        np.testing.assert_array_equal(tiles, _direct_tiles(s, range(min(3, s.n_items))))
    assert np.asarray(tiles).std() > 5  # tissue, not glass


LARGE = """
import resource, sys, time
from pathlib import Path
from featstore.data import readers
from featstore.data.manifest import Dataset
path = Path(sys.argv[1])
import tiffslide
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # after the imports
ds = Dataset.model_validate(dict(name="big", format="wsi", path=path, index="index.csv",
    task="classification", dims=2, tiling={"tile_mpp": 2.0, "tile_size": 128}))
(s,) = readers.list_samples(ds)
n = 0
for k in range(0, s.n_items, 32):
    n += len(readers.load(ds, s, items=range(k, min(k + 32, s.n_items))).image)
print(n, s.tiles.level, base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def test_a_40000_px_slide_is_read_in_bounded_memory(tmp_path):
    """Level 0 of this slide is 4.9 GB as RGB; listing (tissue on the 8 um level) and
    decoding every tissue tile must stay far below that."""
    side, box = 40_960, (16_384, 20_480)  # one square of tissue in the middle

    @functools.cache
    def encoded(top: int, bottom: int, left: int, right: int, size: int) -> bytes:
        out = np.full((size, size, 3), GLASS, np.uint8)
        out[top:bottom, left:right] = (222, 150, 190)
        return zlib.compress(out.tobytes(), 1)  # tifffile writes encoded tiles as given

    def tile(level: int, y: int, x: int, size: int) -> bytes:
        lo, hi = (v // 2**level for v in box)
        return encoded(*(min(max(v, 0), size) for v in (lo - y, hi - y, lo - x, hi - x)), size)

    write_pyramid(tmp_path / "big.tif", (side, side), tile, 5, compression="zlib", side=1024)
    (tmp_path / "index.csv").write_text("image,label,split\nbig.tif,1,train\n")
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(LARGE), str(tmp_path)],
        capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    n, level, base_mb, rss_mb = (int(v) for v in out.stdout.split())
    assert n == (4096 // 512) ** 2 and level == 2  # 4096 px of tissue / 512 px footprints
    # level 0 is 4.9 GB as RGB, level 2 (read from) 315 MB, the 8 um level 20 MB
    assert rss_mb - base_mb < 200, f"peak RSS {rss_mb} MB ({base_mb} MB after imports)"


def test_slide_figure_draws_the_grid_and_the_attention(tmp_path):
    from featstore.report.slides import slide_figure

    path = _slide(tmp_path / "a.tif")
    ds = _dataset(tmp_path, ["a.tif,1,train,"])
    (s,) = readers.list_samples(ds)
    assert ds.tiling is not None and s.tiles is not None
    thumb, mask, per_px = wsi.overview(path, ds.tiling, s.tiles.mpp)
    assert mask.shape == thumb.shape[:2] and mask.any() and per_px == 16.0
    foot = ds.tiling.tile_size * ds.tiling.tile_mpp / s.tiles.mpp
    attention = np.linspace(0.1, 1.0, s.n_items)
    fig = slide_figure(thumb, mask, s.tiles.xy, foot, per_px, "a", attention)
    assert len(fig.axes) == 4  # thumbnail, tissue + grid, attention, its colour bar
    assert len(fig.axes[1].collections[-1].get_paths()) == s.n_items  # one box per tile
    fig.savefig(tmp_path / "a.png")
    assert len(slide_figure(thumb, mask, s.tiles.xy, foot, per_px, "a").axes) == 2
