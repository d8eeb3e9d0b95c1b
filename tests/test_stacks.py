"""Image stacks (EM): multi-page TIFFs and ordered folders of sections as volumes;
contiguous splits; the real ISBI 2012 sections in 2D and as one volume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from featstore.data import readers
from featstore.data.manifest import Dataset, load_manifest
from featstore.data.samples import Sample
from featstore.errors import BadInputError, ManifestError


def _ds(path: Path, rows: list[str], header: str = "id,image,mask,split,sections") -> Dataset:
    (path / "index.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    return Dataset.model_validate(
        dict(name="em", format="stack", path=path, index="index.csv", task="segmentation",
             dims=3, mask_map={255: 1})
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_multipage_tiff_stack_and_mask(tmp_path, dtype):
    rng = np.random.default_rng(0)
    vol = rng.integers(0, np.iinfo(dtype).max, (7, 40, 48), dtype=dtype)
    mask = (rng.random((7, 40, 48)) > 0.5).astype(np.uint8) * 255
    tifffile.imwrite(tmp_path / "vol.tif", vol)
    tifffile.imwrite(tmp_path / "mask.tif", mask)
    ds = _ds(tmp_path, ["v,vol.tif,mask.tif,train,"])
    (s,) = readers.list_samples(ds)
    assert s.n_items == 7 and readers.header(ds, s).size == (40, 48)
    raw = readers.load(ds, s, as_read=True)
    assert raw.image.dtype == dtype and raw.image.shape == (7, 40, 48, 1)
    np.testing.assert_array_equal(raw.image[..., 0], vol)
    np.testing.assert_array_equal(raw.mask, mask // 255)
    assert readers.load(ds, s).image.dtype == np.float32


def test_folder_of_sections_is_one_volume_in_natural_order(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    for i in range(12):  # 10.png must come after 9.png, not after 1.png
        Image.fromarray(np.full((16, 20), i * 10, np.uint8)).save(tmp_path / "img" / f"{i}.png")
        Image.fromarray(np.full((16, 20), 255 * (i % 2), np.uint8)).save(
            tmp_path / "lab" / f"{i}.png"
        )
    ds = _ds(tmp_path, ["all,img,lab,train,", "mid,img,lab,test,2:5"])
    whole, mid = readers.list_samples(ds)
    assert (whole.n_items, mid.n_items) == (12, 3)
    got = readers.load(ds, whole)
    np.testing.assert_array_equal(got.image[:, 0, 0, 0], np.arange(12) * 10)
    np.testing.assert_array_equal(got.mask[:, 0, 0], np.arange(12) % 2)  # type: ignore[index]
    np.testing.assert_array_equal(readers.load(ds, mid).image[:, 0, 0, 0], [20, 30, 40])
    with pytest.raises(BadInputError, match=r"index.csv, line 2: sections '5:40'"):
        readers.list_samples(_ds(tmp_path, ["x,img,lab,train,5:40"]))


def test_sections_of_different_sizes_are_refused(tmp_path):
    (tmp_path / "img").mkdir()
    for i, shape in enumerate([(16, 20), (16, 21)]):
        Image.fromarray(np.zeros(shape, np.uint8)).save(tmp_path / "img" / f"{i}.png")
    tifffile.imwrite(tmp_path / "m.tif", np.zeros((2, 16, 20), np.uint8))
    ds = _ds(tmp_path, ["x,img,m.tif,train,"])
    (s,) = readers.list_samples(ds)
    with pytest.raises(BadInputError, match="sections differ in size"):
        readers.load(ds, s)


def test_stack_needs_dims_3(tmp_path):
    (tmp_path / "m.yaml").write_text(
        "datasets:\n  - {name: e, format: stack, path: ., index: i.csv, task: segmentation, "
        "dims: 2}\n"
    )
    with pytest.raises(ManifestError, match="format 'stack' holds one volume"):
        load_manifest(tmp_path / "m.yaml")


def test_contiguous_splits_cut_blocks_in_natural_order():
    samples = [Sample(str(i), "", (), 1, f"{i}.png", group=str(i)) for i in range(20)]
    got = readers.assign_splits(samples[::-1], (0.6, 0.2, 0.2), seed=3, contiguous=True)
    split = {s.id: s.split for s in got}
    assert [split[str(i)] for i in range(20)] == ["train"] * 12 + ["val"] * 4 + ["test"] * 4
    shuffled = readers.assign_splits(samples, (0.6, 0.2, 0.2), seed=3)
    assert [s.split for s in shuffled] != [split[str(i)] for i in range(20)]


def test_real_isbi2012_sections_in_2d_and_as_one_volume(shared_data, monkeypatch):
    monkeypatch.setenv("FEATSTORE_DATA", str(shared_data))
    m = load_manifest(Path(__file__).resolve().parents[1] / "manifests" / "real.yaml")
    flat, vol = m.dataset("em-isbi2012"), m.dataset("em-isbi2012-3d")
    sections = {s.id: s for s in readers.list_samples(flat)}
    assert [sections[str(i)].split for i in (0, 17, 18, 23, 24, 29)] == [
        "train", "train", "val", "val", "test", "test"
    ]  # fmt: skip
    volumes = {s.split: s for s in readers.list_samples(vol)}
    test = readers.load(vol, volumes["test"])
    assert test.image.shape == (6, 512, 512, 1)
    for k, i in enumerate(range(24, 30)):
        one = readers.load(flat, sections[str(i)])
        np.testing.assert_array_equal(test.image[k], one.image[0])
        np.testing.assert_array_equal(test.mask[k], one.mask[0])  # type: ignore[index]
    assert 0.15 < float((test.mask == 1).mean()) < 0.3  # class 1 is the membrane (~22%)
