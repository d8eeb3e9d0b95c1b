"""Result rows: one typed `ResultRow` per probe x metric, its key columns defined once.

A row's key (`KEY`) says which result it is: two rows with one key are the same
result, so a rerun replaces it (`upsert`) and a table shows one cell per key. The
other columns are the result's value and what produced it. Adding a result
dimension is a field here (marked `KEY_FIELD`) and the code that sets it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # predictions.py reads rows (`ordinary`); rows only name its type
    from featstore.probing.predictions import Predictions

Scores = Mapping[str, tuple[float, float, float]]  # metric -> (value, ci_low, ci_high)
KEY_FIELD = {"key": True}
MEAN_OF_REPEATS = -1  # the `repeat` of a label-efficiency point's mean row
MEAN_OF_SEEDS = -1  # the `seed` of the mean row over a trainable probe's seeds


@dataclass(frozen=True)
class SetColumns:
    """The columns that name the feature set (and how it was pooled and probed)."""

    dataset: str
    encoder: str
    random_init: bool
    resolution: int
    feature_set: str  # the set's cache key, 12 characters
    pool: str  # "" for 2D sets
    protocol: str
    task: str = ""  # the dataset's task, so that rows need no manifest to be read
    # external evaluation (`featstore.probing.external`): the dataset tested and its set
    test_dataset: str = ""  # "": `dataset` itself
    test_feature_set: str = ""  # "": `feature_set` itself


@dataclass(frozen=True)
class Fitted:
    """One probe's test scores and what fitted it, before the set's columns are added."""

    probe: str
    scores: Scores
    param_name: str
    param: float
    seconds: float
    n_train: int  # items (2D) or volumes (3D) the probe was fitted on
    n_val: int
    n_test: int
    units: Mapping[str, str] = field(default_factory=dict)  # metric -> unit ("" if absent)
    # metric -> how its predictions were made into what it scores (instance metrics:
    # `settings.Instances.rule_name`, e.g. "components@0.5")
    rules: Mapping[str, str] = field(default_factory=dict)
    resampled: str = ""  # what the intervals resample (`bootstrap.Resampled`)


@dataclass(frozen=True)
class Outcome:
    """What fitting the probes of one set once gave: their `Fitted` results, and for
    each probe its scores' bootstrap draws (`featstore.probing.bootstrap`), which the
    repeats of a label-efficiency point pool."""

    fitted: list[Fitted]
    draws: Mapping[str, Mapping[str, np.ndarray]]  # probe -> metric -> (N_BOOT + 1,)
    # segmentation: probe -> (V, 5, C-1) `segscores.volume_scores` of each test unit
    per_unit: Mapping[str, np.ndarray] = field(default_factory=dict)
    # instance datasets: probe -> (V, 3) `instances.instance_scores` of each test unit
    per_instance: Mapping[str, np.ndarray] = field(default_factory=dict)
    # each probe's test predictions, keyed as the ordinary probe: whoever refits (a
    # curve point, another seed) re-keys them (`predictions.Key.at`)
    predictions: tuple[Predictions, ...] = ()


@dataclass(frozen=True)
class ResultRow:
    """One score of one probe on one feature set (a line of results.csv)."""

    dataset: str = field(metadata=KEY_FIELD)
    encoder: str = field(metadata=KEY_FIELD)
    random_init: bool = field(metadata=KEY_FIELD)
    resolution: int = field(metadata=KEY_FIELD)
    feature_set: str = ""
    pool: str = field(default="", metadata=KEY_FIELD)
    protocol: str = field(default="default", metadata=KEY_FIELD)
    probe: str = field(default="", metadata=KEY_FIELD)
    metric: str = field(default="", metadata=KEY_FIELD)
    value: float = float("nan")
    ci_low: float = float("nan")
    ci_high: float = float("nan")
    unit: str = ""
    n_train: int = 0
    n_val: int = 0
    n_test: int = 0
    param_name: str = ""
    param: float = float("nan")
    fit_seconds: float = 0.0
    # Label-efficiency points (`featstore.probing.curves`); the ordinary probe is the
    # point at fraction 1, repeat 0. A shots point has no fraction (NaN).
    train_fraction: float = field(default=1.0, metadata=KEY_FIELD)
    shots: int = field(default=0, metadata=KEY_FIELD)
    repeat: int = field(default=0, metadata=KEY_FIELD)  # MEAN_OF_REPEATS: their mean
    std: float = float("nan")  # a mean row's spread across repeats or seeds (population std)
    value_min: float = float("nan")  # a mean row's lowest and highest value across them
    value_max: float = float("nan")
    # The dataset's task (not a key: a dataset has one): a report reads rows of several
    # manifests from one results folder. "" in rows written before it was a column.
    task: str = ""
    # The dataset whose items were scored: `dataset` itself for internal rows, another
    # one for an external evaluation (trained on `dataset`, tested on this); and the
    # feature set they were read from. Rows written before these were columns are
    # internal ones (`typed` fills them in).
    test_dataset: str = field(default="", metadata=KEY_FIELD)
    test_feature_set: str = ""
    # How the head's output became what the metric scores, where it is not the label
    # map itself: neuron instances' rule and threshold ("components@0.5"; not a key:
    # the manifest decides it, and a rerun under another rule replaces the rows).
    rule: str = ""
    # The fit seed of a trainable probe's rows (`featstore probe --seeds`); MEAN_OF_SEEDS
    # for their mean. Rows of probes that do not depend on a seed carry the run's seed
    # (0 by default, and in rows written before it was a column).
    seed: int = field(default=0, metadata=KEY_FIELD)
    # What the intervals resampled: "patient" where the set has that coordinate, else
    # the test unit ("image", "volume", "slide"); "" in rows written before.
    resampled: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The row as {column: value}, columns in `COLUMNS` order."""
        return asdict(self)


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(ResultRow))
KEY: tuple[str, ...] = tuple(f.name for f in fields(ResultRow) if f.metadata.get("key"))
_TYPES = {f.name: f.type for f in fields(ResultRow)}
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(ResultRow)}


