"""Readers round-trip real files written here; bad inputs name the file and the fix."""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from featstore.data import readers, samples
from featstore.data.manifest import Dataset
from featstore.data.settings import Synthetic
from featstore.data.synthetic import generate
from featstore.errors import BadInputError


def _ds(path: Path, **kw) -> Dataset:
    base = dict(
        name="t", format="images", path=path, index="index.csv", task="classification", dims=2
    )
    return Dataset(**{**base, **kw})


def _index(folder: Path, rows: list[str], header: str = "image,label,split") -> None:
    (folder / "index.csv").write_text("\n".join([header, *rows]) + "\n")


def test_images_8_16_bit_grey_and_rgb(tmp_path):
    rng = np.random.default_rng(0)
    a8 = rng.integers(0, 255, (20, 24), dtype=np.uint8)
    a16 = rng.integers(0, 65535, (20, 24), dtype=np.uint16)
    rgb = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(a8).save(tmp_path / "a.png")
    Image.fromarray(a16).save(tmp_path / "b.png")
    Image.fromarray(rgb).save(tmp_path / "c.tiff")
    Image.fromarray(a8).save(tmp_path / "d.jpg", quality=100)
    _index(tmp_path, ["a.png,0,train", "b.png,1,val", "c.tiff,2,test", "d.jpg,1,train"])
    ds = _ds(tmp_path)
    samples = readers.list_samples(ds)
    assert [s.label for s in samples] == [(0,), (1,), (2,), (1,)]
    assert [s.split for s in samples] == ["train", "val", "test", "train"]
    got = [readers.load(ds, s).image for s in samples]
    assert got[0].shape == (1, 20, 24, 1) and np.array_equal(got[0][0, ..., 0], a8)
    assert np.array_equal(got[1][0, ..., 0], a16)
    assert got[2].shape == (1, 20, 24, 3) and np.array_equal(got[2][0], rgb)


def test_nifti_canonical_orientation_and_masks(tmp_path):
    vol = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    lab = (vol % 3).astype(np.uint8)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])  # stored L->R: the reader must flip x back
    nib.save(nib.Nifti1Image(vol, flip), tmp_path / "v.nii.gz")
    nib.save(nib.Nifti1Image(lab, flip), tmp_path / "v_seg.nii.gz")
    _index(tmp_path, ["v.nii.gz,v_seg.nii.gz,train"], "image,mask,split")
    ds = _ds(tmp_path, format="nifti", dims=3, task="segmentation")
    (s,) = readers.list_samples(ds)
    assert s.n_items == 6  # axial: slices along z
    got = readers.load(ds, s)
    expected = np.moveaxis(vol[::-1], 2, 0)
    assert got.image.shape == (6, 4, 5, 1)
    assert np.array_equal(got.image[..., 0], expected)
    assert np.array_equal(got.mask, np.moveaxis(lab[::-1], 2, 0))
    sag = _ds(tmp_path, format="nifti", dims=3, task="segmentation", slice_axis="sagittal")
    assert readers.list_samples(sag)[0].n_items == 4


def _dicom_series(folder: Path, n: int, skip: int | None = None) -> np.ndarray:
    ref = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    folder.mkdir()
    raw = np.random.default_rng(0).integers(0, 2000, (n, 8, 8)).astype(np.uint16)
    for i in range(n):
        if i == skip:
            continue
        ds = ref.copy()
        ds.Rows = ds.Columns = 8
        ds.PixelData = raw[i].astype(np.int16).tobytes()
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * i]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.InstanceNumber = i
        ds.save_as(folder / f"s{(7 * i) % n:03d}.dcm")  # file order != slice order
    return raw.astype(np.float32) - 1024


def test_dicom_series_sorted_and_in_hu(tmp_path):
    expected = _dicom_series(tmp_path / "series", 5)
    _index(tmp_path, ["series,1,train"])
    ds = _ds(tmp_path, format="dicom", dims=3)
    (s,) = readers.list_samples(ds)
    got = readers.load(ds, s).image[..., 0]
    assert np.array_equal(got, expected)


