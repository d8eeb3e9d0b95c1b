"""Slides end to end: tiles are items, slides are samples; shards, repair and the
slide-level probes (mean and ABMIL pooling by patient split) work as for volumes."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import xarray as xr
from conftest import on_cluster, write_manifest

from featstore.data import readers, tissue
from featstore.data.manifest import load_manifest
from featstore.extraction.run import Options
from featstore.probing.options import ProbeOptions
from featstore.store import sets
from pipelines import extract, report
from pipelines import probe as stage

pytest.importorskip("tiffslide")

SLIDES = """\
  - name: slides
    format: synthetic
    synthetic: {kind: slides, n: 24, size: 1024, seed: 4}
    path: data/slides
    task: classification
    dims: 2
    splits: {ratios: [0.5, 0.25, 0.25], seed: 0}
    tiling: {tile_mpp: 1.0, tile_size: 64, max_tiles: 6}
"""
EXTRA = "batch_size: 8\nunit_items: 16\n"


def _run(path, **opts):
    return extract.run(load_manifest(path), Options(progress=False, **opts), echo=lambda *_: None)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, tiny_dinov3):
    work = tmp_path_factory.mktemp("slides")
    mpath = write_manifest(work, SLIDES, f"['{tiny_dinov3}']", "[32]", EXTRA)
    summaries = _run(mpath)
    return mpath, summaries


def test_tiles_are_items_with_their_coordinates(extracted):
    mpath, (enc, _) = extracted
    ds = load_manifest(mpath).datasets[0]
    prep = readers.prepare(ds)
    xs = xr.open_zarr(enc.path)
    assert xs.sizes["item"] == len(prep.index) == enc.items
    tiles = np.concatenate([s.tiles.xy for s in prep.samples if s.tiles is not None])
    np.testing.assert_array_equal(xs.tile_x.values, tiles[:, 0])
    np.testing.assert_array_equal(xs.tile_y.values, tiles[:, 1])
    assert set(xs.tile_mpp.values) == {1.0} and set(xs.slide_mpp.values) == {0.5}
    assert set(xs.mpp_source.values) == {"file: TIFF resolution tags"}
    bags = xs.load().groupby("sample").count()["cls"].isel(channel=0)
    assert {str(k): int(v) for k, v in zip(bags.sample.values, bags.values, strict=True)} == {
        s.id: s.n_items for s in prep.samples
    }
    tiling = xs.attrs["identity"]["recipe"]["tiling"]
    assert tiling["tile_mpp"] == 1.0 and tiling["tile_size"] == 64
    assert tiling["plan"] == tissue.PLAN_VERSION == 3


def test_the_tiling_plan_is_part_of_the_identity(extracted, tmp_path, tiny_dinov3):
    mpath, (enc, _) = extracted
    text = mpath.read_text().replace("max_tiles: 6", "max_tiles: 5")
    other = tmp_path / "manifest.yaml"
    other.write_text(text.replace("cache: cache", f"cache: {mpath.parent / 'cache'}"))
    other_data = tmp_path / "data"
    other_data.symlink_to(mpath.parent / "data")
    (again,) = _run(other, repair=False)[:1]
    assert again.status == "new" and again.path != enc.path


def test_shards_and_repair_work_on_tiles(extracted, tmp_path, tiny_dinov3):
    mpath, (enc, _) = extracted
    work = tmp_path / "sharded"
    work.mkdir()
    (work / "data").symlink_to(mpath.parent / "data")
    shard_manifest = write_manifest(work, SLIDES, f"['{tiny_dinov3}']", "[32]", EXTRA)
    for i in range(2):
        _run(shard_manifest, shard=(i, 2))
    path = work / "cache" / enc.path.name
    fs = sets.FeatureSet(path)
    assert fs.complete and fs.verify() == []
    a, b = xr.open_zarr(path).cls.values, xr.open_zarr(enc.path).cls.values
    np.testing.assert_array_equal(a, b)
    next(f for f in (path / "cls" / "c").rglob("*") if f.is_file()).unlink()  # lose a unit
    (fixed, _) = _run(shard_manifest, repair=True)
    assert fixed.status == "repaired"
    np.testing.assert_array_equal(xr.open_zarr(path).cls.values, b)


@pytest.mark.parametrize("pool", ["mean", "abmil", "cls+patch"])
def test_slide_level_probes_by_patient(extracted, tmp_path, pool):
    mpath, _ = extracted
    manifest = load_manifest(mpath)
    df = stage.run(manifest, tmp_path, ProbeOptions(pool=pool), echo=lambda _: None)
    prep = readers.prepare(manifest.datasets[0])
    test_slides = sum(s.split == "test" for s in prep.samples)
    assert set(df.pool) == {pool} and set(df.n_test) == {test_slides}  # one row per slide
    patients = {s.split: set() for s in prep.samples}
    for s in prep.samples:
        patients[s.split].add(s.group)
    assert not patients["train"] & patients["test"]
    if pool == "abmil":
        assert "abmil" in set(df.probe)
    enc = df[~df.encoder.str.startswith("pixels") & (df.metric == "auroc") & (df.probe == "linear")]
    assert len(enc) == 1 and enc.value.iloc[0] > 0.5


def _chunks(path):
    return {
        str(f.relative_to(path)): f.read_bytes()
        for f in sorted(path.rglob("*"))
        if f.is_file() and "/c/" in f.as_posix()
    }


def test_slides_on_a_local_cluster_equal_a_plain_run(extracted, tmp_path, tiny_dinov3):
    pytest.importorskip("distributed")
    from featstore.extraction.cluster import client_for

    mpath, (enc, _) = extracted
    (tmp_path / "data").symlink_to(mpath.parent / "data")
    clustered = write_manifest(tmp_path, SLIDES, f"['{tiny_dinov3}']", "[32]", EXTRA)
    opts = Options(threads=1, progress=False)
    with client_for("local:2", None, threads=1) as client:
        (got,) = on_cluster(
            load_manifest(clustered), client, opts, baseline=False, echo=lambda *_: None
        )
    assert got.status == "new" and got.path.name == enc.path.name and got.items == enc.items
    assert sets.FeatureSet(got.path).verify() == []
    assert _chunks(got.path) == _chunks(enc.path)  # every array, coordinates and overviews too


def _abmil_by_hand(path):
    """ABMIL's attention over the test slides' tiles, fitted here from the set's CLS
    tokens as `--pool abmil` fits it (heads.fit_abmil, seed 0): (items, weights)."""
    from featstore.probing import heads

    xs = xr.open_zarr(path).load()
    sample = np.array(xs.sample.values.tolist(), str)
    split = np.array(xs.split.values.tolist(), str)
    ids = list(dict.fromkeys(sample))
    rows = [np.flatnonzero(sample == i) for i in ids]
    cls = np.asarray(xs.cls.values, np.float64)
    first = np.array([r[0] for r in rows])
    labels, splits = np.asarray(xs.label.values)[first], split[first]
    mil = heads.fit_abmil(
        [cls[r] for r in rows], labels, splits == "train", splits == "test", 2, seed=0
    )
    test = np.flatnonzero(splits == "test")
    return np.concatenate([rows[v] for v in test]), np.concatenate([mil.weights[v] for v in test])


def test_report_draws_the_slide_figures_from_the_set_alone(extracted, tmp_path):
    mpath, (enc, _) = extracted
    out = tmp_path / "results"
    shutil.move(mpath.parent / "data", mpath.parent / "moved-away")
    try:
        stage.run(load_manifest(mpath), out, ProbeOptions(pool="abmil"), echo=lambda _: None)
        report.run(out, echo=lambda _: None)
        assert not (mpath.parent / "data").exists()  # nothing read, nor generated again
    finally:
        shutil.move(mpath.parent / "moved-away", mpath.parent / "data")
    xs = xr.open_zarr(enc.path)
    key = xs.attrs["cache_key"][:12]
    with np.load(out / "attention" / f"{key}.npz") as saved:
        items, weights = _abmil_by_hand(enc.path)
        np.testing.assert_array_equal(saved["item"], items)
        np.testing.assert_allclose(saved["weight"], weights, rtol=1e-5, atol=1e-7)
    sample = np.array(xs.sample.values.tolist(), str)
    shown = [sample[i] for i in xs.example_item.values]
    assert len(shown) == 3 and set(shown) <= set(sample[items])  # test slides
    text = (out / "report.md").read_text()
    figures = [out / "plots" / f"slide_slides_{s}.png" for s in shown]
    assert all(f"](plots/{f.name})" in text and f.is_file() for f in figures)
    with_attention = {f: f.read_bytes() for f in figures}
    (out / "attention" / f"{key}.npz").unlink()  # a mean-pool probe: no attention panel
    report.run(out, echo=lambda _: None)
    for f in figures:
        assert f.read_bytes() != with_attention[f]


def test_recorded_overviews_are_checked_and_repaired(extracted, tmp_path, tiny_dinov3):
    from featstore.store.schema import OVERVIEWS

    mpath, (enc, _) = extracted
    (tmp_path / "data").symlink_to(mpath.parent / "data")
    again = write_manifest(tmp_path, SLIDES, f"['{tiny_dinov3}']", "[32]", EXTRA)
    copy = tmp_path / "cache" / enc.path.name
    shutil.copytree(enc.path, copy)
    for name in OVERVIEWS:
        chunk = next(p for p in sorted((copy / name / "c").rglob("*")) if p.is_file())
        data = chunk.read_bytes()
        chunk.write_bytes(data[:-9] + bytes([data[-9] ^ 0x10]) + data[-8:])
    assert {p.array for p in sets.FeatureSet(copy).verify()} == set(OVERVIEWS)
    (fixed,) = _run(again, repair=True)[:1]
    assert fixed.status == "repaired" and sets.FeatureSet(copy).verify() == []
    assert _chunks(copy) == _chunks(enc.path)
