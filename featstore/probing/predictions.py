"""Kept test predictions: one Parquet file per feature set and probe (numpy + pyarrow).

Every probe writes what it predicted for each test unit (image, volume or slide) to
OUT/predictions/<dataset>-<feature_set>-<probe>[-<pool>][-<protocol>][-f<fraction>|-n<shots>
-r<repeat>][-s<seed>].parquet (`Key.file_name`; an external evaluation's under
OUT/predictions/external/<dataset>-<feature_set>-<test_dataset>-<test_feature_set>-<probe>...):
a label-efficiency point's repeat and a trainable probe's seed each have their own file.
So that a later comparison of two encoders (`featstore.probing.compare`) tests them on
the same units without refitting anything. The files open with plain pandas
(`pd.read_parquet`); their columns are:

- `sample`: the unit's id (an image, a volume or a slide: the metadata's `unit`);
  `patient` where the set has that coordinate;
- classification: `label` (the true class) and `score_<k>` (the probability of each
  class k), `predicted` (the arg-max class); multi-label: `label_<j>`, `score_<j>` and
  `predicted_<j>` (decided at 0.5) per label j;
- segmentation: `dice_<class>`, `iou_<class>` and `hd95_<class>` of each unit and
  foreground class (NaN: the class is in neither mask); for a dataset with
  `instances:`, also `voi_split`, `voi_merge` and `arand` of each unit's neuron
  instances (`featstore.probing.instances`; NaN: no neuron pixel to score).

The schema metadata key `featstore` holds the row key the file belongs to (`Key`:
dataset, encoder, random_init, resolution, pool, protocol, probe, train_fraction,
shots, repeat, seed, feature_set, test_dataset, test_feature_set), the task and the
unit, as JSON. `read_predictions` refuses a file whose key is not the one asked for
(another feature set, another probe).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from featstore.errors import ProbeError
from featstore.places import atomic_file
from featstore.probing.instances import INSTANCE_METRICS
from featstore.probing.rows import SetColumns, ordinary

FOLDER = "predictions"
EXTERNAL = "external"  # OUT/predictions/external/: external evaluations' predictions
META = b"featstore"
Task = Literal["classification", "multilabel", "segmentation"]
SEG_METRICS = ("dice", "iou", "hd95")  # per unit and class; rows of `volume_scores`: 0, 1, 4
_SEG_ROWS = {"dice": 0, "iou": 1, "hd95": 4}


@dataclass(frozen=True)
class Key:
    """The result rows a prediction file belongs to (the `ResultRow` key, less metric)."""

    dataset: str
    encoder: str
    random_init: bool
    resolution: int
    pool: str
    protocol: str
    probe: str
    feature_set: str
    train_fraction: float = 1.0
    shots: int = 0
    repeat: int = 0
    # an external evaluation (trained on `dataset`): the dataset tested and its set;
    # "" for the internal rows (files written before external evaluations read so)
    test_dataset: str = ""
    test_feature_set: str = ""
    seed: int = 0  # the fit seed of a trainable probe (`featstore probe --seeds`)

    @property
    def ordinary(self) -> bool:
        """Whether these are the ordinary probe's (the whole train split; `rows.ordinary`
        of a frame), not a label-efficiency point's."""
        return self.train_fraction == 1.0 and self.shots == 0 and self.repeat == 0

    def at(self, *, fraction: float = 1.0, shots: int = 0, repeat: int = 0) -> Key:
        """This key at a label-efficiency point (fraction or shots) and repeat."""
        return replace(self, train_fraction=fraction, shots=shots, repeat=repeat)

    @property
    def file_name(self) -> str:
        """`<dataset>-<feature_set>-<probe>[-<pool>][-<protocol>][-f<fraction>|-n<shots>
        -r<repeat>][-s<seed>].parquet`: the ordinary probe has no point suffix; a
        label-efficiency point names its fraction or shots and its repeat, a seed other
        than 0 its seed, so that no two files of one folder collide."""
        # The dataset leads: two datasets of the same content share one feature set.
        # Pool and protocol follow where not the default: both are probe-side choices
        # that keep the set (and its key).
        stem = f"{_safe(self.dataset)}-{self.feature_set}-{self.probe}"
        if self.test_dataset:  # a folder of its own: no internal name can be one of these
            test = f"{_safe(self.test_dataset)}-{self.test_feature_set}"
            stem = f"{EXTERNAL}/{_safe(self.dataset)}-{self.feature_set}-{test}-{self.probe}"
        for part in (self.pool, "" if self.protocol == "default" else self.protocol):
            stem += f"-{_safe(part)}" if part else ""
        name = stem
        if self.shots:
            name += f"-n{self.shots}"
        elif not (isinstance(self.train_fraction, float) and self.train_fraction == 1.0):
            name += f"-f{self.train_fraction:.6g}"
        if self.repeat or name != stem:
            name += f"-r{self.repeat}"
        if self.seed:
            name += f"-s{self.seed}"
        return name + ".parquet"

    def same(self, other: Key) -> bool:
        """Whether both name the same rows (fractions compared to 6 digits, NaN = NaN)."""
        a, b = asdict(self), asdict(other)
        fa, fb = a.pop("train_fraction"), b.pop("train_fraction")
        nan = math.isnan(fa) and math.isnan(fb)
        return a == b and (nan or format(fa, ".6g") == format(fb, ".6g"))


