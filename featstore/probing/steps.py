"""Does scale help? Paired steps up a model family's size ladder and up the input
resolutions, from the kept predictions (pure).

The seed paper claims that a larger model or a finer input does not reliably help.
Each step here answers that for one dataset x probe x metric with an interval and a
test instead of two single numbers:

- `size`: successive sizes of one family (`family`, the caller's
  `encode.presets.preset_family`, so this room needs no encoder: DINOv3 S -> S+ ->
  B -> L -> H+ -> 7B, DINOv2 S -> B -> L) scored at one resolution; A is the larger
  model, B the next smaller one scored, so A - B > 0 means the larger one is better.
- `resolution`: successive input resolutions of one encoder; A is the finer one.

A step is a paired comparison on the same test units, the same as `compare`'s (the
paired bootstrap of the difference resampling patients where known, DeLong, McNemar;
`compare.pair_rows`). A random init is stepped only to a random init of its family,
never to pretrained weights. The p-values are adjusted across the steps of one run
(Holm, or Benjamini-Hochberg), apart from `compare`'s reference comparisons: the two
tables answer different questions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any, Literal

import pandas as pd

from featstore.probing import paired
from featstore.probing.compare import COLUMNS, in_one_order, judged, pair_comparisons
from featstore.probing.predictions import Key, Predictions

Step = Literal["size", "resolution"]


def _chain_rows(
    step: Step,
    chain: Sequence[Predictions],
    seed: int,
    seeds: Mapping[Key, Sequence[Predictions]] | None,
) -> list[dict[str, Any]]:
    """The comparisons of each member of `chain` (smallest first) with the one below
    it; each member's draws are made once (`compare.in_one_order`)."""
    scored = in_one_order(chain, 0, seed)
    rows = []
    for i in range(1, len(chain)):
        a, b = chain[i], chain[i - 1]
        extra = {"step": step, "resolution_b": b.key.resolution}
        for c in pair_comparisons(a, b, scored[i], scored[i - 1], seed, seeds):
            rows.append({**extra, **asdict(c)})
    return rows


def steps(
    preds: Sequence[Predictions],
    family: Callable[[str], tuple[str, int] | None],
    *,
    adjustment: paired.Adjustment = "holm",
    seed: int = 0,
    seeds: Mapping[Key, Sequence[Predictions]] | None = None,
) -> pd.DataFrame:
    """The step table: `compare.COLUMNS` plus `step` and `resolution_b` (B's
    resolution; `resolution` is A's), one row per step and metric. `family(encoder)`
    is (family, place in its size ladder), None outside a ladder. `seeds`: as
    `compare.compare`'s (trainable probes fitted with several seeds)."""
    rows: list[dict[str, Any]] = []
    ladders: dict[tuple[Any, ...], list[tuple[int, Predictions]]] = {}
    inputs: dict[tuple[Any, ...], list[Predictions]] = {}
    for p in preds:
        k = p.key
        if not k.ordinary:
            continue
        cell = (k.dataset, k.pool, k.protocol, k.probe, k.test_dataset)
        inputs.setdefault((*cell, k.encoder, k.random_init), []).append(p)
        rung = family(k.encoder)
        if rung is not None:
            key = (*cell, k.resolution, rung[0], k.random_init)
            ladders.setdefault(key, []).append((rung[1], p))
    for ladder in ladders.values():
        rows += _chain_rows("size", [p for _, p in sorted(ladder, key=lambda t: t[0])], seed, seeds)
    for group in inputs.values():
        rows += _chain_rows(
            "resolution", sorted(group, key=lambda p: p.key.resolution), seed, seeds
        )
    df = judged(rows, adjustment)
    if not rows:
        df = df.assign(step=pd.Series(dtype=str), resolution_b=pd.Series(dtype="int64"))
    return df[list(STEP_COLUMNS)]


STEP_COLUMNS = ("step", *COLUMNS[:2], "resolution_b", *COLUMNS[2:])