def field_type(name: str) -> str:
    """The type of the `ResultRow` field `name`: "str", "bool", "int" or "float"."""
    return str(_TYPES[name])


def result_rows(where: SetColumns, fitted: Fitted) -> list[ResultRow]:
    """A `ResultRow` per metric of `fitted`, on the set `where`."""
    cols = asdict(where)
    cols["test_dataset"] = where.test_dataset or where.dataset
    cols["test_feature_set"] = where.test_feature_set or where.feature_set
    return [
        ResultRow(
            **cols,
            probe=fitted.probe,
            metric=metric,
            value=float(v),
            ci_low=float(lo),
            ci_high=float(hi),
            unit=fitted.units.get(metric, ""),
            n_train=int(fitted.n_train),
            n_val=int(fitted.n_val),
            n_test=int(fitted.n_test),
            param_name=fitted.param_name,
            param=float(fitted.param),
            fit_seconds=round(fitted.seconds, 3),
            rule=fitted.rules.get(metric, ""),
            resampled=fitted.resampled,
        )
        for metric, (v, lo, hi) in fitted.scores.items()
    ]


def typed(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with every `ResultRow` column present and of its field's type.

    Rows read back from results.csv come with NaN for empty strings and without the
    columns older versions did not write; typed, their keys compare equal to fresh
    rows' keys. Columns that are not `ResultRow` fields are kept after them.
    """
    out = df.copy()
    for name in COLUMNS:
        kind = _TYPES[name]
        if name not in out:
            out[name] = _DEFAULTS[name]
        if kind == "str":
            col = out[name].astype(object)
            out[name] = col.where(col.notna(), "").astype(str)
        elif kind == "bool":
            out[name] = out[name].astype(str).str.lower().isin(["true", "1", "1.0"])
        elif kind == "int":
            out[name] = pd.to_numeric(out[name]).fillna(0).astype("int64")
        else:
            out[name] = pd.to_numeric(out[name]).astype("float64")
    for own, of in (("test_dataset", "dataset"), ("test_feature_set", "feature_set")):
        out[own] = out[own].where(out[own] != "", out[of])  # internal rows
    return out[[*COLUMNS, *(c for c in out.columns if c not in COLUMNS)]]


# Read results.csv with these (`pd.read_csv(..., dtype=TEXT)`): a dataset named "007"
# or a feature-set key of 12 digits keeps its leading zeros and stays a key.
TEXT: dict[str, type] = {name: str for name in COLUMNS if _TYPES[name] == "str"}


def frame(rows: Sequence[ResultRow]) -> pd.DataFrame:
    """Rows as a typed DataFrame with the `COLUMNS` (empty rows: no lines)."""
    return typed(pd.DataFrame([r.as_dict() for r in rows], columns=list(COLUMNS)))


def _key_text(value: object) -> str:
    # A float key (a fraction) to 6 significant digits: results.csv files written before
    # keys were written exactly hold 0.333333 for 1/3, and must still name its point.
    if isinstance(value, float):
        return format(value, ".6g")
    return str(value)


def key_strings(df: pd.DataFrame) -> list[tuple[str, ...]]:
    """The `KEY` of each row of a `typed` frame, as comparable tuples."""
    return [tuple(map(_key_text, r)) for r in df[list(KEY)].itertuples(index=False)]


def key_except(*laid_out: str) -> list[str]:
    """The key columns other than `laid_out`: what a table or a plot must also group by
    (or show) beside the columns it lays out itself, so that no result hides another."""
    return [k for k in KEY if k not in laid_out]


# The columns that name a cell: its rows are scores of one set (internal rows) or of
# one pair of sets (an external evaluation: trained on one, tested on the other).
CELL = ("dataset", "encoder", "random_init", "resolution", "test_dataset")
SETS = ("feature_set", "test_feature_set")


def upsert(old: pd.DataFrame, new: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(`old` rows whose key `new` does not have, then `new`, sorted by `KEY`; the old
    rows of cells that `new` scores on another feature set).

    Both are `typed`. A key repeated within `new` is kept as given (the caller's). An
    old row of a cell that `new` probes on a different set (the manifest changed what
    the cell is) is superseded, whether or not `new` has a row of its key: kept, it
    would sit beside scores of another set as if both were one cell's results.
    """
    keys = set(key_strings(new))

    def cells_and_sets(df: pd.DataFrame) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
        return [
            (tuple(map(str, r[: len(CELL)])), tuple(map(str, r[len(CELL) :])))
            for r in df[[*CELL, *SETS]].itertuples(index=False)
        ]

    sets = dict(cells_and_sets(new))
    stale = np.asarray([c in sets and f != sets[c] for c, f in cells_and_sets(old)], dtype=bool)
    replaced = np.asarray([k in keys for k in key_strings(old)], dtype=bool)
    kept = old[~stale & ~replaced]
    both = pd.concat([kept, new], ignore_index=True) if len(kept) else new
    merged = both.sort_values(list(KEY), kind="stable").reset_index(drop=True)
    return merged, old[stale].reset_index(drop=True)


def internal(df: pd.DataFrame) -> pd.DataFrame:
    """The rows scored on their own dataset's test split (not external evaluations)."""
    if "test_dataset" not in df:
        return df
    return df[df.test_dataset == df.dataset]


def external(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of external evaluations: trained on `dataset`, tested on `test_dataset`."""
    if "test_dataset" not in df:
        return df.iloc[:0]
    return df[df.test_dataset != df.dataset]


def ordinary(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of the ordinary probe (the whole train split), without curve points and
    without other seeds' refits: of a trainable probe fitted with several seeds, the
    row of the lowest seed (the run's own `seed`, `options.ProbeOptions`)."""
    if "repeat" not in df:
        return df
    full = df[(df.train_fraction == 1.0) & (df.shots == 0) & (df.repeat == 0)]
    if "seed" not in full or not len(full):
        return full
    fitted = full[full.seed >= 0]
    lowest = fitted.groupby(key_except("seed", "metric"), dropna=False).seed.transform("min")
    return fitted[fitted.seed == lowest]


def seed_means(df: pd.DataFrame) -> pd.DataFrame:
    """The mean rows over a trainable probe's seeds (one per probe and metric)."""
    if "seed" not in df:
        return df.iloc[:0]
    return df[df.seed == MEAN_OF_SEEDS]


def curve_means(df: pd.DataFrame) -> pd.DataFrame:
    """The mean rows of label-efficiency points (one per point, probe and metric)."""
    if "repeat" not in df:
        return df.iloc[:0]
    return df[df.repeat == MEAN_OF_REPEATS]


def interval(low: object, high: object) -> str:
    """'[low, high]', or '[no interval]' where the bootstrap has none (a single test
    unit: resampling it gives nothing to vary)."""
    lo, hi = float(low), float(high)  # type: ignore[arg-type]  # a results cell
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "[no interval]"
    return f"[{lo:.3f}, {hi:.3f}]"
