"""Is encoder A better than B? Kept predictions in, one comparison table out (pure).

For each dataset x resolution x pool x protocol x probe (x the test dataset of an external
evaluation), each encoder is compared with
a reference encoder (or every pair) on the same test units:

- the difference A - B and its 95% interval: a paired bootstrap (`pairdraws`) that
  resamples patients where the set has them, else the units (images, volumes, slides);
- the p-value: DeLong for a binary AUROC (and for each label of a multi-label task),
  exact McNemar for accuracy, the paired bootstrap for the rest (macro AUROC, F1,
  Dice, HD95; HD95 lower is better);
- p adjusted across every comparison of the run (Holm, or Benjamini-Hochberg), and a
  verdict in words (`paired.verdict`).

Encoders scored on different test units are not compared: the pair is a row with its
`reason`. Published reference rows have no predictions, so they never enter.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd

from featstore.probing import bootstrap, paired
from featstore.probing.pairdraws import paired_bootstrap
from featstore.probing.predictions import Predictions


@dataclass(frozen=True)
class Comparison:
    """One line of comparisons.csv: metric(A) - metric(B) on one test set."""

    dataset: str
    resolution: int
    pool: str
    protocol: str
    probe: str
    metric: str
    encoder_a: str
    random_init_a: bool
    encoder_b: str
    random_init_b: bool
    value_a: float = float("nan")
    value_b: float = float("nan")
    difference: float = float("nan")
    ci_low: float = float("nan")
    ci_high: float = float("nan")
    test: str = ""  # "delong" | "mcnemar" | "paired bootstrap"; "" when not compared
    p_value: float = float("nan")
    p_adjusted: float = float("nan")
    verdict: str = ""
    higher_is_better: bool = True
    n_units: int = 0
    resampled: str = ""  # "patient" | "unit"
    reason: str = ""  # why the pair was not compared
    test_dataset: str = ""  # an external evaluation's test dataset ("": `dataset`'s own)


COLUMNS = tuple(Comparison.__dataclass_fields__)


def _label(p: Predictions) -> tuple[str, bool]:
    return p.key.encoder, p.key.random_init


def _f1(y: np.ndarray) -> bootstrap.WeightedMetric:
    """Macro F1 under resample counts (= `metrics.classification_scores`' f1 of each
    resample): per class (label), 2 tp / (predicted + true), from weighted counts;
    single-label classes absent from a resample are left out of its mean."""

    def metric(proba: np.ndarray, w: np.ndarray) -> np.ndarray:
        if y.ndim == 2:
            pred, true = proba >= 0.5, y == 1
        else:
            classes = np.arange(proba.shape[1])
            pred = proba.argmax(1)[:, None] == classes
            true = y[:, None] == classes
        tp = (pred & true).astype(np.float64).T @ w  # (K, b)
        support = true.astype(np.float64).T @ w
        denom = pred.astype(np.float64).T @ w + support
        f1 = 2 * tp / np.maximum(denom, 1e-300)
        f1[denom == 0] = 0.0
        if y.ndim == 2:
            return f1.mean(0)
        present = support > 0
        with np.errstate(invalid="ignore"):
            return (f1 * present).sum(0) / present.sum(0)

    return metric


def _pair_rows(a: Predictions, b: Predictions, base: dict[str, Any], seed: int) -> list[Comparison]:
    """Every metric's comparison of A with B (B already aligned to A's units)."""
    groups, resampled = a.groups()
    common = dict(base, n_units=len(a.sample), resampled=resampled)
    out = []

    def boot(
        metric: str,
        fn: bootstrap.WeightedMetric,
        xa: np.ndarray,
        xb: np.ndarray,
        higher: bool = True,
    ) -> dict[str, Any]:
        r = paired_bootstrap(fn, xa, xb, groups, seed=seed)
        return dict(
            common,
            metric=metric,
            value_a=r.value_a,
            value_b=r.value_b,
            difference=r.difference,
            ci_low=r.ci_low,
            ci_high=r.ci_high,
            test="paired bootstrap",
            p_value=r.p_value,
            higher_is_better=higher,
        )

    if a.task == "segmentation":
        assert a.per is not None and b.per is not None
        for m, row in (("dice", 0), ("hd95", 4)):
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a unit with no class
                va, vb = np.nanmean(a.per[:, row], 1), np.nanmean(b.per[:, row], 1)
            out.append(Comparison(**boot(m, bootstrap.weighted_mean, va, vb, m != "hd95")))
        return out
    assert a.truth is not None and a.scores is not None and b.scores is not None
    y = a.truth
    binary = y.ndim == 1 and a.scores.shape[1] == 2
    auc = boot("auroc", bootstrap.macro_auroc_of(y), a.scores, b.scores)
    if binary:  # the interval from the bootstrap, the p-value from DeLong
        auc.update(
            test="delong", p_value=paired.delong(y == 1, a.scores[:, 1], b.scores[:, 1]).p_value
        )
    out.append(Comparison(**auc))
    if y.ndim == 2:
        for j, d in enumerate(paired.delong_per_label(y, a.scores, b.scores)):
            lab = boot(
                f"auroc:{j}",
                bootstrap.macro_auroc_of(y[:, j : j + 1]),
                a.scores[:, j : j + 1],
                b.scores[:, j : j + 1],
            )
            lab.update(test="delong", p_value=d.p_value)
            out.append(Comparison(**lab))
    else:
        ca = (a.scores.argmax(1) == y).astype(np.float64)
        cb = (b.scores.argmax(1) == y).astype(np.float64)
        acc = boot("accuracy", bootstrap.weighted_mean, ca, cb)
        acc.update(test="mcnemar", p_value=paired.mcnemar_exact(ca > 0, cb > 0).p_value)
        out.append(Comparison(**acc))
    out.append(Comparison(**boot("f1", _f1(y), a.scores, b.scores)))
    return out


def _aligned(a: Predictions, b: Predictions) -> Predictions | str:
    """B's predictions in A's unit order, or why they cannot be paired."""
    sa, sb = np.asarray(a.sample, str), np.asarray(b.sample, str)
    if len(sa) != len(sb) or set(sa) != set(sb):
        return (
            f"scored on different test units ({len(sa)} vs {len(sb)}, "
            f"{len(set(sa) ^ set(sb))} not shared): extract both from one manifest's splits"
        )
    order = pd.Index(sb).get_indexer(sa)
    take = {
        f: (None if getattr(b, f) is None else np.asarray(getattr(b, f))[order])
        for f in ("sample", "patient", "truth", "scores", "per")
    }
    out = Predictions(b.key, b.task, classes=b.classes, **take)  # type: ignore[arg-type]
    if a.truth is not None and not np.array_equal(a.truth, np.asarray(out.truth)):
        return "the same units carry different labels: the sets are of different data"
    return out


def compare(
    preds: Sequence[Predictions],
    reference: str | None = None,
    *,
    all_pairs: bool = False,
    adjustment: paired.Adjustment = "holm",
    seed: int = 0,
) -> pd.DataFrame:
    """The comparison table (`COLUMNS`), one row per pair and metric.

    preds: the ordinary probes' predictions, in results order (the first encoder is
    the default reference); reference: an encoder name; all_pairs: every pair instead.
    """
    rows: list[Comparison] = []
    cells: dict[tuple[str, int, str, str, str, str], list[Predictions]] = {}
    for p in preds:
        k = p.key
        if k.train_fraction == 1.0 and k.shots == 0 and k.repeat == 0:
            cell = (k.dataset, k.resolution, k.pool, k.protocol, k.probe, k.test_dataset)
            cells.setdefault(cell, []).append(p)
    for (dataset, res, pool, protocol, probe, test_dataset), group in cells.items():
        names = [_label(p) for p in group]
        if all_pairs:
            pairs = list(combinations(range(len(group)), 2))
        else:
            ref = next((i for i, n in enumerate(names) if n[0] == reference), None)
            ref = 0 if reference is None else ref
            if ref is None:
                continue  # this cell has no reference encoder
            pairs = [(i, ref) for i in range(len(group)) if i != ref]
        for i, j in pairs:
            a, b = group[i], group[j]
            base: dict[str, Any] = dict(
                dataset=dataset,
                resolution=res,
                pool=pool,
                protocol=protocol,
                probe=probe,
                encoder_a=a.key.encoder,
                random_init_a=a.key.random_init,
                encoder_b=b.key.encoder,
                random_init_b=b.key.random_init,
                test_dataset=test_dataset,
            )
            bb = _aligned(a, b)
            if isinstance(bb, str):
                rows.append(Comparison(**base, metric="", reason=bb))
                continue
            rows += _pair_rows(a, bb, base, seed)
    df = pd.DataFrame([asdict(r) for r in rows], columns=list(COLUMNS))
    tested = df.test.ne("") & np.isfinite(df.p_value.astype(float))
    if tested.any():
        df.loc[tested, "p_adjusted"] = paired.adjust(df.p_value[tested].to_numpy(float), adjustment)
    df["verdict"] = [
        str(
            paired.verdict(
                r.difference, r.ci_low, r.ci_high, r.p_adjusted, higher_is_better=r.higher_is_better
            )
        )
        if r.test
        else "not compared"
        for r in _rows(df)
    ]
    return df


def _rows(df: pd.DataFrame) -> list[Any]:
    """The table's rows, read by column name (`Comparison`'s fields)."""
    return list(df.itertuples())


def table(df: pd.DataFrame) -> str:
    """The comparisons as lines for people; random inits are labelled as such."""

    def enc(name: str, ri: bool) -> str:
        return f"{name} (random init)" if ri else name

    lines = [
        f"{'dataset':<14} {'probe':<11} {'metric':<9} {'A':<24} {'B':<24} "
        f"{'A-B':>7}  {'95% CI':<17} {'test':<16} {'p adj':>6}  verdict"
    ]
    for r in _rows(df):
        a, b = enc(r.encoder_a, r.random_init_a), enc(r.encoder_b, r.random_init_b)
        name = f"{r.dataset}->{r.test_dataset}" if r.test_dataset else r.dataset
        if not r.test:
            lines.append(f"{name:<14} {r.probe:<11} {'':<9} {a:<24} {b:<24} {r.reason}")
            continue
        lines.append(
            f"{name:<14} {r.probe:<11} {r.metric:<9} {a:<24} {b:<24} "
            f"{r.difference:7.3f}  {bootstrap_interval(r.ci_low, r.ci_high):<17} "
            f"{r.test:<16} {r.p_adjusted:6.3f}  {r.verdict}"
        )
    return "\n".join(lines)


def bootstrap_interval(lo: float, hi: float) -> str:
    """'[lo, hi]' of a difference, or '[no interval]'."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "[no interval]"
    return f"[{lo:+.3f}, {hi:+.3f}]"
