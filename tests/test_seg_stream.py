"""Segmentation scored a block of whole volumes at a time (`segmentation.score_volumes`):
the scores of the whole-array path, for the same fitted head, in bounded memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import zarr

from featstore.probing.probes import patch_targets
from featstore.probing.segscores import score_volumes, seg_scores
from featstore.probing.streaming import StreamedHead, fit_streaming

R, D, H, K = 4, 8, 16, 3  # 4x4 patch grid of 8 channels, 16 px masks, 3 classes


def _items(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens whose first channels carry the class of their patch, and its masks."""
    rng = np.random.default_rng(seed)
    cls = rng.integers(0, K, (n, R, R))
    patch = rng.normal(size=(n, R, R, D)) + 2.0 * np.eye(K, D)[cls]
    mask = np.repeat(np.repeat(cls, H // R, 1), H // R, 2).astype(np.uint8)
    mask[:, :2] = 0  # pixels that disagree with their patch: imperfect predictions
    return patch.astype(np.float16), mask


def _store(tmp_path, patch: np.ndarray, mask: np.ndarray):
    """A real Zarr group, chunked by 5 items, read by (unsorted) item indices."""
    root = zarr.open_group(tmp_path / "set.zarr", mode="w")
    zp = root.create_array("patch", shape=patch.shape, chunks=(5, R, R, D), dtype="f2")
    zm = root.create_array("mask", shape=mask.shape, chunks=(5, H, H), dtype="u1")
    zp[:], zm[:] = patch, mask
    return lambda items: (zp.oindex[items], zm.oindex[items])


@pytest.fixture(scope="module")
def head() -> StreamedHead:
    patch, mask = _items(60, 0)
    return fit_streaming(
        lambda a, b: (patch[a:b], mask[a:b]),
        len(patch),
        R * R * D,
        lambda m: patch_targets(m, R, R, K),
        K,
        memory_mb=0.05,
    )


def test_streamed_scores_equal_whole_array_scores(tmp_path, head):
    patch, mask = _items(30, 1)
    lengths = [1, 4, 7, 2, 5, 1, 6, 4]  # volumes of 1..7 slices
    order = np.random.default_rng(2).permutation(30)  # slices scattered over the store
    cuts = np.cumsum(lengths)[:-1]
    vols = np.split(order, cuts)
    ids = [f"v{i}" for i in range(len(vols))]
    spacing = {v: (2.5, 0.8, 0.8) for v in ids}
    names = ["a", "b"]
    te = np.concatenate(vols)
    whole = seg_scores(
        head.predict(patch[te], H), mask[te], np.repeat(ids, lengths), names, spacing, 0
    )
    read = _store(tmp_path, patch, mask)
    for max_items in (1, 6, 256):  # every volume alone; a few per block; one block
        got, ex = score_volumes(
            lambda p, _: head.predict(p, H), read, vols, ids, names, spacing, 0, max_items
        )
        np.testing.assert_equal(got, whole)
        assert 0.2 < got["dice"][0] < 1.0  # neither trivial nor perfect
        most = [int(v[np.argmax((mask[v] > 0).sum((1, 2)))]) for v in vols[:3]]
        assert ex.item.tolist() == most  # each of the first 3 volumes: its fullest slice
        np.testing.assert_array_equal(ex.pred, head.predict(patch[ex.item], H))
        np.testing.assert_array_equal(ex.truth, mask[ex.item])


def test_streamed_scoring_memory_does_not_grow_with_the_test_split(head):
    """Peak traced memory at 8 images a block, for 24 and for 192 test images: holding
    every image's tokens, prediction and truth would add 168 x 768 B = 129 KB; each
    image's scores add 80 B (the bootstrap's draws, ~0.8 MB, do not grow)."""
    peaks = []
    for n in (24, 192):
        patch, mask = _items(n, 3)
        vols = [np.array([i]) for i in range(n)]
        ids = [f"i{i}" for i in range(n)]
        tracemalloc.start()
        score_volumes(
            lambda p, _: head.predict(p, H),
            lambda items, patch=patch, mask=mask: (patch[items], mask[items]),
            vols,
            ids,
            ["a", "b"],
            None,
            0,
            max_items=8,
        )
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] - peaks[0] < 64e3, peaks
