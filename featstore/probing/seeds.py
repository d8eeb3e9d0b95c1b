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

Comparing two trainable probes (`seed_pairs.seeded_difference`) uses the same two-level
resample (`pairdraws.seeded_bootstrap`), so its interval and p-value hold the
seed-to-seed variance of both fits beside the test sampling.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from featstore.probing import bootstrap
from featstore.probing.curves import spread_of, with_spread
from featstore.probing.options import ProbeOptions
from featstore.probing.predictions import (
    Predictions,
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
