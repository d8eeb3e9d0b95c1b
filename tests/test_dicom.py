"""DICOM series: slices ordered by position along the slice normal, bad series named.

Each series is written here from pydicom's bundled CT_small.dcm with 8x8 random
pixels, in a shuffled file order, so only a reader that really sorts gets it right.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from featstore.data import readers
from featstore.data.manifest import Dataset
from featstore.errors import BadInputError

AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
SAGITTAL = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]  # rows along +y, columns along -z: normal -x


def _series(
    folder: Path,
    positions: list[list[float]] | None,
    orientation: list[float] | None = AXIAL,
    sizes: list[int] | None = None,
) -> list[np.ndarray]:
    """Write one slice per position (InstanceNumber = 1, 2, ...); return their HU planes.

    Files are named in a shuffled order unrelated to position or InstanceNumber;
    `positions=None` or `orientation=None` leaves that attribute out of every file.
    """
    ref = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    folder.mkdir(parents=True)
    n = len(positions) if positions is not None else 5
    sizes = sizes or [8] * n
    rng = np.random.default_rng(0)
    names = rng.permutation(n)
    planes = []
    for i in range(n):
        ds = copy.deepcopy(ref)  # Dataset.copy() shares its elements
        ds.Rows = ds.Columns = sizes[i]
        raw = rng.integers(0, 2000, (sizes[i], sizes[i])).astype(np.int16)
        ds.PixelData = raw.tobytes()
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.InstanceNumber = i + 1
        if positions is None:
            del ds.ImagePositionPatient
        else:
            ds.ImagePositionPatient = positions[i]
        if orientation is None:
            del ds.ImageOrientationPatient
        else:
            ds.ImageOrientationPatient = orientation
        ds.save_as(folder / f"IM{names[i]:04d}.dcm")
        planes.append(raw.astype(np.float32) - 1024)
    return planes


def _dataset(root: Path, series: str = "series") -> Dataset:
    (root / "index.csv").write_text(f"image,label,split\n{series},1,train\n")
    return Dataset(
        name="ct", format="dicom", path=root, index="index.csv", task="classification", dims=3
    )


def _load(root: Path) -> np.ndarray:
    ds = _dataset(root)
    (sample,) = readers.list_samples(ds)
    got = readers.load(ds, sample)
    assert got.mask is None and got.image.dtype == np.float32
    assert sample.n_items == got.image.shape[0]  # the listing's count matches the volume
    return got.image[..., 0]


def test_files_are_shuffled_on_disk(tmp_path):
    # Guards the other tests: name order must not already be slice order.
    _series(tmp_path / "series", [[0.0, 0.0, 2.0 * i] for i in range(5)])
    by_name = sorted((tmp_path / "series").iterdir())
    numbers = [int(pydicom.dcmread(p).InstanceNumber) for p in by_name]
    assert numbers != sorted(numbers) and numbers != sorted(numbers, reverse=True)


def test_position_wins_over_instance_number(tmp_path):
    # InstanceNumber goes up while z goes down: superior-to-inferior acquisition.
    planes = _series(tmp_path / "series", [[-10.0, 5.0, 30.0 - 2.5 * i] for i in range(5)])
    vol = _load(tmp_path)
    assert vol.shape == (5, 8, 8)
    np.testing.assert_array_equal(vol, np.stack(planes[::-1]))  # ascending z


def test_ascending_positions_keep_their_order(tmp_path):
    planes = _series(tmp_path / "series", [[0.0, 0.0, -40.0 + 3.0 * i] for i in range(6)])
    np.testing.assert_array_equal(_load(tmp_path), np.stack(planes))


@pytest.mark.parametrize(
    "drop", ["ImagePositionPatient", "ImageOrientationPatient", "both"], ids=str
)
def test_instance_number_is_the_fallback(tmp_path, drop):
    # Positions disagree with InstanceNumber, but without both tags they cannot be used.
    positions = [[0.0, 0.0, -2.0 * i] for i in range(5)]
    planes = _series(
        tmp_path / "series",
        None if drop in ("ImagePositionPatient", "both") else positions,
        None if drop in ("ImageOrientationPatient", "both") else AXIAL,
    )
    dropped = ["ImagePositionPatient", "ImageOrientationPatient"] if drop == "both" else [drop]
    written = pydicom.dcmread(next((tmp_path / "series").iterdir()))
    assert not any(tag in written for tag in dropped)
    np.testing.assert_array_equal(_load(tmp_path), np.stack(planes))  # by InstanceNumber


def test_sagittal_series_is_ordered_along_its_normal(tmp_path):
    # All slices share z, so a z-only sort cannot order them. The normal
    # row x column = (0,1,0) x (0,0,-1) = (-1,0,0): ascending along it is descending
    # DICOM x, i.e. patient left to right, as RAS+ NIfTI sagittal slices come.
    xs = [12.0, -3.0, 6.0, 0.0, 9.0, 3.0]  # shuffled, 3 mm apart
    planes = _series(tmp_path / "series", [[x, -20.0, 50.0] for x in xs], SAGITTAL)
    order = np.argsort(xs)[::-1]  # x = 12, 9, 6, 3, 0, -3
    np.testing.assert_array_equal(_load(tmp_path), np.stack([planes[i] for i in order]))


def test_oblique_normal_uses_all_three_components(tmp_path):
    # Rows along +x, columns tilted 45 degrees between -y and -z: normal (0, s, -s).
    # Along the normal z goes down, so sorting on z alone would reverse the series.
    s = round(float(np.sqrt(0.5)), 8)  # DS holds 16 characters
    orient = [1.0, 0.0, 0.0, 0.0, -s, -s]
    steps = [3, 0, 4, 1, 2]
    positions = [[0.0, 2.0 * k * s, -2.0 * k * s] for k in steps]
    planes = _series(tmp_path / "series", positions, orient)
    np.testing.assert_array_equal(_load(tmp_path), np.stack([planes[i] for i in np.argsort(steps)]))


def test_slices_of_different_sizes_name_the_folder(tmp_path):
    _series(
        tmp_path / "series",
        [[0.0, 0.0, 2.0 * i] for i in range(4)],
        sizes=[8, 8, 6, 8],
    )
    with pytest.raises(BadInputError, match=r"series: slices have different sizes"):
        _load(tmp_path)


def test_non_dicom_file_is_named(tmp_path):
    _series(tmp_path / "series", [[0.0, 0.0, 2.0 * i] for i in range(3)])
    (tmp_path / "series" / "notes.txt").write_text("exported by PACS on Monday\n")
    with pytest.raises(BadInputError, match=r"notes\.txt: not a readable DICOM file"):
        _load(tmp_path)


@pytest.mark.parametrize("drop", ["ImageOrientationPatient", "PixelSpacing", "both"], ids=str)
def test_native_geometry_without_geometry_tags_keeps_the_size(tmp_path, drop):
    """A series without orientation or pixel spacing extracts (InstanceNumber order);
    the geometry a probe records keeps its size and leaves the unknown spacing NaN."""
    from featstore.data.native import native

    _series(tmp_path / "series", [[0.0, 0.0, 2.0 * i] for i in range(5)])
    for f in (tmp_path / "series").iterdir():
        ds = pydicom.dcmread(f)
        for tag in ["ImageOrientationPatient", "PixelSpacing"] if drop == "both" else [drop]:
            delattr(ds, tag)
        ds.save_as(f)
    dataset = _dataset(tmp_path)
    (sample,) = readers.list_samples(dataset)
    got = native(dataset, sample)
    assert (got.rows, got.cols) == (8, 8)
    gap, row, col = got.spacing
    assert np.isnan(gap) == (drop != "PixelSpacing")  # the gap needs the orientation
    spacing_known = drop == "ImageOrientationPatient"
    assert not np.isnan(row) and not np.isnan(col) if spacing_known else np.isnan(row)
    if drop == "PixelSpacing":
        assert gap == pytest.approx(2.0)


def _photometric(folder: Path, kind: str, signed: bool = False) -> np.ndarray:
    """A 3-slice series whose files say `kind`; returns the stored values (unsigned
    12-bit, or signed 16-bit)."""
    ref = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    stored = []
    for i in range(3):
        ds = copy.deepcopy(ref)
        ds.Rows = ds.Columns = 8
        raw = rng.integers(-500 if signed else 0, 4096, (8, 8))
        raw = raw.astype(np.int16 if signed else np.uint16)
        ds.PixelRepresentation, ds.BitsStored = (1, 16) if signed else (0, 12)
        ds.PixelData = raw.tobytes()
        ds.PhotometricInterpretation = kind
        ds.RescaleSlope, ds.RescaleIntercept = 2, -100
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0, 0, float(i)]
        ds.save_as(folder / f"s{i}.dcm")
        stored.append(raw)
    return np.stack(stored)


@pytest.mark.parametrize("signed", [False, True], ids=["uint12", "int16"])
def test_monochrome1_is_reflected_to_monochrome2_before_the_rescale(tmp_path, signed):
    from featstore.data.dicom import load_dicom

    stored = _photometric(tmp_path / "m1", "MONOCHROME1", signed).astype(np.float64)
    flipped = (-1 - stored) if signed else (4095 - stored)
    np.testing.assert_array_equal(load_dicom(tmp_path / "m1"), flipped * 2 - 100)
    stored2 = _photometric(tmp_path / "m2", "MONOCHROME2", signed).astype(np.float64)
    np.testing.assert_array_equal(load_dicom(tmp_path / "m2"), stored2 * 2 - 100)


def test_a_palette_series_is_refused_not_read_as_grey(tmp_path):
    from featstore.data.dicom import load_dicom

    _photometric(tmp_path / "p", "PALETTE COLOR")
    with pytest.raises(BadInputError, match=r"s0\.dcm: PhotometricInterpretation PALETTE COLOR"):
        load_dicom(tmp_path / "p")
