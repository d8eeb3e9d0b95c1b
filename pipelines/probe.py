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
from featstore.identity import SetIdentity, changes, labelled
from featstore.places import atomic_file
from featstore.probing.evaluation import SetResult, probe_manifest
from featstore.probing.metrics import MAIN_METRIC
from featstore.probing.options import ProbeOptions
from featstore.probing.predictions import FOLDER, write_predictions
from featstore.probing.results_file import SUPERSEDED, check_results, write_results
from featstore.probing.rows import external, internal, interval, ordinary
from featstore.store.catalog import find_by_key
from featstore.store.sets import FeatureSet


def table(df: pd.DataFrame, datasets: list[Dataset]) -> str:
    """One line per dataset/encoder/resolution/probe with its main metric and interval."""
    lines = [
        f"{'dataset':<24} {'encoder':<30} {'res':>4} {'probe':<11} {'metric':<8} "
        f"{'value':>6}  95% CI"
    ]
    for ds in datasets:
        metric = MAIN_METRIC[ds.task]
        sub = ordinary(df[(df.dataset == ds.name) & (df.metric == metric)])
        for r in [*internal(sub).itertuples(), *external(sub).itertuples()]:
            enc = labelled(str(r.encoder), bool(r.random_init))
            test = str(r.test_dataset)
            name = ds.name if test == ds.name else f"{ds.name} -> {test}"
            lines.append(
                f"{name:<24} {enc:<30} {r.resolution:>4} {r.probe:<11} "
                f"{metric:<8} {r.value:6.3f}  {interval(r.ci_low, r.ci_high)}"
            )
    return "\n".join(lines)


def _save_examples(out: Path, result: SetResult) -> None:
    if result.examples is None:
        return
    folder = out / "examples"
    folder.mkdir(parents=True, exist_ok=True)
    ex = result.examples
    with atomic_file(folder / f"{result.key}.npz") as f:
        np.savez_compressed(f, item=ex.item, pred=ex.pred, truth=ex.truth)


def _save_attention(out: Path, result: SetResult) -> None:
    """OUT/attention/<set>.npz: `item` (n,) int64, the set's item numbers of every test
    slide's (volume's) tiles, and `weight` (n,) float32, ABMIL's attention on them
    (summing to 1 per slide); written by `--pool abmil`, drawn by the report."""
    if result.attention is None:
        return
    folder = out / "attention"
    folder.mkdir(parents=True, exist_ok=True)
    att = result.attention
    with atomic_file(folder / f"{result.key}.npz") as f:
        np.savez_compressed(f, item=att.item, weight=att.weight)


def _save_predictions(out: Path, result: SetResult) -> None:
    """OUT/predictions/<dataset>-<set>-<probe>[...].parquet: the test predictions of
    each probe, of each label-efficiency repeat and of each `--seeds` refit
    (`predictions.Key.file_name`), read by `featstore compare`."""
    for p in result.predictions:  # an external evaluation's under predictions/external/
        write_predictions(out / FOLDER, p)


def _cells(df: pd.DataFrame) -> list[str]:
    """Each row's cell, as people read it: 'dataset / encoder @ resolution px' (an
    external evaluation's: 'dataset -> test_dataset / ...')."""
    out = []
    for r in df.itertuples():
        name, test = str(r.dataset), str(r.test_dataset)
        on = "" if test == name else f" -> {test}"
        out.append(
            f"{name}{on} / {labelled(str(r.encoder), bool(r.random_init))} @ {r.resolution}px"
        )
    return out


def _identity(cache: Path | str, key: str) -> SetIdentity | None:
    """The identity of the set whose key starts with `key`; None when it is gone."""
    path = find_by_key(cache, key)
    return None if path is None else SetIdentity.from_attrs(FeatureSet(path).attrs["identity"])


def _superseded(stale: pd.DataFrame, df: pd.DataFrame, cache: Path | str) -> dict[str, set[str]]:
    """The cells of the superseded rows `stale`, by why their set changed (from the two
    sets' identities, `identity.changes`): the manifest is said to have changed only
    when it did."""
    sets_now = zip(df.feature_set, df.test_feature_set, strict=True)
    now = dict(zip(_cells(df), sets_now, strict=True))
    out: dict[str, set[str]] = {}
    was = zip(stale.feature_set, stale.test_feature_set, strict=True)
    for cell, (old, old_test) in sorted(set(zip(_cells(stale), was, strict=True))):
        new, new_test = now.get(cell, ("", ""))
        if old == new:  # an external evaluation whose test set changed
            old, new = old_test, new_test
        before, after = _identity(cache, str(old)), _identity(cache, str(new))
        if before is None or after is None:
            why = f"the earlier set {old} is not in {cache}, so what changed is unknown"
        else:
            what = changes(before, after)
            why = " and ".join(what) + " changed since" if what else "one identity, re-made"
        out.setdefault(why, set()).add(cell)
    return out


def run(
    manifest: Manifest,
    out: Path,
    opts: ProbeOptions,
    *,
    manifest_file: Path | None = None,
    echo: Callable[[str], object] = print,
) -> pd.DataFrame:
    """Probe every cell, write the results files, print the table and any problems.

    Raises `ProbeError` when no cell could be probed at all, and before probing when
    OUT holds a results file that cannot be read (`results_file.check_results`).
    """
    check_results(out)

    def done(where: str, result: SetResult) -> None:
        _save_examples(out, result)
        _save_attention(out, result)
        _save_predictions(out, result)
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
    with atomic_file(out / "run-config.json") as f:
        f.write(json.dumps(config, indent=2).encode())
    if len(df):
        echo(table(df, list(manifest.datasets)))
    for n in found.notes:
        echo(f"note: {n}")
    for why, cells in _superseded(stale, df, manifest.cache).items():
        rows = int(stale[[c in cells for c in _cells(stale)]].shape[0])
        echo(
            f"note: {rows} earlier rows of {', '.join(sorted(cells))} scored another feature "
            f"set ({why}); moved to {out / SUPERSEDED}"
        )
    for p in found.skipped:
        echo(f"skipped: {p}")
    for p in found.problems:
        echo(f"problem: {p}")
    if found.problems and not found.rows:
        raise ProbeError("no dataset could be probed:\n  " + "\n  ".join(found.problems))
    echo(f"results: {out / 'results.csv'} ({len(found.rows)} rows written)")
    return df
