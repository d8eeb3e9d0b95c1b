"""A slide that fails part-way (one tile unreadable, after other tiles of it were
encoded) is skipped as a whole with `--skip-bad`: every item of it is NaN, `skipped`
names it with the reason, and the probe runs on the other slides and says so."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import xarray as xr
from conftest import write_manifest

from featstore.data import readers
from featstore.data.manifest import load_manifest
from featstore.data.synthetic_slides import slide_image, write_slide
from featstore.extraction.run import Options
from featstore.probing.options import ProbeOptions
from featstore.store import sets
from pipelines import extract
from pipelines import probe as stage

pytest.importorskip("tiffslide")

ENTRY = """\
  - name: slides
    format: wsi
    path: {path}
    index: index.csv
    task: classification
    dims: 2
    tiling: {{tile_mpp: 1.0, tile_size: 64}}
"""
SPLITS = ["train"] * 6 + ["val"] * 3 + ["test"] * 3
BAD = 2  # slide002, in train


def _corrupt_tile(path, xy0) -> None:
    """Zero the bytes of the level-1 TIFF tile (256 px) that holds level-0 point `xy0`:
    the header, the tissue level (2) and the other tiles still read."""
    with tifffile.TiffFile(path) as tf:
        page = tf.series[0].levels[1].keyframe
        across = -(-page.imagewidth // page.tilewidth)
        k = (int(xy0[1]) // 2 // page.tilelength) * across + int(xy0[0]) // 2 // page.tilewidth
        offset, size = page.dataoffsets[k], page.databytecounts[k]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes(size))


@pytest.fixture(scope="module")
def partial(tmp_path_factory):
    work = tmp_path_factory.mktemp("partial")
    data = work / "data"
    data.mkdir()
    rows = []
    for i, split in enumerate(SPLITS):
        write_slide(data / f"slide{i:03d}.tif", slide_image(np.random.default_rng(i), 1024, i % 2))
        rows.append(f"slide{i:03d}.tif,{i % 2},{split},p{i:03d}")
    (data / "index.csv").write_text("image,label,split,patient\n" + "\n".join(rows) + "\n")
    ds = load_manifest(
        write_manifest(work, ENTRY.format(path=data), "[]", extra="batch_size: 2\nunit_items: 4\n")
    ).datasets[0]
    bad = readers.prepare(ds).samples[BAD]
    assert bad.tiles is not None and bad.n_items >= 4
    _corrupt_tile(data / bad.image, bad.tiles.xy[-1])  # its last tile: earlier ones read
    readers.load(ds, bad, items=range(2))  # its first batch still decodes
    return work / "manifest.yaml", bad


def test_a_slide_failing_part_way_is_skipped_whole(partial, tmp_path):
    mpath, bad = partial
    manifest = load_manifest(mpath)
    (summary,) = extract.run(manifest, Options(progress=False, skip_bad=True), echo=print)
    assert list(summary.skipped) == [bad.id]
    xs = xr.open_zarr(summary.path)
    reason = xs.attrs["skipped"][bad.id]
    assert bad.image in reason and "cannot decode the tile" in reason
    sample = np.array(xs.sample.values.tolist(), str)
    finite = np.isfinite(xs.cls.values.astype(np.float32)).all(1)
    np.testing.assert_array_equal(finite, sample != bad.id)  # all its tiles, and only them
    assert sets.FeatureSet(summary.path).verify() == []
    lines: list[str] = []
    df = stage.run(manifest, tmp_path, ProbeOptions(), echo=lines.append)
    assert set(df.n_train) == {len(SPLITS[:6]) - 1}  # per slide, the bad one left out
    note = next(line for line in lines if line.startswith("note:") and bad.id in line)
    assert "left out" in note and "cannot decode the tile" in note


def test_the_slides_of_a_dataset_without_scores_are_still_drawn(partial, tmp_path):
    """Two slides (like the real Aperio pair) cannot be classified: the report still
    shows both, the test slide first, from the set alone."""
    from pipelines import report

    mpath, _ = partial
    pair = tmp_path / "pair"
    pair.mkdir()
    for i in (0, 1):
        (pair / f"slide{i:03d}.tif").symlink_to(mpath.parent / "data" / f"slide{i:03d}.tif")
    (pair / "index.csv").write_text(
        "image,label,split,patient\nslide000.tif,0,train,a\nslide001.tif,1,test,b\n"
    )
    entries = ENTRY.format(path=mpath.parent / "data")
    entries += ENTRY.format(path=pair).replace("name: slides", "name: pair")
    entries += "    allow_outside_paths: true\n"  # pair/ holds links to data/'s slides
    manifest = load_manifest(write_manifest(tmp_path, entries, "[]", extra="batch_size: 4\n"))
    extract.run(manifest, Options(progress=False, skip_bad=True), echo=lambda *_: None)
    lines: list[str] = []
    stage.run(manifest, tmp_path / "out", ProbeOptions(), echo=lines.append)
    assert any(line.startswith("problem: pair") and "single class" in line for line in lines)
    report.run(tmp_path / "out", echo=lambda _: None)
    text = (tmp_path / "out" / "report.md").read_text()
    assert "## pair (slides; no scores" in text
    at = [text.index(f"](plots/slide_pair_slide{i:03d}.png)") for i in (1, 0)]
    assert at[0] < at[1]  # the test slide first
    assert all(
        (tmp_path / "out" / "plots" / f"slide_pair_slide{i:03d}.png").is_file() for i in (0, 1)
    )
