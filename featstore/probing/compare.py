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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd

from featstore.probing import bootstrap, paired
from featstore.probing.pairdraws import PairedBootstrap, compare_draws
from featstore.probing.predictions import Key, Predictions
from featstore.probing.seed_pairs import seeded_difference


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
    seeds_a: int = 1  # fits of A (`featstore probe --seeds`): above 1, the seeded test
    seeds_b: int = 1


COLUMNS = tuple(Comparison.__dataclass_fields__)


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
        k = pred.shape[1]
        # One pass over w (n, b), which at 5,000 units x 1,001 draws is 40 MB: the
        # three counts' matrix products read it once together, not three times.
        rows = np.ascontiguousarray(np.concatenate([pred & true, true, pred], 1).T, np.float64)
        counts = rows @ w  # (3K, b)
        tp, support = counts[:k], counts[k : 2 * k]
        denom = counts[2 * k :] + support
        f1 = 2 * tp / np.maximum(denom, 1e-300)
        f1[denom == 0] = 0.0
        if y.ndim == 2:
            return f1.mean(0)
        present = support > 0
        with np.errstate(invalid="ignore"):
            return (f1 * present).sum(0) / present.sum(0)

    return metric


class Scored:
    """One encoder's predictions in the cell's unit order, with its draws of each
    metric made once on the cell's `Resampling`: every pair it enters reuses them, so
    ten encoders against a reference cost ten sets of draws, not eighteen."""

    def __init__(self, p: Predictions, resampling: bootstrap.Resampling) -> None:
        self.p, self.resampling = p, resampling
        self.metrics = _metrics(p)
        self._draws: dict[str, np.ndarray] = {}
        self._placements: list[paired.Placements] | None = None

    def draws(self, metric: str) -> np.ndarray:
        if metric not in self._draws:
            fn, values, _ = self.metrics[metric]
            self._draws[metric] = bootstrap.weighted_draws(fn, values, self.resampling)
        return self._draws[metric]

    def placements(self) -> list[paired.Placements]:
        """DeLong's placements of each class (label), made once."""
        if self._placements is None:
            assert self.p.truth is not None and self.p.scores is not None
            self._placements = paired.label_placements(self.p.truth, self.p.scores)
        return self._placements


def _metrics(p: Predictions) -> dict[str, tuple[bootstrap.WeightedMetric, np.ndarray, bool]]:
    """metric -> (its `WeightedMetric`, what it scores, higher is better)."""
    if p.task == "segmentation":
        assert p.per is not None
        out: dict[str, tuple[bootstrap.WeightedMetric, np.ndarray, bool]] = {}
        for m, row in (("dice", 0), ("hd95", 4)):
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a unit with no class
                out[m] = (bootstrap.weighted_mean, np.nanmean(p.per[:, row], 1), m != "hd95")
        return out
    assert p.truth is not None and p.scores is not None
    y = p.truth
    out = {"auroc": (bootstrap.macro_auroc_of(y), p.scores, True)}
    if y.ndim == 2:
        for j in range(y.shape[1]):
            out[f"auroc:{j}"] = (
                bootstrap.macro_auroc_of(y[:, j : j + 1]),
                p.scores[:, j : j + 1],
                True,
            )
    else:
        correct = (p.scores.argmax(1) == y).astype(np.float64)
        out["accuracy"] = (bootstrap.weighted_mean, correct, True)
    out["f1"] = (_f1(y), p.scores, True)
    return out


def pair_rows(a: Scored, b: Scored, base: dict[str, Any]) -> list[Comparison]:
    """Every metric's comparison of A with B (both in the cell's unit order)."""
    _, resampled = a.p.groups()
    common = dict(base, n_units=len(a.p.sample), resampled=resampled)
    y = a.p.truth
    binary = y is not None and y.ndim == 1 and a.p.scores is not None and a.p.scores.shape[1] == 2
    out = []
    for metric, (_, _, higher) in a.metrics.items():
        r = compare_draws(a.draws(metric), b.draws(metric))
        test, p = "paired bootstrap", r.p_value
        if metric == "auroc" and binary:  # the interval from the bootstrap, p from DeLong
            test, p = "delong", paired.delong_from(a.placements()[1], b.placements()[1]).p_value
        elif metric.startswith("auroc:"):
            j = int(metric.split(":")[1])
            test, p = "delong", paired.delong_from(a.placements()[j], b.placements()[j]).p_value
        elif metric == "accuracy":
            ca, cb = a.metrics[metric][1], b.metrics[metric][1]
            test, p = "mcnemar", paired.mcnemar_exact(ca > 0, cb > 0).p_value
        out.append(_row(common, metric, r, test, p, higher))
    return out


