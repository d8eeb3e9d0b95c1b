"""Indexes built from file names (GlobIndex): join CSV, mask template, mask_map, metadata.

Every test writes its own small PNG dataset: images in imgs/, masks as 0/255 PNGs in
masks/, and a join CSV (in another row order than the files) with label, split,
patient and scanner columns.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featstore.data import readers
from featstore.data.manifest import Dataset
from featstore.errors import BadInputError

STEMS = ("a", "b", "c")
META = (
    "filename,label,split,patient,scanner,age\n"
    "c.png,2,test,p2,Siemens,71\n"  # not in file order: rows are matched by key
    "a.png,0,train,p1,GE,54\n"
    "b.png,1,val,p1,GE,55\n"
)
INDEX = {"glob": "imgs/*.png", "mask": "../masks/{stem}_seg.png", "join": "meta.csv"}


def _write(root: Path, meta: str = META) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write imgs/{a,b,c}.png, masks/{stem}_seg.png (0/255) and meta.csv."""
    rng = np.random.default_rng(0)
    (root / "imgs").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "imgs" / "README.txt").write_text("not an image; the glob must skip it\n")
    out = {}
    for stem in STEMS:
        img = rng.integers(0, 256, (6, 10), dtype=np.uint8)
        mask = np.where(rng.random((6, 10)) > 0.5, 255, 0).astype(np.uint8)
        Image.fromarray(img).save(root / "imgs" / f"{stem}.png")
        Image.fromarray(mask).save(root / "masks" / f"{stem}_seg.png")
        out[stem] = (img, mask)
    (root / "meta.csv").write_text(meta)
    return out


def _ds(root: Path, index: dict | None = None, **kw) -> Dataset:
    base = dict(
        name="glob", format="images", path=root, index=index or INDEX, task="classification"
    )
    return Dataset(**{**base, "dims": 2, **kw})


def test_glob_join_lists_samples_with_csv_columns(tmp_path):
    written = _write(tmp_path)
    samples = readers.list_samples(_ds(tmp_path))
    assert [s.id for s in samples] == ["a", "b", "c"]  # sorted file names, not CSV order
    assert [s.label for s in samples] == [(0,), (1,), (2,)]
    assert [s.split for s in samples] == ["train", "val", "test"]
    assert [s.group for s in samples] == ["p1", "p1", "p2"]
    assert [s.n_items for s in samples] == [1, 1, 1]
    assert samples[0].image == str(tmp_path / "imgs" / "a.png")
    assert samples[2].mask == str(tmp_path / "masks" / "c_seg.png")
    got = readers.load(_ds(tmp_path), samples[1])
    assert got.image.shape == (1, 6, 10, 1)
    np.testing.assert_array_equal(got.image[0, ..., 0], written["b"][0])


def test_join_csv_with_excel_bom_and_custom_key(tmp_path):
    meta = META.replace("filename,", "file,")
    _write(tmp_path, "\ufeff" + meta)
    samples = readers.list_samples(_ds(tmp_path, {**INDEX, "key": "file"}))
    assert [s.label for s in samples] == [(0,), (1,), (2,)]


def test_mask_template_and_mask_map(tmp_path):
    written = _write(tmp_path)
    plain = _ds(tmp_path, task="segmentation")
    mapped = _ds(tmp_path, task="segmentation", mask_map={255: 1})
    (s_plain, *_), (s_mapped, *_) = readers.list_samples(plain), readers.list_samples(mapped)
    raw = written["a"][1]
    assert set(np.unique(raw)) == {0, 255}
    unmapped = readers.load(plain, s_plain).mask
    np.testing.assert_array_equal(unmapped[0], raw)
    got = readers.load(mapped, s_mapped).mask
    assert got.shape == (1, 6, 10) and got.dtype == np.uint8
    np.testing.assert_array_equal(got[0], (raw == 255).astype(np.uint8))


def test_mask_map_several_values_and_unmapped_values_kept(tmp_path):
    _write(tmp_path)
    mask = np.array([[0, 64, 128, 255, 7]] * 2, np.uint8)
    Image.fromarray(mask).save(tmp_path / "masks" / "a_seg.png")
    Image.fromarray(np.zeros((2, 5), np.uint8)).save(tmp_path / "imgs" / "a.png")
    ds = _ds(tmp_path, task="segmentation", mask_map={64: 1, 128: 2, 255: 3})
    got = readers.load(ds, readers.list_samples(ds)[0]).mask
    np.testing.assert_array_equal(got[0], [[0, 1, 2, 3, 7]] * 2)


def test_metadata_columns_become_sample_meta(tmp_path):
    _write(tmp_path)
    ds = _ds(tmp_path, metadata={"scanner": "device", "age": "age_years"})
    samples = readers.list_samples(ds)
    assert [s.meta for s in samples] == [
        (("device", "GE"), ("age_years", "54")),
        (("device", "GE"), ("age_years", "55")),
        (("device", "Siemens"), ("age_years", "71")),
    ]
    assert readers.list_samples(_ds(tmp_path))[0].meta == ()  # only when asked for


# ------------------------------------------------------------------- bad inputs


def test_glob_matching_nothing_is_named(tmp_path):
    _write(tmp_path)
    with pytest.raises(BadInputError, match=r"'imgs/\*\.jpg' matches no file"):
        readers.list_samples(_ds(tmp_path, {**INDEX, "glob": "imgs/*.jpg"}))


def test_join_csv_without_key_column_is_named(tmp_path):
    _write(tmp_path, META.replace("filename,", "file_name,"))
    with pytest.raises(BadInputError, match=r"meta\.csv: no column 'filename'") as err:
        readers.list_samples(_ds(tmp_path))
    assert "file_name" in str(err.value)  # lists the columns it does have


def test_image_without_join_row_is_named(tmp_path):
    _write(tmp_path)
    Image.fromarray(np.zeros((6, 10), np.uint8)).save(tmp_path / "imgs" / "d.png")
    with pytest.raises(BadInputError, match=r"meta\.csv: no row for d\.png"):
        readers.list_samples(_ds(tmp_path))


def test_metadata_column_missing_from_join_is_named(tmp_path):
    _write(tmp_path)
    with pytest.raises(BadInputError, match=r"lacks column\(s\) \['site'\]"):
        readers.list_samples(_ds(tmp_path, metadata={"site": "site"}))


def test_missing_mask_from_template_is_named(tmp_path):
    _write(tmp_path)
    (tmp_path / "masks" / "b_seg.png").unlink()
    with pytest.raises(BadInputError, match=r"mask .*masks[/\\]b_seg\.png does not exist"):
        readers.list_samples(_ds(tmp_path, task="segmentation"))


def test_missing_join_csv_is_a_bad_input(tmp_path):
    _write(tmp_path)
    with pytest.raises(BadInputError, match=r"meta_v2\.csv"):
        readers.list_samples(_ds(tmp_path, {**INDEX, "join": "meta_v2.csv"}))


def test_bad_split_in_join_csv_names_the_join_csv(tmp_path):
    _write(tmp_path, META.replace("a.png,0,train", "a.png,0,training"))
    with pytest.raises(BadInputError, match=r"split 'training'") as err:
        readers.list_samples(_ds(tmp_path))
    assert "meta.csv" in str(err.value)
