"""The real datasets of ../shared/data through manifests/real.yaml (skipped when absent).

Expected counts come from ../shared/data/PROVENANCE.md.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from featstore.data import readers
from featstore.data.manifest import load_manifest


@pytest.fixture(scope="module")
def real(request):
    from conftest import SHARED_DATA

    if not (SHARED_DATA / "PROVENANCE.md").is_file():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (see docs/real-data.md)")
    m = load_manifest(REPO / "manifests" / "real.yaml")
    return {d.name: d for d in m.datasets}


@pytest.mark.parametrize(
    ("name", "splits", "train_classes"),
    [
        ("breastmnist", {"train": 546, "val": 78, "test": 156}, {0: 147, 1: 399}),
        ("pneumoniamnist", {"train": 4708, "val": 524, "test": 624}, {0: 1214, 1: 3494}),
        ("adrenalmnist3d", {"train": 1188, "val": 98, "test": 298}, {0: 929, 1: 259}),
        ("adrenalmnist3d-64", {"train": 1188, "val": 98, "test": 298}, {0: 929, 1: 259}),
    ],
)
def test_medmnist_files_match_provenance(real, name, splits, train_classes):
    ds = real[name]
    samples = readers.list_samples(ds)
    assert Counter(s.split for s in samples) == splits
    assert Counter(s.label[0] for s in samples if s.split == "train") == train_classes
    side = 64 if name.endswith("-64") else 28
    first = readers.load(ds, samples[0]).image
    assert first.shape == ((side, side, side, 1) if ds.dims == 3 else (1, 28, 28, 1))
    if ds.dims == 3:
        assert samples[0].n_items == side
        assert set(np.unique(first)) <= {0.0, 255.0}  # shape masks, per PROVENANCE


def test_hc18_outlines_become_filled_masks(real):
    ds = real["hc18"]
    samples = readers.list_samples(ds)
    assert len(samples) == 100 and samples[0].id == "000_HC"
    assert dict(samples[0].meta) == {"pixel_spacing_mm": "0.0691358041432", "hc_mm": "44.3"}
    assert Counter(s.split for s in samples) == {"train": 60, "val": 20, "test": 20}
    for s in samples[:3]:
        got = readers.load(ds, s)
        assert got.image.shape == (1, 540, 800, 1) and got.mask.shape == (1, 540, 800)
        assert set(np.unique(got.mask)) == {0, 1}
        outline = int((np.asarray(Image.open(s.mask)) > 0).sum())
        assert got.mask.sum() > 10 * outline  # filled, not a 1-pixel ring


def test_hippocampus_volumes_labels_and_grouped_splits(real):
    ds = real["msd-hippocampus"]
    samples = readers.list_samples(ds)
    assert len(samples) == 260
    assert all(s.group == s.id for s in samples)  # one volume per group: none crosses splits
    assert Counter(s.split for s in samples) == {"train": 156, "val": 26, "test": 78}
    for s in samples[:3]:
        got = readers.load(ds, s)
        assert got.mask.shape == got.image.shape[:3] and s.n_items == got.image.shape[0]
        counts = np.bincount(got.mask.ravel(), minlength=3)
        assert set(np.unique(got.mask)) == {0, 1, 2}
        assert 900 < counts[1] < 2700 and 900 < counts[2] < 2300  # PROVENANCE ranges


@pytest.mark.slow
def test_whole_real_manifest_end_to_end(real, tmp_path):
    """extract + probe every real dataset, cold, at the manifest's own resolutions (the
    lowest that serve every task on a CPU: 32 px leaves Hippocampus a 2x2 patch grid)."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    args = ["--manifest", str(REPO / "manifests" / "real.yaml"), "--cache", str(tmp_path / "c")]
    ex = CliRunner().invoke(app, ["extract", *args])
    assert ex.exit_code == 0, ex.output
    pr = CliRunner().invoke(app, ["probe", *args, "--out", str(tmp_path / "r")])
    assert pr.exit_code == 0, pr.output
    # the two Aperio slides (one per class) cannot be probed: that set's only problem
    problems = [ln for ln in pr.output.splitlines() if ln.startswith("problem:")]
    assert problems and all(ln.startswith("problem: wsi-aperio /") for ln in problems), problems
    import pandas as pd

    df = pd.read_csv(tmp_path / "r" / "results.csv")
    assert set(df.dataset) == set(real) - {"wsi-aperio"}
    assert set(df.encoder) == {"dinov3-vits16", "pixels"}
    hippo = df[(df.dataset == "msd-hippocampus") & ~df.encoder.str.startswith("pixels")]
    assert {"dice", "dice:anterior", "dice:posterior"} <= set(hippo.metric)
