"""Label-efficiency curves of one feature set: the probes refitted on nested,
stratified parts of the train split (`featstore.probing.subsets`), `repeats` times.

Every point gives the raw rows of each repeat (`repeat` 0, 1, ...) and one row of
their mean (`repeat` = `MEAN_OF_REPEATS`): the mean over repeats, `std` their
spread, and the bootstrap interval of the pooled predictions (each resample of the
test units scores every repeat's predictions of them; the interval is that of the
mean). The full train split is one point for every repeat, so it is fitted once:
it is the ordinary probe, whose rows are the curve's rows at fraction 1.

Features are read once per set; for kNN the distances from the val and test rows to
every train row are computed once and shared by every subset (exact: a subset's
distances are columns of that matrix). Standardisation is not shared: a subset's
mean and variance are its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from featstore.data.manifest import Dataset, Manifest
from featstore.data.settings import LabelEfficiency
from featstore.errors import ProbeError
from featstore.probing import bootstrap, classification, probes
from featstore.probing.classification import ClassArrays
from featstore.probing.items import item_str, volume_items
from featstore.probing.knn import knn_from_distances, squared_distances
from featstore.probing.options import ProbeOptions
from featstore.probing.rows import (
    MEAN_OF_REPEATS,
    Fitted,
    Outcome,
    ResultRow,
    SetColumns,
    result_rows,
)
from featstore.probing.segmentation import SegSet, probe_segmentation
from featstore.probing.subsets import Point, SkippedPoint, draw, group_order, strata

# The most the shared kNN distance matrices may hold; beyond it (or with a memory
# bound, or ABMIL's per-subset pooling) each subset runs its own kNN.
SHARED_BYTES = 512e6


def manifest_curve(manifest: Manifest, ds: Dataset) -> LabelEfficiency | None:
    """`label_efficiency:` of `ds`, else of the first study over it that has one."""
    if ds.label_efficiency is not None:
        return ds.label_efficiency
    for study in manifest.studies:
        if (not study.datasets or ds.name in study.datasets) and study.label_efficiency:
            return study.label_efficiency
    return None


def points(le: LabelEfficiency) -> list[Point]:
    """The curve's points: its fractions, then its shots (each sorted)."""
    return [Point(fraction=f) for f in le.fractions] + [Point(shots=k) for k in le.shots]


@dataclass
class Curve:
    """The rows of a set's curve, and the points that could not be drawn (why)."""

    rows: list[ResultRow] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def at_point(
    rows: Sequence[ResultRow], point: Point, repeat: int, spread: Mapping[str, float] | None = None
) -> list[ResultRow]:
    """`rows` with the columns that say which point and repeat they are (and, for a
    mean row, the spread of each metric across repeats)."""
    fraction = float("nan") if point.fraction is None else point.fraction
    return [
        replace(
            r,
            train_fraction=fraction,
            shots=point.shots or 0,
            repeat=repeat,
            std=r.std if spread is None else spread[r.metric],
        )
        for r in rows
    ]


def mean_rows(where: SetColumns, point: Point, outs: Sequence[Outcome]) -> list[ResultRow]:
    """One row per probe and metric: the mean over the repeats `outs`, their std, and
    the bootstrap interval of the pooled predictions."""
    rows: list[ResultRow] = []
    for i, first in enumerate(outs[0].fitted):
        fits = [o.fitted[i] for o in outs]
        pooled = bootstrap.pooled([dict(o.draws[first.probe]) for o in outs])
        mean = Fitted(
            first.probe,
            bootstrap.intervals(pooled),
            first.param_name,
            float(np.median([f.param for f in fits])),
            sum(f.seconds for f in fits),
            round(float(np.mean([f.n_train for f in fits]))),
            first.n_val,
            first.n_test,
            first.units,
        )
        spread = {m: float(np.std([f.scores[m][0] for f in fits])) for m in first.scores}
        rows += at_point(result_rows(where, mean), point, MEAN_OF_REPEATS, spread)
    return rows