def _row(
    common: dict[str, Any], metric: str, r: PairedBootstrap, test: str, p: float, higher: bool
) -> Comparison:
    return Comparison(
        **common,
        metric=metric,
        value_a=r.value_a,
        value_b=r.value_b,
        difference=r.difference,
        ci_low=r.ci_low,
        ci_high=r.ci_high,
        test=test,
        p_value=p,
        higher_is_better=higher,
    )


def aligned(a: Predictions, b: Predictions) -> Predictions | str:
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


def in_one_order(group: Sequence[Predictions], anchor: int, seed: int) -> list[Scored | None]:
    """Each of `group` scored in group[anchor]'s unit order on one `Resampling`, so
    that its draws are made once and shared by every pair it enters; None for one
    scored on other units than the anchor."""
    first = group[anchor]
    resampling = bootstrap.Resampling.of(len(first.sample), first.groups()[0], seed=seed)
    out: list[Scored | None] = []
    for p in group:
        q = p if p is first else aligned(first, p)
        out.append(None if isinstance(q, str) else Scored(q, resampling))
    return out


def _values(p: Predictions, metric: str) -> Callable[[np.ndarray], np.ndarray]:
    """One seed's scores (or segmentation `per`) -> what `metric` of `p` scores."""
    if p.task == "segmentation":
        return lambda x: _metrics(replace(p, per=x))[metric][1]
    return lambda x: _metrics(replace(p, scores=x))[metric][1]


def seeded_rows(
    a: Predictions,
    b: Predictions,
    seeds_a: Sequence[Predictions],
    seeds_b: Sequence[Predictions],
    base: dict[str, Any],
    seed: int,
) -> list[Comparison]:
    """Every metric's comparison of two trainable probes fitted with several seeds: the
    two-level bootstrap (`seed_pairs.seeded_difference`: test units, the same for A and B,
    then each side's seeds), test "seeded bootstrap"; DeLong and McNemar would test one
    fit each, so they are not used here."""
    _, resampled = a.groups()
    common = dict(base, n_units=len(a.sample), resampled=resampled)
    common |= dict(seeds_a=len(seeds_a), seeds_b=len(seeds_b))
    out = []
    for metric, (fn, _, higher) in _metrics(a).items():
        try:
            r = seeded_difference(fn, seeds_a, seeds_b, _values(a, metric), seed=seed)
        except ValueError as exc:  # a seed's file of other units
            return [Comparison(**base, metric="", reason=str(exc))]
        out.append(_row(common, metric, r, "seeded bootstrap", r.p_value, higher))
    return out


def pair_comparisons(
    a: Predictions,
    b: Predictions,
    sa: Scored | None,
    sb: Scored | None,
    seed: int,
    seeds: Mapping[Key, Sequence[Predictions]] | None = None,
) -> list[Comparison]:
    """A with B from their `in_one_order` scoring; where either is not on the anchor's
    units, on A's own (they may share theirs); one row with the reason where A and B
    share no units. `seeds`: the ordinary key -> every seed's predictions of a
    trainable probe (`seed_pairs.kept_seeds`); where A or B has more than one, the seeded
    test (`seeded_rows`)."""
    base: dict[str, Any] = dict(
        dataset=a.key.dataset,
        resolution=a.key.resolution,
        pool=a.key.pool,
        protocol=a.key.protocol,
        probe=a.key.probe,
        encoder_a=a.key.encoder,
        random_init_a=a.key.random_init,
        encoder_b=b.key.encoder,
        random_init_b=b.key.random_init,
        test_dataset=a.key.test_dataset,
    )
    fits_a = (seeds or {}).get(a.key, [a])
    fits_b = (seeds or {}).get(b.key, [b])
    if max(len(fits_a), len(fits_b)) > 1:
        bb = aligned(a, b)
        if isinstance(bb, str):
            return [Comparison(**base, metric="", reason=bb)]
        return seeded_rows(a, bb, fits_a, fits_b, base, seed)
    if sa is None or sb is None:
        bb = aligned(a, b)
        if isinstance(bb, str):
            return [Comparison(**base, metric="", reason=bb)]
        own = bootstrap.Resampling.of(len(a.sample), a.groups()[0], seed=seed)
        sa, sb = Scored(a, own), Scored(bb, own)
    return pair_rows(sa, sb, base)


