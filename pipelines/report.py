"""The report stage: results (and their feature sets) -> report.md, report.html, plots.

Reads what `featstore probe --out DIR` wrote into DIR (results.csv, run-config.json,
examples/), draws the scaling plots and per-dataset example figures (from the feature
sets' thumbnails: never the raw data), and writes DIR/report.md and DIR/report.html.
Never loads torch; rerunning on unchanged results rewrites nothing.

    featstore report --out results
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from featstore.data.manifest import Dataset, Manifest
from featstore.errors import ProbeError
from featstore.identity import requested, short
from featstore.probing.metrics import MAIN_METRIC
from featstore.probing.results_file import read_results
from featstore.probing.rows import internal, ordinary
from featstore.report import comparisons, curves, external, references, slides
from featstore.report import tables as rpt
from featstore.store.catalog import find_by_key, find_cell
from featstore.store.schema import EXAMPLE_ITEM, THUMBNAIL
from featstore.store.sets import open_set, plain


def _best_set(
    ds: Dataset, df: pd.DataFrame, cache: Path | str
) -> tuple[pd.Series, xr.Dataset] | None:
    """The best non-baseline cell of `ds` (main probe, main metric) and its open set;
    None when there is none."""
    task = ds.task
    main = df[
        (df.dataset == ds.name)
        & (df.metric == MAIN_METRIC[task])
        & (df.probe == rpt.MAIN_PROBE[task])
        & ~df.encoder.map(rpt.is_baseline).astype(bool)
    ]
    if main.empty:
        return None
    best = main.iloc[main.value.argmax()]
    path = find_by_key(cache, best.feature_set)
    return None if path is None else (best, open_set(path))


def _examples(ds: Dataset, df: pd.DataFrame, cache: Path | str, out: Path, task: str) -> str | None:
    """Example figure for the best non-baseline cell of `ds`; returns its file name.

    The images are the set's own thumbnails (recorded at extraction): the raw data is
    not read, so a report can be made where only the cache is.
    """
    found = _best_set(ds, df, cache)
    if found is None:
        return None
    best, xs = found
    if THUMBNAIL not in xs:
        return None  # no test items
    items = np.asarray(xs[EXAMPLE_ITEM].values)
    sample, skipped = plain(np.asarray(xs["sample"].values)), list(xs.attrs.get("skipped", {}))
    read = (items >= 0) & ~np.isin(sample[np.maximum(items, 0)], skipped)  # -1: not read
    thumbs, items = np.asarray(xs[THUMBNAIL].values)[read], items[read]  # nor if skipped
    pred = truth = None
    npz = out / "examples" / f"{best.feature_set}.npz"
    if task == "segmentation" and npz.is_file():
        keep = dict(np.load(npz))
        at = {int(i): j for j, i in enumerate(keep["item"])}
        both = [k for k, i in enumerate(items) if int(i) in at]
        items, thumbs = items[both], thumbs[both]
        rows = [at[int(i)] for i in items]
        pred, truth = keep["pred"][rows], keep["truth"][rows]
    if len(items) == 0:
        return None
    pca = rpt.pca_rgb(np.asarray(xs.patch[items].values)) if "patch" in xs else None
    name = f"examples_{ds.name}.png"
    title = f"{ds.name}: {rpt.label(best.encoder, best.random_init)} @ {best.resolution}px"
    images = [t.astype(np.float32) / 255 for t in thumbs]
    rpt.plot_examples(images, pca, pred, truth, title, out / "plots" / name)
    return name


def _slides(ds: Dataset, xs: xr.Dataset, key: str, out: Path) -> tuple[list[str], list[str]]:
    """The slide figures of a slide set (`report.slides.set_slides`), with ABMIL's
    attention where `--pool abmil` saved it for set `key` (Markdown, HTML parts)."""
    npz = out / "attention" / f"{key}.npz"
    attention: dict[int, float] = {}
    if npz.is_file():
        with np.load(npz) as saved:
            attention = dict(zip(saved["item"].tolist(), saved["weight"].tolist(), strict=True))
    names = []
    for slide, fig in slides.set_slides(xs, attention):
        names.append(f"slide_{ds.name}_{slide}.png")
        rpt.save_figure(fig, out / "plots" / names[-1])
    if not names:
        return [], []
    text = (
        "Example slides (test slides first) as extraction recorded them: thumbnail, tissue "
        "mask (green) and tiles (blue), and ABMIL's attention over the test slides' tiles "
        "(`featstore probe --pool abmil`)."
    )
    md = [text, "", *(f"![{name}](plots/{name})" for name in names), ""]
    return md, [f"<p>{text}</p>", *(f'<img src="plots/{n}" alt="{n}">' for n in names)]


def _slide_section(
    ds: Dataset, df: pd.DataFrame, manifest: Manifest, out: Path
) -> tuple[list[str], list[str]]:
    """The slide figures of a slide dataset: from its best scored set, else from the
    first set the manifest's request finds (a dataset the probe could not score, e.g.
    too few slides to classify, has a heading of its own)."""
    scored = ds.name in set(df.dataset)
    found = _best_set(ds, df, manifest.cache) if scored else None
    if found is not None:
        return _slides(ds, found[1], found[0].feature_set, out)
    for cell in manifest.cells():  # encoders first, then the baseline
        if cell.dataset.name != ds.name:
            continue
        request = requested(cell.dataset, manifest, "", cell.encoder, cell.resolution).request()
        path = find_cell(manifest.cache, request, cell.dataset.name, checked=False).path
        if path is None:
            continue
        xs = open_set(path)
        md, body = _slides(ds, xs, short(str(xs.attrs["cache_key"])), out)
        if scored or not md:
            return md, body
        head = f"{ds.name} (slides; no scores: see the probe's problem lines)"
        return [f"## {head}", "", *md], [f"<h2>{head}</h2>", *body]
    return [], []


def _published_note(df: pd.DataFrame) -> str:
    """What the published rows are, and whether featstore's may stand beside them."""
    random = sorted(
        set(df.encoder[df.random_init.astype(bool) & ~df.encoder.map(rpt.is_baseline).astype(bool)])
    )
    note = (
        "Published rows are supervised models trained end to end on the dataset; "
        "featstore's are probes on frozen features, so they place, not score, each other."
    )
    if random:
        one = len(random) == 1
        note += (
            f" **{', '.join(random)} here {'is a random init' if one else 'are random inits'}, "
            f"not pretrained weights: {'its' if one else 'their'} rows measure the pipeline "
            "and must not be read as the pretrained models' performance.**"
        )
    return note


