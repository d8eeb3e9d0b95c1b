"""Blockwise kNN (`featstore.probing.knn`): the in-memory kNN's predictions, in bounded memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import zarr
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

from featstore.probing import probes
from featstore.probing.knn import knn_blockwise, nearest, plan


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """As `evaluation.probe_set` runs the probes: on a shared CPU, OpenBLAS threads
    spin-wait, and these small products run several times slower."""
    with threadpool_limits(limits=1):
        yield


def _blobs(n: int, k: int, d: int, seed: int):
    """Continuous features (exact distance ties have probability 0), classes in front."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    return rng.normal(size=(n, d)) + np.eye(k, d)[y], y


def _splits(d: int = 16, k: int = 4):
    return [_blobs(n, k, d, s) for n, s in ((700, 0), (150, 1), (200, 2))]


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("memory_mb", [0.02, 1.0, 256.0])  # 6 x 17 rows a block .. one block
def test_blockwise_knn_equals_in_memory_knn(metric, memory_mb):
    (xtr, ytr), (xva, yva), (xte, _) = _splits()
    ref = probes.knn_probe(xtr, ytr, xva, yva, xte, 4, metric=metric)
    got = knn_blockwise(xtr, ytr, xva, yva, xte, 4, metric=metric, memory_mb=memory_mb)
    assert got.param == ref.param
    np.testing.assert_array_equal(got.proba, ref.proba)


def test_every_k_of_the_grid_is_chosen_as_in_memory():
    """The val pass scores all k at once; each grid, and k larger than the train split."""
    (xtr, ytr), (xva, yva), (xte, _) = _splits()
    for grid in [(1,), (3, 7), (5, 50), (1000,)]:
        ref = probes.knn_probe(xtr, ytr, xva, yva, xte, 4, grid=grid)
        got = knn_blockwise(xtr, ytr, xva, yva, xte, 4, grid=grid, memory_mb=0.05)
        assert got.param == ref.param
        np.testing.assert_array_equal(got.proba, ref.proba)


@pytest.mark.parametrize("per_label", [False, True])
def test_blockwise_knn_multilabel_equals_in_memory(per_label):
    (xtr, ytr), (xva, yva), (xte, _) = _splits()
    multi = [
        np.stack([y == 0, y == 1, (y == 2) | (y == 3), y < 0], 1).astype(int) for y in (ytr, yva)
    ]
    ref = probes.knn_probe(xtr, multi[0], xva, multi[1], xte, 4, per_label=per_label)
    got = knn_blockwise(xtr, multi[0], xva, multi[1], xte, 4, per_label=per_label, memory_mb=0.05)
    assert got.param == ref.param  # label 3 is never on: a constant score, no k
    np.testing.assert_array_equal(got.proba, ref.proba)


def test_exact_ties_at_the_kth_place_keep_train_order():
    """Small integer features: every distance is exact, so ties are certain."""
    rng = np.random.default_rng(0)
    train = np.repeat(rng.integers(0, 3, (50, 8)), 4, 0).astype(np.float64)  # each row 4x
    queries = rng.integers(0, 3, (20, 8)).astype(np.float64)
    got = nearest(train, queries, 6, train_rows=7, cosine=False)  # copies straddle blocks
    d = ((queries[:, None] - train[None]) ** 2).sum(-1)
    want = np.stack([np.lexsort((np.arange(len(train)), r))[:6] for r in d])
    np.testing.assert_array_equal(got, want)


def _peak_mb(x, y, xva, yva, xte) -> tuple[float, np.ndarray]:
    tracemalloc.start()
    got = knn_blockwise(x, y, xva, yva, xte, 5, memory_mb=1.0)
    peak = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    return peak, got.proba


def test_train_rows_stream_from_zarr_in_bounded_memory(tmp_path):
    """Peak traced memory stays under the bound and does not grow with the train rows.

    Independence is measured on a float16 numpy source: a zarr source adds the cyclic
    garbage of zarr's asyncio reads (~0.4 KB a chunk until the collector runs)."""
    (_, _), (xva, yva), (xte, _) = _splits(d=32, k=5)
    assert plan(32, 50, 1.0).query_rows < len(xva)  # several query blocks, several passes
    peaks = []
    for n in (2000, 8000):
        x, y = _blobs(n, 5, 32, 0)
        z = zarr.create_array(tmp_path / f"x{n}", shape=x.shape, chunks=(500, 32), dtype="f2")
        z[:] = x.astype(np.float16)
        peak, proba = _peak_mb(z, y, xva, yva, xte)
        assert peak < 1.0, peak
        ref = probes.knn_probe(z[:].astype(np.float64), y, xva, yva, xte, 5)
        np.testing.assert_array_equal(proba, ref.proba)
        peaks.append(_peak_mb(z[:], y, xva, yva, xte)[0])
    assert peaks[1] < 1.05 * peaks[0], peaks
