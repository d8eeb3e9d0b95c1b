"""The probe stage: cached feature sets -> results.csv/.jsonl, a table, report inputs.

Probes every cell of the manifest (`featstore.probing.evaluation`), upserts the rows into
OUT/results.csv and OUT/results.jsonl, writes the resolved configuration to
OUT/run-config.json, segmentation examples to OUT/examples/<set>.npz and (`--pool
abmil`) the attention over the test slides' tiles to OUT/attention/<set>.npz, and prints
the main metric of each cell. Never loads an encoder; torch is imported only by the
trainable heads (`featstore.probing.heads`: the segmentation decoder, `--pool abmil`,
`protocol: seed`).

    featstore probe --manifest data_manifest.yaml --out results
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from featstore.data.manifest import Dataset, Manifest
from featstore.data.native import data_check
from featstore.errors import ProbeError
from featstore.identity import labelled
from featstore.probing.evaluation import SetResult, probe_manifest
from featstore.probing.metrics import MAIN_METRIC
from featstore.probing.options import ProbeOptions
from featstore.probing.rows import CELL, TEXT, ResultRow, frame, interval, ordinary, typed, upsert


def _read_results(csv: Path) -> pd.DataFrame:
    """The rows an earlier run wrote to `csv`; a `ProbeError` naming the file when it is
    not a featstore results file (empty, truncated, or someone else's CSV)."""
    fix = "move it away, or probe into another --out folder"
    try:
        old = pd.read_csv(csv, dtype=TEXT)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ProbeError(f"{csv}: not a featstore results file ({exc}); {fix}") from None
    missing = [k for k in ("dataset", "encoder", "probe", "metric", "value") if k not in old]
    if missing:
        raise ProbeError(f"{csv}: not a featstore results file (no {missing} columns); {fix}")
    return typed(old)


SUPERSEDED = "results-superseded.csv"


def write_results(out: Path, rows: list[ResultRow]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Upsert rows (keyed by `rows.KEY`) into OUT/results.csv and OUT/results.jsonl.

    Returns (all rows, the earlier rows superseded now). Earlier rows of a cell that
    `rows` scores on another feature set (the manifest changed what the cell is) move
    to OUT/results-superseded.csv: kept, not mixed with the new set's scores.
    """
    out.mkdir(parents=True, exist_ok=True)
    csv = out / "results.csv"
    old = _read_results(csv) if csv.is_file() else frame([])
    new, stale = upsert(old, frame(rows))
    if len(stale):
        moved = out / SUPERSEDED
        before = _read_results(moved) if moved.is_file() else frame([])
        pd.concat([before, stale], ignore_index=True).to_csv(
            moved, index=False, float_format="%.6g"
        )
    new.to_csv(csv, index=False, float_format="%.6g")
    with (out / "results.jsonl").open("w") as f:
        for rec in new.to_dict("records"):
            f.write(json.dumps(rec, default=str) + "\n")
    return new, stale


def table(df: pd.DataFrame, datasets: list[Dataset]) -> str:
    """One line per dataset/encoder/resolution/probe with its main metric and interval."""
    lines = [
        f"{'dataset':<24} {'encoder':<30} {'res':>4} {'probe':<11} {'metric':<8} "
        f"{'value':>6}  95% CI"
    ]
    for ds in datasets:
        metric = MAIN_METRIC[ds.task]
        sub = ordinary(df[(df.dataset == ds.name) & (df.metric == metric)])
        for r in sub.itertuples():
            enc = labelled(str(r.encoder), bool(r.random_init))
            lines.append(
                f"{ds.name:<24} {enc:<30} {r.resolution:>4} {r.probe:<11} "
                f"{metric:<8} {r.value:6.3f}  {interval(r.ci_low, r.ci_high)}"
            )
    return "\n".join(lines)


def _save_examples(out: Path, result: SetResult) -> None:
    if result.examples is None:
        return
    folder = out / "examples"
    folder.mkdir(parents=True, exist_ok=True)
    ex = result.examples
    np.savez_compressed(folder / f"{result.key}.npz", item=ex.item, pred=ex.pred, truth=ex.truth)


def _save_attention(out: Path, result: SetResult) -> None:
    """OUT/attention/<set>.npz: `item` (n,) int64, the set's item numbers of every test
    slide's (volume's) tiles, and `weight` (n,) float32, ABMIL's attention on them
    (summing to 1 per slide); written by `--pool abmil`, drawn by the report."""
    if result.attention is None:
        return
    folder = out / "attention"
    folder.mkdir(parents=True, exist_ok=True)
    att = result.attention
    np.savez_compressed(folder / f"{result.key}.npz", item=att.item, weight=att.weight)


def run(
    manifest: Manifest,
    out: Path,
    opts: ProbeOptions,
    *,
    manifest_file: Path | None = None,
    echo: Callable[[str], object] = print,
) -> pd.DataFrame:
    """Probe every cell, write the results files, print the table and any problems.

    Raises `ProbeError` when no cell could be probed at all.
    """

    def done(where: str, result: SetResult) -> None:
        _save_examples(out, result)
        _save_attention(out, result)
        echo(f"probed {where}: {len(result.rows)} scores")

    found = probe_manifest(
        manifest,
        opts,
        manifest_file=manifest_file,
        on_set=done,
        data_check=data_check(manifest.cache),
    )
    df, stale = write_results(out, found.rows)
    config: dict[str, Any] = {"manifest": manifest.model_dump(mode="json")}
    config["options"] = {
        **dataclasses.asdict(opts),
        "curve": opts.curve.model_dump(mode="json") if opts.curve else None,
    }
    (out / "run-config.json").write_text(json.dumps(config, indent=2))
    if len(df):
        echo(table(df, list(manifest.datasets)))
    for n in found.notes:
        echo(f"note: {n}")
    if len(stale):
        cells = sorted(
            f"{r.dataset} / {labelled(str(r.encoder), bool(r.random_init))} @ {r.resolution}px"
            for r in stale.drop_duplicates(list(CELL)).itertuples()
        )
        echo(
            f"note: {len(stale)} earlier rows of {', '.join(cells)} scored another feature "
            f"set (the manifest changed since); moved to {out / SUPERSEDED}"
        )
    for p in found.skipped:
        echo(f"skipped: {p}")
    for p in found.problems:
        echo(f"problem: {p}")
    if found.problems and not found.rows:
        raise ProbeError("no dataset could be probed:\n  " + "\n  ".join(found.problems))
    echo(f"results: {out / 'results.csv'} ({len(found.rows)} rows written)")
    return df
