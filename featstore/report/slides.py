"""The slide figure: thumbnail with tissue outline and tile grid, and the ABMIL
attention over it (matplotlib; arrays in, a figure out; no file is read here)."""

from __future__ import annotations

import numpy as np
from matplotlib.collections import PatchCollection
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle


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
