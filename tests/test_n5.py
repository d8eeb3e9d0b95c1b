"""N5 containers (`format: zarr` on a `.n5` folder) read through tensorstore: pixels and
labels equal tensorstore's own read of an N5 it wrote (in N5's (x, y, z) order, read
back as (z, y, x)); sections and spacing as for Zarr; a missing array, a group, a
damaged block and a missing tensorstore are each a BadInputError naming the folder and
the array."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import numpy as np
import pytest

from featstore.data import readers
from featstore.data.manifest import Dataset
from featstore.errors import BadInputError

ts = pytest.importorskip("tensorstore", reason="N5 is read through tensorstore (featstore[n5])")

RAW, LABELS = "volumes/raw", "volumes/labels/neuron_ids"
CREMI = {"raw": RAW, "labels": LABELS, "resolution": "resolution"}


def write_n5(folder: Path, arrays: dict[str, np.ndarray], block=(4, 5, 2)) -> Path:
    """Each (z, y, x) array at its internal path of folder/v.n5, written by tensorstore
    as N5 lists axes (fastest first: dimensions [x, y, z]), gzip blocks; CREMI's
    resolution on raw, and N5's root attributes as its Java library writes them."""
    path = folder / "v.n5"
    for inner, arr in arrays.items():
        spec = {
            "driver": "n5",
            "kvstore": {"driver": "file", "path": str(path / inner)},
            "metadata": {
                "dimensions": list(arr.shape[::-1]),
                "blockSize": list(block),
                "dataType": str(arr.dtype),
                "compression": {"type": "gzip"},
            },
            "create": True,
        }
        ts.open(spec).result()[...] = arr.T
    attrs = path / RAW / "attributes.json"
    attrs.write_text(json.dumps({**json.loads(attrs.read_text()), "resolution": [40, 4, 4]}))
    (path / "attributes.json").write_text('{"n5": "2.5.1"}')
    return path


def dataset(folder: Path, rows: list[str], **kw) -> Dataset:
    (folder / "index.csv").write_text("id,image,split,sections\n" + "\n".join(rows) + "\n")
    base = dict(name="em", format="zarr", path=folder, index="index.csv", task="segmentation",
                dims=3, volume=CREMI)  # fmt: skip
    return Dataset.model_validate({**base, **kw})


def volume(shape=(9, 12, 14)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 65535, shape, dtype=np.uint16), rng.integers(0, 3, shape, np.uint64)


def test_decoded_pixels_equal_tensorstores_own_read(tmp_path):
    raw, labels = volume()
    path = write_n5(tmp_path, {RAW: raw, LABELS: labels})
    assert json.loads((path / RAW / "attributes.json").read_text())["dimensions"] == [14, 12, 9]
    ds = dataset(tmp_path, ["all,v.n5,train,", "mid,v.n5,test,3:8"])
    whole, mid = readers.list_samples(ds)
    assert (whole.n_items, mid.n_items) == (9, 5)
    own = ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": str(path / RAW)}})
    own = np.asarray(own.result().read().result())  # (x, y, z), as N5 lists it
    assert own.shape == (14, 12, 9)
    got = readers.load(ds, whole, as_read=True)
    assert got.image.dtype == np.uint16 and got.image.shape == (9, 12, 14, 1)
    np.testing.assert_array_equal(got.image[..., 0], own.T)
    np.testing.assert_array_equal(got.image[..., 0], raw)
    np.testing.assert_array_equal(got.mask, labels.astype(np.uint8))
    run = readers.load(ds, mid, items=range(1, 3))  # sections 4, 5 of the container
    np.testing.assert_array_equal(run.image[..., 0], raw[4:6].astype(np.float32))
    assert run.span == (float(raw[3:8].min()), float(raw[3:8].max()))
    assert readers.header(ds, mid).size == (12, 14)
    assert readers.header(ds, mid).spacing == (40 / 1e6, 4 / 1e6, 4 / 1e6)


def test_neuron_ids_in_an_n5_become_boundaries(tmp_path):
    from featstore.data.samples import id_boundaries

    raw, _ = volume()
    ids = np.zeros(raw.shape, np.uint64)
    ids[:, :, 7:] = 2**40
    write_n5(tmp_path, {RAW: raw, LABELS: ids})
    ds = dataset(tmp_path, ["a,v.n5,train,"], classes=["interior", "boundary"],
                 instances={"labels": "ids"})  # fmt: skip
    (s,) = readers.list_samples(ds)
    got = readers.load(ds, s, as_read=True)
    np.testing.assert_array_equal(got.mask, id_boundaries(ids))
    assert got.mask[:, :, 6:8].all() and got.mask.sum() == 9 * 12 * 2


def _damaged_block(path: Path) -> None:
    block = path / RAW / "0" / "0" / "0"
    block.write_bytes(block.read_bytes()[:9])


def test_bad_containers_are_refused_naming_the_folder_and_the_array(tmp_path, monkeypatch):
    raw, labels = volume()
    path = write_n5(tmp_path, {RAW: raw, LABELS: labels})
    cases = [
        ({"raw": "volumes/rawx"}, r"v\.n5 \[volumes/rawx\]: no such array.*'volumes/raw'"),
        ({"raw": "volumes"}, r"v\.n5 \[volumes\]: is a group, not an array"),
    ]
    for paths, pattern in cases:
        ds = dataset(tmp_path, ["a,v.n5,train,"], volume={**CREMI, **paths})
        with pytest.raises(BadInputError, match=pattern):
            readers.list_samples(ds)
    ds = dataset(tmp_path, ["a,v.n5,train,"])
    (s,) = readers.list_samples(ds)
    _damaged_block(path)
    with pytest.raises(BadInputError, match=r"v\.n5 \[volumes/raw\]: cannot read slices 0:9"):
        readers.load(ds, s)
    (path / RAW / "attributes.json").write_text("{not json")
    with pytest.raises(BadInputError, match=r"v\.n5 \[volumes/raw\]: unreadable attributes"):
        readers.list_samples(ds)
    real_import = builtins.__import__

    def no_tensorstore(name, *args, **kw):
        if name == "tensorstore":
            raise ImportError("no tensorstore here")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_tensorstore)
    with pytest.raises(BadInputError, match=r"v\.n5 \[volumes/raw\]: an N5 container; install"):
        readers.list_samples(ds)