def _dataset_section(
    ds: Dataset, df: pd.DataFrame, cache: Path | str, out: Path
) -> tuple[list[str], list[str]]:
    """One dataset's table, published values and example figure (Markdown, HTML parts)."""
    task, rows = ds.task, df[df.dataset == ds.name]
    table = rpt.task_table(rows, task)
    md = [f"## {ds.name} ({task}, {ds.dims}D)", "", rpt.to_markdown(table), ""]
    body = [f"<h2>{ds.name} ({task}, {ds.dims}D)</h2>", rpt.to_html(table)]
    refs = references.for_dataset(ds)
    if refs:
        pub = rpt.published_table(rows, refs)
        note = _published_note(rows)
        md += ["Published values beside featstore's:", "", rpt.to_markdown(pub, ""), ""]
        md += [note, ""]
        body += [rpt.to_html(pub, ""), f"<p>{note.replace('**', '')}</p>"]
    figure = _examples(ds, df, cache, out, task)
    if figure:
        md += [f"![{ds.name} examples](plots/{figure})", ""]
        body.append(f'<img src="plots/{figure}" alt="{ds.name} examples">')
    return md, body


def _label_efficiency(
    every: pd.DataFrame, tasks: Mapping[str, str], out: Path
) -> tuple[list[str], list[str]]:
    """The label-efficiency plot and labels-to-95% table (Markdown and HTML parts)."""
    name = "label_efficiency.png"
    curves.plot_label_efficiency(every, tasks, out / "plots" / name)
    table = curves.labels_to_reach(every, tasks)
    text = (
        "Each point is the mean over repeats of the main probe's main metric on a "
        "stratified part of the train split (bands: +- one std across repeats; pixels "
        "dashed). The table gives the fewest training units (images or volumes) whose "
        "mean reaches 95% of the encoder's own full-data score."
    )
    md = ["## Label efficiency", "", text, "", f"![{name}](plots/{name})", ""]
    md += [rpt.to_markdown(table, "dataset"), ""]
    body = ["<h2>Label efficiency</h2>", f"<p>{text}</p>", f'<img src="plots/{name}" alt="{name}">']
    return md, [*body, rpt.to_html(table, "dataset")]


def _write(out: Path, md: list[str], body: list[str]) -> None:
    """OUT/report.md and OUT/report.html, each only when its bytes change."""
    rpt.write_if_changed(out / "report.md", "\n".join(md).encode())
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>featstore report</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-"
        "collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;"
        "font-size:13px}img{max-width:100%}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )
    rpt.write_if_changed(out / "report.html", page.encode())


def _tasks(every: pd.DataFrame, manifest: Manifest) -> dict[str, str]:
    """Each dataset's task: from run-config.json's manifest, else from its rows (the
    `task` column; rows of another manifest probed into the same folder)."""
    tasks = {
        str(d): str(t) for d, t in zip(every.dataset, every.task, strict=True) if t in MAIN_METRIC
    }
    return {**tasks, **{d.name: d.task for d in manifest.datasets if d.name in set(every.dataset)}}


def _left_out_note(names: list[str], cfg: Path) -> str:
    """Why the rows of datasets `names` are not in the report."""
    return (
        f"the rows of {', '.join(names)} give no task (results.csv written by an older "
        f"featstore) and the manifest in {cfg} does not list them; probe them again with "
        "their manifest into this folder to bring them back"
    )


