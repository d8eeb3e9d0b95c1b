"""A linear segmentation head trained in bounded memory, streaming over the patch chunks.

For sets whose training patches do not fit in memory: two passes over `patch` in
blocks of at most `memory_mb` (the running mean/variance of every channel, then
mini-batch SGD on the logistic loss with `partial_fit`), so peak memory depends on
the block size and not on the number of items. No torch; scikit-learn only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import SGDClassifier
from sklearn.preprocessing import StandardScaler

from featstore.probing.probes import boundary_probability, linear_logits, upsample_logits

# Reads items [start, stop) of patch (n, rows, cols, D) and mask (n, H, W) as numpy.
Reader = Callable[[int, int], tuple[np.ndarray, np.ndarray]]


# Bytes held per token element while a block is fitted: the float32 read, its scaled
# copy, and scikit-learn's float64 copy of the shuffled block (measured with
# benchmarks/seg_memory.py).
BYTES_PER_ELEMENT = 32


def blocks(n_items: int, item_elements: int, memory_mb: float) -> Iterator[tuple[int, int]]:
    """(start, stop) item ranges whose fitting stays within `memory_mb` (>= 1 item)."""
    step = max(1, int(memory_mb * 1e6 // max(1, item_elements * BYTES_PER_ELEMENT)))
    for start in range(0, n_items, step):
        yield start, min(start + step, n_items)


@dataclass(frozen=True)
class StreamedHead:
    """Scaler and SGD logistic head on patch tokens; predicts per-patch class scores."""

    scaler: StandardScaler
    model: SGDClassifier
    n_classes: int
    param: float = 1e-4  # the SGD L2 penalty (alpha)
    seconds: float = 0.0

    def predict(self, patch: np.ndarray, size: int) -> np.ndarray:
        """patch (n, rows, cols, D) -> label maps (n, size, size) uint8 (bilinear logits)."""
        return upsample_logits(self.logits(patch), size).argmax(-1).astype(np.uint8)

    def boundary(self, patch: np.ndarray, size: int) -> np.ndarray:
        """patch (n, rows, cols, D) -> (n, size, size) float32, the probability of
        class 1 (instance datasets; `probes.boundary_probability`)."""
        return boundary_probability(upsample_logits(self.logits(patch), size))

    def logits(self, patch: np.ndarray) -> np.ndarray:
        """patch (n, rows, cols, D) -> (n, rows, cols, K) float32 scores (`linear_logits`)."""
        n, r, c, d = patch.shape
        flat = self.scaler.transform(patch.reshape(-1, d).astype(np.float32))
        return linear_logits(self.model, flat, self.n_classes).reshape(n, r, c, self.n_classes)


def fit_streaming(
    read: Reader,
    n_items: int,
    item_elements: int,
    targets: Callable[[np.ndarray], np.ndarray],
    n_classes: int,
    memory_mb: float = 256.0,
    epochs: int = 2,
    seed: int = 0,
) -> StreamedHead:
    """Fit on every training patch, `memory_mb` of float32 tokens at a time.

    Args:
        read: items [start, stop) -> (patch (n, rows, cols, D), mask (n, H, W) uint8).
        item_elements: elements of one item's patch tokens (rows * cols * D).
        memory_mb: the bound on what a block holds while it is fitted.
        targets: mask (n, H, W) -> per-patch class ids (n, rows, cols).
    """
    t0 = time.perf_counter()
    scaler = StandardScaler()
    for start, stop in blocks(n_items, item_elements, memory_mb):
        patch, _ = read(start, stop)
        scaler.partial_fit(patch.reshape(-1, patch.shape[-1]).astype(np.float32))
    model = SGDClassifier(loss="log_loss", alpha=1e-4, random_state=seed)
    classes = np.arange(n_classes)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        for start, stop in blocks(n_items, item_elements, memory_mb):
            patch, mask = read(start, stop)
            x = scaler.transform(patch.reshape(-1, patch.shape[-1]).astype(np.float32))
            y = targets(mask).reshape(-1)
            order = rng.permutation(len(y))
            model.partial_fit(x[order], y[order], classes=classes)
    return StreamedHead(scaler, model, n_classes, 1e-4, time.perf_counter() - t0)
