"""Nearest neighbours in a set's CLS space: L2-normalised cosine, exact, in numpy.

The index is the set's (n, D) CLS matrix, normalised once (float32, n x D x 4 bytes:
the one copy the server keeps). A query is one matrix-vector product and a partial
sort, O(n D): about 10 ms for 100,000 x 384 (benchmarks/serve_neighbours.py), so no
approximate index (faiss) is needed at the sizes one machine serves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Neighbour:
    """One neighbour: its item index and cosine similarity to the query."""

    item: int
    similarity: float


class Index:
    """Cosine neighbours of the rows of `vectors` (n, D) float; rows where `usable` is
    False (a damaged chunk, a skipped sample) are never returned nor queried."""

    def __init__(self, vectors: np.ndarray, usable: np.ndarray | None = None) -> None:
        x = np.asarray(vectors, np.float32)
        if x.ndim != 2:
            raise ValueError(f"vectors must be (n, D), not {x.shape}")
        self.usable = np.ones(len(x), bool) if usable is None else np.asarray(usable, bool)
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        self.usable = self.usable & (norm[:, 0] > 0) & np.isfinite(norm[:, 0])
        with np.errstate(invalid="ignore", divide="ignore"):
            x /= np.where(norm > 0, norm, 1)  # in place: no second (n, D) copy
        x[~self.usable] = 0
        self.unit = x

    @property
    def nbytes(self) -> int:
        return int(self.unit.nbytes + self.usable.nbytes)

    def query(self, item: int, k: int) -> list[Neighbour]:
        """The `k` most similar usable items to `item` (itself left out), best first;
        ties broken by the lower item index. ValueError for an unusable `item`."""
        if not self.usable[item]:
            raise ValueError(f"item {item} has no readable CLS token")
        sim = self.unit @ self.unit[item]
        sim[~self.usable] = -np.inf
        sim[item] = -np.inf
        k = min(k, int(self.usable.sum()) - 1)
        if k <= 0:
            return []
        top = np.argpartition(-sim, k - 1)[:k]
        order = np.lexsort((top, -sim[top]))
        return [Neighbour(int(top[j]), float(sim[top[j]])) for j in order]
