"""Study report: tables and plots from results rows (pandas + matplotlib; no torch).

Everything here takes data (a results DataFrame, arrays) and writes files; finding
the data is `pipelines/report.py`'s job. Output is deterministic: the same results
give byte-identical files, and a file whose bytes would not change is not rewritten.
"""

from __future__ import annotations

import html
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from featstore.encode.presets import PRESETS, preset_width
from featstore.errors import ProbeError
from featstore.identity import labelled
from featstore.probing.metrics import MAIN_METRIC
from featstore.probing.rows import COLUMNS, KEY, interval, key_except
from featstore.report.references import Reference, published_model

MAIN_PROBE = {"classification": "linear", "multilabel": "linear", "segmentation": "seg-linear"}
SIZE_ORDER = list(PRESETS)  # smallest first
BASELINE = "pixels"
# Key columns a task table lays out itself: its rows, columns and the table's dataset.
SHOWN = ("dataset", "encoder", "random_init", "resolution", "probe", "metric")
# Key columns a resolution plot lays out: its panels, x axis and the main probe/metric.
LINE_LAID_OUT = ("dataset", "resolution", "probe", "metric")


def is_baseline(encoder: str) -> bool:
    """The raw-pixel baseline at any patch size (`pixels`, `pixels:8`)."""
    return encoder == BASELINE or encoder.startswith(BASELINE + ":")


def write_if_changed(path: Path, data: bytes) -> bool:
    """Write `data` unless the file already holds exactly it. Returns True if written."""
    if path.is_file() and path.read_bytes() == data:
        return False
    path.write_bytes(data)
    return True


def save_figure(fig: Figure, path: Path) -> bool:
    """PNG bytes without a version stamp, written only when they change."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    return write_if_changed(path, buf.getvalue())


def label(encoder: str, random_init: bool) -> str:
    """An encoder's name for tables and legends (`identity.labelled`)."""
    return labelled(encoder, random_init)


def size_rank(encoder: str) -> int:
    """Rank by model size: a preset's token width, then its place in the DINOv3 ladder
    (encoders that are not presets after every preset; callers break ties by name)."""
    width = preset_width(encoder)
    place = SIZE_ORDER.index(encoder) if encoder in SIZE_ORDER else len(SIZE_ORDER)
    return (width or 1 << 30) * 100 + place  # by width (S < B < L), then the ladder


def varying(df: pd.DataFrame, cols: Sequence[str]) -> list[str]:
    """The columns of `cols` whose values differ within `df`: those a label must name."""
    return [k for k in cols if k in df and df[k].astype(str).nunique() > 1]


def line_labels(df: pd.DataFrame, extra: Sequence[str], at: bool = True) -> list[str]:
    """Each row's 'encoder @ resolution px' label (`at` False: without the resolution),
    with the `extra` key columns that vary within `df` (e.g. two pools or protocols of
    one set): a table row or a plot line of each, so that no result hides another."""
    named = varying(df, [k for k in extra if k not in ("encoder", "random_init", "resolution")])
    return [
        label(e, r)
        + (f" @ {res}px" if at else "")
        + "".join(f", {k} {v}" for k, v in zip(named, more, strict=True))
        for e, r, res, *more in zip(
            df.encoder, df.random_init, df.resolution, *(df[k] for k in named), strict=True
        )
    ]


def cell(row: Any) -> str:
    """'value [ci_low, ci_high]' of one results row (a DataFrame.itertuples() tuple)."""
    return f"{row.value:.3f} {interval(row.ci_low, row.ci_high)}"