def run_curve(
    where: SetColumns,
    le: LabelEfficiency,
    stratum: np.ndarray,
    group: np.ndarray,
    fit: Callable[[np.ndarray], Outcome],
    full: Outcome,
) -> Curve:
    """Fit every point of `le` (`fit`: training units -> Outcome) on `repeats` draws.

    stratum, group: (n,) of the training units; full: the ordinary probe's Outcome,
    the point at fraction 1. A point that cannot be drawn, or whose subset a probe
    refuses (a `ProbeError`), is skipped with its reason; the others still run.
    """
    out = Curve()
    orders = [group_order(stratum, group, r) for r in range(le.repeats)]
    # The ordinary probe's rows are the full point's repeat 0: add their mean row.
    out.rows += mean_rows(where, Point(fraction=1.0), [full])
    for point in points(le):
        if point.full:
            continue
        outs, rows = [], []
        try:
            for r, order in enumerate(orders):
                outs.append(fit(draw(order, point)))
                found = [row for f in outs[-1].fitted for row in result_rows(where, f)]
                rows += at_point(found, point, r)
        except ProbeError as exc:  # SkippedPoint, or a probe that refuses the subset
            kind = "" if isinstance(exc, SkippedPoint) else f"{point}, repeat {len(outs)}: "
            out.skipped.append(
                f"{where.dataset} / {where.encoder} @ {where.resolution}px: skipped {kind}{exc}"
            )
            continue
        out.rows += rows + mean_rows(where, point, outs)
    return out


class Distances:
    """Squared distances from the val and test rows to every train row, computed once;
    `knn(rows)` is `knn_blockwise`'s prediction for the train rows `rows`."""

    def __init__(self, a: ClassArrays, opts: ProbeOptions) -> None:
        self.a, (self.grid, metric, self.per_label) = a, classification.knn_settings(opts)
        x = a.x.astype(np.float64)
        if metric == "cosine":
            x = probes.l2_normalise(x)
        self.train = a.part("train")
        t, v, e = (x[a.part(s)] for s in ("train", "val", "test"))
        self.dva, self.dte = squared_distances(v, t), squared_distances(e, t)

    def knn(self, rows: np.ndarray) -> probes.Prediction:
        pos = np.searchsorted(self.train, rows)
        a = self.a
        return knn_from_distances(
            self.dva[:, pos],
            self.dte[:, pos],
            a.y[rows],
            a.y[a.part("val")],
            a.n_classes,
            self.grid,
            self.per_label,
        )


def class_curve(
    a: ClassArrays, opts: ProbeOptions, le: LabelEfficiency, where: SetColumns, full: Outcome
) -> Curve:
    """The curve of a classification set; units are images (2D) or volumes (3D)."""
    train = a.part("train")
    pairs = len(train) * (len(a.part("val")) + len(a.part("test")))
    share = a.bags is None and opts.memory_mb is None and pairs * 8 <= SHARED_BYTES
    shared = Distances(a, opts) if share else None  # else each subset's kNN on its own

    def fit(units: np.ndarray) -> Outcome:
        rows = train[units]
        knn = shared.knn if shared is not None else None
        return classification.outcome(
            a, classification.predict(a, opts, rows, knn), opts.seed, rows
        )

    stratum = strata(a.y[train], len(train))
    return run_curve(where, le, stratum, a.group[train], fit, full)


def seg_curve(
    s: SegSet, opts: ProbeOptions, le: LabelEfficiency, where: SetColumns, full: Outcome
) -> Curve:
    """The curve of a segmentation set; units are training images (2D) or volumes
    (3D), drawn unstratified, whole patients at a time where the set has them."""
    train = s.idx["train"]
    vols = volume_items(s.sample[train], np.asarray(s.xs.slice.values)[train])
    first = train[[v[0] for v in vols]]
    group = item_str(s.xs.patient)[first] if "patient" in s.xs.coords else s.sample[first]

    def fit(units: np.ndarray) -> Outcome:
        items = np.sort(np.concatenate([train[vols[u]] for u in units]))
        return probe_segmentation(s.with_train(items), opts)[0]

    return run_curve(where, le, strata(None, len(vols)), group, fit, full)