def test_dicom_missing_slice_is_named(tmp_path):
    _dicom_series(tmp_path / "series", 6, skip=3)
    _index(tmp_path, ["series,1,train"])
    ds = _ds(tmp_path, format="dicom", dims=3)
    with pytest.raises(BadInputError, match=r"series.*missing or inconsistently spaced"):
        readers.load(ds, readers.list_samples(ds)[0])


def test_pydicom_bundled_ct_is_in_hu(tmp_path):
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    (tmp_path / "ct").mkdir()
    src.save_as(tmp_path / "ct" / "one.dcm")
    _index(tmp_path, ["ct,0,train"])
    ds = _ds(tmp_path, format="dicom", dims=3)
    got = readers.load(ds, readers.list_samples(ds)[0]).image[0, ..., 0]
    expected = src.pixel_array * float(src.RescaleSlope) + float(src.RescaleIntercept)
    assert np.array_equal(got, expected)
    assert float(src.RescaleIntercept) != 0 and got.min() < 0  # really shifted into HU


def test_medmnist_2d_3d_and_multilabel(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 5), ("val", 2), ("test", 3)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 14), dtype=np.uint8)
    np.savez(tmp_path / "chest.npz", **arrays)
    ds = _ds(tmp_path / "chest.npz", format="medmnist", index=None, task="multilabel")
    samples = readers.list_samples(ds)
    assert [s.split for s in samples].count("val") == 2
    assert len(samples[0].label) == 14
    img = readers.load(ds, samples[6]).image
    assert img.shape == (1, 28, 28, 3) and np.array_equal(img[0], arrays["val_images"][1])
    vol = {
        f"{s}_images": rng.integers(0, 255, (2, 28, 28, 28), dtype=np.uint8)
        for s in ("train", "val", "test")
    }
    vol |= {f"{s}_labels": np.array([[0], [1]]) for s in ("train", "val", "test")}
    np.savez(tmp_path / "vol.npz", **vol)
    ds3 = _ds(tmp_path / "vol.npz", format="medmnist", index=None, dims=3)
    s3 = readers.list_samples(ds3)
    assert s3[0].n_items == 28 and s3[1].label == (1,)
    assert readers.load(ds3, s3[0]).image.shape == (28, 28, 28, 1)


def test_ratio_splits_keep_patients_together(tmp_path):
    rows = [f"i{i}.png,{i % 2},,p{i // 3}" for i in range(30)]
    for i in range(30):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / f"i{i}.png")
    _index(tmp_path, rows, "image,label,split,patient")
    ds = _ds(tmp_path, splits={"ratios": [0.6, 0.2, 0.2], "seed": 3})
    samples = readers.list_samples(ds)
    by_patient: dict[str, set[str]] = {}
    for s in samples:
        by_patient.setdefault(s.group, set()).add(s.split)
    assert all(len(v) == 1 for v in by_patient.values())
    assert {s.split for s in samples} == {"train", "val", "test"}
    assert samples == readers.list_samples(ds)  # deterministic


@pytest.mark.parametrize("kind", ["cls2d", "seg2d", "cls3d", "seg3d"])
def test_synthetic_is_deterministic(tmp_path, kind):
    spec = Synthetic(kind=kind, n=6, size=24, slices=4, seed=5)

    def digest(folder: Path) -> str:
        h = hashlib.sha256()
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                h.update(f.relative_to(folder).as_posix().encode() + f.read_bytes())
        return h.hexdigest()

    assert digest(generate(spec, tmp_path / "a")) == digest(generate(spec, tmp_path / "b"))


# ------------------------------------------------------------------- bad inputs


def test_truncated_png_is_named(tmp_path):
    Image.fromarray(np.zeros((64, 64), np.uint8) + 7).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(data[: len(data) // 2])
    _index(tmp_path, ["a.png,0,train"])
    ds = _ds(tmp_path)
    with pytest.raises(BadInputError, match=r"a\.png: cannot decode image"):
        readers.load(ds, readers.list_samples(ds)[0])


def test_nifti_wrong_dims_nan_and_mask_shape(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 5), np.float32), np.eye(4)), tmp_path / "flat.nii")
    vol = np.zeros((4, 5, 6), np.float32)
    vol[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "nan.nii")
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4)), tmp_path / "ok.nii")
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 7), np.uint8), np.eye(4)), tmp_path / "m.nii")
    _index(tmp_path, ["flat.nii,m.nii,train"], "image,mask,split")
    ds = _ds(tmp_path, format="nifti", dims=3, task="segmentation")
    with pytest.raises(BadInputError, match=r"flat\.nii: expected a 3D volume"):
        readers.list_samples(ds)
    _index(tmp_path, ["nan.nii,m.nii,train", "ok.nii,m.nii,train"], "image,mask,split")
    s_nan, s_ok = readers.list_samples(ds)
    with pytest.raises(BadInputError, match=r"nan\.nii: 1 NaN/Inf"):
        readers.load(ds, s_nan)
    with pytest.raises(BadInputError, match=r"m\.nii: mask shape .* differs from its image"):
        readers.load(ds, s_ok)


