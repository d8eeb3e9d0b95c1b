"""HDF5 and Zarr volumes (issue 30): raw and label arrays by internal path, read slice
run by slice run; pixels equal the libraries' own reads; sections blocks, contiguous
splits; every malformed file a BadInputError naming the file and the array; memory
bounded by the run; block-wise extraction stores what a whole-volume read stores."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr
from PIL import Image
from pydantic import ValidationError
from typer.testing import CliRunner

import featstore
from featstore.data import native, readers, volumes
from featstore.data.manifest import Dataset
from featstore.errors import BadInputError
from pipelines.cli import app

RAW, LABELS = "volumes/raw", "volumes/labels/neuron_ids"
CREMI = {"raw": RAW, "labels": LABELS, "resolution": "resolution"}
# where a volume is written: (format, file name, zarr_format or None)
KINDS = [("hdf5", "v.h5", None), ("zarr", "v2.zarr", 2), ("zarr", "v3.zarr", 3)]
IDS = ["hdf5", "zarr-v2", "zarr-v3"]


def write(
    folder: Path,
    name: str,
    raw: np.ndarray,
    labels: np.ndarray | None = None,
    zarr_format: int | None = None,
    attrs: dict | None = None,
    chunks: tuple[int, ...] | None = None,
) -> Path:
    """`raw` (and `labels`) at RAW (LABELS) of an HDF5 file (zarr_format None) or a Zarr
    group, chunked along z, with `attrs` on raw (default: CREMI's resolution)."""
    path = folder / name
    attrs = {"resolution": [40.0, 4.0, 4.0]} if attrs is None else attrs
    arrays = {RAW: raw} if labels is None else {RAW: raw, LABELS: labels}
    if zarr_format is None:
        with h5py.File(path, "w") as f:
            for inner, arr in arrays.items():
                f.create_dataset(inner, data=arr, chunks=chunks or (1, *arr.shape[1:]))
            f[RAW].attrs.update(attrs)
        return path
    group = zarr.open_group(path, mode="w", zarr_format=zarr_format)
    for inner, arr in arrays.items():
        z = group.create_array(
            inner, shape=arr.shape, dtype=arr.dtype, chunks=chunks or (2, *arr.shape[1:])
        )
        z[:] = arr
    group[RAW].attrs.update(attrs)
    return path


def dataset(folder: Path, fmt: str, rows: list[str], **kw) -> Dataset:
    """A segmentation dataset of `rows` ("id,image,split,sections")."""
    (folder / "index.csv").write_text("id,image,split,sections\n" + "\n".join(rows) + "\n")
    base = dict(name="em", format=fmt, path=folder, index="index.csv", task="segmentation",
                dims=3, volume=CREMI)  # fmt: skip
    return Dataset.model_validate({**base, **kw})


def volume(shape=(9, 12, 14), dtype=np.uint16, seed=0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        raw = rng.normal(0, 100, shape).astype(dtype)
    else:
        raw = rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)
    return raw, rng.integers(0, 3, shape).astype(np.uint64)  # class ids stored as uint64


# ---------------------------------------------------------------- pixels


@pytest.mark.parametrize(("fmt", "name", "zf"), KINDS, ids=IDS)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_decoded_pixels_equal_the_librarys_own_read(tmp_path, fmt, name, zf, dtype):
    raw, labels = volume(dtype=dtype)
    path = write(tmp_path, name, raw, labels, zf)
    ds = dataset(tmp_path, fmt, [f"all,{name},train,", f"mid,{name},test,3:8"])
    whole, mid = readers.list_samples(ds)
    assert (whole.n_items, mid.n_items) == (9, 5)
    if zf is None:
        with h5py.File(path, "r") as f:
            own, own_labels = f[RAW][:], f[LABELS][:]
    else:
        group = zarr.open_group(path, mode="r")
        assert group.metadata.zarr_format == zf
        own, own_labels = group[RAW][:], group[LABELS][:]
    got = readers.load(ds, whole, as_read=True)
    assert got.image.dtype == raw.dtype and got.image.shape == (9, 12, 14, 1)
    np.testing.assert_array_equal(got.image[..., 0], own)
    np.testing.assert_array_equal(got.mask, own_labels.astype(np.uint8))
    assert got.mask.dtype == np.uint8  # type: ignore[union-attr]
    run = readers.load(ds, mid, items=range(1, 3))  # slices 4, 5 of the file
    assert run.image.dtype == np.float32
    np.testing.assert_array_equal(run.image[..., 0], own[4:6].astype(np.float32))
    np.testing.assert_array_equal(run.mask, own_labels[4:6])
    # minmax maps every run by its sample's (min, max): sections 3:8, not the run's
    sub = own[3:8].astype(np.float64)
    assert run.span == (sub.min(), sub.max())
    assert readers.header(ds, mid).size == (12, 14)


@pytest.mark.parametrize(("fmt", "name", "zf"), KINDS, ids=IDS)
def test_resolution_is_recorded_in_mm_in_the_stated_unit(tmp_path, fmt, name, zf):
    raw, labels = volume()
    write(tmp_path, name, raw, labels, zf)
    ds = dataset(tmp_path, fmt, [f"a,{name},train,"])
    (s,) = readers.list_samples(ds)
    assert readers.header(ds, s).spacing == (40 / 1e6, 4 / 1e6, 4 / 1e6)  # CREMI's nm
    assert native.native(ds, s).spacing == (4e-05, 4e-06, 4e-06)
    unknown = dataset(tmp_path, fmt, [f"a,{name},train,"], volume={"raw": RAW, "labels": LABELS})
    assert readers.header(unknown, readers.list_samples(unknown)[0]).spacing is None
    microns = dataset(tmp_path, fmt, [f"a,{name},train,"], volume={**CREMI, "unit": "um"})
    assert readers.header(microns, s).spacing == (0.04, 0.004, 0.004)


def test_a_unit_attribute_that_disagrees_is_refused(tmp_path):
    raw, labels = volume()
    write(tmp_path, "v.h5", raw, labels, attrs={"resolution": [40, 4, 4], "unit": "um"})
    ds = dataset(tmp_path, "hdf5", ["a,v.h5,train,"])
    with pytest.raises(BadInputError, match=r"v\.h5 \[volumes/raw\].*'um'.*volume.unit: um"):
        readers.list_samples(ds)
    ok = dataset(tmp_path, "hdf5", ["a,v.h5,train,"], volume={**CREMI, "unit": "um"})
    (s,) = readers.list_samples(ok)
    assert readers.header(ok, s).spacing == (0.04, 0.004, 0.004)


# ---------------------------------------------------------------- splits


def test_sections_blocks_and_contiguous_splits(tmp_path):
    raw, labels = volume(shape=(12, 8, 8))
    write(tmp_path, "v.h5", raw, labels)
    rows = [f"b{i},v.h5,,{2 * i}:{2 * i + 2}" for i in range(6)][::-1]  # order must not matter
    ds = dataset(
        tmp_path, "hdf5", rows, splits={"ratios": [0.5, 0.25, 0.25], "order": "contiguous"}
    )
    samples = {s.id: s for s in readers.list_samples(ds)}
    assert [samples[f"b{i}"].split for i in range(6)] == ["train"] * 3 + ["val"] + ["test"] * 2
    for i in range(6):
        got = readers.load(ds, samples[f"b{i}"], as_read=True)
        np.testing.assert_array_equal(got.image[..., 0], raw[2 * i : 2 * i + 2])
    with pytest.raises(BadInputError, match=r"index.csv, line 2: sections '5:40'"):
        readers.list_samples(dataset(tmp_path, "hdf5", ["x,v.h5,train,5:40"]))


# ---------------------------------------------------------------- refusals


def _png_as(path: Path) -> Path:
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path.with_suffix(".png"))
    path.with_suffix(".png").rename(path)
    return path


