"""Seed variance of the trainable probes: refit with each of `--seeds`, rows per seed and
a mean row with the spread across seeds (numpy; the fits are the caller's).

A trainable probe's score depends on its seed as well as on the test set it is scored
on. `featstore probe --seeds 0,1,2,3,4` refits every probe whose fit draws from the
seed (`trainable`) once per seed, the way the repeats of a label-efficiency point are
refitted (`featstore.probing.curves`):

- each seed's rows carry it in the `seed` column, and its test predictions have their
  own file (`-s<seed>`); the run's own seed (`ProbeOptions.seed`, 0) is the ordinary
  fit, reused, not refitted;
- one mean row per probe and metric (`seed` = `MEAN_OF_SEEDS`): the mean over seeds,
  `std`, `value_min` and `value_max` their spread, and a 95% interval that holds both
  sources of variance: each bootstrap resample of the test units (whole patients where
  the set has them, the same resamples for every seed) also draws S seeds out of the S
  with replacement (`nested_draws`);
- probes that do not depend on the seed (linear and kNN on fixed features: lbfgs and
  a vote are deterministic) are fitted once, and have no seed rows.

Comparing two trainable probes (`seeded_difference`) uses the same two-level resample
(`pairdraws.seeded_bootstrap`), so its interval and p-value hold the seed-to-seed
variance of both fits beside the test sampling.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from featstore.errors import ProbeError
from featstore.probing import bootstrap
from featstore.probing.curves import spread_of, with_spread
from featstore.probing.options import ProbeOptions
from featstore.probing.pairdraws import PairedBootstrap, seeded_bootstrap
from featstore.probing.predictions import (
    FOLDER,
    Key,
    Predictions,
    kept_in,
    read_predictions,
    row_key,
)
from featstore.probing.rows import (
    MEAN_OF_SEEDS,
    Outcome,
    ResultRow,
    SetColumns,
    result_rows,
)


def trainable(task: str, opts: ProbeOptions, bags: bool) -> tuple[str, ...]:
    """The probes of a set whose fit depends on the seed, refitted by `--seeds`.

    Segmentation: the dense decoder (torch; the linear head's lbfgs is deterministic).
    `--pool abmil`: ABMIL, and linear and kNN too, which read ABMIL's learnt pooling.
    `protocol: seed`: its linear layer (torch SGD). Else none.
    """
    if task == "segmentation":
        return ("seg-decoder",)
    if bags and opts.pool == "abmil":
        return ("linear", "knn", "abmil")
    return ("linear",) if opts.protocol == "seed" else ()


@dataclass
class SeedRuns:
    """The rows of every seed's refit and their mean rows, and each refit's predictions."""

    rows: list[ResultRow] = field(default_factory=list)
    predictions: list[Predictions] = field(default_factory=list)


def nested_draws(per_seed: np.ndarray, seed: int = 0) -> np.ndarray:
    """The draws of the mean over seeds, resampling seeds as well as test units.

    per_seed: (S, B + 1) each seed's draws of one metric on the same resamples of the
    test units (draw 0: all units). Draw 0 out is the mean over seeds; draw b is the
    mean of draw b over S seeds drawn with replacement (`default_rng([seed, 1])`, as
    `pairdraws.seeded_bootstrap`). One seed: its draws. Returns (B + 1,) float64.
    """
    per = np.asarray(per_seed, np.float64)
    if len(per) == 1:
        return per[0].copy()
    picks = np.random.default_rng([seed, 1]).integers(0, len(per), (per.shape[1] - 1, len(per)))
    drawn = np.take_along_axis(per[:, 1:].T, picks, axis=1)  # (B, S)
    return np.concatenate([[per[:, 0].mean()], drawn.mean(1)])


def mean_rows(where: SetColumns, outs: Sequence[Outcome], seed: int) -> list[ResultRow]:
    """One row per probe and metric of `outs` (one Outcome per seed, the same probes):
    the mean over seeds, their spread, and the `nested_draws` interval."""
    rows: list[ResultRow] = []
    for i, first in enumerate(outs[0].fitted):
        fits = [o.fitted[i] for o in outs]
        scores = {
            m: bootstrap.intervals(
                {m: nested_draws(np.stack([o.draws[first.probe][m] for o in outs]), seed)}
            )[m]
            for m in first.scores
        }
        mean = replace(
            first,
            scores=scores,
            param=float(np.median([f.param for f in fits])),
            seconds=sum(f.seconds for f in fits),
        )
        found = [replace(r, seed=MEAN_OF_SEEDS) for r in result_rows(where, mean)]
        rows += with_spread(found, spread_of(fits))
    return rows


def _only(found: Outcome, probes: Sequence[str]) -> Outcome:
    """`found` restricted to `probes`."""
    return Outcome(
        [f for f in found.fitted if f.probe in probes],
        {p: d for p, d in found.draws.items() if p in probes},
        {p: u for p, u in found.per_unit.items() if p in probes},
        {p: u for p, u in found.per_instance.items() if p in probes},
        tuple(p for p in found.predictions if p.key.probe in probes),
    )


def run_seeds(
    where: SetColumns,
    opts: ProbeOptions,
    probes: Sequence[str],
    fit: Callable[[int], Outcome],
    full: Outcome,
) -> SeedRuns:
    """Refit `probes` with every seed of `opts.seeds` (`fit`: seed -> Outcome of those
    probes, intervals drawn with `opts.seed`); `full`: the ordinary fit (`opts.seed`),
    reused where `opts.seeds` holds that seed. Its rows are already written as the
    ordinary rows: they are not repeated here, and its predictions neither."""
    out = SeedRuns()
    if not opts.seeds or not probes:
        return out
    outs = []
    for s in opts.seeds:
        found = _only(full if s == opts.seed else fit(s), probes)
        outs.append(found)
        if s == opts.seed:
            continue
        out.rows += [replace(row, seed=s) for f in found.fitted for row in result_rows(where, f)]
        out.predictions += [replace(p, key=replace(p.key, seed=s)) for p in found.predictions]
    out.rows += mean_rows(where, outs, opts.seed)
    return out


# ---- comparing two trainable probes ---------------------------------------------------


def kept_seeds(out: Path, rows: pd.DataFrame, first: Predictions) -> list[Predictions]:
    """Every seed's kept predictions of the rows of `first` (the ordinary file's
    predictions, as `predictions.kept` gives them), `first` first: one entry
    when the probe was fitted with a single seed. A seed's file that is missing, or of
    other units than the ordinary one, is a `ProbeError` naming it."""
    k = first.key
    same = rows[
        (rows.dataset == k.dataset)
        & (rows.feature_set == k.feature_set)
        & (rows.probe == k.probe)
        & (rows.pool == k.pool)
        & (rows.protocol == k.protocol)
        & (rows.train_fraction == 1.0)
        & (rows.shots == 0)
        & (rows.repeat == 0)
        & (rows.seed >= 0)
        & (rows.seed != k.seed)
    ]
    found = [first]
    for r in same.drop_duplicates("seed").sort_values("seed").itertuples():
        key = row_key(r)
        path = out / FOLDER / key.file_name
        if not path.is_file():
            raise ProbeError(
                f"{path}: missing, but results hold rows of seed {key.seed}; rerun "
                "`featstore probe --seeds ...` into this --out folder to write it"
            )
        found.append(read_predictions(path, key, np.asarray(first.sample)))
    return found


def seed_sets(
    out: Path, rows: pd.DataFrame, preds: Sequence[Predictions]
) -> dict[Key, list[Predictions]]:
    """Ordinary key -> every seed's predictions (`kept_seeds`) of each of `preds`
    fitted with more than one seed: what `compare` tests with the seeded bootstrap."""
    found = {}
    for p in preds:
        if "seed" in rows and (rows.seed > p.key.seed).any():
            fits = kept_seeds(out, rows, p)
            if len(fits) > 1:
                found[p.key] = fits
    return found


def kept_with_seeds(out: Path) -> tuple[list[Predictions], list[str], dict[Key, list[Predictions]]]:
    """`predictions.kept_in(out)` and `seed_sets` of its predictions: what `featstore
    compare`, the API and the report compare."""
    from featstore.probing.results_file import RESULTS, read_results

    preds, missing = kept_in(out)
    return preds, missing, seed_sets(out, read_results(out / RESULTS), preds)


def _stack(preds: Sequence[Predictions], order: np.ndarray, what: str) -> np.ndarray:
    """(S, n, ...) of each seed's `what` ("scores" or "per"), units in `order`."""
    out = []
    for p in preds:
        at = pd.Index(np.asarray(p.sample, str)).get_indexer(order)
        if (at < 0).any() or len(at) != len(p.sample):
            raise ValueError(
                f"{p.key.file_name}: its test units differ from the other seeds': every "
                "seed of a pair must be scored on the same units"
            )
        arr = getattr(p, what)
        assert arr is not None, what
        out.append(np.asarray(arr)[at])
    return np.stack(out)


