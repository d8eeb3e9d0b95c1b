"""The compare stage: OUT's kept predictions -> OUT/comparisons.csv (each encoder
against the reference) and OUT/steps.csv (does scale help: successive sizes of a
family, successive resolutions), each printed as a table.

featstore compare --out results [--reference ENC] [--all-pairs] [--adjust holm|bh]
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from featstore.encode.presets import preset_family
from featstore.errors import ProbeError
from featstore.places import atomic_file
from featstore.probing import compare as cmp
from featstore.probing.paired import Adjustment
from featstore.probing.predictions import Key, Predictions
from featstore.probing.seed_pairs import kept_with_seeds
from featstore.probing.steps import steps

COMPARISONS = "comparisons.csv"
STEPS = "steps.csv"


def _kept(out: Path) -> tuple[list[Predictions], list[str], dict[Key, list[Predictions]]]:
    """OUT's kept predictions, notes on result rows without any, and every seed's
    predictions of the probes fitted with `--seeds`."""
    preds, missing, seeds = kept_with_seeds(out)
    if not preds:
        raise ProbeError(
            f"{out}: no kept predictions (OUT/predictions/); rerun `featstore probe --out "
            f"{out}`, which writes them"
        )
    return preds, missing, seeds


def run(
    out: Path,
    reference: str | None = None,
    all_pairs: bool = False,
    adjustment: Adjustment = "holm",
    echo: Callable[[str], object] = print,
) -> pd.DataFrame:
    """Compare, write OUT/comparisons.csv and OUT/steps.csv (each in one step) and
    print the tables."""
    preds, missing, seeds = _kept(out)
    names = {p.key.encoder for p in preds}
    if reference is not None and reference not in names:
        raise ProbeError(
            f"--reference {reference!r} has no predictions in {out}; give one of {sorted(names)}"
        )
    df = cmp.compare(preds, reference, all_pairs=all_pairs, adjustment=adjustment, seeds=seeds)
    with atomic_file(out / COMPARISONS) as f:
        df.to_csv(f, index=False, float_format="%.6g")
    echo(cmp.table(df))
    for m in missing:
        echo(f"note: not compared (no predictions): {m}")
    echo(f"comparisons: {out / COMPARISONS} ({len(df)} rows; p adjusted by {adjustment})")
    st = steps(preds, preset_family, adjustment=adjustment, seeds=seeds)
    with atomic_file(out / STEPS) as f:
        st.to_csv(f, index=False, float_format="%.6g")
    if len(st):
        echo("Does scale help? (A: the larger model or the finer input; B: the step below)")
        echo(cmp.table(st, step=True))
    echo(f"steps: {out / STEPS} ({len(st)} rows; p adjusted by {adjustment} over the steps)")
    return df
