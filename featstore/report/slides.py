"""The slide figure: thumbnail with tissue outline and tile grid, and the ABMIL
attention over it (matplotlib; arrays in, a figure out; no file is read here).

`set_slides` draws it for the example slides of an open feature set, from what the set
recorded at extraction (`schema.OVERVIEWS`, the tiles' level-0 coordinates, the
tiling plan): the raw slides are never read.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import xarray as xr
from matplotlib.collections import PatchCollection
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from featstore.store import schema
from featstore.store.sets import plain


def slide_figure(
    thumb: np.ndarray,
    mask: np.ndarray,
    xy: np.ndarray,
    foot: float,
    per_px: float,
    title: str,
    attention: np.ndarray | None = None,
) -> Figure:
    """Thumbnail + tissue mask + tile grid, and (given) attention as a heatmap.

    thumb: (h, w, 3) uint8; mask: (h, w) bool tissue; xy: (n, 2) level-0 tile corners;
    foot: a tile's side in level-0 pixels; per_px: level-0 pixels per thumbnail pixel;
    attention: (n,) weights of the slide's tiles (ABMIL), or None.
    """
    panels = 2 if attention is None else 3
    fig = Figure(figsize=(4.2 * panels, 4.2))
    axes = fig.subplots(1, panels, squeeze=False)
    ax = axes[0]
    ax[0].imshow(thumb)
    ax[0].set_title(title, fontsize=7)
    ax[1].imshow(thumb)
    ax[1].contour(mask, levels=[0.5], colors="lime", linewidths=0.8)
    boxes = [Rectangle((x / per_px, y / per_px), foot / per_px, foot / per_px) for x, y in xy]
    ax[1].add_collection(PatchCollection(boxes, facecolor="none", edgecolor="blue", lw=0.5))
    ax[1].set_title(f"tissue (green) and {len(xy)} tiles (blue)", fontsize=9)
    if attention is not None:
        heat = np.full(mask.shape, np.nan)
        scaled = attention / attention.max()
        for (x, y), a in zip(xy, scaled, strict=True):
            r0, c0 = int(y / per_px), int(x / per_px)
            r1, c1 = int((y + foot) / per_px), int((x + foot) / per_px)
            heat[r0:r1, c0:c1] = np.fmax(heat[r0:r1, c0:c1], a)
        ax[2].imshow(thumb)
        shown = ax[2].imshow(heat, cmap="magma", alpha=0.6, vmin=0, vmax=1)
        fig.colorbar(shown, ax=ax[2], fraction=0.046, label="ABMIL attention / max")
        ax[2].set_title("ABMIL attention", fontsize=9)
    for a in ax:
        a.set_axis_off()
    fig.tight_layout()
    return fig


def _strings(var: xr.DataArray) -> np.ndarray:
    return plain(np.asarray(var.values))


def set_slides(xs: xr.Dataset, attention: Mapping[int, float]) -> list[tuple[str, Figure]]:
    """(slide id, figure) of each example slide of the set `xs` that was read.

    attention: ABMIL's weight of each item (the set's item numbers) of the test slides,
    as `featstore probe --pool abmil` saved it; a slide whose tiles are not all in it
    is drawn without the attention panel.
    """
    if schema.OVERVIEW not in xs:
        return []
    tiling = xs.attrs["identity"]["recipe"]["tiling"]
    sample, skipped = _strings(xs["sample"]), set(xs.attrs.get("skipped", {}))
    label = np.asarray(xs["label"].values) if "label" in xs else None
    out = []
    for e, item in enumerate(np.asarray(xs[schema.EXAMPLE_ITEM].values)):
        per_px = float(xs[schema.OVERVIEW_SCALE].values[e])
        if item < 0 or not np.isfinite(per_px) or sample[item] in skipped:
            continue  # not read at extraction, or skipped then
        codes = np.asarray(xs[schema.OVERVIEW_TISSUE][e].values)
        inside = codes != schema.TISSUE_CODES["outside"]
        h, w = int(inside.any(1).sum()), int(inside.any(0).sum())
        thumb = np.asarray(xs[schema.OVERVIEW][e].values)[:h, :w]
        mask = codes[:h, :w] == schema.TISSUE_CODES["tissue"]
        rows = np.flatnonzero(sample == sample[item])
        xy = np.stack([xs["tile_x"].values[rows], xs["tile_y"].values[rows]], 1)
        mpp0 = float(xs["slide_mpp"].values[item])
        foot = max(1, round(tiling["tile_size"] * tiling["tile_mpp"] / mpp0))
        weights = [attention.get(int(r)) for r in rows]
        heat = None if None in weights else np.array(weights, np.float64)
        shown = "" if label is None else f"label {label[item]}, "
        source = _strings(xs["mpp_source"])[item]
        title = f"{sample[item]} ({shown}{mpp0:g} um/px, {source})"
        out.append((str(sample[item]), slide_figure(thumb, mask, xy, foot, per_px, title, heat)))
    return out
