"""The int8 patch codec, both ways: quantised when a unit is written, dequantised
lazily when a set is opened (`quantize: int8` in the manifest).

Symmetric int8 with a float32 scale per item and channel (absmax / 127): a set
stores `patch` as int8 and `patch_scale (item, [patch_layer,] channel)`; readers
(`FeatureSet.open`, the probes, `featstore.open_features`) see float32 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import xarray as xr

SCALE = "patch_scale"  # the stored scale variable beside `patch`


@dataclass(frozen=True)
class Quantized:
    """values: int8 of the patch tokens' shape; scale: (n, [P,] D) float32, with
    patch ~= values * scale[..., None, None, :]."""

    values: np.ndarray
    scale: np.ndarray


def quantize_int8(patch: np.ndarray) -> Quantized:
    """patch: (n, [P,] rows, cols, D) float -> `Quantized`, within half a step of each
    value. NaN rows (skipped items) get a NaN scale and zero values."""
    x = patch.astype(np.float32, copy=False)
    with np.errstate(invalid="ignore"):
        scale = np.abs(x).max(axis=(-3, -2)) / 127.0
        scale[scale == 0] = 1.0  # an all-zero channel: any scale reproduces it
        q = np.rint(x / scale[..., None, None, :])
    q[~np.isfinite(q)] = 0
    return Quantized(q.astype(np.int8), scale.astype(np.float32))


def dequantized(xs: xr.Dataset) -> xr.Dataset:
    """`xs` with int8 `patch` x `patch_scale` as lazy float32 `patch` (no scale
    variable); a set stored in float16/float32 is returned as it is."""
    if SCALE not in xs:
        return xs
    xs["patch"] = (xs.patch.astype(np.float32) * xs[SCALE]).transpose(*xs.patch.dims)
    return xs.drop_vars(SCALE)
