"""Property-based hostile input: any manifest text and any index CSV gives a valid result
or a FeatstoreError, never another exception.

Manifests are generated as random YAML text, random structures, and random mutations
of a valid manifest; index CSVs as random headers and rows over a pool of real files
(good, truncated and garbage PNG/NIfTI/DICOM, a decompression bomb, folders). No
encoder runs here: the properties cover `load_manifest`, `readers.prepare` and
`readers.load`. Examples are capped so the file runs in seconds.
"""

from __future__ import annotations

import copy
import csv
import io
import os
import shutil
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.data import get_testdata_file
from test_hostile import png_header

from featstore.data import readers
from featstore.data.manifest import MAX_LABEL, SPLITS, Dataset, Manifest, load_manifest
from featstore.errors import FeatstoreError

# FEATSTORE_HYPOTHESIS_EXAMPLES=3000 for a deeper search (minutes)
FAST = settings(
    max_examples=int(os.environ.get("FEATSTORE_HYPOTHESIS_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# ------------------------------------------------------------------ manifests

KEYS = sorted(
    {
        *Manifest.model_fields,
        *Dataset.model_fields,
        "from",
        "ratios",
        "seed",
        "kind",
        "n",
        "size",
        "slices",
        "mode",
        "center",
        "width",
        "low",
        "high",
        "glob",
        "mask",
        "join",
        "key",
    }
    - {"from_"}
)
WORDS = [
    "images", "nifti", "dicom", "medmnist", "synthetic", "classification", "segmentation",
    "multilabel", "cls2d", "seg3d", "column", "window", "percentile", "minmax", "pixels",
    "pixels:8", "axial", "pad", "data", "index.csv", "$HOME", "${NOPE:-x}", "..", "/", "",
    "a\x00b", "x" * 300,
]  # fmt: skip
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-3, 300)
    | st.floats()
    | st.sampled_from(WORDS)
    | st.text(max_size=12)
)
KEY = st.sampled_from(KEYS) | st.text(max_size=8) | st.integers(-2, 2)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(KEY, inner, max_size=5)
        | st.sets(st.text(max_size=3) | st.integers(), max_size=3)
    ),  # YAML !!set
    max_leaves=25,
)

VALID: dict[str, Any] = {
    "cache": "cache",
    "encoders": ["pixels:8"],
    "resolutions": [32],
    "batch_size": 4,
    "unit_items": 8,
    "layers": 1,
    "baseline": "pixels:8",
    "datasets": [
        {
            "name": "img",
            "format": "images",
            "path": "data",
            "index": "index.csv",
            "task": "classification",
            "dims": 2,
            "splits": {"from": "column"},
            "intensity": {"mode": "window", "center": 40, "width": 400},
            "classes": ["a", "b"],
            "metadata": {"patient": "pid"},
            "resolutions": [32, 64],
        },
        {
            "name": "syn",
            "format": "synthetic",
            "synthetic": {"kind": "seg3d", "n": 6, "size": 16, "slices": 4, "seed": 0},
            "path": "syn",
            "task": "segmentation",
            "dims": 3,
            "splits": {"ratios": [0.5, 0.25, 0.25], "seed": 1},
            "mask_map": {255: 1},
            "index": {"glob": "*.nii.gz", "mask": "{stem}_seg.nii.gz", "join": "x.csv"},
        },
    ],
    "studies": [{"name": "s", "datasets": ["img"], "encoders": ["pixels"], "resolutions": [32]}],
}


@pytest.fixture(scope="module")
def manifest_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("manifests")
    (root / "data").mkdir()
    (root / "data" / "index.csv").write_text("image,label,split\n")
    return root


def _load(root: Path, content: str | bytes) -> None:
    path = root / "m.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "replace"))
    try:
        m = load_manifest(path)
    except FeatstoreError:
        return
    m.cells()  # a manifest that loads can be used
    for ds in m.datasets:
        assert m.resolutions_for(ds) and all(16 <= r <= 4096 for r in m.resolutions_for(ds))


def _dump(doc: Any) -> str:
    return yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)


@FAST
@given(doc=st.dictionaries(KEY, VALUES, max_size=6) | VALUES)
def test_any_yaml_structure_loads_or_is_a_manifest_error(manifest_dir, doc):
    _load(manifest_dir, _dump(doc))


