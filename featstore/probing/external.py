"""External evaluation: the probe inputs of a fit on one dataset scored on another's
test units (arrays, or for segmentation a lazily joined set; no file is read here).

`join` puts the train dataset's train and val rows and the test dataset's scored rows
into one `ClassArrays` (the other dataset's rows are its "test" split), so that the
probes of `featstore.probing.classification` (linear, kNN, ABMIL) fit and score an
external evaluation exactly as they do an internal one. Test labels are carried to the
train dataset's class ids first (`relabel`, from `featstore.data.evaluations.label_map`).

`join_sets` does the same, lazily, for a segmentation set's patch tokens and masks
(`featstore.probing.segmentation` then fits and scores its heads unchanged).

The drop between a probe's internal and external scores is `featstore.probing.drop`'s.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import xarray as xr

from featstore.errors import ProbeError
from featstore.probing.classification import ClassArrays
from featstore.probing.items import item_str

Split = Literal["test", "all"]


def relabel(y: np.ndarray, label_map: tuple[int, ...] | None) -> np.ndarray:
    """Test labels as the train dataset's class ids: y (n,) int ids, or (n, L)
    multi-hot whose columns are reordered; `label_map[j]` is the train id of test id j
    (None: ids kept)."""
    if label_map is None:
        return y
    to = np.asarray(label_map, np.int64)
    if y.ndim == 2:
        out = np.zeros_like(y)
        out[:, to] = y
        return out
    return to[y]


def join(
    train: ClassArrays, test: ClassArrays, split: Split, label_map: tuple[int, ...] | None
) -> ClassArrays:
    """`train`'s train and val rows, then `test`'s rows of its test split (or all of
    them) as the "test" split, labelled with `train`'s class ids.

    A `ProbeError` when the two sets' features or labels have different widths (two
    encoders, or label spaces of other sizes) or nothing is left to score.
    """
    if train.x.shape[1] != test.x.shape[1]:
        raise ProbeError(
            f"the two sets hold features of {train.x.shape[1]} and {test.x.shape[1]} "
            "channels: they are not of one encoder; extract both with the same one"
        )
    y_test = relabel(test.y, label_map)
    if train.y.ndim != y_test.ndim or train.y.shape[1:] != y_test.shape[1:]:
        raise ProbeError(
            f"labels of shape {train.y.shape[1:]} and {y_test.shape[1:]}: the two "
            "datasets do not share one label space; give both the same `classes:`"
        )
    fit = np.flatnonzero(np.isin(train.split, ["train", "val"]))
    scored = np.flatnonzero(test.split == "test") if split == "test" else np.arange(len(test.y))
    if len(scored) == 0:
        raise ProbeError(
            "the test dataset has no test split to score; set `split: all` on the "
            "evaluation to score every item of it"
        )
    n_classes = max(train.n_classes, 1 + int(y_test.max()) if y_test.ndim == 1 else 0)
    bags = None
    if train.bags is not None:
        assert test.bags is not None  # one `ProbeOptions.pool` for both
        bags = [train.bags[i] for i in fit] + [test.bags[i] for i in scored]
    assert train.sample is not None and test.sample is not None
    return ClassArrays(
        x=np.concatenate([train.x[fit], test.x[scored]]),
        y=np.concatenate([train.y[fit], y_test[scored]]),
        split=np.concatenate([train.split[fit], np.full(len(scored), "test", object)]),
        group=np.concatenate([train.group[fit].astype(object), test.group[scored].astype(object)]),
        n_classes=train.y.shape[1] if train.y.ndim == 2 else n_classes,
        bags=bags,
        sample=np.concatenate([train.sample[fit].astype(object), test.sample[scored]]),
        has_patient=test.has_patient,  # what the kept test predictions name
    )


def join_sets(
    train: xr.Dataset, test: xr.Dataset, split: Split, label_map: tuple[int, ...] | None
) -> xr.Dataset:
    """A segmentation set to probe (`segmentation.seg_set`): `train`'s train and val
    items, then `test`'s test items (or all of them) as "test", lazily (no patch token
    is read here); the test masks carried to `train`'s class ids.

    Holds `patch`, `mask` and the `sample`, `slice`, `split` coordinates (and
    `patient` where both sets have one); both sets are of one encoder and resolution.
    """
    fit = np.flatnonzero(np.isin(item_str(train.split), ["train", "val"]))
    tested = (
        item_str(test.split) == "test" if split == "test" else np.ones(test.sizes["item"], bool)
    )
    scored = np.flatnonzero(tested)
    if len(scored) == 0:
        raise ProbeError(
            "the test dataset has no test split to score; set `split: all` on the "
            "evaluation to score every item of it"
        )
    names = [
        "sample",
        "slice",
        "split",
        *(["patient"] if "patient" in train.coords and "patient" in test.coords else []),
    ]

    def part(
        xs: xr.Dataset, items: np.ndarray, as_test: bool, lut: np.ndarray | None
    ) -> xr.Dataset:
        mask = xs["mask"].isel(item=items)
        if lut is not None:
            mask = xr.apply_ufunc(
                lambda m: lut[m], mask, dask="parallelized", output_dtypes=[mask.dtype]
            )
        coords = {
            n: ("item", item_str(xs[n])[items] if n != "slice" else np.asarray(xs[n].values)[items])
            for n in names
        }
        if as_test:
            coords["split"] = ("item", np.full(len(items), "test"))
        out = xr.Dataset({"patch": xs["patch"].isel(item=items), "mask": mask})
        out = out.reset_coords(drop=True).drop_vars("item", errors="ignore")
        return out.assign_coords(coords)

    lut = None if label_map is None else np.asarray(label_map, test["mask"].dtype)
    both = [part(train, fit, False, None), part(test, scored, True, lut)]
    return xr.concat(both, dim="item", coords="minimal", compat="override", join="override")
