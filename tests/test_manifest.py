from pathlib import Path

import pytest

from featstore.data.manifest import load_manifest
from featstore.errors import ManifestError

# The example of issue 2, verbatim (long comment lines included).
ISSUE_EXAMPLE = """\
cache: cache/features            # where feature sets live; FEATSTORE_CACHE and --cache override
encoders: [dinov3-vits16]        # preset names, local model folders or hub ids
resolutions: [224]
datasets:
  - name: my-xray
    format: images               # medmnist | images | nifti | dicom | synthetic
    path: data/my-xray           # a folder, or the .npz file for medmnist
    index: labels.csv            # images/nifti/dicom: one row per sample (image, label and/or mask, split)
    task: classification         # classification | multilabel | segmentation
    dims: 2                      # 2 or 3
    modality: XR
    intensity: {mode: minmax}    # or {mode: window, center: 40, width: 400} or {mode: percentile, low: 0.5, high: 99.5}
    splits: {from: column}       # or {ratios: [0.7, 0.1, 0.2], seed: 0}
"""


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "data" / "my-xray").mkdir(parents=True, exist_ok=True)
    (tmp_path / "data" / "my-xray" / "labels.csv").write_text("image,label,split\n")
    path = tmp_path / "m.yaml"
    path.write_text(text)
    return path


def test_issue_example_parses_as_written(tmp_path):
    m = load_manifest(_write(tmp_path, ISSUE_EXAMPLE))
    ds = m.datasets[0]
    assert (ds.name, ds.format, ds.task, ds.dims) == ("my-xray", "images", "classification", 2)
    assert ds.path == tmp_path / "data" / "my-xray"  # relative to the manifest's folder
    assert ds.splits.from_ == "column"
    assert m.cache == tmp_path / "cache" / "features"


def test_cache_override_order(tmp_path, monkeypatch):
    path = _write(tmp_path, ISSUE_EXAMPLE)
    monkeypatch.setenv("FEATSTORE_CACHE", str(tmp_path / "env"))
    assert load_manifest(path).cache == tmp_path / "env"
    assert load_manifest(path, cache=tmp_path / "flag").cache == tmp_path / "flag"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "    modality: XR",
            "    modalty: XR",
            r"dataset 'my-xray', field 'modalty'.*did you mean 'modality'",
        ),
        ("format: images ", "format: jpeg ", r"dataset 'my-xray', field 'format'.*'medmnist'"),
        ("dims: 2 ", "dims: two ", r"dataset 'my-xray', field 'dims'"),
        ("path: data/my-xray ", "path: data/nowhere ", r"dataset 'my-xray', field 'path'.*nowhere"),
        ("{mode: minmax}", "{mode: window, center: 40}", r"field 'intensity'.*width"),
        ("resolutions: [224]", "resolution: [224]", r"did you mean 'resolutions'"),
        ("{from: column}", "{ratios: [0.5, 0.6, 0.2]}", r"field 'splits'.*sum"),
    ],
)
def test_errors_name_dataset_field_and_fix(tmp_path, old, new, expected):
    assert old in ISSUE_EXAMPLE
    with pytest.raises(ManifestError, match=expected):
        load_manifest(_write(tmp_path, ISSUE_EXAMPLE.replace(old, new)))


def test_missing_manifest_and_bad_yaml(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found"):
        load_manifest(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets: [\n")
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_manifest(bad)


def test_shipped_manifest_is_valid():
    m = load_manifest(Path(__file__).resolve().parents[1] / "data_manifest.yaml")
    assert {d.synthetic.kind for d in m.datasets} == {"cls2d", "seg2d", "cls3d", "seg3d", "slides"}


STUDIES = """\
encoders: [dinov3-vits16]
resolutions: [224]
datasets:
  - {name: a, format: synthetic, synthetic: {kind: cls2d}, path: a, task: classification, dims: 2}
  - {name: b, format: synthetic, synthetic: {kind: seg2d}, path: b, task: segmentation, dims: 2}
studies:
  - {name: scaling, datasets: [a], encoders: [dinov3-vits16, dinov3-vitb16], resolutions: [112, 224]}
  - {name: seg, datasets: [b], encoders: [dinov3-vits16], resolutions: [448]}
"""


def test_studies_declare_grids_of_cells(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(STUDIES)
    m = load_manifest(path)
    cells = {(c.dataset.name, c.encoder, c.resolution) for c in m.cells()}
    assert len(cells) == 3 * 2 + 2 * 1  # (2 encoders + pixels) x 2 sizes, (1 + pixels) x 1
    assert ("a", "dinov3-vitb16", 112) in cells and ("a", "pixels", 224) in cells
    assert ("b", "dinov3-vits16", 448) in cells and ("b", "pixels", 448) in cells
    assert {c.dataset.name for c in m.select(study="seg").cells()} == {"b"}
    flags = m.select(encoders=["x"], resolutions=[64]).cells(baseline=False)
    assert {(c.dataset.name, c.encoder, c.resolution) for c in flags} == {
        ("a", "x", 64),
        ("b", "x", 64),
    }
    with pytest.raises(ManifestError, match="no study named 'nope'"):
        m.select(study="nope")
    # with --study, the flags narrow that study's grid (its encoders, its datasets stay)
    narrowed = m.select(study="scaling", resolutions=[64]).cells(baseline=False)
    assert {(c.dataset.name, c.encoder, c.resolution) for c in narrowed} == {
        ("a", "dinov3-vits16", 64),
        ("a", "dinov3-vitb16", 64),
    }
    swapped = m.select(study="seg", encoders=["x"]).cells(baseline=False)
    assert {(c.dataset.name, c.encoder, c.resolution) for c in swapped} == {("b", "x", 448)}
    with pytest.raises(ManifestError, match=r"study 'seg' covers \['b'\], not \['a'\]"):
        m.select(study="seg", datasets=["a"])
    path.write_text(STUDIES.replace("datasets: [b]", "datasets: [c]"))
    with pytest.raises(ManifestError, match=r"study 'seg' names unknown datasets \['c'\]"):
        load_manifest(path)


def test_every_format_has_rules_and_a_reader():
    from typing import get_args

    from featstore.data.readers import READERS
    from featstore.data.settings import FORMATS, Format

    assert set(FORMATS) == set(get_args(Format))
    assert set(READERS) == set(FORMATS) - {"synthetic"}  # synthetic data is written as one


@pytest.mark.parametrize(
    ("fmt", "dims", "expected"),
    [
        ("images", 3, r"format 'images' holds 2D images: set `dims: 2`"),
        ("nifti", 2, r"format 'nifti' holds volumes: set `dims: 3`"),
        ("stack", 2, r"format 'stack' holds one volume per sample.*`dims: 3`"),
    ],
)
def test_format_rules_name_the_dims_to_set(tmp_path, fmt, dims, expected):
    text = ISSUE_EXAMPLE.replace("format: images ", f"format: {fmt} ").replace(
        "dims: 2 ", f"dims: {dims} "
    )
    with pytest.raises(ManifestError, match=expected):
        load_manifest(_write(tmp_path, text))
    no_index = "\n".join(ln for ln in text.splitlines() if "index:" not in ln)
    ok_dims = 2 if fmt == "images" else 3
    with pytest.raises(ManifestError, match=rf"format '{fmt}' needs `index: <file>.csv`"):
        load_manifest(_write(tmp_path, no_index.replace(f"dims: {dims} ", f"dims: {ok_dims} ")))
