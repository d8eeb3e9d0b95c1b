"""Probing and reporting where the raw data is not: the set records what they need."""

from __future__ import annotations

import io
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
import zarr
from conftest import synth_entry, write_manifest
from PIL import Image
from typer.testing import CliRunner

import featstore
from featstore.data import readers
from featstore.data.manifest import RESERVED, load_manifest
from featstore.encode.preprocess import preprocess
from featstore.errors import (
    DataAbsentWarning,
    ProbeError,
    StoreIncompleteError,
    StoreMismatchError,
)
from featstore.identity import FORMAT_VERSION, SetIdentity, requested
from featstore.store import catalog, schema, sets
from pipelines.cli import app

DATASETS = synth_entry("lesions", "cls2d", n=24) + synth_entry("organs", "seg3d", n=8)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, tiny_dinov3):
    """A manifest of a 2D classification and a 3D segmentation set, extracted."""
    tmp = tmp_path_factory.mktemp("rawfree")
    mpath = write_manifest(tmp, DATASETS, f"['{tiny_dinov3}']")
    result = CliRunner().invoke(app, ["extract", "--manifest", str(mpath)])
    assert result.exit_code == 0, result.output
    return mpath


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def _pixels(path) -> np.ndarray:
    with Image.open(io.BytesIO(path.read_bytes())) as im:
        return np.asarray(im.convert("RGB"))


def _probe_and_report(mpath, out) -> str:
    said = _invoke("probe", "--manifest", str(mpath), "--out", str(out))
    _invoke("report", "--out", str(out))
    return said


def test_probe_and_report_without_the_data_give_the_same_rows_and_figures(extracted):
    tmp = extracted.parent
    with_data = _probe_and_report(extracted, tmp / "with")
    assert "is absent" not in with_data
    shutil.move(tmp / "data", tmp / "moved-away")
    try:
        without = _probe_and_report(extracted, tmp / "without")
        assert not (tmp / "data").exists()  # nothing read, nor generated again
    finally:
        shutil.move(tmp / "moved-away", tmp / "data")
    notes = [line for line in without.splitlines() if line.startswith("note: ")]
    assert len(notes) == 2 and all("fingerprint is not checked" in n for n in notes), notes
    a = pd.read_csv(tmp / "with" / "results.csv").drop(columns="fit_seconds")
    b = pd.read_csv(tmp / "without" / "results.csv").drop(columns="fit_seconds")
    assert len(a) > 20
    pd.testing.assert_frame_equal(a, b)
    hd95 = a[a.metric.str.startswith("hd95")]
    assert len(hd95) and set(hd95.unit) == {"mm"}  # spacing came from the set
    figures = sorted(p.name for p in (tmp / "with" / "plots").glob("*.png"))
    assert {"examples_lesions.png", "examples_organs.png"} <= set(figures)
    for name in figures:
        np.testing.assert_array_equal(
            _pixels(tmp / "with" / "plots" / name), _pixels(tmp / "without" / "plots" / name)
        )
    for npz in (tmp / "with" / "examples").glob("*.npz"):
        again = np.load(tmp / "without" / "examples" / npz.name)
        for key, value in np.load(npz).items():
            np.testing.assert_array_equal(value, again[key])


def test_the_set_records_native_geometry_and_the_encoders_view(extracted):
    m = load_manifest(extracted)
    for ds in m.datasets:
        prep = readers.prepare(ds)
        xs = featstore.open_features(m, ds.name, m.encoders[0])
        assert xs.native_rows.values.tolist() == [32] * xs.sizes["item"]
        spacing = [xs[name].values for name in schema.NATIVE_SPACING]
        if ds.dims == 3:  # synthetic volumes: voxels of 1 x 1 x 2 mm, sliced axially
            assert [np.unique(s).tolist() for s in spacing] == [[2.0], [1.0], [1.0]]
        else:  # PNG states no spacing
            assert all(np.isnan(s).all() for s in spacing)
        pre = SetIdentity.from_attrs(xs.attrs["identity"]).preprocess()
        test = [s for s in prep.samples if s.split == "test"][: schema.N_EXAMPLES]
        items = xs.example_item.values
        assert len(items) == len(test) > 0
        for j, sample in enumerate(test):
            loaded = readers.load(ds, sample)
            pixels, masks = preprocess(loaded.image, loaded.mask, pre)
            of_sample = np.flatnonzero(xs.sample.values == sample.id)
            k = int(xs.slice.values[items[j]])
            assert items[j] in of_sample
            if masks is not None:  # the slice with most foreground, as the probe shows it
                assert k == int(np.argmax((masks > 0).sum((1, 2))))
                assert (masks[k] > 0).sum() > 0
            else:
                assert k == len(of_sample) // 2
            view = np.clip(pixels[k, 0] * pre.std[0] + pre.mean[0], 0, 1)
            thumb = xs.thumbnail.values[j].astype(np.float64) / 255
            assert np.abs(thumb - view).max() <= 0.5 / 255 + 1e-6


