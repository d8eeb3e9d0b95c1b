"""Planning a slide (issue 32): tissue on small slides, which pixel size wins, plans
refused before a pixel is read, and slides left out named in extract's output.

Slides are real pyramidal TIFFs written by tifffile (`write_slide`, `write_pyramid`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import xarray as xr
from conftest import write_manifest

from featstore.data import readers, wsi
from featstore.data.manifest import Dataset, load_manifest
from featstore.data.synthetic_slides import GLASS, slide_image, write_pyramid, write_slide
from featstore.errors import BadInputError
from featstore.extraction.run import Options
from pipelines import extract

pytest.importorskip("tiffslide")

RGB = ((255, 0, 0), (0, 255, 0), (0, 0, 255))


def _dataset(path: Path, rows: list[str], **tiling: object) -> Dataset:
    (path / "index.csv").write_text("image,label,split,mpp\n" + "\n".join(rows) + "\n")
    spec = {"tile_mpp": 0.5, "tile_size": 64, **tiling}
    return Dataset.model_validate(
        dict(name="s", format="wsi", path=path, index="index.csv", task="classification",
             dims=2, tiling=spec)
    )  # fmt: skip


def _rgb_slide(path: Path, size: int = 512, block: int = 96) -> list[tuple[int, int]]:
    """A size x size slide at 0.5 um/px: pure red, green and blue squares of `block`
    px on white; returns each square's level-0 top-left (x, y)."""
    img = np.full((size, size, 3), 255, np.uint8)
    corners = []
    for i, colour in enumerate(RGB):
        x, y = 24 + i * (block + 40), 40 + i * 60
        img[y : y + block, x : x + block] = colour
        corners.append((x, y))
    write_slide(path, img)
    return corners


def test_saturated_red_green_blue_on_a_small_slide_are_tissue(tmp_path):
    """256 um across: 32 px at tissue_mpp 8, where the median blur and the 0.01 mm2
    speck rule used to erase every square ("no tissue found")."""
    corners = _rgb_slide(tmp_path / "rgb.tif")
    ds = _dataset(tmp_path, ["rgb.tif,1,train,"])
    found = readers.listing(ds)
    assert found.skipped == {} and len(found.samples) == 1
    (s,) = found.samples
    assert s.tiles is not None and s.n_items >= 3
    tiles = readers.load(ds, s, as_read=True).image
    for (x, y), colour in zip(corners, RGB, strict=True):
        inside = [
            k for k, (tx, ty) in enumerate(s.tiles.xy) if x <= tx < x + 96 and y <= ty < y + 96
        ]
        assert inside, f"no tile in the {colour} square"
        mean = tiles[inside].reshape(-1, 3).mean(0)
        assert np.argmax(mean) == int(np.argmax(colour)) and mean.max() > 150
    # 224 px at 0.5 um: a square (2304 um2) cannot hold half a tile (6272 um2)
    with pytest.raises(BadInputError, match=r"rgb.tif: no tissue found: .* larger than 6272"):
        readers.listing(_dataset(tmp_path, ["rgb.tif,1,train,"], tile_size=224))


def test_a_slide_smaller_than_a_tile_says_so(tmp_path):
    write_slide(tmp_path / "tiny.tif", np.full((40, 40, 3), (255, 0, 0), np.uint8))
    _slide = slide_image(np.random.default_rng(0), 1024, 1)
    write_slide(tmp_path / "a.tif", _slide)
    found = readers.listing(_dataset(tmp_path, ["tiny.tif,1,train,", "a.tif,1,train,"]))
    assert [s.id for s in found.samples] == ["a"]
    assert "smaller than one tile (64 level-0 px)" in found.skipped["tiny"]


def _tag(path: Path, resolution: float, unit: int) -> None:
    """Overwrite level 0's resolution tags (unit 2: inch, 3: cm) in place."""
    with tifffile.TiffFile(path, mode="r+b") as tf:
        tags = tf.pages[0].tags
        tags["XResolution"].overwrite((int(resolution), 1))
        tags["YResolution"].overwrite((int(resolution), 1))
        tags["ResolutionUnit"].overwrite(unit)


@pytest.mark.parametrize("dpi", [72, 300])
def test_a_dpi_default_tag_is_no_pixel_size_and_the_index_mpp_is_used(tmp_path, dpi):
    write_slide(tmp_path / "a.tif", slide_image(np.random.default_rng(0), 1024, 1))
    _tag(tmp_path / "a.tif", dpi, 2)  # 300 dpi: 84.7 um/px, inside the old 0.02-100 range
    with pytest.raises(BadInputError) as err:
        readers.list_samples(_dataset(tmp_path, ["a.tif,1,train,"]))
    msg = str(err.value)
    assert "a.tif: the slide records no pixel size" in msg and f"{dpi}.0 per inch" in msg
    assert "software default" in msg and "`mpp` column" in msg
    (s,) = readers.list_samples(_dataset(tmp_path, ["a.tif,1,train,0.5"]))
    assert s.tiles is not None and (s.tiles.mpp, s.tiles.mpp_source) == (0.5, "index: mpp column")
    assert s.tiles.mpp_note == ""  # a default tag is not a disagreement


