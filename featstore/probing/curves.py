"""Label-efficiency curves of one feature set: the probes refitted on nested,
stratified parts of the train split (`featstore.probing.subsets`), `repeats` times.

Every point gives the raw rows of each repeat (`repeat` 0, 1, ...) and one row of
their mean (`repeat` = `MEAN_OF_REPEATS`): the mean over repeats, `std` their
spread, and the bootstrap interval of the pooled predictions (each resample of the
test units scores every repeat's predictions of them; the interval is that of the
mean). The full train split is one point for every repeat, so it is fitted once:
it is the ordinary probe, whose rows are the curve's rows at fraction 1. Every other
point's repeat keeps its test predictions (`predictions.Key.file_name`: `-f<fraction>
-r<repeat>` or `-n<shots>-r<repeat>`); the mean rows have none.

Features are read once per set; for kNN the distances from the val and test rows to
every train row are computed once and shared by every subset (exact: a subset's
distances are columns of that matrix). Standardisation is not shared: a subset's
mean and variance are its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import cast

import numpy as np

from featstore.data.manifest import Dataset, Manifest
from featstore.data.settings import LabelEfficiency
from featstore.errors import ProbeError
from featstore.probing import bootstrap, classification, probes
from featstore.probing.classification import ClassArrays
from featstore.probing.items import item_str, volume_items
from featstore.probing.knn import knn_from_distances, squared_distances
from featstore.probing.options import ProbeOptions
from featstore.probing.predictions import Predictions, Task, set_key
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
    """The rows of a set's curve, the test predictions of each point's repeats, and the
    points that could not be drawn (why)."""

    rows: list[ResultRow] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    predictions: list[Predictions] = field(default_factory=list)


@dataclass(frozen=True)
class Spread:
    """A metric's spread across the fits a mean row averages (repeats or seeds)."""

    std: float  # population std
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        v = np.asarray(values, np.float64)
        return cls(float(np.std(v)), float(np.min(v)), float(np.max(v)))


def spread_of(fits: Sequence[Fitted]) -> dict[str, Spread]:
    """Each metric's `Spread` over the values (draw 0) of `fits`, one probe's fits."""
    return {m: Spread.of([f.scores[m][0] for f in fits]) for m in fits[0].scores}


def with_spread(rows: Sequence[ResultRow], spread: Mapping[str, Spread]) -> list[ResultRow]:
    """Mean rows with each metric's spread (`std`, `value_min`, `value_max`)."""
    return [
        replace(
            r,
            std=spread[r.metric].std,
            value_min=spread[r.metric].low,
            value_max=spread[r.metric].high,
        )
        for r in rows
    ]


def at_point(rows: Sequence[ResultRow], point: Point, repeat: int) -> list[ResultRow]:
    """`rows` with the columns that say which point and repeat they are."""
    fraction = float("nan") if point.fraction is None else point.fraction
    shots = point.shots or 0
    return [replace(r, train_fraction=fraction, shots=shots, repeat=repeat) for r in rows]


def point_predictions(found: Outcome, point: Point, repeat: int) -> list[Predictions]:
    """The test predictions of one fit of a point, keyed by that point and repeat."""
    fraction = float("nan") if point.fraction is None else point.fraction
    shots = point.shots or 0
    return [
        replace(p, key=p.key.at(fraction=fraction, shots=shots, repeat=repeat))
        for p in found.predictions
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
            first.rules,
            first.resampled,
        )
        found = at_point(result_rows(where, mean), point, MEAN_OF_REPEATS)
        rows += with_spread(found, spread_of(fits))
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
        outs, rows, preds = [], [], []
        try:
            for r, order in enumerate(orders):
                outs.append(fit(draw(order, point)))
                found = [row for f in outs[-1].fitted for row in result_rows(where, f)]
                rows += at_point(found, point, r)
                preds += point_predictions(outs[-1], point, r)
        except ProbeError as exc:  # SkippedPoint, or a probe that refuses the subset
            kind = "" if isinstance(exc, SkippedPoint) else f"{point}, repeat {len(outs)}: "
            out.skipped.append(
                f"{where.dataset} / {where.encoder} @ {where.resolution}px: skipped {kind}{exc}"
            )
            continue
        out.rows += rows + mean_rows(where, point, outs)
        out.predictions += preds
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
    key, task = set_key(where, opts.seed), cast(Task, where.task or "classification")
    train = a.part("train")
    pairs = len(train) * (len(a.part("val")) + len(a.part("test")))
    share = a.bags is None and opts.memory_mb is None and pairs * 8 <= SHARED_BYTES
    shared = Distances(a, opts) if share else None  # else each subset's kNN on its own

    def fit(units: np.ndarray) -> Outcome:
        rows = train[units]
        knn = shared.knn if shared is not None else None
        runs = classification.predict(a, opts, rows, knn)
        return classification.outcome(a, runs, opts.seed, rows, key, task)

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
        return probe_segmentation(s.with_train(items), opts, key=set_key(where, opts.seed))[0]

    return run_curve(where, le, strata(None, len(vols)), group, fit, full)
