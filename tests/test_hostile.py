"""Hostile input (issue 11): each case ends in a featstore error naming the file, field
or line, or in a correct result; never a traceback, a hang, or a silently wrong value.

Property-based versions of these (random manifests and index CSVs) are in
test_properties.py; benchmarks/reliability.py runs the same cases through the CLI.
"""

from __future__ import annotations

import re
import resource
import struct
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from featstore.data import readers
from featstore.data.manifest import Dataset, load_manifest
from featstore.errors import BadInputError, FeatstoreError, FeatureOverflowError, ManifestError
from featstore.extraction.run import Options
from pipelines import extract
from pipelines.cli import app

runner = CliRunner()
PIXELS = "cache: cache\nencoders: ['pixels:8']\nbaseline: null\nresolutions: [32]\n"


def billion_laughs(levels: int = 10) -> str:
    """Each level lists the previous one 9 times: 9**levels strings once expanded."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]")
    return "\n".join([*lines, f"datasets: [*l{levels - 1}]", ""])


def png_header(path: Path, width: int, height: int) -> Path:
    """A small PNG file whose header claims `width` x `height` grey pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (width + 1) * 4)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return path


def images_dataset(root: Path, rows: list[str], header: str = "image,label,split", **kw):
    """A PNG dataset: one 8x8 grey image per row's first cell (unless it exists)."""
    root.mkdir(parents=True, exist_ok=True)
    for row in rows:
        name = row.split(",")[0]
        if name and not (root / name).exists():
            Image.fromarray(np.full((8, 8), 40, np.uint8)).save(root / name)
    (root / "index.csv").write_text("\n".join([header, *rows]) + "\n")
    base = dict(name="d", format="images", path=root, index="index.csv", dims=2)
    return Dataset(**{**base, "task": "classification", **kw})


def _manifest(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "m.yaml"
    path.write_text(text)
    return path


# ------------------------------------------------------------------ manifests


def test_yaml_alias_bomb_is_refused_fast_with_bounded_memory(tmp_path):
    path = _manifest(tmp_path, billion_laughs())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(ManifestError, match=r"m\.yaml: more than 100000 values .* aliases"):
        load_manifest(path)
    assert time.perf_counter() - start < 2
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 100_000  # KiB
    path.write_text("a: &a [*a]\ndatasets: *a\n")  # an alias inside its own anchor
    with pytest.raises(ManifestError, match="refers to itself"):
        load_manifest(path)


def test_yaml_anchors_that_expand_modestly_still_work(tmp_path):
    text = """\
resolutions: &sizes [224]
datasets:
  - name: a
    format: synthetic
    synthetic: &kind {kind: cls2d}
    path: a
    task: classification
    dims: 2
    intensity: &window {mode: window, center: 40, width: 400}
  - {name: b, format: synthetic, synthetic: *kind, path: b, task: classification, dims: 2,
     intensity: *window}
studies: [{name: s, encoders: [x], resolutions: *sizes}]
"""
    m = load_manifest(_manifest(tmp_path, text))
    assert m.datasets[1].intensity.mode == "window" and m.studies[0].resolutions == (224,)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (bytes(range(256)) * 8, r"m\.yaml: not a text file \(byte 128"),
        (b"datasets: \x00\x01\x1b[0m", r"m\.yaml: not valid YAML"),  # UTF-8 control bytes
        (b"x: " + b"[" * 5000, r"m\.yaml: not valid YAML: nested deeper than 32"),
        (b"# padding\n" * 200_000, r"m\.yaml: larger than 1 MiB"),
        (b"datasets: !!timestamp 2001-01-01 -", r"cannot read '2001-01-01 -' as .*timestamp"),
        (b"datasets: !!int ''", r"m\.yaml: not valid YAML: cannot read '' as .*int"),
        (b"datasets: !!python/object:os.system x", r"m\.yaml: not valid YAML: could not determine"),
    ],
    ids=["binary", "control-bytes", "deep-nesting", "huge", "timestamp", "int", "python-tag"],
)
def test_garbage_manifest_is_a_manifest_error(tmp_path, content, expected):
    path = tmp_path / "m.yaml"
    path.write_bytes(content)
    with pytest.raises(ManifestError, match=expected):
        load_manifest(path)