def task_table(df: pd.DataFrame, task: str) -> pd.DataFrame:
    """Rows encoder x resolution, columns probe/metric; the best cell of the main
    probe's main metric is marked with '**'; the pixel baseline is the last row. A
    dataset with neuron instances adds their VOI and adapted Rand error columns."""
    metrics = [MAIN_METRIC[task]] + (
        ["accuracy", "f1"] if task != "segmentation" else ["iou", "hd95"]
    )
    metrics += [m for m in ("voi", "arand") if m in set(df.metric)]  # neuron instances
    sub = df[df.metric.isin(metrics)].copy()
    sub["row"] = line_labels(sub, key_except(*SHOWN))
    units = sub["unit"] if "unit" in sub else pd.Series("", index=sub.index)  # older results
    sub["col"] = sub.probe + " / " + sub.metric
    sub["col"] += [f" ({u})" if isinstance(u, str) and u else "" for u in units]
    sub["text"] = [cell(r) for r in sub.itertuples()]
    main = sub[
        (sub.probe == MAIN_PROBE[task])
        & (sub.metric == MAIN_METRIC[task])
        & ~sub.encoder.map(is_baseline).astype(bool)
    ]
    if len(main):
        best = main.iloc[main.value.argmax()]
        sub.loc[(sub.row == best.row) & (sub.col == best.col), "text"] = f"**{best.text}**"
    twice = sub[sub.duplicated(["row", "col"], keep=False)]
    if len(twice):
        first = twice.iloc[0]
        unknown = sorted(set(sub.columns) - set(KEY) - {"row", "col", "text"} - set(COLUMNS))
        raise ProbeError(
            f"results hold {len(twice)} rows for one cell ({first.row}: {first.col}) that "
            f"differ only outside the result key {list(KEY)}"
            + (f" (in {unknown})" if unknown else "")
            + "; rerun `featstore probe` into a fresh --out folder"
        )
    table = sub.pivot(index="row", columns="col", values="text")
    order = sorted(
        table.index, key=lambda r: (is_baseline(r.split(" ")[0]), size_rank(r.split(" ")[0]), r)
    )
    cols = sorted(table.columns, key=lambda c: (not c.startswith(MAIN_PROBE[task]), c))
    return table.loc[order, cols].fillna("")