def compare(
    preds: Sequence[Predictions],
    reference: str | None = None,
    *,
    all_pairs: bool = False,
    adjustment: paired.Adjustment = "holm",
    seed: int = 0,
    seeds: Mapping[Key, Sequence[Predictions]] | None = None,
) -> pd.DataFrame:
    """The comparison table (`COLUMNS`), one row per pair and metric.

    preds: the ordinary probes' predictions, in results order (the first encoder is
    the default reference); reference: an encoder name; all_pairs: every pair instead.
    """
    rows: list[Comparison] = []
    cells: dict[tuple[str, int, str, str, str, str], list[Predictions]] = {}
    for p in preds:
        k = p.key
        if k.ordinary:
            cell = (k.dataset, k.resolution, k.pool, k.protocol, k.probe, k.test_dataset)
            cells.setdefault(cell, []).append(p)
    for group in cells.values():
        if all_pairs:
            ref, pairs = 0, list(combinations(range(len(group)), 2))
        else:
            found = [i for i, p in enumerate(group) if p.key.encoder == reference]
            if reference is not None and not found:
                continue  # this cell has no reference encoder
            ref = found[0] if found else 0
            pairs = [(i, ref) for i in range(len(group)) if i != ref]
        scored = in_one_order(group, ref, seed)
        for i, j in pairs:
            rows += pair_comparisons(group[i], group[j], scored[i], scored[j], seed, seeds)
    return judged([asdict(r) for r in rows], adjustment)


def judged(rows: list[dict[str, Any]], adjustment: paired.Adjustment) -> pd.DataFrame:
    """The table of comparison rows (`Comparison` fields, perhaps more columns), p
    adjusted across all of them and each worded (`paired.verdict`)."""
    columns = [*COLUMNS, *(c for c in (rows[0] if rows else {}) if c not in COLUMNS)]
    df = pd.DataFrame(rows, columns=columns)
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


def table(df: pd.DataFrame, step: bool = False) -> str:
    """The comparisons as aligned lines for people (each column as wide as its longest
    entry); random inits are labelled as such. step: the rows are `steps.steps'` (A
    and B each named with its resolution)."""

    def enc(name: str, ri: bool, res: int) -> str:
        return f"{name}{f'@{res}' if step else ''}{' (random init)' if ri else ''}"

    cells = []
    for r in _rows(df):
        a = enc(r.encoder_a, r.random_init_a, r.resolution)
        b = enc(r.encoder_b, r.random_init_b, getattr(r, "resolution_b", r.resolution))
        name = f"{r.dataset}->{r.test_dataset}" if r.test_dataset else r.dataset
        if not r.test:
            cells.append((name, r.probe, "", a, b, r.reason))
            continue
        ci = bootstrap_interval(r.ci_low, r.ci_high)
        rest = f"{r.difference:7.3f}  {ci:<17} {r.test:<16} {r.p_adjusted:6.3f}  {r.verdict}"
        cells.append((name, r.probe, r.metric, a, b, rest))
    head = ("dataset", "probe", "metric", "A", "B")
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, h in enumerate(head)]
    rest = f"{'A-B':>7}  {'95% CI':<17} {'test':<16} {'p adj':>6}  verdict"
    lines = []
    for row in [(*head, rest), *cells]:
        lines.append(
            " ".join(f"{c:<{w}}" for c, w in zip(row, widths, strict=False)) + " " + row[5]
        )
    return "\n".join(line.rstrip() for line in lines)


def bootstrap_interval(lo: float, hi: float) -> str:
    """'[lo, hi]' of a difference, or '[no interval]'."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "[no interval]"
    return f"[{lo:+.3f}, {hi:+.3f}]"