@dataclass(frozen=True, eq=False)
class Predictions:
    """One probe's predictions of the test units of one feature set.

    sample: (n,) str unit ids; patient: (n,) str or None; classification: truth (n,)
    int labels or (n, L) multi-hot, scores (n, K) or (n, L) float; segmentation: per
    (n, 5, C-1) float64, the `segscores.volume_scores` of each unit, with the
    foreground class names `classes`; instance datasets: instances (n, 3) float64,
    the `instances.instance_scores` of each unit; unit: what `sample` names.
    """

    key: Key
    task: Task
    sample: np.ndarray
    patient: np.ndarray | None = None
    truth: np.ndarray | None = None
    scores: np.ndarray | None = None
    per: np.ndarray | None = None
    classes: tuple[str, ...] = ()
    instances: np.ndarray | None = None  # (n, 3) `INSTANCE_METRICS` (instance datasets)
    unit: str = "unit"  # what a unit is: "image", "volume" or "slide" ("unit": unknown)

    def frame(self) -> pd.DataFrame:
        """The file's columns (module docstring), one row per unit."""
        cols: dict[str, Any] = {"sample": np.asarray(self.sample, str)}
        if self.patient is not None:
            cols["patient"] = np.asarray(self.patient, str)
        if self.task == "segmentation":
            assert self.per is not None
            for m in SEG_METRICS:
                for c, name in enumerate(self.classes):
                    cols[f"{m}_{name}"] = self.per[:, _SEG_ROWS[m], c]
            if self.instances is not None:
                for j, m in enumerate(INSTANCE_METRICS):
                    cols[m] = self.instances[:, j]
            return pd.DataFrame(cols)
        assert self.truth is not None and self.scores is not None
        if self.task == "multilabel":
            for j in range(self.scores.shape[1]):
                cols[f"label_{j}"] = self.truth[:, j].astype(np.int64)
            for j in range(self.scores.shape[1]):
                cols[f"score_{j}"] = self.scores[:, j].astype(np.float64)
            for j in range(self.scores.shape[1]):
                cols[f"predicted_{j}"] = (self.scores[:, j] >= 0.5).astype(np.int64)
            return pd.DataFrame(cols)
        cols["label"] = self.truth.astype(np.int64)
        for k in range(self.scores.shape[1]):
            cols[f"score_{k}"] = self.scores[:, k].astype(np.float64)
        cols["predicted"] = self.scores.argmax(1).astype(np.int64)
        return pd.DataFrame(cols)

    def groups(self) -> tuple[np.ndarray, str]:
        """What a bootstrap of these units resamples: the patients where known, else
        the units themselves (an image, a volume or a slide), and its name
        (`bootstrap.Resampled`; "unit" in files written before the unit was kept)."""
        if self.patient is not None:
            return np.asarray(self.patient, str), "patient"
        return np.asarray(self.sample, str), self.unit


def write_predictions(folder: Path, p: Predictions) -> Path:
    """Write `p` to folder/`p.key.file_name` in one step (`atomic_file`): a rerun
    replaces the file, a kill midway leaves the previous one whole."""
    import pyarrow as pa  # type: ignore[import-untyped]  # no stubs
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    folder.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(p.frame(), preserve_index=False)
    meta = {"key": asdict(p.key), "task": p.task, "classes": list(p.classes), "unit": p.unit}
    table = table.replace_schema_metadata(
        {**(table.schema.metadata or {}), META: json.dumps(meta).encode()}
    )
    path = folder / p.key.file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        pq.write_table(table, f)
    return path


def file_key(path: Path) -> tuple[Key, Task, tuple[str, ...]]:
    """The key, task and class names recorded in the prediction file `path` (files
    written before seeds were kept have seed 0)."""
    info = _meta(path)
    return Key(**info["key"]), info["task"], tuple(info.get("classes", ()))