def seeded_difference(
    metric: bootstrap.WeightedMetric,
    seeds_a: Sequence[Predictions],
    seeds_b: Sequence[Predictions],
    values: Callable[[np.ndarray], np.ndarray] | None = None,
    *,
    n_resamples: int = bootstrap.N_BOOT,
    seed: int = 0,
) -> PairedBootstrap:
    """metric(A) - metric(B) of two trainable probes, each fitted with several seeds.

    The two-level bootstrap of `pairdraws.seeded_bootstrap`: every resample redraws the
    test units (whole patients where the predictions have them, the same for A and B)
    and, for A and for B on their own, S seeds out of their S; the interval and the
    p-value hold both the test sampling and the seed-to-seed variance. The difference
    is that of the means over seeds on all units. A and B may have different numbers
    of seeds (one: that fit is taken as fixed).

    Args:
        metric: a `WeightedMetric` of one seed's predictions (n, ...).
        seeds_a, seeds_b: each seed's `Predictions` of A and of B (`kept_seeds`), of the
            same test units in any order (aligned here on A's first).
        values: per-unit values from a seed's predictions array (scores (n, K), or the
            segmentation `per` (n, 5, C-1)) -> the metric's input, e.g. a unit's Dice;
            None: the scores as they are.
    """
    if not seeds_a or not seeds_b:
        raise ValueError("seeded_difference needs at least one seed's predictions of each")
    first = seeds_a[0]
    order = np.asarray(first.sample, str)
    what = "per" if first.task == "segmentation" else "scores"
    a, b = _stack(seeds_a, order, what), _stack(seeds_b, order, what)
    if values is not None:
        a = np.stack([values(x) for x in a])
        b = np.stack([values(x) for x in b])
    groups = first.groups()[0] if first.patient is not None else None
    return seeded_bootstrap(metric, a, b, groups, n_resamples=n_resamples, seed=seed)
