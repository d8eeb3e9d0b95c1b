"""The explorer's HTML: plain pages rendered on the server, with one small vanilla
script (static/explorer.js) for the item grid's filters and the neighbour panels.
No CDN, no template engine: every value is escaped here."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

    from featstore.serve.data import OpenSet, SetInfo
    from featstore.serve.failures import Failure

MAIN = {"classification": "auroc", "multilabel": "auroc", "segmentation": "dice"}


def page(title: str, body: str, data: dict[str, str] | None = None) -> str:
    """A whole page: nav, body, the script; `data` becomes data-* on <main>."""
    attrs = "".join(f' data-{k}="{escape(v)}"' for k, v in (data or {}).items())
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{escape(title)} - featstore</title>"
        "<link rel='icon' href='data:,'>"  # no /favicon.ico request, so no console 404
        "<link rel='stylesheet' href='/static/style.css'></head><body>"
        "<nav><a href='/'>featstore serve</a> <span>read-only</span></nav>"
        f"<main{attrs}><h1>{escape(title)}</h1>{body}</main>"
        "<script src='/static/explorer.js'></script></body></html>"
    )


def error_page(status: int, message: str) -> str:
    return page(f"{status}", f"<p class='error' id='error'>{escape(message)}</p>")


def _scores(info: SetInfo, results: pd.DataFrame | None) -> str:
    if results is None:
        return ""
    rows = results[results.feature_set == info.key]
    parts = []
    for r in rows.itertuples():
        if r.metric == MAIN.get(str(r.task), "auroc"):
            probe, metric = str(r.probe), str(r.metric)
            parts.append(f"{probe} {metric} {r.value:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]")
    return "<br>".join(escape(p) for p in parts)


def overview(sets: list[SetInfo], results: pd.DataFrame | None, cache: str, out: str) -> str:
    """Every set of the cache, grouped by dataset, with its state and main scores."""
    if not sets:
        return page("Overview", f"<p>No feature sets in {escape(cache)}.</p>")
    head = (
        "<tr><th>dataset</th><th>encoder</th><th>resolution</th><th>items</th>"
        "<th>size (MB)</th><th>state</th><th>scores</th><th>pages</th></tr>"
    )
    rows = []
    for s in sorted(sets, key=lambda s: (s.dataset, s.encoder, s.resolution)):
        ok = s.state == "complete"
        links = (
            f"<a href='/set/{s.key}'>items</a> <a href='/set/{s.key}/failures'>failures</a>"
            if ok
            else f"<span title='{escape(s.note)}'>cannot be opened</span>"
        )
        init = " <b class='random'>random init</b>" if s.random_init else ""
        rows.append(
            f"<tr class='set' data-key='{s.key}' data-state='{s.state}'>"
            f"<td>{escape(s.dataset)}</td><td>{escape(s.encoder)}{init}</td>"
            f"<td>{s.resolution}</td><td>{s.items}</td><td>{s.size_mb}</td>"
            f"<td class='state-{s.state}'>{s.state}</td><td>{_scores(s, results)}</td>"
            f"<td>{links}</td></tr>"
        )
    studies = "" if results is None else ", ".join(sorted(map(str, set(results.dataset))))
    body = (
        f"<p>cache: <code>{escape(cache)}</code>; results: <code>{escape(out)}</code>"
        + (f" (probed: {escape(studies)})" if studies else " (no results.csv)")
        + f"</p><table id='sets'>{head}{''.join(rows)}</table>"
    )
    return page("Overview", body)


def browser(s: OpenSet, partners: list[SetInfo]) -> str:
    """The item grid of one set; explorer.js fills it from /api/sets/KEY/items."""
    body = (
        f"<p>{escape(s.info.dataset)} / {escape(s.info.label)}: {s.n} items. "
        f"<a href='/set/{s.info.key}/failures'>failure cases</a></p>"
        "<div id='filters'>split <select id='f-split'><option value=''>all</option></select>"
        " label <select id='f-label'><option value=''>all</option></select>"
        " prediction <select id='f-pred'><option value=''>all</option></select>"
        " <span id='count'></span></div><div id='grid' class='grid'></div>"
    )
    return page(f"Items of {s.info.dataset}", body, {"key": s.info.key, "view": "browser"})


def item(s: OpenSet, index: int, partners: list[SetInfo]) -> str:
    """One item: its thumbnail, its feature maps, its neighbours in two encoders."""
    key = s.info.key
    label = "" if s.labels is None else f", label {escape(str(s.labels[index]))}"
    options = "".join(f"<option value='{p.key}'>{escape(p.label)}</option>" for p in partners)
    fmap = ""
    if "patch" in s.xs:
        fmap = (
            "<h2>Feature map (PCA of patch tokens)</h2><div class='maps'>"
            f"<figure><img id='pca-image' src='/img/{key}/{index}/pca.png?fit=image'>"
            "<figcaption>PCA fitted on this image</figcaption></figure>"
            f"<figure><img id='pca-test' src='/img/{key}/{index}/pca.png?fit=test'>"
            "<figcaption>PCA fitted on the dataset's test items</figcaption></figure></div>"
        )
    body = (
        f"<p>sample <b>{escape(str(s.samples[index]))}</b>, split {escape(s.splits[index])}"
        f"{label}; <a href='/set/{key}'>back to the items</a></p>"
        f"<figure><img class='tile' src='/img/{key}/{index}/tile.png'></figure>{fmap}"
        "<h2>Nearest neighbours (cosine of L2-normalised CLS)</h2><div class='sides'>"
        f"<section class='side' id='side-a' data-set='{key}'><h3>{escape(s.info.label)}</h3>"
        "<ol class='neighbours'></ol></section>"
        "<section class='side' id='side-b'><h3>compare with <select id='partner'>"
        f"<option value=''>-</option>{options}</select></h3><ol class='neighbours'></ol>"
        "</section></div>"
    )
    data = {"key": key, "item": str(index), "view": "item"}
    if partners:
        data["partner"] = partners[0].key
    return page(f"Item {index} of {s.info.dataset}", body, data)


def failures_page(
    s: OpenSet,
    sections: Sequence[tuple[str, str, list[Failure]]],
    items: dict[str, int],
    limit: int,
) -> str:
    """Per probe, the kept test predictions' failures, worst first (`limit` shown)."""
    if not sections:
        body = "<p>No kept predictions for this set: run `featstore probe` into --out.</p>"
        return page(f"Failure cases of {s.info.dataset}", body)
    parts = []
    for probe, task, rows in sections:
        what = "lowest Dice first" if task == "segmentation" else "most confident first"
        score = "dice" if task == "segmentation" else "confidence"
        lines = []
        for f in rows[:limit]:
            at = items.get(f.sample)
            link = f"/set/{s.info.key}/item/{at}" if at is not None else ""
            thumb = f"<img class='mini' src='/img/{s.info.key}/{at}/tile.png'>" if link else ""
            lines.append(
                f"<tr class='failure' data-sample='{escape(f.sample)}'><td>{thumb}</td>"
                f"<td><a href='{link}'>{escape(f.sample)}</a></td><td>{escape(f.truth)}</td>"
                f"<td>{escape(f.predicted)}</td><td>{f.score:.4f}</td></tr>"
            )
        parts.append(
            f"<section class='probe' data-probe='{escape(probe)}'><h2>{escape(probe)}: "
            f"{len(rows)} failures ({what})</h2><table><tr><th></th><th>sample</th>"
            f"<th>truth</th><th>predicted</th><th>{score}</th></tr>{''.join(lines)}</table>"
            "</section>"
        )
    return page(f"Failure cases of {s.info.dataset}", "".join(parts), {"key": s.info.key})