def _rows_only_section(name: str, task: str, df: pd.DataFrame) -> tuple[list[str], list[str]]:
    """The table of a dataset that only its rows know (probed by another manifest than
    the last one into this folder): no example figure, slides or published values."""
    table = rpt.task_table(df[df.dataset == name], task)
    note = (
        f"{name} was probed with another manifest than the last one (run-config.json): its "
        "example figure, slides and published values need that manifest; probe with it last "
        "to get them."
    )
    md = [f"## {name} ({task})", "", rpt.to_markdown(table), "", note, ""]
    return md, [f"<h2>{name} ({task})</h2>", rpt.to_html(table), f"<p>{note}</p>"]


def _sections(
    manifest: Manifest, df: pd.DataFrame, tasks: Mapping[str, str], out: Path
) -> tuple[list[str], list[str]]:
    """Each scored dataset's section, by task, then the slide figures of slide datasets
    that have no scores (Markdown, HTML parts)."""
    md: list[str] = []
    body: list[str] = []
    scored = set(df.dataset)
    listed = {d.name for d in manifest.datasets}
    for task in ("classification", "multilabel", "segmentation"):
        for ds in (d for d in manifest.datasets if d.task == task and d.name in scored):
            md_d, html_d = _dataset_section(ds, df, manifest.cache, out)
            md_s, html_s = _slide_section(ds, df, manifest, out) if ds.tiling else ([], [])
            md += md_d + md_s
            body += html_d + html_s
        for name in sorted(n for n in scored - listed if tasks[n] == task):
            md_d, html_d = _rows_only_section(name, task, df)
            md += md_d
            body += html_d
    for ds in manifest.datasets:
        if ds.tiling is not None and ds.name not in scored:
            md_s, html_s = _slide_section(ds, df, manifest, out)
            md += md_s
            body += html_s
    return md, body


def run(out: Path, echo: Callable[[str], object] = print) -> Path:
    """Write OUT/report.md, OUT/report.html and OUT/plots/ from OUT's probe results.

    Raises `ProbeError` when OUT holds no results.csv/run-config.json. Returns the
    path of report.md.
    """
    csv, cfg = out / "results.csv", out / "run-config.json"
    if not csv.is_file() or not cfg.is_file():
        raise ProbeError(
            f"{out}: no results.csv/run-config.json; run `featstore probe --out {out}` first"
        )
    every = read_results(csv)
    if every.empty:
        raise ProbeError(
            f"{csv} holds no scores (the probe could score no dataset: see its problem "
            f"lines); fix those, then rerun `featstore probe --out {out}`"
        )
    manifest = Manifest.model_validate(json.loads(cfg.read_text())["manifest"])
    tasks = _tasks(every, manifest)
    left_out = sorted(set(every.dataset) - set(tasks))
    every = every[every.dataset.isin(list(tasks)) & every.test_dataset.isin(list(tasks))]
    if left_out:
        echo(f"note: {_left_out_note(left_out, cfg)}")
    if every.empty:
        raise ProbeError(f"{csv}: no rows the report can place; {_left_out_note(left_out, cfg)}")
    scored = ordinary(every)  # label-efficiency points have their own plot and table
    df = internal(scored)  # external evaluations have their own section
    (out / "plots").mkdir(parents=True, exist_ok=True)
    plots = ["resolution.png", "size.png", "linear_vs_knn.png"]
    rpt.plot_resolution(df, tasks, out / "plots" / plots[0])
    rpt.plot_size(df, tasks, out / "plots" / plots[1])
    rpt.plot_linear_vs_knn(df, out / "plots" / plots[2])
    random = sorted(set(df.encoder[df.random_init.astype(bool)]))
    warn = (
        f"**Random-init encoders:** {', '.join(random)} have no pretrained weights here: "
        "their features come from a fixed-seed random initialisation, so their scores "
        "measure the pipeline, not DINOv3."
        if random
        else "All encoders are pretrained."
    )
    md = [
        "# featstore study report",
        "",
        warn,
        "",
        f"Cells: {df.groupby(['encoder', 'resolution']).ngroups} encoder x resolution; "
        "values are test-split scores with bootstrap 95% intervals; **bold** marks the best "
        "cell of the main probe; `pixels` is the raw-pixel baseline.",
        "",
    ]
    body = [f"<h1>featstore study report</h1><p>{warn.replace('**', '')}</p>"]
    if left_out:
        md += [f"Left out: {_left_out_note(left_out, cfg)}", ""]
        body.append(f"<p>Left out: {_left_out_note(left_out, cfg)}</p>")
    md_d, html_d = _sections(manifest, df, tasks, out)
    md += md_d
    body += html_d
    md_x, html_x = external.section(out, scored, dict(tasks))
    md += md_x
    body += html_x
    md_q, html_q = comparisons.section(out, scored, dict(tasks))
    md += md_q
    body += html_q
    md += ["## Scaling", ""] + [f"![{p}](plots/{p})" for p in plots] + [""]
    body += ["<h2>Scaling</h2>"] + [f'<img src="plots/{p}" alt="{p}">' for p in plots]
    if curves.any_curve(every):
        md_c, html_c = _label_efficiency(every, tasks, out)
        md += md_c
        body += html_c
    _write(out, md, body)
    echo(f"report: {out / 'report.md'}, {out / 'report.html'}")
    return out / "report.md"