def to_markdown(table: pd.DataFrame, corner: str = "encoder @ resolution") -> str:
    """A `task_table` (or `published_table`) as a Markdown table (cells are strings)."""
    head = [corner, *table.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [
        "| " + " | ".join([idx, *row]) + " |"
        for idx, row in zip(table.index, table.values.tolist(), strict=True)
    ]
    return "\n".join(lines)


def to_html(table: pd.DataFrame, corner: str = "encoder @ resolution") -> str:
    """A `task_table` (or `published_table`) as an HTML table; '**' marks become bold."""

    def fmt(text: str) -> str:
        bold = text.startswith("**")
        text = html.escape(text.strip("*"))
        return f"<b>{text}</b>" if bold else text

    head = "".join(f"<th>{html.escape(c)}</th>" for c in [corner, *table.columns])
    body = "".join(
        "<tr><td>"
        + html.escape(idx)
        + "</td>"
        + "".join(f"<td>{fmt(v)}</td>" for v in row)
        + "</tr>"
        for idx, row in zip(table.index, table.values.tolist(), strict=True)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def published_table(df: pd.DataFrame, refs: Sequence[Reference]) -> pd.DataFrame:
    """Published values beside featstore's linear probe, for one dataset.

    df: that dataset's results rows; refs: its `featstore.report.references`. Rows: one per
    published model/resolution (labelled "published") and one per featstore encoder x
    resolution x protocol (its linear probe, random-init flagged); columns: source,
    model, resolution, accuracy, auroc and any other metric of `refs` (dice, precision,
    recall; strings, "" where there is no value).
    """
    published: dict[tuple[str, str, str], dict[str, str]] = {}
    for r in refs:
        model = f"{r.model} (on {r.dataset}, another dataset)" if r.beside else r.model
        published.setdefault((r.source, model, r.resolution), {})[r.metric] = f"{r.value:.3f}"
    out = [
        {"source": f"published: {src}", "model": model, "resolution": res, **vals}
        for (src, model, res), vals in published.items()
    ]
    # accuracy and AUROC always; Dice, precision, recall where a reference has them
    metrics = ["accuracy", "auroc", *sorted({r.metric for r in refs} - {"accuracy", "auroc"})]
    lin = df[df.probe.isin(["linear", "seg-linear"]) & df.metric.isin(metrics)]
    keys = key_except("dataset", "probe", "metric")  # a line per result, none hidden
    for values, g in lin.groupby(keys, sort=False):
        k = dict(zip(keys, values, strict=True))
        enc, rnd, res, pool = k["encoder"], k["random_init"], k["resolution"], k["pool"]
        out.append(
            {
                "source": f"featstore ({k['protocol']} protocol)",
                "model": f"{label(str(enc), bool(rnd))}, frozen, linear probe"
                + (f", {pool} pooling" if pool else "")
                + (
                    f" (the paper's {published_model(str(enc))})"
                    if published_model(str(enc))
                    else ""
                ),
                "resolution": f"{res} px",
                **{str(r.metric): cell(r) for r in g.itertuples()},
            }
        )
    cols = ["source", "model", "resolution", *metrics]
    return pd.DataFrame(out, columns=cols).astype(object).fillna("").set_index("source")


def _main_rows(df: pd.DataFrame, tasks: Mapping[str, str]) -> pd.DataFrame:
    keep = [
        MAIN_METRIC[tasks[d]] == m and MAIN_PROBE[tasks[d]] == p
        for d, m, p in zip(df.dataset, df.metric, df.probe, strict=True)
    ]
    return df[keep]


def _yerr(rows: pd.DataFrame) -> np.ndarray:
    """(2, n) error bar lengths below and above each value, from its 95% interval;
    0 where a row has no interval (an interval may not hold its full-set value, and
    matplotlib refuses a negative length)."""
    v = rows.value.to_numpy(float)
    below = v - rows.ci_low.to_numpy(float)
    above = rows.ci_high.to_numpy(float) - v
    return np.clip(np.nan_to_num(np.stack([below, above]), nan=0.0), 0.0, None)


def plot_resolution(df: pd.DataFrame, tasks: Mapping[str, str], path: Path) -> bool:
    """Main metric against input resolution, one line per encoder (the paper's Fig. 1)."""
    main = _main_rows(df, tasks).copy()
    names = sorted(tasks)
    # a line per every key column but the panel's and the x axis's: no two results share
    main["line"] = line_labels(main, key_except(*LINE_LAID_OUT), at=False)
    first = main.drop_duplicates("line")
    encoders = sorted(
        zip(first.line, first.encoder, strict=True),
        key=lambda le: (is_baseline(le[1]), size_rank(le[1]), le[0]),
    )
    colour = {ln: f"C{i % 10}" for i, (ln, _) in enumerate(encoders)}  # one colour per line
    style: dict[str, Literal["-", "--"]] = {
        ln: "--" if is_baseline(e) else "-" for ln, e in encoders
    }
    # The legend below the panels: as many columns as the width holds (a label such as
    # "dinov2-vitb14 [random_init]" needs ~2.2 in at this size), a row of height each.
    width = 4.0 * len(names)
    ncol = max(1, min(len(encoders), int(width // 2.2)))
    legend = 0.16 * -(-len(encoders) // ncol) + 0.12
    fig = Figure(figsize=(width, 3.6 + legend))
    axes = fig.subplots(1, len(names), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        sub = main[main.dataset == name]
        for er, g in sub.groupby("line"):
            g = g.sort_values("resolution")
            ax.errorbar(
                g.resolution,
                g.value,
                yerr=_yerr(g),
                marker="o",
                capsize=3,
                color=colour[str(er)],
                linestyle=style[str(er)],
            )
        ax.set(
            title=name,
            xlabel="input resolution (px)",
            ylabel=f"{MAIN_METRIC[tasks[name]]} ({MAIN_PROBE[tasks[name]]})",
        )
        ax.grid(alpha=0.3)
    handles = [
        Line2D([], [], color=colour[ln], marker="o", linestyle=style[ln]) for ln, _ in encoders
    ]
    fig.legend(
        handles,
        [ln for ln, _ in encoders],
        loc="lower center",
        ncol=ncol,
        fontsize=7,
        frameon=False,
    )
    fig.tight_layout(rect=(0, legend / (3.6 + legend), 1, 1))
    return save_figure(fig, path)


def plot_size(df: pd.DataFrame, tasks: Mapping[str, str], path: Path) -> bool:
    """Main metric against model size (best resolution per encoder, with its 95%
    interval), one line per dataset. Whether a step up helps: the report's "Does scale
    help?" table (paired, `featstore.probing.steps`), not overlapping bars."""
    main = _main_rows(df, tasks)
    main = main[~main.encoder.map(is_baseline).astype(bool)].copy()
    main["x"] = [label(e, r) for e, r in zip(main.encoder, main.random_init, strict=True)]
    first = main.drop_duplicates("x")
    encoders = [
        x
        for x, _ in sorted(
            zip(first.x, first.encoder, strict=True), key=lambda xe: (size_rank(xe[1]), xe[0])
        )
    ]
    # a line per dataset and every other key column the axes do not lay out (pool, ...)
    lines = key_except("encoder", "random_init", "resolution", "probe", "metric")
    named = varying(main, [k for k in lines if k != "dataset"])
    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    for values, g in main.groupby(lines, sort=True):
        k = dict(zip(lines, values, strict=True))
        # the best resolution of each encoder, with its 95% interval (a score that
        # could not be computed, e.g. AUROC of a one-class test set, is no candidate)
        g = g[np.isfinite(g.value.astype(float))]
        best = g.loc[g.groupby("x").value.idxmax()].set_index("x")
        xs = [i for i, e in enumerate(encoders) if e in best.index]
        at = best.loc[[encoders[i] for i in xs]]
        text = str(k["dataset"]) + "".join(f", {c} {k[c]}" for c in named)
        ax.errorbar(
            xs,
            at.value,
            yerr=_yerr(at),
            marker="o",
            capsize=3,
            label=text,
        )
    ax.set_xticks(range(len(encoders)), encoders, rotation=20, fontsize=7)
    ax.set(xlabel="encoder (by size)", ylabel="main metric, best resolution (95% CI)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # none where only the baseline was scored
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_linear_vs_knn(df: pd.DataFrame, path: Path) -> bool:
    """Linear probe against kNN on the same feature sets (classification AUROC)."""
    # every key column but the probe indexes a point, so that no two results average
    cells = [k for k in KEY if k in df and k not in ("probe", "metric")]
    sub = df[df.metric == "auroc"].pivot(index=cells, columns="probe", values="value")
    fig = Figure(figsize=(4, 4))
    ax = fig.subplots()
    if {"linear", "knn"} <= set(sub.columns):
        for name, g in sub.groupby(level="dataset"):
            ax.scatter(g["knn"], g["linear"], label=name, s=25)
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8)
    ax.set(xlim=(0, 1.02), ylim=(0, 1.02), xlabel="kNN AUROC", ylabel="linear AUROC")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def pca_rgb(patch: np.ndarray, fit: np.ndarray | None = None) -> np.ndarray:
    """First three principal components of patch tokens as colours.

    patch: (n, rows, cols, D) float -> (n, rows, cols, 3) float64 in [0, 1]. The PCA
    (centre, axes, signs and the 1-99% colour range) is fitted on `fit` (m, r, c, D),
    by default on `patch` itself: one PCA for all n. Fitted on a dataset's test items,
    one colour means one direction of feature space in every image.
    """
    n, r, c, d = patch.shape
    ref = (patch if fit is None else fit).reshape(-1, d).astype(np.float64)
    mean = ref.mean(0)
    ref -= mean
    _, _, vt = np.linalg.svd(ref, full_matrices=False)
    axes = vt[:3].T
    fitted = ref @ axes
    for j in range(fitted.shape[1]):  # fix sign for determinism across BLAS builds
        if fitted[np.argmax(np.abs(fitted[:, j])), j] < 0:
            fitted[:, j] *= -1
            axes[:, j] *= -1
    comps = fitted if fit is None else (patch.reshape(-1, d).astype(np.float64) - mean) @ axes
    if comps.shape[1] < 3:
        comps = np.pad(comps, ((0, 0), (0, 3 - comps.shape[1])))
        fitted = np.pad(fitted, ((0, 0), (0, 3 - fitted.shape[1])))
    lo, hi = np.percentile(fitted, [1, 99], axis=0)
    rgb = np.clip((comps - lo) / np.maximum(hi - lo, 1e-9), 0, 1)
    return rgb.reshape(n, r, c, 3)


def plot_examples(
    images: Sequence[np.ndarray],
    pca: np.ndarray | None,
    pred: np.ndarray | None,
    truth: np.ndarray | None,
    title: str,
    path: Path,
) -> bool:
    """Per example: the image, its patch-token PCA, and (segmentation) truth and prediction.

    images: n (R, R) float arrays in [0, 1]; pca: (n, rows, cols, 3) float in [0, 1];
    pred/truth: (n, R, R) uint8 label maps (segmentation; both or neither).
    """
    cols = 2 + (2 if pred is not None else 0)
    fig = Figure(figsize=(2.2 * cols, 2.2 * len(images)))
    axes = fig.subplots(len(images), cols, squeeze=False)
    for i, img in enumerate(images):
        panels: list[tuple[str, np.ndarray, str | None]] = [("image", img, "gray")]
        if pca is not None:
            panels.append(("patch PCA", pca[i], None))
        if pred is not None and truth is not None:
            k = max(int(truth.max()), int(pred.max()), 1)
            panels += [
                ("ground truth", truth[i] / k, "viridis"),
                ("prediction", pred[i] / k, "viridis"),
            ]
        for ax, (name, arr, cmap) in zip(axes[i], panels, strict=False):
            ax.imshow(arr, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(name, fontsize=8)
        for ax in axes[i]:
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
