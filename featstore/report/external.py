"""The report's "External test sets" section: each external evaluation's score beside
the same probe's internal score, and the drop between them with its 95% interval.

The drop is computed from the kept predictions of both rows
(`featstore.probing.drop`): the two test sets are different units, so it is an
unpaired difference, each test set resampled on its own. A row whose predictions are
not kept shows its scores without a drop interval.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from featstore.errors import ProbeError
from featstore.identity import labelled
from featstore.probing.drop import drop
from featstore.probing.metrics import MAIN_METRIC
from featstore.probing.predictions import FOLDER, read_predictions, row_key
from featstore.probing.rows import external, internal, interval

# the rows that are one probe on one pair of datasets (all but the metric's columns)
SAME = ["dataset", "encoder", "random_init", "resolution", "pool", "protocol", "probe"]
TEXT = (
    "Each probe fitted on the first dataset's train split (hyper-parameters on its val "
    "split) and scored on its own test split (internal) and on the second dataset "
    "(external). The drop is internal - external; its 95% interval is an unpaired "
    "bootstrap: the two test sets are different units, so each is resampled on its own "
    "(1,000 resamples each) and the interval is that of the differences."
)


def _signed(v: float) -> str:
    return f"{v:+.3f}" if np.isfinite(v) else ""


def _value(row: Any) -> float:
    return float(row.value)


def _score(row: Any) -> str:
    """'value [ci_low, ci_high]' of a results row."""
    return f"{_value(row):.3f} {interval(row.ci_low, row.ci_high)}"


def drops(out: Path, rows: pd.DataFrame, tasks: dict[str, str]) -> pd.DataFrame:
    """One line per external row of the main metric (`rows`: ordinary `typed` rows):
    the internal and external scores with their intervals, the drop and its interval,
    and a note where the drop has no interval (predictions not kept)."""
    ext, own = external(rows), internal(rows)
    lines = []
    for r in ext.itertuples():
        task = tasks.get(str(r.dataset), str(r.task))
        if r.metric != MAIN_METRIC.get(task, "auroc"):
            continue
        same = own
        for c in [*SAME, "metric"]:
            same = same[same[c] == getattr(r, c)]
        base = next(same.itertuples(), None)
        line = {
            "train -> test": f"{r.dataset} -> {r.test_dataset}",
            "encoder @ resolution": f"{labelled(str(r.encoder), bool(r.random_init))} @ "
            f"{r.resolution}px",
            "probe": str(r.probe) + (f" ({r.pool!s})" if r.pool else ""),
            "metric": str(r.metric),
            "internal": "" if base is None else _score(base),
            "external": _score(r),
            "drop": "" if base is None else _signed(_value(base) - _value(r)),
            "95% CI (unpaired)": "",
            "note": "" if base is not None else f"no internal row of {r.dataset}",
        }
        if base is not None:
            try:
                a = read_predictions(out / FOLDER / row_key(base).file_name, row_key(base))
                b = read_predictions(out / FOLDER / row_key(r).file_name, row_key(r))
            except (ProbeError, OSError):
                line["note"] = "predictions not kept: rerun `featstore probe` for the interval"
            else:
                d = drop(a, b)[str(r.metric)]
                line["drop"] = _signed(d.drop)
                if np.isfinite(d.ci_low) and np.isfinite(d.ci_high):
                    line["95% CI (unpaired)"] = f"[{d.ci_low:+.3f}, {d.ci_high:+.3f}]"
        lines.append(line)
    return pd.DataFrame(lines)


def section(out: Path, rows: pd.DataFrame, tasks: dict[str, str]) -> tuple[list[str], list[str]]:
    """(Markdown, HTML) of the section; empty without external rows."""
    table = drops(out, rows, tasks)
    if table.empty:
        return [], []
    head = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "---|" * len(table.columns)
    body = ["| " + " | ".join(map(str, r)) + " |" for r in table.itertuples(index=False)]
    md = ["## External test sets", "", TEXT, "", head, rule, *body, ""]
    page = ["<h2>External test sets</h2>", f"<p>{html.escape(TEXT)}</p>"]
    return md, [*page, table.to_html(index=False)]