SYNTH = (
    "datasets:\n  - {name: d, format: synthetic, synthetic: {kind: cls2d}, path: d, "
    "task: classification, dims: 2%s}\n"
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (SYNTH % ", resolutions: [-224]", r"dataset 'd', field 'resolutions'.*16 to 4096"),
        (SYNTH % ", resolutions: [1000000]", r"dataset 'd', field 'resolutions'.*16 to 4096"),
        (SYNTH % ", resolutions: []", r"dataset 'd', field 'resolutions'.*non-empty"),
        ("resolutions: [1000000]\n" + SYNTH % "", r"field 'resolutions'.*16 to 4096"),
        (PIXELS + "batch_size: 0\n" + SYNTH % "", r"field 'batch_size'.*greater than or equal"),
        (PIXELS + "batch_size: 100000\n" + SYNTH % "", r"field 'batch_size'.*less than or equal"),
        (SYNTH % ", splits: {ratios: [.nan, .nan, .nan]}", r"field 'splits.ratios.0'.*finite"),
        (SYNTH % ", splits: {from: column, seed: -1}", r"field 'splits.seed'"),
        (SYNTH % ", mask_map: {300: 1}", r"mask_map values and class ids must be in 0..255"),
        (
            SYNTH % ", metadata: {site: split}",
            r"metadata coordinate names \['split'\] are reserved",
        ),
        (SYNTH % ", index: {glob: '*.png', mask: '{nam}'}", r"may use only \{name\} and \{stem\}"),
        (SYNTH.replace("kind: cls2d", "kind: cls2d, size: 100000") % "", r"synthetic.size"),
        (
            "studies: [{name: s, encoders: [x], resolutions: [8]}]\n" + SYNTH % "",
            r"field 'studies.0.resolutions'",
        ),
    ],
)
def test_sizes_and_numbers_are_bounded_before_allocation(tmp_path, text, expected):
    with pytest.raises(ManifestError, match=expected):
        load_manifest(_manifest(tmp_path, text))


def test_cli_resolution_override_is_bounded(tmp_path):
    m = load_manifest(_manifest(tmp_path, SYNTH % ""))
    for bad in (-8, 1_000_000):
        with pytest.raises(ManifestError, match=rf"--resolution \[{bad}\].*16 to 4096"):
            m.select(resolutions=[bad])
    assert m.select(resolutions=[64]).resolutions == (64,)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--batch-size", "-4"], "error: --batch-size -4: give 1 to 4096"),
        (["--batch-size", "0"], "error: --batch-size 0: give 1 to 4096"),
        (["--workers", "-1"], "error: --workers -1"),
        (["--resolution", "1000000"], r"error: --resolution [1000000]"),
    ],
)
def test_cli_extract_options_are_validated(tmp_path, args, expected):
    path = _manifest(tmp_path, PIXELS + SYNTH % "")
    result = runner.invoke(app, ["extract", "--manifest", str(path), *args])
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert not (tmp_path / "cache").exists()  # refused before anything was allocated


def test_cli_probe_pool_is_validated(tmp_path):
    path = _manifest(tmp_path, PIXELS + SYNTH % "")
    result = runner.invoke(app, ["probe", "--manifest", str(path), "--pool", "median"])
    assert result.exit_code == 2 and "error: --pool 'median'" in result.output


# ------------------------------------------------------------------ images


@pytest.mark.parametrize("side", [30000, 9000])  # over PIL's own limit (its message), under it
def test_png_header_claiming_huge_size_is_refused_by_its_header(tmp_path, side):
    ds = images_dataset(tmp_path, ["ok.png,0,train"])
    png_header(tmp_path / "ok.png", side, side)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    (sample,) = readers.list_samples(ds)
    size = rf"({side} x {side}|{side * side} pixels)"
    with pytest.raises(BadInputError, match=rf"ok\.png: its header claims .*{size}.*--skip-bad"):
        readers.load(ds, sample)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 100_000  # KiB


def test_skip_bad_records_a_decompression_bomb_and_goes_on(tmp_path):
    rows = [f"i{i}.png,{i % 2},{('train', 'val', 'test')[i % 3]}" for i in range(6)]
    root = tmp_path / "data"
    images_dataset(root, rows)
    png_header(root / "i4.png", 30000, 30000)
    text = PIXELS + (
        "datasets:\n  - {name: d, format: images, path: data, index: index.csv, "
        "task: classification, dims: 2}\n"
    )
    m = load_manifest(_manifest(tmp_path, text))
    with pytest.raises(BadInputError, match=r"i4\.png: its header claims"):
        extract.run(m, Options(progress=False), baseline=False, echo=lambda *_: None)
    (s,) = extract.run(
        m, Options(progress=False, skip_bad=True), baseline=False, echo=lambda *_: None
    )
    assert len(s.skipped) == 1 and s.items == 6


