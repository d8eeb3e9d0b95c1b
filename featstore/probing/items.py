"""The items of an open feature set, as the probes read them: string coordinates,
volumes (the items of one `sample`, in slice order) and patch tokens."""

from __future__ import annotations

import numpy as np
import xarray as xr

from featstore.store import sets


def item_str(var: xr.DataArray) -> np.ndarray:
    """A string coordinate as a plain '<U' array (`sets.open_set` already made it one)."""
    return sets.plain(np.asarray(var.values))


def volume_items(sample: np.ndarray, slice_: np.ndarray | None = None) -> list[np.ndarray]:
    """Indices of each volume's items: the one grouping of items into volumes.

    sample: (n,) volume id of each item (a 2D image is its own volume); slice_: (n,)
    the items' slice numbers (None: their order). Volumes come in order of first
    appearance, each volume's items by slice (ties in item order).
    """
    if len(sample) == 0:
        return []
    _, first, inv = np.unique(sample, return_index=True, return_inverse=True)
    inv = inv.reshape(-1)
    within = np.arange(len(sample)) if slice_ is None else np.asarray(slice_)
    items = np.lexsort((np.arange(len(sample)), within, inv))
    per = np.split(items, np.cumsum(np.bincount(inv))[:-1])
    return [per[j] for j in np.argsort(first, kind="stable")]


def patch_tokens(xs: xr.Dataset, items: np.ndarray, last_only: bool = False) -> np.ndarray:
    """Patch tokens of `items` as (n, rows, cols, C). A set that stores several blocks
    (`patch` with a `patch_layer` dim, blocks in increasing depth as the manifest's
    `patch_layers` sorts them) gives the deepest stored block (`last_only`) or all of
    them concatenated along channels, shallowest first."""
    var = xs.patch
    dim = "patch_layer"
    if dim not in var.dims:
        return np.asarray(var[items].values)
    if last_only:
        return np.asarray(var[items].isel({dim: -1}).values)
    arr = np.asarray(var[items].transpose("item", "row", "col", dim, "channel").values)
    return arr.reshape(*arr.shape[:3], -1)
