"""Every seed's kept predictions of a probe fitted with `--seeds`, and the comparison of
two such probes over seeds and test units (pure numpy beside the files: no torch, so
the report and `compare` may read it; the fits are `featstore.probing.seeds`').
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from featstore.errors import ProbeError
from featstore.probing import bootstrap
from featstore.probing.pairdraws import PairedBootstrap, seeded_bootstrap
from featstore.probing.predictions import (
    FOLDER,
    Key,
    Predictions,
    kept_in,
    read_predictions,
    row_key,
)


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