def _truncated_h5(folder: Path) -> None:
    path = write(folder, "v.h5", *volume(shape=(20, 32, 32)))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _truncated_chunk(folder: Path) -> None:
    write(folder, "v.zarr", *volume(), zarr_format=3)
    chunk = folder / "v.zarr" / "volumes" / "raw" / "c" / "1" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:5])


def _foreign_folder(folder: Path) -> None:
    (folder / "v.zarr").mkdir()
    _png_as(folder / "v.zarr" / "0.png")


def _n5(folder: Path) -> None:
    (folder / "v.n5").mkdir()
    (folder / "v.n5" / "attributes.json").write_text('{"n5": "2.0.0"}')


def _neuron_ids(folder: Path) -> None:
    raw, labels = volume()
    write(folder, "v.h5", raw, labels * 1000 + 7)  # uint64 ids, never wrapped to uint8


def _raw(shape: tuple[int, ...], zf: int | None = None, name: str = "v.h5"):
    return lambda folder: write(folder, name, *volume(shape=shape)[:1], volume()[1], zarr_format=zf)


REFUSALS = {
    "hdf5-missing-raw": ("hdf5", "v.h5", {"raw": "volumes/rawx"}, _raw((9, 12, 14)),
                         r"v\.h5 \[volumes/rawx\]: no such dataset.*volumes/raw"),
    "hdf5-missing-labels": ("hdf5", "v.h5", {"labels": "volumes/labels/x"}, _raw((9, 12, 14)),
                            r"v\.h5 \[volumes/labels/x\]: no such dataset"),
    "hdf5-group-not-array": ("hdf5", "v.h5", {"raw": "volumes"}, _raw((9, 12, 14)),
                             r"v\.h5 \[volumes\]: is a group, not a dataset"),
    "hdf5-rank-4": ("hdf5", "v.h5", {}, _raw((2, 9, 12, 14)),
                    r"v\.h5 \[volumes/raw\]: array of rank 4"),
    "hdf5-rank-2": ("hdf5", "v.h5", {}, _raw((12, 14)), r"v\.h5 \[volumes/raw\]: array of rank 2"),
    "hdf5-labels-other-shape": ("hdf5", "v.h5", {}, _raw((9, 12, 15)),
                                r"v\.h5 \[volumes/labels/neuron_ids\]: label array of shape "
                                r"\(9, 12, 14\).*volumes/raw \(9, 12, 15\)"),
    "hdf5-truncated": ("hdf5", "v.h5", {}, _truncated_h5,
                       r"v\.h5 \[volumes/raw\]: not a readable HDF5 file \(.*truncated"),
    "hdf5-png-renamed": ("hdf5", "v.h5", {}, lambda f: _png_as(f / "v.h5"),
                         r"v\.h5 \[volumes/raw\]: not a readable HDF5 file"),
    "zarr-missing-raw": ("zarr", "v.zarr", {"raw": "volumes/rawx"}, _raw((9, 12, 14), 3, "v.zarr"),
                         r"v\.zarr \[volumes/rawx\]: no such array.*volumes/raw"),
    "zarr-rank-4": ("zarr", "v.zarr", {}, _raw((2, 9, 12, 14), 2, "v.zarr"),
                    r"v\.zarr \[volumes/raw\]: array of rank 4"),
    "zarr-labels-other-shape": ("zarr", "v.zarr", {}, _raw((9, 13, 14), 3, "v.zarr"),
                                r"v\.zarr \[volumes/labels/neuron_ids\]: label array of shape"),
    "zarr-truncated-chunk": ("zarr", "v.zarr", {}, _truncated_chunk,
                             r"v\.zarr \[volumes/raw\]: cannot read slices 0:9 .*truncated"),
    "zarr-foreign-folder": ("zarr", "v.zarr", {}, _foreign_folder,
                            r"v\.zarr \[volumes/raw\]: not a readable Zarr group"),
    "zarr-n5-empty": ("zarr", "v.n5", {}, _n5,  # read through tensorstore (tests/test_n5.py)
                      r"v\.n5 \[volumes/raw\]: no such array .*the container holds \[\]"),
    "hdf5-neuron-ids": ("hdf5", "v.h5", {}, _neuron_ids,
                        r"v\.h5 \[volumes/labels/neuron_ids\]: mask values must be integer "
                        r"class ids in 0\.\.255"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_malformed_volumes_are_refused_naming_the_file_and_the_array(tmp_path, case):
    fmt, name, paths, setup, pattern = REFUSALS[case]
    setup(tmp_path)
    ds = dataset(tmp_path, fmt, [f"a,{name},train,"], volume={**CREMI, **paths})
    with pytest.raises(BadInputError, match=pattern) as err:
        for s in readers.list_samples(ds):  # listing reads metadata; decoding the chunks
            readers.load(ds, s, items=range(s.n_items))
    assert str(tmp_path / name) in str(err.value)


def test_a_mask_column_and_the_manifest_rules(tmp_path):
    write(tmp_path, "v.h5", *volume())
    (tmp_path / "index.csv").write_text("image,mask,split\nv.h5,v.h5,train\n")
    ds = Dataset(name="em", format="hdf5", path=tmp_path, index="index.csv",
                 task="segmentation", dims=3, volume=CREMI)  # fmt: skip
    with pytest.raises(BadInputError, match=r"line 2: format hdf5 reads labels .*volume.labels"):
        readers.list_samples(ds)
    base = dict(name="em", path=tmp_path, index="i.csv", task="segmentation", dims=3)
    with pytest.raises(ValidationError, match="go with a `volume:"):
        Dataset.model_validate({**base, "format": "hdf5"})
    with pytest.raises(ValidationError, match="names its label array"):
        Dataset.model_validate({**base, "format": "zarr", "volume": {"raw": RAW}})
    with pytest.raises(ValidationError, match="percentiles are not computed"):
        Dataset.model_validate(
            {**base, "format": "zarr", "volume": CREMI, "intensity": {"mode": "percentile"}}
        )


# ---------------------------------------------------------------- memory


@pytest.mark.parametrize(("fmt", "name", "zf"), [KINDS[0], KINDS[2]], ids=["hdf5", "zarr-v3"])
def test_reading_a_run_never_loads_the_whole_volume(tmp_path, monkeypatch, fmt, name, zf):
    """A 4-slice run of a 128 MB volume, minmax span included (read block by block,
    4 MB at a time here), allocates a small multiple of the block and the run (about
    9 MB with h5py, 14 MB with zarr), never the volume."""
    monkeypatch.setattr(volumes, "BLOCK_BYTES", 4 << 20)
    shape = (512, 512, 512)  # 128 MB of uint8
    raw = np.zeros(shape, np.uint8)
    raw[::7, ::5, ::3] = np.arange(shape[0] // 7 + 1, dtype=np.uint8)[:, None, None]
    write(tmp_path, name, raw, zarr_format=zf, chunks=(8, 512, 512))
    ds = dataset(tmp_path, fmt, [f"a,{name},train,"], task="classification",
                 volume={"raw": RAW})  # fmt: skip
    (tmp_path / "index.csv").write_text(f"image,label,split\n{name},0,train\n")
    (s,) = readers.list_samples(ds)
    volumes._SPANS.clear()
    del raw
    tracemalloc.start()
    try:
        got = readers.load(ds, s, items=range(100, 104))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got.image.shape == (4, 512, 512, 1) and got.span == (0.0, 73.0)
    volume_bytes = int(np.prod(shape))
    assert peak < 4 * volumes.BLOCK_BYTES + got.image.nbytes < volume_bytes / 6, peak


# ---------------------------------------------------------------- pipeline


def _tiff_copy(folder: Path, raw: np.ndarray, labels: np.ndarray) -> None:
    tifffile.imwrite(folder / "v.tif", raw, photometric="minisblack")
    tifffile.imwrite(folder / "m.tif", labels.astype(np.uint8), photometric="minisblack")


def test_extract_and_probe_an_hdf5_segmentation_set_as_a_whole_volume_read_would(tmp_path):
    """`featstore extract` + `probe` through the CLI: the HDF5 set, read in runs of at
    most 3 slices, stores the same features, masks and scores as the same volume read
    whole as a TIFF stack (the non-tiled path)."""
    rng = np.random.default_rng(3)
    labels = np.zeros((24, 32, 32), np.uint8)
    for z in range(24):
        y, x = rng.integers(4, 20, 2)
        labels[z, y : y + 10, x : x + 10] = 1
    ramp = 15 * np.arange(24)[:, None, None]  # each slice run has its own min and max
    raw = (rng.integers(0, 60, labels.shape) + 120 * labels + ramp).astype(np.uint16)
    data = tmp_path / "data"
    data.mkdir()
    write(data, "v.h5", raw, labels.astype(np.uint64), chunks=(5, 16, 16))
    _tiff_copy(data, raw, labels)
    blocks = [f"{4 * i}:{4 * i + 4}" for i in range(6)]
    (data / "h5.csv").write_text("id,image,patient,sections\n" + "".join(
        f"b{i},v.h5,b{i},{b}\n" for i, b in enumerate(blocks)))  # fmt: skip
    (data / "tif.csv").write_text("id,image,mask,patient,sections\n" + "".join(
        f"b{i},v.tif,m.tif,b{i},{b}\n" for i, b in enumerate(blocks)))  # fmt: skip
    common = ("path: data, task: segmentation, dims: 3, classes: [bg, fg], "
              "splits: {ratios: [0.5, 0.25, 0.25], order: contiguous}")  # fmt: skip
    mpath = tmp_path / "m.yaml"
    mpath.write_text(
        "cache: cache\nencoders: ['pixels:8']\nbaseline: null\nresolutions: [32]\n"
        "batch_size: 3\nunit_items: 6\ndatasets:\n"
        f"  - {{name: em-h5, format: hdf5, index: h5.csv, {common},\n"
        f"      volume: {{raw: {RAW}, labels: {LABELS}, resolution: resolution}}}}\n"
        f"  - {{name: em-tif, format: stack, index: tif.csv, {common}}}\n"
    )
    runner = CliRunner()
    result = runner.invoke(app, ["extract", "--manifest", str(mpath), "--workers", "0"])
    assert result.exit_code == 0, result.output
    h5 = featstore.open_features(mpath, "em-h5", "pixels:8", 32)
    tif = featstore.open_features(mpath, "em-tif", "pixels:8", 32)
    for name in ("cls", "patch", "mask", "sample", "slice", "split"):
        np.testing.assert_array_equal(h5[name].values, tif[name].values, err_msg=name)
    assert list(h5["split"].values[::4]) == ["train"] * 3 + ["val"] + ["test"] * 2
    np.testing.assert_allclose(h5["native_slice_mm"].values, 40e-6)
    assert np.isnan(tif["native_slice_mm"].values).all()
    out = tmp_path / "results"
    result = runner.invoke(app, ["probe", "--manifest", str(mpath), "--out", str(out)])
    assert result.exit_code == 0, result.output
    df = pd.read_csv(out / "results.csv")
    cols = ["probe", "metric", "value"]
    rows = {n: df[df.dataset == n][cols].sort_values(cols[:2]).reset_index(drop=True)
            for n in ("em-h5", "em-tif")}  # fmt: skip
    assert "dice" in set(rows["em-h5"].metric), rows["em-h5"]
    hd95 = rows["em-h5"].metric.str.startswith("hd95")
    assert hd95.any()
    # HD95 is in mm where the header gives spacing (HDF5: 4 um pixels), else in pixels
    assert (rows["em-h5"].value[hd95] < 1e-3).all() and (rows["em-tif"].value[hd95] > 1).all()
    pd.testing.assert_frame_equal(rows["em-h5"][~hd95], rows["em-tif"][~hd95])