@FAST
@given(
    doc=st.dictionaries(KEY, VALUES, max_size=6),
    datasets=st.lists(st.dictionaries(KEY, VALUES, max_size=8), max_size=3),
)
def test_any_dataset_entries_load_or_are_a_manifest_error(manifest_dir, doc, datasets):
    _load(manifest_dir, _dump({**doc, "datasets": datasets}))


def _mutate(data: st.DataObject, node: Any) -> Any:
    """`node` with one random change somewhere below it (replace, delete or add a key)."""
    if isinstance(node, dict) and node and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(node, key=str)))
        return {**node, key: _mutate(data, node[key])}
    if isinstance(node, list) and node and data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(node) - 1))
        return [*node[:i], _mutate(data, node[i]), *node[i + 1 :]]
    op = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if op == "delete" and isinstance(node, dict) and node:
        key = data.draw(st.sampled_from(sorted(node, key=str)))
        return {k: v for k, v in node.items() if k != key}
    if op == "add" and isinstance(node, dict):
        return {**node, data.draw(KEY): data.draw(VALUES)}
    return data.draw(VALUES)


@FAST
@given(data=st.data())
def test_mutated_valid_manifest_loads_or_is_a_manifest_error(manifest_dir, data):
    doc = copy.deepcopy(VALID)
    for _ in range(data.draw(st.integers(1, 3))):
        doc = _mutate(data, doc)
    _load(manifest_dir, _dump(doc))


YAML_TOKENS = [
    "datasets:", "- ", "&a ", "*a ", "[", "]", "{", "}", ": ", "\n", "  ", "name: x",
    "!!binary ", "!!python/object:os.system ", "<<: *a", "? ", "|", ">", "'", '"', "---\n",
    "%YAML 1.1\n", "...", "# c", "\t", ", ", "!!set ", "!!timestamp 2001-01-01 ", "1e999",
    ".nan", "\\x00", "\ufeff", "resolutions: [", "-1", "datasets: [*a]", "a: &a [*a]",
    "!!int ", "!!float ", "!!bool ", "!!null ", "!!set {a, b}", "!!omap [a: 1]", "2001-02-30",
    "0x", "0o", "1_0", "190:20:30",
]  # fmt: skip


@FAST
@given(
    text=st.lists(st.sampled_from(YAML_TOKENS) | st.text(max_size=4), max_size=30).map("".join)
    | st.text(max_size=200)
    | st.binary(max_size=200)
)
def test_any_text_or_bytes_loads_or_is_a_manifest_error(manifest_dir, text):
    _load(manifest_dir, text)