def test_nifti_header_claiming_huge_volume_is_refused_by_its_header(tmp_path):
    header = nib.Nifti1Header()
    header.set_data_shape((3000, 3000, 3000))
    header.set_data_dtype(np.float32)
    (tmp_path / "v.nii").write_bytes(header.binaryblock + bytes(4 + 64))
    (tmp_path / "index.csv").write_text("image,label,split\nv.nii,0,train\n")
    ds = Dataset(
        name="d", format="nifti", path=tmp_path, index="index.csv", task="classification", dims=3
    )
    with pytest.raises(BadInputError, match=r"v\.nii: its header says 3000 x 3000 x 3000 voxels"):
        readers.list_samples(ds)


def test_dicom_without_pixel_data_is_a_bad_input(tmp_path):
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ct.PixelData
    (tmp_path / "s").mkdir()
    ct.save_as(tmp_path / "s" / "a.dcm")
    (tmp_path / "index.csv").write_text("image,label,split\ns,0,train\n")
    ds = Dataset(
        name="d", format="dicom", path=tmp_path, index="index.csv", task="classification", dims=3
    )
    with pytest.raises(BadInputError, match=r"a\.dcm: cannot decode its pixel data"):
        readers.load(ds, readers.list_samples(ds)[0])
    (tmp_path / "index.csv").write_text("image,label,split\ns/a.dcm,0,train\n")
    with pytest.raises(BadInputError, match=r"line 2: image .*a\.dcm is not a folder"):
        readers.list_samples(ds)


# ------------------------------------------------------------------ index: splits and labels


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"image,label,split\n\xff\xfe\x00garbage", r"index\.csv: not a UTF-8 text CSV"),
        (b"image,label,split\na.png,0,train,oops\n", r"index\.csv, line 2: 4 cells but the head"),
        (b"image,label,label\na.png,0,1\n", r"index\.csv: header repeats column\(s\) \['label'\]"),
        (b"image,label,split\n,0,train\n", r"index\.csv, line 2: the image cell is empty"),
        (b"image,label,split\na\x00.png,0,train\n", r"index\.csv, line 2: image .* does not exist"),
        (b"image,label,split\n\n,,\n", r"index\.csv: index has no rows"),
    ],
    ids=["binary", "extra-cell", "repeated-column", "empty-image", "nul-byte", "blank-rows"],
)
def test_malformed_index_csv_names_file_and_line(tmp_path, content, expected):
    ds = images_dataset(tmp_path, [])
    (tmp_path / "index.csv").write_bytes(content)
    with pytest.raises(BadInputError, match=expected):
        readers.list_samples(ds)


def test_split_typo_with_splits_from_column_names_file_and_line(tmp_path):
    ds = images_dataset(tmp_path, ["a.png,0,train", "b.png,1,tset"], splits={"from": "column"})
    with pytest.raises(BadInputError, match=r"index\.csv, line 3: split 'tset' must be one of"):
        readers.list_samples(ds)


def test_missing_split_column_with_splits_from_column_is_refused(tmp_path):
    ds = images_dataset(tmp_path, ["a.png,0", "b.png,1"], "image,label", splits={"from": "column"})
    with pytest.raises(BadInputError, match=r"index\.csv: index lacks column\(s\) \['split'\]"):
        readers.list_samples(ds)
    ratios = images_dataset(
        tmp_path, ["a.png,0", "b.png,1"], "image,label", splits={"ratios": [0.5, 0.5, 0]}
    )
    assert len(readers.list_samples(ratios)) == 2  # ratios need no split column


@pytest.mark.parametrize(
    ("label", "classes", "expected"),
    [
        ("1.7", None, r"line 2: label '1.7' is not an integer class id"),
        ("-1", None, r"line 2: label -1 is out of range"),
        ("3", ("a", "b", "c"), r"line 2: label 3 is out of range: `classes` names 3"),
        ("inf", None, r"line 2: label 'inf' is not an integer"),
        ("1e30", None, r"line 2: label 1000000000000000019884624838656 is out of range"),
    ],
)
def test_bad_labels_are_refused_where_they_are_read(tmp_path, label, classes, expected):
    ds = images_dataset(tmp_path, [f"a.png,{label},train"], classes=classes)
    with pytest.raises(BadInputError, match=expected):
        readers.list_samples(ds)


def test_integral_float_labels_and_multilabel_checks(tmp_path):
    ds = images_dataset(tmp_path, ["a.png,1.0,train", "b.png,2,test"])
    assert [s.label for s in readers.list_samples(ds)] == [(1,), (2,)]
    multi = images_dataset(tmp_path, ["a.png,0;1;0,train", "b.png,1;2;0,train"], task="multilabel")
    with pytest.raises(BadInputError, match=r"line 3: multilabel '1;2;0' must be 0/1"):
        readers.list_samples(multi)
    ragged = images_dataset(tmp_path, ["a.png,0;1;0,train", "b.png,1;0,train"], task="multilabel")
    with pytest.raises(BadInputError, match=r"line 3: multilabel has 2 values but .*line 2"):
        readers.list_samples(ragged)


