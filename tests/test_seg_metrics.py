"""Segmentation and classification metrics of the seed protocol: HD95 (against a
brute-force computation and known distances, anisotropic spacing included),
precision/recall, and the spacing of the stored mask grid."""

from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scipy.spatial.distance import cdist
from sklearn import metrics as skm

from featstore.data import native
from featstore.data.manifest import Dataset
from featstore.data.nifti import load_nifti
from featstore.data.readers import Sample
from featstore.probing import geometry
from featstore.probing.metrics import classification_scores, hd95, precision_recall
from featstore.store import schema


def _boundary_points(mask: np.ndarray) -> np.ndarray:
    """Indices of mask voxels with a face neighbour outside the mask or off the array,
    found by explicit neighbour checks (no morphology, no distance transform)."""
    pts = []
    for ix in zip(*np.nonzero(mask), strict=True):
        for axis, step in itertools.product(range(mask.ndim), (-1, 1)):
            nb = list(ix)
            nb[axis] += step
            if not 0 <= nb[axis] < mask.shape[axis] or not mask[tuple(nb)]:
                pts.append(ix)
                break
    return np.asarray(pts, float)


def _brute_hd95(pred: np.ndarray, truth: np.ndarray, spacing) -> float:
    bp = _boundary_points(pred) * np.asarray(spacing)
    bt = _boundary_points(truth) * np.asarray(spacing)
    d = cdist(bp, bt)
    return float(max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95)))


def _blobs(shape, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(float)
    out = np.zeros(shape, bool)
    for _ in range(2):
        centre = rng.uniform(2, np.asarray(shape) - 2)
        radius = rng.uniform(1.5, 4)
        out |= ((grid - centre.reshape(-1, *[1] * len(shape))) ** 2).sum(0) <= radius**2
    return out


@pytest.mark.parametrize(
    ("shape", "spacing"),
    [((24, 20), (1.0, 1.0)), ((24, 20), (2.0, 0.5)), ((8, 16, 14), (3.0, 0.7, 1.1))],
)
def test_hd95_matches_brute_force(shape, spacing):
    for seed in range(4):
        pred, truth = _blobs(shape, seed), _blobs(shape, seed + 100)
        assert hd95(pred, truth, spacing) == pytest.approx(_brute_hd95(pred, truth, spacing))


def test_hd95_known_distances_and_anisotropy():
    a = np.zeros((20, 12), bool)
    a[2:5, 3:6] = True  # a 3x3 square; its ring is 8 boundary pixels
    for k in (3, 5, 9):
        b = np.roll(a, k, axis=0)  # shifted k rows: 3 of 8 ring points lie exactly k away
        assert hd95(a, b) == pytest.approx(k)
        assert hd95(a, b, (2.5, 1.0)) == pytest.approx(2.5 * k)  # row spacing 2.5 mm
        assert hd95(a, b, (1.0, 4.0)) == pytest.approx(k)  # column spacing is irrelevant
    p = np.zeros((10, 10), bool)
    t = np.zeros((10, 10), bool)
    p[2, 3], t[5, 7] = True, True  # single pixels: a 3-4-5 triangle
    assert hd95(p, t) == pytest.approx(5.0)
    assert hd95(p, t, (2.0, 0.5)) == pytest.approx(np.hypot(6.0, 2.0))
    v, w = np.zeros((6, 5, 5), bool), np.zeros((6, 5, 5), bool)
    v[1, 2, 3], w[3, 2, 3] = True, True  # two slices apart, 2.5 mm slices
    assert hd95(v, w, (2.5, 0.8, 0.8)) == pytest.approx(5.0)
    assert hd95(a, a, (2.0, 3.0)) == 0.0


def test_hd95_empty_masks():
    empty = np.zeros((11, 21), bool)
    full = empty.copy()
    full[3:6, 4:9] = True
    assert np.isnan(hd95(empty, empty))  # nothing to score: left out of means
    diag = np.hypot(10 * 2.0, 20 * 0.5)  # the grid's diagonal, in mm
    assert hd95(empty, full, (2.0, 0.5)) == pytest.approx(diag)
    assert hd95(full, empty, (2.0, 0.5)) == pytest.approx(diag)
    with pytest.raises(ValueError, match="spacing"):
        hd95(full, full, (1.0, 1.0, 1.0))


def test_segmentation_precision_recall():
    truth = np.zeros((2, 8, 8), np.uint8)
    pred = np.zeros_like(truth)
    truth[0, :4, :4] = 1  # 16 px
    pred[0, :4, :2] = 1  # 8 px, all inside the truth
    pred[0, 6:, 6:] = 1  # 4 px outside
    pred[1, 0, 0] = 2  # class 2 only predicted
    prec, rec = precision_recall(pred, truth, 4)
    assert prec[0] == pytest.approx(8 / 12) and rec[0] == pytest.approx(8 / 16)
    assert prec[1] == 0.0 and rec[1] == 0.0  # hallucinated structure
    assert np.isnan(prec[2]) and np.isnan(rec[2])  # absent on both sides


def test_classification_precision_recall_are_macro():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    proba = rng.dirichlet(np.ones(3), 200) + np.eye(3)[y] * 0.3
    s = classification_scores(y, proba)
    pred = proba.argmax(1)
    assert s["precision"] == pytest.approx(skm.precision_score(y, pred, average="macro"))
    assert s["recall"] == pytest.approx(skm.recall_score(y, pred, average="macro"))
    multi = (rng.random((200, 4)) < 0.4).astype(int)
    mp = np.clip(multi * 0.6 + rng.random((200, 4)) * 0.5, 0, 1)
    s = classification_scores(multi, mp)
    assert s["precision"] == pytest.approx(
        skm.precision_score(multi, mp >= 0.5, average="macro", zero_division=0)
    )
    assert s["recall"] == pytest.approx(skm.recall_score(multi, mp >= 0.5, average="macro"))


def _dataset(tmp_path, fmt: str, dims: int) -> Dataset:
    return Dataset.model_validate(
        {
            "name": "d",
            "format": fmt,
            "path": str(tmp_path),
            "index": "index.csv",
            "task": "segmentation",
            "dims": dims,
        }
    )


def _coords(table: list[native.Native], n_items: list[int]) -> dict[str, np.ndarray]:
    """The NATIVE coordinates extraction writes, for samples of `n_items` items each."""
    rows = [n for n, k in zip(table, n_items, strict=True) for _ in range(k)]
    columns = (
        [n.rows for n in rows],
        [n.cols for n in rows],
        *([n.spacing[a] for n in rows] for a in range(3)),
    )
    return {name: np.asarray(c) for name, c in zip(schema.NATIVE, columns, strict=True)}


def test_grid_spacing_from_a_nifti_header_follows_the_readers_axes(tmp_path):
    # Input axis 0 lies along z (0.8 mm), axis 1 along x (0.9 mm), axis 2 along y (2.5 mm).
    affine = np.array([[0, 0.9, 0, 0], [0, 0, 2.5, 0], [0.8, 0, 0, 0], [0, 0, 0, 1.0]])
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 40, 30), np.float32), affine), path)
    slices = load_nifti(path, "axial")  # what extract sees: (slices, rows, cols)
    assert slices.shape == (10, 40, 30)
    ds = _dataset(tmp_path, "nifti", 3)
    found = native.native(ds, Sample("v", "test", (), 10, str(path)))
    assert (found.rows, found.cols) == (40, 30)
    assert found.spacing == pytest.approx((0.8, 0.9, 2.5))
    coords = _coords([found], [10])
    got = geometry.grid_spacing(3, coords, np.array(["v"] * 10), 32, "resize")
    assert got == {"v": pytest.approx((0.8, 0.9 * 40 / 32, 2.5 * 30 / 32))}
    # a per-item coordinate overrides the header's in-plane spacing
    coords["spacing_mm"] = np.full(10, 0.5)
    got = geometry.grid_spacing(3, coords, np.array(["v"] * 10), 32, "resize")
    assert got == {"v": pytest.approx((0.8, 0.5 * 40 / 32, 0.5 * 30 / 32))}


