"""The compare stage: OUT's kept predictions -> OUT/comparisons.csv and a table.

featstore compare --out results [--reference ENC] [--all-pairs] [--adjust holm|bh]
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from featstore.errors import ProbeError
from featstore.places import atomic_file
from featstore.probing import compare as cmp
from featstore.probing.paired import Adjustment
from featstore.probing.predictions import kept
from featstore.probing.results_file import RESULTS, read_results

COMPARISONS = "comparisons.csv"


def comparisons(
    out: Path,
    reference: str | None = None,
    all_pairs: bool = False,
    adjustment: Adjustment = "holm",
) -> tuple[pd.DataFrame, list[str]]:
    """The comparison table of OUT's kept predictions, and notes on rows without any."""
    csv = out / RESULTS
    if not csv.is_file():
        raise ProbeError(f"{csv} is not there; run `featstore probe --out {out}` first")
    preds, missing = kept(out, read_results(csv))
    if not preds:
        raise ProbeError(
            f"{out}: no kept predictions (OUT/predictions/); rerun `featstore probe --out "
            f"{out}`, which writes them"
        )
    names = {p.key.encoder for p in preds}
    if reference is not None and reference not in names:
        raise ProbeError(
            f"--reference {reference!r} has no predictions in {out}; give one of {sorted(names)}"
        )
    return cmp.compare(preds, reference, all_pairs=all_pairs, adjustment=adjustment), missing


def run(
    out: Path,
    reference: str | None = None,
    all_pairs: bool = False,
    adjustment: Adjustment = "holm",
    echo: Callable[[str], object] = print,
) -> pd.DataFrame:
    """Compare, write OUT/comparisons.csv in one step and print the table."""
    df, missing = comparisons(out, reference, all_pairs, adjustment)
    with atomic_file(out / COMPARISONS) as f:
        df.to_csv(f, index=False, float_format="%.6g")
    echo(cmp.table(df))
    for m in missing:
        echo(f"note: not compared (no predictions): {m}")
    echo(f"comparisons: {out / COMPARISONS} ({len(df)} rows; p adjusted by {adjustment})")
    return df