def test_mask_value_outside_classes_is_refused_when_loaded(tmp_path):
    mask = np.zeros((8, 8), np.uint8)
    mask[2:4, 2:4] = 5
    Image.fromarray(mask).save(tmp_path / "m.png")
    kw = dict(task="segmentation", classes=("background", "lesion"))
    ds = images_dataset(tmp_path, ["a.png,m.png,train"], "image,mask,split", **kw)
    (sample,) = readers.list_samples(ds)
    with pytest.raises(BadInputError, match=r"m\.png: mask values \[5\] are not class ids"):
        readers.load(ds, sample)
    mapped = ds.model_copy(update={"mask_map": {5: 1}})
    assert readers.load(mapped, sample).mask.max() == 1


# ------------------------------------------------------------------ errors


def test_feature_overflow_is_a_featstore_error_and_a_floating_point_error():
    err = FeatureOverflowError("features overflow float16")
    assert isinstance(err, FeatstoreError) and isinstance(err, FloatingPointError)


# ------------------------------------------------------------------ HDF5 and Zarr volumes

VOLUME_SET = (
    "datasets:\n  - {name: v, format: %s, path: data, index: index.csv, task: segmentation, "
    "dims: 3, classes: [bg, fg], volume: {raw: volumes/raw, labels: volumes/labels}}\n"
)


def _volume_set(root: Path, suffix: str) -> Path:
    """Three 4 x 16 x 16 volumes with labels inside each file (.h5 or Zarr v3 .zarr)."""
    import h5py
    import zarr

    (root / "data").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        arrays = {"volumes/raw": rng.integers(0, 255, (4, 16, 16), np.uint8)}
        arrays["volumes/labels"] = (arrays["volumes/raw"] > 128).astype(np.uint8)
        path = root / "data" / f"v{i}{suffix}"
        if suffix == ".h5":
            with h5py.File(path, "w") as f:
                for inner, arr in arrays.items():
                    f.create_dataset(inner, data=arr)
            continue
        group = zarr.open_group(path, mode="w", zarr_format=3)
        for inner, arr in arrays.items():
            group.create_array(inner, shape=arr.shape, dtype=arr.dtype, chunks=(1, 16, 16))
            group[inner][:] = arr
    rows = "".join(f"v{i}{suffix},{s}\n" for i, s in enumerate(("train", "val", "test")))
    (root / "data" / "index.csv").write_text("image,split\n" + rows)
    fmt = "hdf5" if suffix == ".h5" else "zarr"
    return _manifest(root, PIXELS + VOLUME_SET % fmt)


def _half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _labels_16x8(path: Path) -> None:
    import h5py

    with h5py.File(path, "a") as f:
        del f["volumes/labels"]
        f.create_dataset("volumes/labels", data=np.zeros((4, 16, 8), np.uint8))


def _png_h5(path: Path) -> None:
    path.unlink()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path, format="PNG")


@pytest.mark.parametrize(
    ("suffix", "damage", "expected"),
    [
        (".h5", _half, r"v1\.h5 \[volumes/raw\]: not a readable HDF5 file"),
        (".h5", _png_h5, r"v1\.h5 \[volumes/raw\]: not a readable HDF5 file"),
        (".h5", _labels_16x8, r"v1\.h5 \[volumes/labels\]: label array of shape \(4, 16, 8\)"),
        (".zarr", lambda p: _half(p / "volumes/raw/c/2/0/0"), r"v1\.zarr \[volumes/raw\]: cannot"),
        (
            ".zarr",
            lambda p: (p / "zarr.json").unlink(),
            r"v1\.zarr \[volumes/raw\]: not a readable",
        ),
    ],
    ids=["h5-truncated", "h5-png", "h5-labels-shape", "zarr-chunk-truncated", "zarr-no-metadata"],
)
def test_hostile_volumes_are_refused_by_the_cli_naming_file_and_array(
    tmp_path, suffix, damage, expected
):
    path = _volume_set(tmp_path, suffix)
    damage(tmp_path / "data" / f"v1{suffix}")
    result = runner.invoke(app, ["extract", "--manifest", str(path), "--workers", "0"])
    assert result.exit_code == 2, result.output
    assert re.search(expected, result.output) and "Traceback" not in result.output, result.output