def test_the_index_mpp_wins_over_the_file_and_a_disagreement_is_printed_and_recorded(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a", "b"):  # resolution tags of 0.5 um/px (cm), a real calibration
        write_slide(data / f"{name}.tif", slide_image(np.random.default_rng(0), 1024, 1))
    ds = _dataset(data, ["a.tif,1,train,0.25", "b.tif,0,train,0.51"], tile_mpp=1.0)
    a, b = readers.list_samples(ds)
    assert a.tiles is not None and b.tiles is not None
    assert (a.tiles.mpp, a.tiles.mpp_source) == (0.25, "index: mpp column")
    assert "0.25 um from the index's mpp column used; the file says 0.5 um" in a.tiles.mpp_note
    assert b.tiles.mpp == 0.51 and b.tiles.mpp_note == ""  # within 5%: they agree
    entry = (
        "  - {name: s, format: wsi, path: data, index: index.csv, task: classification, "
        "dims: 2, tiling: {tile_mpp: 1.0, tile_size: 64}}\n"
    )
    lines: list[str] = []
    manifest = load_manifest(write_manifest(tmp_path, entry, "[]"))
    (summary,) = extract.run(manifest, Options(progress=False), echo=lines.append)
    (note,) = [x for x in lines if x.startswith("note: s / a:")]
    assert "index's mpp column used" in note and "TIFF resolution tags" in note
    recorded = xr.open_zarr(summary.path).attrs["dataset"]["pixel_size_notes"]
    assert list(recorded) == ["a"] and recorded["a"] == a.tiles.mpp_note


def test_absurd_plans_are_refused_before_a_pixel_is_read(tmp_path, monkeypatch):
    def no_read(*args: object) -> np.ndarray:
        raise AssertionError("a region was read")

    write_slide(tmp_path / "a.tif", slide_image(np.random.default_rng(0), 1024, 1))
    img = np.full((1024, 1024, 3), GLASS, np.uint8)

    def tile(level: int, y: int, x: int, side: int) -> np.ndarray:
        return img[y : y + side, x : x + side]

    write_pyramid(tmp_path / "flat.tif", (1024, 1024), tile, levels=1)  # no pyramid
    monkeypatch.setattr(wsi, "read_rgb", no_read)
    cases = [
        # tile_mpp 0.001 upsampled: a tile covers 0.128 level-0 pixels
        (["a.tif,1,train,"], dict(tile_mpp=0.001, upsample=True), r"covers 0\.128 level-0"),
        # mpp 50 (meant 0.50): a level-0 pixel per tile, a million tiles of one pixel
        (
            ["a.tif,1,train,50"],
            dict(tile_mpp=1.0, upsample=True),
            r"tiles every 1 level-0 px .*1,048,576",
        ),
        # 512 px at 16 um from a slide with only its 0.5 um level: 16384 px per tile
        (["flat.tif,1,train,"], dict(tile_mpp=16.0, tile_size=512), r"read as 16384 x 16384"),
    ]
    for rows, tiling, message in cases:
        with pytest.raises(BadInputError, match=message) as err:
            readers.list_samples(_dataset(tmp_path, rows, **tiling))
        assert rows[0].split(",")[0] in str(err.value) and "um/px" in str(err.value)
    monkeypatch.setattr(wsi, "MAX_GRID", 10)
    with pytest.raises(BadInputError, match=r"lays 64 tiles .* more than 10;"):
        readers.list_samples(_dataset(tmp_path, ["a.tif,1,train,"], tile_mpp=1.0))


def test_slides_left_out_are_named_and_counted_in_extracts_output(tmp_path):
    """Five slides in one index, three of them small: the run names each slide it
    leaves out with its reason and counts it in the `done:` line."""
    data = tmp_path / "data"
    data.mkdir()
    _rgb_slide(data / "rgb.tif")
    for i in range(2):
        write_slide(data / f"t{i}.tif", slide_image(np.random.default_rng(i), 1024, i))
    write_slide(data / "blank.tif", np.full((512, 512, 3), GLASS, np.uint8))
    write_slide(data / "dot.tif", np.full((40, 40, 3), (0, 0, 255), np.uint8))
    rows = [f"{n}.tif,{i % 2},train," for i, n in enumerate(["rgb", "t0", "t1", "blank", "dot"])]
    _dataset(data, rows)
    entry = (
        "  - {name: s, format: wsi, path: data, index: index.csv, task: classification, "
        "dims: 2, tiling: {tile_mpp: 0.5, tile_size: 64}}\n"
    )
    lines: list[str] = []
    manifest = load_manifest(write_manifest(tmp_path, entry, "[]"))
    (summary,) = extract.run(manifest, Options(progress=False), echo=lines.append)
    assert sorted(summary.skipped) == ["blank", "dot"]
    left = [x for x in lines if x.startswith("left out s / ")]
    assert len(left) == 2
    assert any("blank" in x and "no tissue found" in x for x in left)
    assert any("dot" in x and "smaller than one tile" in x for x in left)
    assert lines[-1] == "done: 1 new, 0 resumed, 0 repaired, 0 cached, 2 samples skipped"
    assert "2 samples left out" in next(x for x in lines if x.lstrip().startswith("new"))
    again: list[str] = []  # a cached rerun still says what its set leaves out
    extract.run(manifest, Options(progress=False), echo=again.append)
    assert again[-1] == "done: 0 new, 0 resumed, 0 repaired, 1 cached, 2 samples skipped"
