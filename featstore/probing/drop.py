"""The drop between a probe's internal and external scores, with its 95% interval.

The two test sets (the train dataset's own, another dataset's) are different units, so
the difference is unpaired: each set is resampled on its own (internal with `seed`,
external with `seed + 1`) and the interval is that of the differences of the two sets'
independent bootstrap draws. Predictions in, numbers out: the report
(`featstore.report.external`) reads the kept predictions of both rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from featstore.probing import bootstrap
from featstore.probing.predictions import Predictions
from featstore.probing.segscores import volume_draws


@dataclass(frozen=True)
class Drop:
    """A probe's internal score minus its external score, with a 95% interval."""

    internal: float
    external: float
    drop: float  # internal - external: positive when the other dataset scores lower
    ci_low: float
    ci_high: float
    n_internal: int  # test units of each set
    n_external: int


def drop(internal: Predictions, external: Predictions, seed: int = 0) -> dict[str, Drop]:
    """{metric: Drop} of two predictions of one probe (one encoder, resolution, pool
    and protocol): on its own dataset's test units and on the other's.

    Unpaired: the internal units are resampled with `seed`, the external ones with
    `seed + 1`, each on its own (`bootstrap.classification_draws`, segmentation:
    `segscores.volume_draws`, as their rows' intervals), and the interval
    holds the 2.5 and 97.5 percentiles of the draws' differences. Draw 0 of each is the
    score on all of its units, the value in results.csv.
    """
    if internal.task == "segmentation":  # per-unit Dice, IoU, HD95 of each class
        assert internal.per is not None and external.per is not None
        a = volume_draws(internal.per, internal.classes, seed)
        b = volume_draws(external.per, external.classes, seed + 1)
    else:
        assert internal.truth is not None and internal.scores is not None
        assert external.truth is not None and external.scores is not None
        a = bootstrap.classification_draws(internal.truth, internal.scores, seed)
        b = bootstrap.classification_draws(external.truth, external.scores, seed + 1)
    out = {}
    for m in a:
        diff = bootstrap.intervals({m: a[m] - b[m]})[m]
        out[m] = Drop(
            float(a[m][0]), float(b[m][0]), *diff, len(internal.sample), len(external.sample)
        )
    return out