def test_missing_label_and_missing_file(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.png")
    _index(tmp_path, ["a.png,,train"])
    with pytest.raises(BadInputError, match=r"index\.csv, line 2: label is missing"):
        readers.list_samples(_ds(tmp_path))
    _index(tmp_path, ["b.png,1,train"])
    with pytest.raises(BadInputError, match=r"line 2: image .*b\.png does not exist"):
        readers.list_samples(_ds(tmp_path))
    _index(tmp_path, ["a.png,1,training"])
    with pytest.raises(BadInputError, match=r"split 'training' must be one of"):
        readers.list_samples(_ds(tmp_path))


def test_fill_outlines_fills_closed_contours():
    ring = np.zeros((1, 9, 9), np.uint8)
    ring[0, 2, 2:7] = ring[0, 6, 2:7] = ring[0, 2:7, 2] = ring[0, 2:7, 6] = 255
    filled = samples.fill_outlines(ring)
    assert filled[0, 4, 4] == 255 and filled[0, 0, 0] == 0 and (filled == 255).sum() == 25


def test_synthetic_follows_its_spec_and_spares_foreign_folders(tmp_path):
    spec = Synthetic(kind="cls2d", n=12, size=32, seed=0)
    out = generate(spec, tmp_path / "d")
    first = (out / "index.csv").read_text()
    assert generate(spec, out) == out and (out / "index.csv").read_text() == first
    bigger = generate(spec.model_copy(update={"n": 18}), out)
    assert len((bigger / "index.csv").read_text().splitlines()) == 19  # regenerated
    reseeded = generate(spec.model_copy(update={"n": 18, "seed": 1}), out)
    assert (reseeded / "images" / "img0000.png").read_bytes() != (
        generate(spec, tmp_path / "ref") / "images" / "img0000.png"
    ).read_bytes()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "scan.png").write_bytes(b"user data")
    with pytest.raises(BadInputError, match="did not generate"):
        generate(spec, tmp_path / "mine")
    assert (tmp_path / "mine" / "scan.png").read_bytes() == b"user data"


def test_a_nifti_mask_of_another_size_is_refused_by_its_header_unread(tmp_path, monkeypatch):
    """A label volume whose header claims other dimensions than its image is refused
    before its voxels are read (hypothesis found a mask header large enough to exhaust
    memory when read)."""
    import nibabel as nib

    from featstore.data import nifti

    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4)), tmp_path / "v.nii")
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4)), tmp_path / "m.nii")
    raw = bytearray((tmp_path / "m.nii").read_bytes())
    raw[42:48] = np.array([900, 900, 900], "<i2").tobytes()  # dim[1:4]: 729M voxels claimed
    (tmp_path / "m.nii").write_bytes(bytes(raw))
    (tmp_path / "index.csv").write_text("image,mask,split\nv.nii,m.nii,train\n")
    ds = Dataset(
        name="n", format="nifti", path=tmp_path, index="index.csv", task="segmentation",
        dims=3, classes=["bg", "fg"],
    )  # fmt: skip
    (s,) = readers.list_samples(ds)
    read: list[Path] = []
    real = nifti.load_nifti
    monkeypatch.setattr(nifti, "load_nifti", lambda p, a: (read.append(p), real(p, a))[1])
    refused = r"m\.nii: mask shape \(900, 900, 900\) \(its header\) differs"
    with pytest.raises(BadInputError, match=refused):
        readers.load(ds, s)
    assert read == [tmp_path / "v.nii"]  # the image only