def test_grid_spacing_of_2d_images_needs_a_coordinate(tmp_path):
    Image.fromarray(np.zeros((40, 30), np.uint8)).save(tmp_path / "a.png")  # H 40, W 30
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "b.png")
    ds = _dataset(tmp_path, "images", 2)
    samples = [Sample(n, "test", (), 1, str(tmp_path / f"{n}.png")) for n in "ab"]
    table = native.native_table(ds, samples)
    assert [(n.rows, n.cols) for n in table] == [(40, 30), (20, 20)]
    assert all(np.isnan(n.spacing).all() for n in table)  # a PNG states no spacing
    coords = _coords(table, [1, 1])
    ids = np.array(["a", "b"])
    assert geometry.grid_spacing(2, coords, ids, 32, "resize") is None  # pixels
    coords["pixel_spacing_mm"] = np.array([0.2, 0.1])
    got = geometry.grid_spacing(2, coords, ids, 32, "resize")
    assert got == {
        "a": pytest.approx((0.2 * 40 / 32, 0.2 * 30 / 32)),
        "b": pytest.approx((0.1 * 20 / 32, 0.1 * 20 / 32)),
    }
    padded = geometry.grid_spacing(2, coords, ids, 32, "pad")
    assert padded is not None and padded["b"] == pytest.approx((0.1, 0.1))  # not resampled
    coords["pixel_spacing_mm"] = np.array([0.2, np.nan])  # one unknown: the set in pixels
    assert geometry.grid_spacing(2, coords, ids, 32, "resize") is None
