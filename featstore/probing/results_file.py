"""results.csv, results.jsonl and results-superseded.csv: read checked, written whole.

One reader for every results file (the probe stage before it probes, the report) and
one writer. A file whose columns do not parse is refused with the line and the
column, before any probe has spent its time; every write goes to a temporary file
renamed into place (`featstore.store.location.atomic_file`), so that a kill leaves
the previous file whole. Key columns are written exactly (a fraction of 1/3 is
`0.3333333333333333`, not `0.333333`), so that a key read back is the key written and
a rerun replaces its rows instead of adding to them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from featstore.errors import ProbeError
from featstore.places import atomic_file
from featstore.probing.rows import COLUMNS, KEY, TEXT, ResultRow, field_type, frame, typed, upsert

SUPERSEDED = "results-superseded.csv"
RESULTS = "results.csv"
FIX = "move it away, or probe into another --out folder"
_NUMERIC = [c for c in COLUMNS if c not in TEXT]
_NA = ["", "nan", "NaN", "NA", "<NA>", "None"]  # a numeric cell without a value
_BOOLS = {"true", "false", "1", "0", "1.0", "0.0"}
# float keys: written with repr, exactly (`float_format` rounds every other number)
_EXACT = [k for k in KEY if field_type(k) == "float"]


def read_results(csv: Path) -> pd.DataFrame:
    """The `typed` rows of the results file `csv`.

    Raises a `ProbeError` naming the file (and the line and column) when it is not a
    featstore results file: empty, truncated, someone else's CSV, or a cell of a
    number or flag column that is not one. Text columns are read as written: a
    dataset named "007" or "nan" keeps its name. Columns an older featstore did not
    write get their default (`typed`).
    """
    try:
        old = pd.read_csv(
            csv, dtype=TEXT, keep_default_na=False, na_values={c: _NA for c in _NUMERIC}
        )
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ProbeError(f"{csv}: not a featstore results file ({exc}); {FIX}") from None
    missing = [k for k in ("dataset", "encoder", "probe", "metric", "value") if k not in old]
    if missing:
        raise ProbeError(f"{csv}: not a featstore results file (no {missing} columns); {FIX}")
    for name in (c for c in _NUMERIC if c in old):
        _check_column(csv, name, old[name])
    return typed(old)


def _check_column(csv: Path, name: str, col: pd.Series) -> None:
    """A `ProbeError` naming the first cell of `col` that is not of its field's type."""
    kind = field_type(name)
    given = col.notna()
    if kind == "bool":
        bad = given & ~col.astype(str).str.lower().isin(_BOOLS)
        want = "true or false"
    else:
        number = pd.to_numeric(col, errors="coerce")
        bad = given & number.isna()
        if kind == "int":
            bad |= given & number.notna() & (number != np.floor(number))
        want = "a whole number" if kind == "int" else "a number"
    if bad.any():
        at = int(np.flatnonzero(bad.to_numpy())[0])
        raise ProbeError(
            f"{csv}, line {at + 2}, column '{name}': '{col.iloc[at]}' is not {want}; fix "
            f"that line, or {FIX}"
        )


def _write_csv(path: Path, df: pd.DataFrame) -> None:
    out = df.copy()
    for k in _EXACT:
        out[k] = [repr(float(v)) for v in out[k]]
    with atomic_file(path) as f:
        out.to_csv(f, index=False, float_format="%.6g")


def check_results(out: Path) -> None:
    """Read OUT's results files (results.csv, results-superseded.csv) if they are
    there: a `ProbeError` now, before probing, for one that cannot be upserted later."""
    for name in (RESULTS, SUPERSEDED):
        if (out / name).is_file():
            read_results(out / name)


def write_results(out: Path, rows: Sequence[ResultRow]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Upsert rows (keyed by `rows.KEY`) into OUT/results.csv and OUT/results.jsonl.

    Returns (all rows, the earlier rows superseded now). Earlier rows of a cell that
    `rows` scores on another feature set (the manifest changed what the cell is) move
    to OUT/results-superseded.csv: kept, not mixed with the new set's scores. Each
    file is replaced in one step.
    """
    out.mkdir(parents=True, exist_ok=True)
    csv = out / RESULTS
    old = read_results(csv) if csv.is_file() else frame([])
    new, stale = upsert(old, frame(list(rows)))
    if len(stale):
        moved = out / SUPERSEDED
        before = read_results(moved) if moved.is_file() else frame([])
        _write_csv(moved, pd.concat([before, stale], ignore_index=True))
    _write_csv(csv, new)
    with atomic_file(out / "results.jsonl") as f:
        for rec in new.to_dict("records"):
            f.write((json.dumps(rec, default=str) + "\n").encode())
    return new, stale