def _meta(path: Path) -> dict[str, Any]:
    """The file's `featstore` metadata, its key checked; a `ProbeError` naming the file
    when it has none (not a featstore prediction file)."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(path).metadata or {}
        info: dict[str, Any] = json.loads(meta[META])
        Key(**info["key"])
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise ProbeError(
            f"{path}: not a featstore prediction file ({type(exc).__name__}: {exc}); "
            "remove it and rerun `featstore probe`, which writes it again"
        ) from None
    return info


def read_predictions(
    path: Path, expect: Key | None = None, samples: np.ndarray | None = None
) -> Predictions:
    """The predictions in `path`, checked: a `ProbeError` naming the file when its
    recorded key is not `expect` (another feature set or probe) or its units are not
    `samples` (when given), rather than a comparison of other units."""
    info = _meta(path)
    key, task, classes = Key(**info["key"]), info["task"], tuple(info.get("classes", ()))
    unit = str(info.get("unit", "unit"))
    if expect is not None and not key.same(expect):
        raise ProbeError(
            f"{path}: these predictions are of {_describe(key)}, not of the rows "
            f"{_describe(expect)}; rerun `featstore probe` into this --out folder to "
            "write them again"
        )
    df = pd.read_parquet(path)
    sample = df["sample"].astype(str).to_numpy()
    if samples is not None and (
        len(sample) != len(samples) or set(sample) != set(np.asarray(samples, str))
    ):
        raise ProbeError(
            f"{path}: its {len(sample)} test units are not the {len(samples)} units of "
            f"{_describe(key)}; rerun `featstore probe` to write them again"
        )
    patient = df["patient"].astype(str).to_numpy() if "patient" in df else None
    if task == "segmentation":
        per = np.full((len(df), 5, len(classes)), np.nan)
        for m in SEG_METRICS:
            for c, name in enumerate(classes):
                per[:, _SEG_ROWS[m], c] = df[f"{m}_{name}"].to_numpy(np.float64)
        inst = None
        if all(m in df for m in INSTANCE_METRICS):
            inst = df[list(INSTANCE_METRICS)].to_numpy(np.float64)
        return Predictions(
            key, task, sample, patient, per=per, classes=classes, instances=inst, unit=unit
        )
    score = df[[c for c in map(str, df.columns) if c.startswith("score_")]].to_numpy(np.float64)
    truth: np.ndarray
    if task == "multilabel":
        truth = df[[f"label_{j}" for j in range(score.shape[1])]].to_numpy(np.int64)
    else:
        truth = df["label"].to_numpy(np.int64)
    return Predictions(key, task, sample, patient, truth, score, unit=unit)


def _safe(text: str) -> str:
    """`text` as a file-name part: characters other than letters, digits, '.' and '_'
    become '_' (the exact names are in the file's metadata, which the reader checks)."""
    return re.sub(r"[^A-Za-z0-9._]", "_", text)


def _describe(k: Key) -> str:
    ext = {f.name: getattr(k, f.name) for f in fields(k) if f.name != "dataset"}
    return f"{k.dataset} ({', '.join(f'{n}={v}' for n, v in ext.items())})"


def set_key(where: SetColumns, seed: int = 0) -> Callable[[str], Key]:
    """probe -> the `Key` of its ordinary rows on the set (or pair of sets) `where`,
    fitted with `seed`."""

    def key(probe: str) -> Key:
        return Key(
            dataset=where.dataset,
            encoder=where.encoder,
            random_init=where.random_init,
            resolution=where.resolution,
            pool=where.pool,
            protocol=where.protocol,
            probe=probe,
            feature_set=where.feature_set,
            test_dataset=where.test_dataset,
            test_feature_set=where.test_feature_set,
            seed=seed,
        )

    return key


def row_key(r: Any) -> Key:
    """The `Key` of a results row (a `typed` frame's itertuples row)."""
    return Key(
        dataset=str(r.dataset),
        encoder=str(r.encoder),
        random_init=bool(r.random_init),
        resolution=int(r.resolution),
        pool=str(r.pool),
        protocol=str(r.protocol),
        probe=str(r.probe),
        feature_set=str(r.feature_set),
        train_fraction=float(r.train_fraction),
        shots=int(r.shots),
        repeat=int(r.repeat),
        test_dataset="" if str(r.test_dataset) == str(r.dataset) else str(r.test_dataset),
        test_feature_set="" if str(r.test_dataset) == str(r.dataset) else str(r.test_feature_set),
        seed=int(getattr(r, "seed", 0)),
    )


def kept(out: Path, rows: pd.DataFrame) -> tuple[list[Predictions], list[str]]:
    """The kept predictions of each ordinary (feature set, probe) of `rows` (a `typed`
    results frame), in results order, and a note for each one without a file (rows
    written before predictions were kept, published reference rows). A file that is
    not of its rows is a `ProbeError` (`read_predictions`)."""
    full = ordinary(rows)
    found, missing, seen = [], [], set()
    for r in full.itertuples():
        key = row_key(r)
        if key.file_name in seen or not key.feature_set:
            continue
        seen.add(key.file_name)
        path = out / FOLDER / key.file_name
        if not path.is_file():
            on = f" -> {key.test_dataset}" if key.test_dataset else ""
            missing.append(f"{key.dataset}{on} / {key.encoder} / {key.probe}: no {path}")
            continue
        found.append(read_predictions(path, key, None))
    return found, missing


def kept_in(out: Path) -> tuple[list[Predictions], list[str]]:
    """`kept` of the results folder OUT (its results.csv); a `ProbeError` where OUT has
    no results yet."""
    from featstore.probing.results_file import RESULTS, read_results

    csv = out / RESULTS
    if not csv.is_file():
        raise ProbeError(
            f"{csv} is not there; run `featstore probe --out {out}` (or featstore.probe) first"
        )
    return kept(out, read_results(csv))
