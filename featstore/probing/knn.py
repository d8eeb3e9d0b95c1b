"""kNN in bounded memory: query rows in blocks, the train rows streamed past in blocks.

For sets whose features need not fit in memory (`featstore probe --memory-mb N`):
each block of query rows (val, then test) keeps a running top-k of its nearest train
rows while the train rows are read block by block (`x[start:stop]` of a numpy, zarr
or dask array), so the working memory follows `memory_mb`, not the number of items.

It makes the predictions of `probes.knn_probe` (scikit-learn's brute-force
`KNeighborsClassifier`, uniform weights): the same squared Euclidean distance
(`|x|^2 - 2 x.y + |y|^2`, clamped at 0, as scikit-learn's ArgKmin computes it; on
L2-normalised rows for `cosine`), the same votes, and k chosen on val with the same
tie rules. Two things can differ. The last bits of a distance (another BLAS call), so
neighbours that are nearly tied may swap. And exactly tied neighbours (duplicated
rows, blank images) at the k-th place: here the first in train order is kept, while
scikit-learn's choice depends on its heap and its chunking.
No torch.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from featstore.probing.probes import K_GRID, Prediction, check_split

# Working bytes per (query, train) pair of a block: the float64 distance, its int64
# argpartition index, argpartition's own copy of the distances and a comparison's
# bool; and per element of a row: the float64 copy and the norm's temporary square.
BYTES_PER_PAIR = 32
BYTES_PER_ROW_ELEMENT = 24
TRAIN_ROWS_MAX = 1024  # train rows per block: enough for a fast matrix product


@dataclass(frozen=True)
class Plan:
    """Rows per block: train rows streamed at a time, query rows kept at a time."""

    train_rows: int
    query_rows: int


def plan(dim: int, k: int, memory_mb: float, votes: int = 1) -> Plan:
    """Blocks whose working set stays within `memory_mb` (at least one row each).

    A row costs `BYTES_PER_ROW_ELEMENT` per feature; a query also holds its running
    top-k (distances, indices and the merge's candidates) and its neighbours' votes
    (`votes` int64 per neighbour, twice: labels and their sum); a (query, train) pair
    its distance and what partitions it (`BYTES_PER_PAIR`). The train block takes at
    most a quarter of the bound, the query block the rest: few passes over the train
    rows.
    """
    row = BYTES_PER_ROW_ELEMENT * dim
    budget = memory_mb * 1e6
    train = int(max(1, min(TRAIN_ROWS_MAX, budget // (4 * row))))
    per_query = row + BYTES_PER_PAIR * train + 64 * k + 16 * k * votes
    return Plan(train, int(max(1, (budget - train * row) // per_query)))


def _rows(x: Any, start: int, stop: int, cosine: bool) -> np.ndarray:
    """Rows [start, stop) of x as a float64 copy; unit L2 norm for cosine, as
    `probes.l2_normalise` (a zero row stays zero)."""
    block = np.array(x[start:stop], dtype=np.float64)
    if cosine:
        block /= np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
    return block


def _smallest(d: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k smallest values of each row of d (q, t), in no order;
    of values equal to the k-th smallest, the first columns (train order)."""
    if k >= d.shape[1]:
        return np.broadcast_to(np.arange(d.shape[1]), d.shape).copy()
    part = np.argpartition(d, k - 1, axis=1)[:, :k]
    kth = np.take_along_axis(d, part[:, k - 1 : k], 1)
    for r in np.flatnonzero((d <= kth).sum(1) > k):  # a tie straddles the cut: rare
        below, equal = np.flatnonzero(d[r] < kth[r, 0]), np.flatnonzero(d[r] == kth[r, 0])
        part[r] = np.concatenate([below, equal[: k - len(below)]])
    return part


def nearest(train: Any, queries: np.ndarray, k: int, train_rows: int, cosine: bool) -> np.ndarray:
    """Indices (q, k) int64 of the k train rows nearest each query, nearest first (equal
    distances in train order). train: (n, D) array that slices rows (numpy, zarr, dask),
    read `train_rows` at a time; queries: (q, D) float64, already normalised for cosine."""
    n = train.shape[0]
    qn = np.einsum("ij,ij->i", queries, queries)[:, None]
    best_d = np.empty((len(queries), 0))
    best_i = np.empty((len(queries), 0), np.int64)
    for start in range(0, n, train_rows):
        block = _rows(train, start, min(start + train_rows, n), cosine)
        d = queries @ block.T
        d *= -2.0
        d += qn  # in scikit-learn's order: |x|^2 + (-2 x.y), then + |y|^2
        d += np.einsum("ij,ij->i", block, block)
        np.maximum(d, 0.0, out=d)
        cols = _smallest(d, k)
        cand_d = np.concatenate([best_d, np.take_along_axis(d, cols, 1)], 1)
        cand_i = np.concatenate([best_i, cols + start], 1)
        del d
        order = np.lexsort((cand_i, cand_d), axis=1)[:, :k]  # by distance, then train index
        best_d = np.take_along_axis(cand_d, order, 1)
        best_i = np.take_along_axis(cand_i, order, 1)
    return best_i


def _query_blocks(
    x: Any, train: Any, k: int, p: Plan, cosine: bool
) -> Iterator[tuple[int, int, np.ndarray]]:
    """(start, stop, neighbour indices (stop - start, k)) for each block of query rows."""
    for start in range(0, x.shape[0], p.query_rows):
        stop = min(start + p.query_rows, x.shape[0])
        yield start, stop, nearest(train, _rows(x, start, stop, cosine), k, p.train_rows, cosine)


def _counts(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Votes (q, n_classes) int64 of the neighbour labels (q, k) int."""
    q = len(labels)
    flat = (np.arange(q)[:, None] * n_classes + labels).ravel()
    return np.bincount(flat, minlength=q * n_classes).reshape(q, n_classes)


def _best_k(ks: list[int], correct: np.ndarray) -> int:
    """The k with the most correct val predictions, the smallest on ties (as
    `probes.knn_probe`); correct: (len(ks),) int, in the order of ks."""
    return max(ks, key=lambda k: (int(correct[ks.index(k)]), -k))


def _choose_k(
    ks: list[int],
    ytr: np.ndarray,
    yva: np.ndarray,
    val: Iterable[tuple[int, int, np.ndarray]],
    n_classes: int,
    per_label: bool,
) -> tuple[list[int], float]:
    """The k of each label (one k for all unless `per_label`) and the reported param,
    from the val rows' neighbours: (start, stop, indices (stop - start, max(ks)))."""
    multi = ytr.ndim == 2
    # Correct val predictions per k (and per label: the vote of a binary label is 1
    # when more than half the neighbours have it, as scikit-learn's argmax decides).
    correct = np.zeros((len(ks), ytr.shape[1] if multi else 1), np.int64)
    for a, b, idx in val:
        lab = ytr[idx]  # (q, K) or (q, K, L)
        for i, k in enumerate(ks):
            if multi:
                correct[i] += ((2 * lab[:, :k].sum(1) > k) == yva[a:b]).sum(0)
            else:
                correct[i] += (_counts(lab[:, :k], n_classes).argmax(1) == yva[a:b]).sum()
    if multi and per_label:
        varies = [len(np.unique(ytr[:, j])) > 1 for j in range(ytr.shape[1])]
        chosen = [_best_k(ks, correct[:, j]) if v else 0 for j, v in enumerate(varies)]
        param: float = float(np.median([c for c in chosen if c])) if any(varies) else np.nan
        return chosen, param
    chosen = [_best_k(ks, correct.sum(1))] * (ytr.shape[1] if multi else 1)
    return chosen, chosen[0]  # an int param, as `knn_probe` reports it


def _vote(
    ytr: np.ndarray,
    test: Iterable[tuple[int, int, np.ndarray]],
    chosen: list[int],
    n_test: int,
    n_classes: int,
) -> np.ndarray:
    """Class (or label) scores of the test rows from their neighbours' labels."""
    multi = ytr.ndim == 2
    out = np.zeros((n_test, ytr.shape[1] if multi else n_classes))
    for a, b, idx in test:
        lab = ytr[idx]
        if not multi:
            out[a:b] = _counts(lab[:, : chosen[0]], n_classes) / chosen[0]
            continue
        for j, k in enumerate(chosen):  # k 0: a label constant in train keeps its value
            out[a:b, j] = lab[:, :k, j].sum(1) / k if k else float(ytr[0, j])
    return out


def _ks(grid: Sequence[int], n_train: int) -> list[int]:
    return [k for k in grid if k <= n_train] or [n_train]


def knn_blockwise(
    xtr: Any,
    ytr: np.ndarray,
    xva: Any,
    yva: np.ndarray,
    xte: Any,
    n_classes: int,
    grid: Sequence[int] = K_GRID,
    metric: str = "cosine",
    per_label: bool = False,
    memory_mb: float = 256.0,
) -> Prediction:
    """`probes.knn_probe`'s prediction, in blocks that stay within `memory_mb`.

    x*: (n, D) features that slice rows (numpy, zarr or dask; any float dtype, used as
    float64); y*: (n,) int labels or (n, L) multi-hot, in memory. One pass over the
    train rows per block of val rows scores every k of the grid at once; the test
    rows then need only the chosen k. Returns proba (n_test, n_classes) float64, or
    (n_test, L) for multi-hot labels (`per_label`: each label its own k, `param`
    their median).
    """
    for y, s in ((ytr, "train"), (yva, "val")):
        check_split(y, s)
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"unknown kNN metric {metric!r}; use cosine or euclidean")
    t0 = time.perf_counter()
    cosine = metric == "cosine"
    ks = _ks(grid, xtr.shape[0])
    # Votes per neighbour: one per label, or (single label) one, plus the class counts.
    votes = ytr.shape[1] if ytr.ndim == 2 else 1 + -(-n_classes // max(ks))
    p = plan(xtr.shape[1], max(ks), memory_mb, votes)
    val = _query_blocks(xva, xtr, max(ks), p, cosine)
    chosen, param = _choose_k(ks, ytr, yva, val, n_classes, per_label)
    test = _query_blocks(xte, xtr, max(max(chosen), 1), p, cosine)
    out = _vote(ytr, test, chosen, xte.shape[0], n_classes)
    return Prediction(out, param, time.perf_counter() - t0)


def squared_distances(queries: np.ndarray, train: np.ndarray) -> np.ndarray:
    """(q, n) squared Euclidean distances of rows (float64), as `nearest` computes
    them (|x|^2 - 2 x.y + |y|^2, clamped at 0)."""
    d = queries @ train.T
    d *= -2.0
    d += np.einsum("ij,ij->i", queries, queries)[:, None]
    d += np.einsum("ij,ij->i", train, train)
    return np.maximum(d, 0.0, out=d)


def knn_from_distances(
    dva: np.ndarray,
    dte: np.ndarray,
    ytr: np.ndarray,
    yva: np.ndarray,
    n_classes: int,
    grid: Sequence[int] = K_GRID,
    per_label: bool = False,
) -> Prediction:
    """`knn_blockwise`'s prediction from precomputed distances: dva (n_val, n_train)
    and dte (n_test, n_train), e.g. columns of one matrix shared by several train
    subsets (label-efficiency curves). Neighbours, votes and k as `knn_blockwise`."""
    for y, s in ((ytr, "train"), (yva, "val")):
        check_split(y, s)
    t0 = time.perf_counter()
    ks = _ks(grid, dva.shape[1])

    def block(d: np.ndarray, k: int) -> list[tuple[int, int, np.ndarray]]:
        cols = _smallest(d, k)
        near = np.take_along_axis(d, cols, 1)
        order = np.lexsort((cols, near), axis=1)  # by distance, then train index
        return [(0, len(d), np.take_along_axis(cols, order, 1))]

    chosen, param = _choose_k(ks, ytr, yva, block(dva, max(ks)), n_classes, per_label)
    out = _vote(ytr, block(dte, max(max(chosen), 1)), chosen, len(dte), n_classes)
    return Prediction(out, param, time.perf_counter() - t0)