# ------------------------------------------------------------------ index CSVs


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    """Real files a random index can point at: good, odd and broken ones."""
    root = tmp_path_factory.mktemp("pool")
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 255, (8, 8), dtype=np.uint8)
    Image.fromarray(grey).save(root / "g8.png")
    Image.fromarray(grey.astype(np.uint16) * 200).save(root / "g16.png")
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / "rgb.png")
    Image.fromarray(rng.integers(0, 255, (8, 8, 4), dtype=np.uint8)).save(root / "rgba.png")
    Image.fromarray(rng.random((8, 8), dtype=np.float32)).save(root / "f.tif")
    Image.fromarray(grey[:1, :1]).save(root / "px.png")
    Image.fromarray(grey).convert("P").save(root / "pal.png")
    Image.fromarray(grey).save(root / "g.jpg")
    for name, values in {"m01": (0, 1), "m255": (0, 255), "m7": (0, 7), "m2": (0, 1, 2)}.items():
        Image.fromarray(rng.choice(np.array(values, np.uint8), (8, 8))).save(root / f"{name}.png")
    Image.fromarray(np.zeros((6, 6), np.uint8)).save(root / "m_small.png")
    Image.fromarray(np.full((8, 8), 300, np.uint16)).save(root / "m300.png")
    good = (root / "g8.png").read_bytes()
    (root / "trunc.png").write_bytes(good[: len(good) // 2])
    (root / "junk.png").write_bytes(rng.bytes(300))
    (root / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("not an image\n")
    png_header(root / "bomb.png", 30000, 30000)
    png_header(root / "wide.png", 9000, 9000)
    (root / "sub").mkdir()
    Image.fromarray(grey).save(root / "sub" / "x.png")
    (root / "emptydir").mkdir()
    vol = rng.random((4, 5, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), root / "v.nii.gz")
    nib.save(nib.Nifti1Image((vol * 3).astype(np.uint8), np.eye(4)), root / "v_seg.nii.gz")
    nib.save(nib.Nifti1Image(vol[:, :, :3] * 0, np.eye(4)), root / "v3.nii.gz")
    nib.save(nib.Nifti1Image(vol[..., 0], np.eye(4)), root / "flat.nii")
    nan = vol.copy()
    nan[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), root / "nan.nii")
    gz = (root / "v.nii.gz").read_bytes()
    (root / "trunc.nii.gz").write_bytes(gz[: len(gz) // 2])
    (root / "junk.nii").write_bytes(rng.bytes(400))
    header = nib.Nifti1Header()
    header.set_data_shape((3000, 3000, 3000))
    header.set_data_dtype(np.float32)
    (root / "vbomb.nii").write_bytes(header.binaryblock + bytes(4 + 64))
    for name, edit in DICOM_EDITS.items():
        (root / name).mkdir()
        for i in range(2):
            ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
            ct.ImagePositionPatient = [0.0, 0.0, 2.0 * i]
            edit(ct, i)
            ct.save_as(root / name / f"{i}.dcm")
    (root / "dcm_png").mkdir()
    shutil.copy(root / "g8.png", root / "dcm_png" / "a.dcm")
    return root


def _no_pixels(ct: pydicom.Dataset, i: int) -> None:
    del ct.PixelData


def _rows(ct: pydicom.Dataset, i: int) -> None:
    ct.Rows = 4000 if i else ct.Rows


DICOM_EDITS = {
    "dcm": lambda ct, i: None,
    "dcm_nopix": _no_pixels,
    "dcm_rows": _rows,
    "dcm_orient": lambda ct, i: setattr(ct, "ImageOrientationPatient", [1, 0]),
    "dcm_same": lambda ct, i: setattr(ct, "ImagePositionPatient", [0, 0, 0]),
}


FILES = [
    "g8.png", "g16.png", "rgb.png", "rgba.png", "f.tif", "px.png", "pal.png", "g.jpg",
    "m01.png", "m255.png", "m7.png", "m2.png", "m_small.png", "m300.png", "trunc.png",
    "junk.png", "empty.png", "notes.txt", "bomb.png", "wide.png", "sub", "sub/x.png",
    "emptydir", "v.nii.gz", "v_seg.nii.gz", "v3.nii.gz", "flat.nii", "nan.nii",
    "trunc.nii.gz", "junk.nii", "vbomb.nii", *DICOM_EDITS, "dcm_png", "", "missing.png",
    "../pool", "index.csv",
]  # fmt: skip
LABELS = [
    "0", "1", "2", "3", "1.0", "1.7", "-1", "-0", "nan", "inf", "1e400", "1e30", "abc", "",
    " 1 ", "0;1", "0;1;0", "1;2", "0;0;0", ";", "99999999999999999999999", "0x1", "٣",
]  # fmt: skip
SPLIT_CELLS = ["train", "val", "test", "tset", "", " test ", "TRAIN", "val;test"]
COLUMNS = ["image", "label", "split", "mask", "patient", "id", "pid", "extra"]
GOOD = {  # image cells of the right kind for each format, valid or broken
    "images": [
        "g8.png", "g16.png", "rgb.png", "rgba.png", "f.tif", "px.png", "pal.png", "g.jpg",
        "trunc.png", "junk.png", "empty.png", "bomb.png", "wide.png",
    ],
    "nifti": ["v.nii.gz", "v3.nii.gz", "flat.nii", "nan.nii", "trunc.nii.gz", "vbomb.nii"],
    "dicom": [*DICOM_EDITS, "dcm_png", "emptydir"],
}  # fmt: skip
GOOD_MASKS = {
    "images": ["m01.png", "m2.png", "m255.png", "m7.png", "m_small.png", "m300.png"],
    "nifti": ["v_seg.nii.gz", "v3.nii.gz", "nan.nii"],
}
HOSTILE = {
    "image": st.sampled_from(FILES) | st.text(max_size=6),
    "mask": st.sampled_from(FILES) | st.text(max_size=6),
    "label": st.sampled_from(LABELS) | st.text(max_size=5),
    "split": st.sampled_from(SPLIT_CELLS) | st.text(max_size=5),
    "patient": st.sampled_from(["p1", "p2", "", "p1,p2"]),
    "id": st.sampled_from(["", "a", "b", "a"]) | st.text(max_size=4),
}
DATASETS = st.fixed_dictionaries(
    {
        "format": st.sampled_from(["images", "nifti", "dicom"]),
        "task": st.sampled_from(["classification", "multilabel", "segmentation"]),
        "splits": st.sampled_from([None, {"from": "column"}, {"ratios": [0.6, 0.2, 0.2]}]),
        "classes": st.sampled_from([None, ["a", "b"], ["bg", "x", "y"]]),
        "mask_map": st.sampled_from([{}, {255: 1}, {7: 2, 1: 1}]),
        "fill_outlines": st.booleans(),
        "metadata": st.sampled_from([{}, {"pid": "patient_id"}]),
        "slice_axis": st.sampled_from(["axial", "sagittal"]),
    }
)


def _good_cell(draw, column: str, spec: dict, row: int) -> str:
    fmt, n = spec["format"], len(spec["classes"] or "abc")
    if column == "image":
        return draw(st.sampled_from(GOOD[fmt]))
    if column == "mask":
        return draw(st.sampled_from(GOOD_MASKS.get(fmt, GOOD_MASKS["nifti"])))
    if column == "label" and spec["task"] == "multilabel":
        return ";".join(draw(st.lists(st.sampled_from("01"), min_size=n, max_size=n)))
    if column == "label":
        return str(draw(st.integers(0, n - 1)))
    if column == "split":
        return draw(st.sampled_from(SPLITS))
    if column == "id":
        return f"s{row}"
    return draw(st.sampled_from(["p1", "p2", "x"]))


@st.composite
def indexed_dataset(draw) -> tuple[dict, str]:
    """A dataset spec and its index CSV: mostly valid rows with hostile cells, a random
    header, ragged rows, or raw text."""
    spec = draw(DATASETS)
    shape = draw(st.integers(0, 9))
    if shape == 0:
        return spec, draw(st.text(max_size=80))
    target = "mask" if spec["task"] == "segmentation" else "label"
    canonical = ["image", target, "split", "pid", "id"]
    header = (
        draw(st.lists(st.sampled_from(COLUMNS), min_size=1, max_size=6))
        if shape == 1
        else draw(st.permutations(canonical))
    )
    hostility = draw(st.sampled_from([0.0, 0.1, 0.3]))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    for i in range(draw(st.integers(0, 5) if shape == 1 else st.integers(1, 5))):
        row = [
            draw(HOSTILE.get(c, st.text(max_size=4)))
            if draw(st.floats(0, 1)) < hostility
            else _good_cell(draw, c, spec, i)
            for c in header
        ]
        ragged = draw(st.lists(st.text(max_size=2), max_size=1)) if shape == 2 else []
        writer.writerow(row + ragged)
    return spec, out.getvalue()


@FAST
@given(case=indexed_dataset())
def test_any_index_lists_and_loads_or_is_a_bad_input_error(pool, case):
    spec, text = case
    (pool / "index.csv").write_text(text, encoding="utf-8", errors="surrogatepass")
    dims = 2 if spec["format"] == "images" else 3
    ds = Dataset(name="p", path=pool, index="index.csv", dims=dims, **spec)
    try:
        prepared = readers.prepare(ds)
    except FeatstoreError:
        return
    widths = set()
    for s in prepared.samples:
        assert s.split in SPLITS and s.n_items >= 1 and s.id
        top = len(ds.classes) - 1 if ds.classes else MAX_LABEL
        if ds.task == "classification":
            assert len(s.label) == 1 and 0 <= s.label[0] <= top
        elif ds.task == "multilabel":
            assert s.label and set(s.label) <= {0, 1}
            widths.add(len(s.label))
        try:
            got = readers.load(ds, s)
        except FeatstoreError:
            continue
        assert got.image.dtype == np.float32 and got.image.ndim == 4
        assert got.image.shape[0] == s.n_items and np.isfinite(got.image).all()
        if got.mask is not None:
            assert got.mask.dtype == np.uint8 and got.mask.shape == got.image.shape[:3]
            assert not ds.classes or got.mask.max() < len(ds.classes)
    assert len(widths) <= 1
