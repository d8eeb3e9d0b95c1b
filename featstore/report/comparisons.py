"""The report's "Is A better than B?" section: the comparison table of the kept
predictions (`featstore.probing.compare`) and, with 3+ encoders on 3+ datasets, their
mean ranks (Friedman, Wilcoxon-Holm: `featstore.probing.ranks`) and a
critical-difference diagram (`featstore.report.cdplot`)."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd

from featstore.encode.presets import preset_family
from featstore.identity import labelled
from featstore.probing import compare as cmp
from featstore.probing.metrics import MAIN_METRIC
from featstore.probing.predictions import kept
from featstore.probing.ranks import rank_encoders
from featstore.probing.rows import internal
from featstore.probing.seed_pairs import seed_sets
from featstore.probing.steps import steps
from featstore.report.cdplot import plot_critical_difference

CD_PLOT = "critical_difference.png"
MAIN_PROBE = {"classification": "linear", "multilabel": "linear", "segmentation": "seg-linear"}


def _table(df: pd.DataFrame, step: bool = False) -> pd.DataFrame:
    shown = df[df.metric.isin(["", *MAIN_METRIC.values(), "accuracy", "hd95"])]
    res_b = shown.resolution_b if step else shown.resolution

    def named(encoders: pd.Series, random: pd.Series, res: pd.Series) -> list[str]:
        at = [f" @ {r}" if step else "" for r in res]
        return [labelled(e, bool(r)) + a for e, r, a in zip(encoders, random, at, strict=True)]

    return pd.DataFrame(
        {
            **({"step": shown.step} if step else {}),
            "dataset": [
                d if t in ("", d) else f"{d} -> {t}"
                for d, t in zip(shown.dataset, shown.test_dataset, strict=True)
            ],
            "probe": shown.probe,
            "metric": shown.metric,
            "A": named(shown.encoder_a, shown.random_init_a, shown.resolution),
            "B": named(shown.encoder_b, shown.random_init_b, res_b),
            "A - B": [f"{d:+.3f}" if np.isfinite(d) else "" for d in shown.difference],
            "95% CI": [
                cmp.bootstrap_interval(lo, hi) if t else ""
                for lo, hi, t in zip(shown.ci_low, shown.ci_high, shown.test, strict=True)
            ],
            "test": shown.test,
            "p (adjusted)": [f"{p:.3g}" if np.isfinite(p) else "" for p in shown.p_adjusted],
            "verdict": [
                v if t else f"not compared: {why}"
                for v, t, why in zip(shown.verdict, shown.test, shown.reason, strict=True)
            ],
        }
    )


def _markdown(table: pd.DataFrame) -> str:
    head = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "---|" * len(table.columns)
    lines = ["| " + " | ".join(str(v) for v in r) + " |" for r in table.itertuples(index=False)]
    return "\n".join([head, rule, *lines])


def ranking_scores(rows: pd.DataFrame, tasks: dict[str, str]) -> pd.DataFrame:
    """(datasets x encoders) main metric of each dataset's main probe (`MAIN_PROBE`),
    averaged over resolutions; encoders missing a dataset are left out. Internal rows
    only: an external evaluation is not a dataset of its own."""
    rows = internal(rows)
    parts = []
    for name, task in tasks.items():
        sub = rows[
            (rows.dataset == name)
            & (rows.metric == MAIN_METRIC[task])
            & (rows.probe == MAIN_PROBE[task])
        ]
        parts.append(
            sub.assign(
                enc=[
                    labelled(e, bool(r)) for e, r in zip(sub.encoder, sub.random_init, strict=True)
                ]
            )
        )
    if not parts:
        return pd.DataFrame()
    both = pd.concat(parts)
    if both.empty:
        return pd.DataFrame()
    return both.pivot_table(index="dataset", columns="enc", values="value", aggfunc="mean").dropna(
        axis=1
    )


def section(out: Path, rows: pd.DataFrame, tasks: dict[str, str]) -> tuple[list[str], list[str]]:
    """(Markdown, HTML) of the section; empty when OUT has no kept predictions."""
    preds, _ = kept(out, rows)
    if not preds:
        return [], []
    seeds = seed_sets(out, rows, preds)
    df = cmp.compare(preds, seeds=seeds)
    table = _table(df)
    text = (
        "Each encoder against the first of the results (paired bootstrap over the same "
        "test units, resampling patients where known; p from DeLong for binary AUROC, "
        "exact McNemar for accuracy, the bootstrap otherwise; probes fitted with "
        "--seeds: the seeded bootstrap over units and seeds; Holm-adjusted over the "
        "run; `featstore compare --out` for every metric). Encoders marked "
        "[random_init] are random initialisations, not pretrained models: a difference "
        "to them measures the pipeline, not the model."
    )
    md = ["## Is A better than B?", "", text, "", _markdown(table), ""]
    body = [
        "<h2>Is A better than B?</h2>",
        f"<p>{html.escape(text)}</p>",
        table.to_html(index=False),
    ]
    stepped = steps(preds, preset_family, seeds=seeds)
    if len(stepped):
        st = _table(stepped, step=True)
        words = (
            "Each step up a model family's sizes (DINOv3 S, S+, B, L, ...; DINOv2 S, B, L) "
            "at one resolution, and up the input resolutions of one encoder: A is the "
            "larger model or the finer input, B the step below it, on the same test units "
            "(the tests above; Holm-adjusted over the steps)."
        )
        md += ["### Does scale help?", "", words, "", _markdown(st), ""]
        body += [
            "<h3>Does scale help?</h3>",
            f"<p>{html.escape(words)}</p>",
            st.to_html(index=False),
        ]
    scores = ranking_scores(rows, {k: v for k, v in tasks.items() if k in set(rows.dataset)})
    if scores.shape[0] >= 3 and scores.shape[1] >= 3:
        r = rank_encoders(scores.to_numpy(float), list(scores.columns))
        plot_critical_difference(r, out / "plots" / CD_PLOT)
        ranks = ", ".join(
            f"{n} {m:.2f}"
            for n, m in sorted(zip(r.names, r.mean_ranks, strict=True), key=lambda t: t[1])
        )
        line = (
            f"Mean ranks over {r.n_datasets} datasets (1 = best): {ranks}; Friedman p = "
            f"{r.friedman_p:.3g}; bars join encoders with Wilcoxon-Holm p >= {r.alpha:g}."
        )
        md += [line, "", f"![{CD_PLOT}](plots/{CD_PLOT})", ""]
        body += [f"<p>{html.escape(line)}</p>", f'<img src="plots/{CD_PLOT}" alt="{CD_PLOT}">']
    return md, body
