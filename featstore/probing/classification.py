"""Classification probes of one feature set: linear, kNN and (`--pool abmil`)
attention-MIL, on one feature vector per image (2D) or pooled volume (3D).

`class_arrays` reads the set once into `ClassArrays`; `predict` fits the probes on
a chosen part of the train split (all of it for the ordinary probe, a subset for a
label-efficiency point) and `fitted` scores their test predictions with intervals.
torch is imported (from `featstore.probing.heads`) only by ABMIL and `protocol: seed`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import cast

import numpy as np
import xarray as xr

from featstore.data.manifest import Dataset
from featstore.errors import ProbeError
from featstore.probing import bootstrap, predictions, probes
from featstore.probing.items import item_str, patch_tokens, volume_items
from featstore.probing.knn import knn_blockwise
from featstore.probing.options import ProbeOptions
from featstore.probing.rows import Fitted, Outcome

Knn = Callable[[np.ndarray], probes.Prediction]  # train rows -> kNN's test prediction
Runs = dict[str, tuple[str, probes.Prediction]]  # probe -> (param name, prediction)


@dataclass(frozen=True)
class MILPrediction(probes.Prediction):
    """ABMIL's test scores, and the attention it gives each volume's slices or tiles."""

    weights: tuple[np.ndarray, ...] = ()  # per volume: (slices,) float64, summing to 1


@dataclass(frozen=True)
class Attention:
    """ABMIL's attention over the test volumes' items (the slide figure's heatmap).

    item: (n,) int64 rows of the opened set (`evaluation` maps them to the set's item
    numbers); weight: (n,) float32, summing to 1 within each volume.
    """

    item: np.ndarray
    weight: np.ndarray


@dataclass(frozen=True)
class ClassArrays:
    """One set's classification inputs, one row per image (2D) or volume (3D).

    x: (n, D) float64 features (3D: pooled, or for ABMIL the raw slices in `bags`);
    y: (n,) int labels or (n, L) multi-hot; split: (n,) "train" | "val" | "test";
    group: (n,) the patient (a `patient` coordinate) or else the volume or image id:
    what label-efficiency subsets keep whole.
    """

    x: np.ndarray
    y: np.ndarray
    split: np.ndarray
    group: np.ndarray
    n_classes: int
    bags: list[np.ndarray] | None = None  # ABMIL: per volume (slices, D) float64
    bag_items: list[np.ndarray] | None = None  # ABMIL: per volume, its items' rows in the set
    sample: np.ndarray | None = None  # (n,) the image or volume id of each row
    has_patient: bool = False  # whether `group` is the set's `patient` coordinate
    unit: str = "image"  # what a row is: "image", "volume" or "slide"

    @property
    def resampled(self) -> bootstrap.Resampled:
        """What the intervals resample: patients where the set has them, else rows."""
        return "patient" if self.has_patient else cast(bootstrap.Resampled, self.unit)

    def test_groups(self) -> np.ndarray | None:
        """The test rows' patients (None without them): the bootstrap's groups."""
        return self.group[self.part("test")] if self.has_patient else None

    def part(self, name: str, train: np.ndarray | None = None) -> np.ndarray:
        """Row indices of split `name` ("train": the rows `train` when given)."""
        return np.flatnonzero(self.split == name) if train is None else np.asarray(train)


def class_arrays(
    xs: xr.Dataset, ds: Dataset, opts: ProbeOptions, need_test: bool = True
) -> ClassArrays:
    """Read (and for 3D pool) the set's CLS tokens, labels and splits; a `ProbeError`
    for an empty test split when `need_test` (the set's own test split is scored)."""
    cls = np.asarray(xs.cls.values, np.float64).reshape(xs.sizes["item"], -1)
    label = np.asarray(xs.label.values)
    split = item_str(xs.split)
    sample = item_str(xs.sample)
    group = item_str(xs.patient) if "patient" in xs.coords else sample
    n_classes = label.shape[1] if label.ndim == 2 else int(label.max()) + 1
    if not np.isfinite(cls).all():  # pooled or attention-weighted, they stay finite
        raise ProbeError("features contain NaN/Inf; run `featstore verify` on the set")
    bags = vols = None
    if ds.bags:  # slices of a volume, tiles of a slide: pooled per sample
        vols = volume_items(sample, np.asarray(xs.slice.values))
        first = np.array([v[0] for v in vols])
        label, split, group, sample = label[first], split[first], group[first], sample[first]
        if opts.pool == "abmil":
            bags = [cls[v] for v in vols]
            cls = np.zeros((len(vols), cls.shape[1]))  # replaced by the attention pooling
        else:
            patch_mean = None
            if opts.pool == "cls+patch" and "patch" in xs:
                items = np.arange(xs.sizes["item"])
                patch_mean = patch_tokens(xs, items, last_only=True).astype(np.float64)
                patch_mean = patch_mean.mean((1, 2))
            cls = probes.pool_volumes(cls, vols, opts.pool, patch_mean)
    if need_test and not (split == "test").any():
        raise ProbeError("the test split is empty")
    return ClassArrays(
        cls,
        label,
        split,
        group,
        n_classes,
        bags,
        vols if bags else None,
        sample=sample,
        has_patient="patient" in xs.coords,
        unit=bootstrap.resampled(False, ds.dims, ds.slides),
    )


def _linear(a: ClassArrays, x: np.ndarray, tr: np.ndarray, opts: ProbeOptions) -> probes.Prediction:
    va, te = a.part("val"), a.part("test")
    if opts.protocol != "seed":
        return probes.linear_probe(
            x[tr], a.y[tr], x[va], a.y[va], x[te], a.n_classes, seed=opts.seed
        )
    from featstore.probing import heads

    probes.check_split(a.y[tr], "train")
    t0 = time.perf_counter()
    proba = heads.seed_linear(x[tr], a.y[tr], x[te], a.n_classes, opts.seed)
    return probes.Prediction(proba, heads.SEED_LR, time.perf_counter() - t0)


def knn_settings(opts: ProbeOptions) -> tuple[tuple[int, ...], str, bool]:
    """(k grid, metric, per_label) of the kNN probe under `opts.protocol`."""
    if opts.protocol == "medmnist+":
        return (11,), "euclidean", False
    return probes.K_GRID, "cosine", opts.protocol == "seed"


def _knn(a: ClassArrays, x: np.ndarray, tr: np.ndarray, opts: ProbeOptions) -> probes.Prediction:
    """scikit-learn's kNN, or in blocks of `opts.memory_mb` (the same predictions)."""
    va, te = a.part("val"), a.part("test")
    grid, metric, per_label = knn_settings(opts)
    args = (x[tr], a.y[tr], x[va], a.y[va], x[te], a.n_classes, grid, metric, per_label)
    if opts.memory_mb is None:
        return probes.knn_probe(*args)
    return knn_blockwise(*args, memory_mb=opts.memory_mb)


def predict(
    a: ClassArrays,
    opts: ProbeOptions,
    train: np.ndarray | None = None,
    knn: Knn | None = None,
    which: Collection[str] = ("linear", "knn", "abmil"),
) -> Runs:
    """Every classification probe's test prediction (or only those in `which`), fitted
    on rows `train` (default: the whole train split); hyper-parameters are chosen on
    the whole val split.

    knn: the kNN probe of the train rows (default: `_knn` on `a.x`), e.g. one that
    shares a distance matrix across subsets; not used with ABMIL's pooling.
    """
    tr = a.part("train", train)
    x, runs = a.x, {}
    if a.bags is not None:  # ABMIL: attention weights learnt on the train volumes
        from featstore.probing import heads

        fit_on = np.zeros(len(a.y), bool)
        fit_on[tr] = True
        mil = heads.fit_abmil(a.bags, a.y, fit_on, a.split == "test", a.n_classes, opts.seed)
        x = np.stack([w @ b for w, b in zip(mil.weights, a.bags, strict=True)])
        found = MILPrediction(mil.proba, mil.lr, mil.seconds, tuple(mil.weights))
        runs["abmil"] = ("lr", found)
        knn = None
    first: Runs = {}
    if "linear" in which:
        first["linear"] = ("lr" if opts.protocol == "seed" else "C", _linear(a, x, tr, opts))
    if "knn" in which:
        first["knn"] = ("k", knn(tr) if knn is not None else _knn(a, x, tr, opts))
    return {**first, **{k: v for k, v in runs.items() if k in which}}


def test_attention(a: ClassArrays, runs: Runs) -> Attention | None:
    """ABMIL's attention over the items of every test volume (None without ABMIL)."""
    mil = runs.get("abmil", ("", None))[1]
    if not isinstance(mil, MILPrediction) or a.bag_items is None:
        return None
    test = a.part("test")
    item = [a.bag_items[v] for v in test]
    weight = [mil.weights[v] for v in test]
    return Attention(
        np.concatenate(item).astype(np.int64), np.concatenate(weight, dtype=np.float32)
    )


def test_predictions(
    a: ClassArrays, runs: Runs, key: Callable[[str], predictions.Key], task: predictions.Task
) -> list[predictions.Predictions]:
    """Each run's predictions of the test rows, keyed by `key(probe)`."""
    te = a.part("test")
    assert a.sample is not None
    return [
        predictions.Predictions(
            key=key(name),
            task=task,
            sample=a.sample[te],
            patient=a.group[te] if a.has_patient else None,
            truth=a.y[te],
            scores=pred.proba,
            unit=a.unit,
        )
        for name, (_, pred) in runs.items()
    ]


def outcome(
    a: ClassArrays,
    runs: Runs,
    seed: int,
    train: np.ndarray | None = None,
    key: Callable[[str], predictions.Key] | None = None,
    task: predictions.Task = "classification",
) -> Outcome:
    """Each run's test scores with bootstrap intervals (`Fitted`: of whole patients
    where the set has them), their draws, and (with `key`) their test predictions."""
    yte, groups = a.y[a.part("test")], a.test_groups()
    n_train, n_val = len(a.part("train", train)), len(a.part("val"))
    fitted, draws = [], {}
    for name, (pname, pred) in runs.items():
        draws[name] = bootstrap.classification_draws(yte, pred.proba, seed, groups)
        scores = bootstrap.intervals(draws[name])
        fitted.append(
            Fitted(
                name,
                scores,
                pname,
                pred.param,
                pred.seconds,
                n_train,
                n_val,
                len(yte),
                resampled=a.resampled,
            )
        )
    kept = tuple(test_predictions(a, runs, key, task)) if key is not None else ()
    return Outcome(fitted, draws, predictions=kept)