def test_open_features_without_the_data_warns_once_and_opens_the_same_set(extracted):
    m = load_manifest(extracted)
    here = featstore.open_features(m, "organs", m.encoders[0])
    ds = m.dataset("organs")
    gone = ds.path.with_name("organs-away")
    shutil.move(ds.path, gone)
    try:
        with pytest.warns(DataAbsentWarning, match="fingerprint is not checked"):
            away = featstore.open_features(extracted, "organs", m.encoders[0])
    finally:
        shutil.move(gone, ds.path)
    assert away.attrs["cache_key"] == here.attrs["cache_key"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataAbsentWarning)  # data here: no warning
        featstore.open_features(m, "organs", m.encoders[0])


def test_changed_data_is_named_and_a_stale_set_is_not_probed(extracted, tmp_path):
    m = load_manifest(extracted)
    ds = m.dataset("lesions")
    copy = tmp_path / "lesions"
    shutil.copytree(ds.path, copy)
    first = sorted(copy.rglob("*.png"))[0]
    arr = np.asarray(Image.open(first)).copy()
    arr[0, 0] ^= 1  # one pixel of one image
    Image.fromarray(arr).save(first)
    changed = m.model_copy(
        update={"datasets": (ds.model_copy(update={"path": copy}),), "baseline": None}
    )
    with pytest.raises(StoreIncompleteError, match="changed since its feature set"):
        featstore.open_features(changed, "lesions", m.encoders[0])
    with pytest.raises(ProbeError, match=r"changed since its feature set.*featstore extract"):
        featstore.probe(changed)
    request = requested(ds, m, "", m.encoders[0], 32).request()
    found = catalog.find_cell(m.cache, request, "lesions", checked=False)
    assert found.path is not None and not found.checked  # without data: by identity
    assert catalog.find_cell(m.cache, request, "other", checked=False).path is None


def test_sets_of_the_previous_format_are_refused_with_the_fix(extracted, tmp_path):
    m = load_manifest(extracted)
    key = featstore.open_features(m, "lesions", m.encoders[0]).attrs["cache_key"]
    path = sets.FeatureSet.at(m.cache, key).path
    old = tmp_path / path.name
    shutil.copytree(path, old)
    zarr.open_group(old, mode="r+", use_consolidated=False).attrs["featstore_format"] = (
        FORMAT_VERSION - 1
    )
    with pytest.raises(StoreMismatchError, match=r"another featstore format.*re-extract"):
        sets.open_set(old)


def test_recorded_names_are_reserved_for_metadata():
    assert {*schema.NATIVE, *schema.EXAMPLES, schema.EXAMPLE_DIM, "thumb_y", "thumb_x"} <= RESERVED


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A complete 2D segmentation set of the pixel baseline (3 units), and its manifest."""
    tmp = tmp_path_factory.mktemp("small")
    mpath = write_manifest(tmp, synth_entry("d", "seg2d", n=12), "[]", extra="unit_items: 4\n")
    _invoke("extract", "--manifest", str(mpath), "--batch-size", "4")
    (path,) = (tmp / "cache").glob("*.zarr")
    return mpath, path


def _chunk_files(path) -> dict[str, bytes]:
    return {
        str(f.relative_to(path)): f.read_bytes()
        for f in sorted(path.rglob("*"))
        if f.is_file() and "/c/" in f.as_posix()
    }


@pytest.mark.parametrize("name", [*schema.EXAMPLES, "native_rows", "native_col_mm"])
def test_recorded_arrays_are_checked_and_repaired(small, tmp_path, name):
    mpath, path = small
    cache = tmp_path / "cache"
    shutil.copytree(path, cache / path.name)
    text = mpath.read_text().replace("cache: cache", f"cache: {cache}")
    text = text.replace("path: data/d", f"path: {mpath.parent / 'data' / 'd'}")
    (tmp_path / "m.yaml").write_text(text)
    copy = cache / path.name
    chunk = next(p for p in sorted((copy / name / "c").rglob("*")) if p.is_file())
    data = chunk.read_bytes()
    chunk.write_bytes(data[:-9] + bytes([data[-9] ^ 0x10]) + data[-8:])
    result = CliRunner().invoke(app, ["verify", str(copy)])
    assert result.exit_code == 1 and f"FAIL {name} unit 0:" in result.output, result.output
    _invoke("extract", "--manifest", str(tmp_path / "m.yaml"), "--batch-size", "4", "--repair")
    assert _chunk_files(copy) == _chunk_files(path)
    assert CliRunner().invoke(app, ["verify", str(copy)]).exit_code == 0
