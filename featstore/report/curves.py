"""Label-efficiency figures: the main metric against the labelled fraction, and the
labels each encoder needs to reach a share of its own full-data score (no torch).

Both read the mean rows of the curve points (`featstore.probing.rows.curve_means`):
a point's value is the mean over repeats and `std` their spread.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from featstore.probing.metrics import MAIN_METRIC
from featstore.probing.rows import curve_means, key_except
from featstore.report.tables import MAIN_PROBE, is_baseline, line_labels, save_figure, size_rank

# A curve is one line per every key column but these (which its axes, panels and the
# chosen probe, metric and mean rows lay out): pools and protocols never share a line.
LAID_OUT = ("dataset", "probe", "metric", "train_fraction", "shots", "repeat")


def main_points(df: pd.DataFrame, tasks: Mapping[str, str]) -> pd.DataFrame:
    """Fraction points (not shots) of each dataset's main probe and metric."""
    means = curve_means(df)
    keep = [
        d in tasks and MAIN_METRIC[tasks[d]] == m and MAIN_PROBE[tasks[d]] == p and s == 0
        for d, m, p, s in zip(means.dataset, means.metric, means.probe, means.shots, strict=True)
    ]
    return means[keep]


def plot_label_efficiency(df: pd.DataFrame, tasks: Mapping[str, str], path: Path) -> bool:
    """Main metric against the labelled fraction (log x), one line per encoder and
    resolution, the pixel baseline dashed, bands of +- one std across repeats.
    Returns whether the file was written; False (and no file) without curve rows."""
    points = main_points(df, tasks)
    names = sorted(set(points.dataset))
    points = points.assign(line=line_labels(points, key_except(*LAID_OUT)))
    if not names:
        return False
    fig = Figure(figsize=(4.2 * len(names), 3.8))
    axes = fig.subplots(1, len(names), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        sub = points[points.dataset == name]
        lines = [(str(g.encoder.iloc[0]), text, g) for text, g in sub.groupby("line")]
        lines.sort(key=lambda kv: (is_baseline(kv[0]), size_rank(kv[0]), kv[1]))
        for i, (enc, text, g) in enumerate(lines):
            g = g.sort_values("train_fraction")
            colour = f"C{i % 10}"
            style = "--" if is_baseline(enc) else "-"
            ax.plot(
                g.train_fraction,
                g.value,
                marker="o",
                linestyle=style,
                color=colour,
                label=text,
            )
            std = g["std"].fillna(0.0)
            ax.fill_between(g.train_fraction, g.value - std, g.value + std, color=colour, alpha=0.2)
        ax.set_xscale("log")
        ax.set(
            title=name,
            xlabel="labelled fraction of the train split",
            ylabel=f"{MAIN_METRIC[tasks[name]]} ({MAIN_PROBE[tasks[name]]})",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return save_figure(fig, path)


def labels_to_reach(
    df: pd.DataFrame, tasks: Mapping[str, str], share: float = 0.95
) -> pd.DataFrame:
    """Per dataset, encoder and resolution: its full-data score, and the smallest curve
    point (fraction and training units) whose mean reaches `share` of that score.

    Columns: dataset, model, full score, fraction, labels (strings; "not reached" when
    no point does). Scores where higher is better (the main metrics are).
    """
    points = main_points(df, tasks)
    points = points.assign(line=line_labels(points, key_except(*LAID_OUT)))
    out: list[tuple[tuple[str, bool, int, int, str], dict[str, str]]] = []
    for (name, text), g in points.groupby(["dataset", "line"]):
        enc = str(g.encoder.iloc[0])
        full = g[g.train_fraction == 1.0]
        if full.empty:
            continue
        goal = share * float(full.value.iloc[0])
        hit = g[g.value >= goal].sort_values("train_fraction")
        reached = hit.iloc[0] if len(hit) else None
        order = (str(name), is_baseline(enc), size_rank(enc), int(g.resolution.iloc[0]), str(text))
        out.append(
            (
                order,
                {
                    "dataset": str(name),
                    "model": str(text),
                    "full score": f"{float(full.value.iloc[0]):.3f}",
                    "fraction": "not reached" if reached is None else f"{reached.train_fraction:g}",
                    "labels": "not reached" if reached is None else str(int(reached.n_train)),
                },
            )
        )
    cols = ["dataset", "model", "full score", "fraction", "labels"]
    if not out:
        return pd.DataFrame(columns=cols).set_index("dataset")
    table = pd.DataFrame([row for _, row in sorted(out, key=lambda kv: kv[0])])
    return table[cols].set_index("dataset")


def any_curve(df: pd.DataFrame) -> bool:
    """Whether the results hold label-efficiency points."""
    return bool(len(curve_means(df))) and bool(np.isfinite(curve_means(df).value).any())
