"""Intensity handling, resizing and normalisation (numpy + PIL; no torch).

Intensities become [0, 1] per sample (a whole volume at once, so every slice of a
volume shares one mapping; a volume read in blocks brings its whole `span`), slices
are resized (antialiased, with the encoder's own filter: bilinear or bicubic) to the
encoder input, grey is replicated to 3 channels (or a `channels:` block maps several
co-registered images to them, each with its own intensity rule: `input_groups`), and
the encoder's own mean/std are applied.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from featstore.data.settings import INTERPOLATIONS, Intensity, Interpolation
from featstore.errors import EncoderConfigError
from featstore.identity import Preprocess

# PIL's filters widen their kernel when shrinking, i.e. they antialias.
_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def interpolation(name: object, where: str) -> Interpolation:
    """`name` as a resize filter featstore has, or an EncoderConfigError naming `where`."""
    for known in INTERPOLATIONS:
        if name == known:
            return known
    raise EncoderConfigError(
        f"{where}: interpolation {name!r}; featstore resizes with bilinear or bicubic "
        "(override it in the manifest's preprocessing for this encoder)"
    )


def unit_map(
    image: np.ndarray, intensity: Intensity, span: tuple[float, float] | None = None
) -> tuple[float, float] | None:
    """(lo, scale) of the sample's mapping x -> clip((x - lo) * scale, 0, 1), or None
    for mode `none` (clip only). `image` is the whole sample, any shape and dtype, or
    some slices of it with `span`, the whole sample's (min, max) (`Loaded.span`), which
    mode `minmax` then uses (the manifest refuses `percentile` for such samples)."""
    if intensity.mode == "window":
        center, width = intensity.center, intensity.width
        assert center is not None and width is not None  # Intensity's validator checks them
        lo = center - width / 2
        hi = center + width / 2
    elif intensity.mode == "percentile":
        lo, hi = np.percentile(image, [intensity.low, intensity.high])
    elif intensity.mode == "minmax":
        lo, hi = span if span is not None else (float(image.min()), float(image.max()))
    else:  # none: the data is already in [0, 1]
        return None
    scale = 1.0 / (hi - lo) if hi > lo else 0.0
    return lo, scale


def to_unit(
    image: np.ndarray, intensity: Intensity, span: tuple[float, float] | None = None
) -> np.ndarray:
    """Raw intensities (any shape) to float32 in [0, 1] with one mapping per sample
    (`span`: see `unit_map`)."""
    x = image.astype(np.float32, copy=False)
    mapping = unit_map(x, intensity, span)
    if mapping is None:
        return np.clip(x, 0.0, 1.0)
    lo, scale = mapping
    return np.clip((x - lo) * scale, 0.0, 1.0)


def _fit_plane(
    plane: np.ndarray, size: int, fit: str, nearest: bool, filt: str = "bilinear"
) -> np.ndarray:
    h, w = plane.shape
    if fit == "pad" and h <= size and w <= size:
        out = np.zeros((size, size), plane.dtype)
        top, left = (size - h) // 2, (size - w) // 2
        out[top : top + h, left : left + w] = plane
        return out
    if (h, w) == (size, size):
        return plane
    mode = Image.Resampling.NEAREST if nearest else _FILTERS[filt]
    src = Image.fromarray(plane.astype(np.int32 if nearest else np.float32, copy=False))
    return np.asarray(src.resize((size, size), mode), dtype=plane.dtype)


def preprocess(
    image: np.ndarray,
    mask: np.ndarray | None,
    cfg: Preprocess,
    span: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Encoder input for every slice of one sample.

    Args:
        image: (D, H, W, C) float32 raw intensities, C in {1, 3}.
        mask: (D, H, W) uint8 class ids, or None.
        span: the whole sample's (min, max) where `image` is a slice run of it
            (`Loaded.span`); None: `image` is the whole sample.
    Returns:
        pixels: (D, 3G, R, R) float32, normalised with the encoder's mean/std; G = 1
            encoder input per item, but G = inputs for `channels: {mode: per-channel}`
            (see `input_groups`).
        mask:   (D, R, R) uint8 (nearest-neighbour), or None.
    """
    unit = unit_planes(image, cfg, span)
    d, _, _, c = unit.shape
    r = cfg.resolution
    groups = input_groups(cfg, c)
    out = np.empty((d, 3 * len(groups), r, r), np.float32)
    for i in range(d):
        planes = [
            _fit_plane(unit[i, :, :, k], r, cfg.fit, False, cfg.interpolation) for k in range(c)
        ]
        out[i] = [planes[k] for group in groups for k in group]
    out -= np.tile(np.asarray(cfg.mean, np.float32), len(groups))[None, :, None, None]
    out /= np.tile(np.asarray(cfg.std, np.float32), len(groups))[None, :, None, None]
    return out, fit_mask(mask, cfg)


def unit_planes(
    image: np.ndarray, cfg: Preprocess, span: tuple[float, float] | None = None
) -> np.ndarray:
    """(D, H, W, C) raw -> (D, H, W, C') float32 in [0, 1]: the whole image by the
    dataset's intensity (C' = C), or with `channels:` each input from its source by its
    own rule (C' = inputs; `image` holds one channel per `Channels.sources`)."""
    ch = cfg.channels
    if ch is None:
        return to_unit(image, cfg.intensity, span)
    if image.shape[-1] != len(ch.sources):
        raise ValueError(f"image has {image.shape[-1]} channels, `channels:` {len(ch.sources)}")
    at = {s: k for k, s in enumerate(ch.sources)}
    units = [to_unit(image[..., at[i.source]], i.intensity, span) for i in ch.inputs]
    return np.stack(units, axis=-1)


def inputs_per_item(cfg: Preprocess) -> int:
    """G, the encoder inputs of one item: `preprocess` gives (D, 3G, R, R) pixels."""
    return 1 if cfg.channels is None else len(cfg.channels.groups)


def input_groups(cfg: Preprocess, c: int) -> tuple[tuple[int, int, int], ...]:
    """The one rule from unit planes to encoder channels: for each encoder input, the
    plane on its R, G and B channels. Grey is replicated, RGB kept; with `channels:`,
    its mapping (rgb: one input; per-channel: one grey input per channel, whose
    features `encode.multichannel` joins)."""
    if cfg.channels is not None:
        return cfg.channels.groups
    return ((0, 0, 0),) if c == 1 else ((0, 1, 2),)


def fit_mask(mask: np.ndarray | None, cfg: Preprocess) -> np.ndarray | None:
    """(D, H, W) uint8 class ids -> (D, R, R) uint8, nearest-neighbour (never blended)."""
    if mask is None:
        return None
    r = cfg.resolution
    return np.stack([_fit_plane(m, r, cfg.fit, nearest=True) for m in mask]).astype(np.uint8)
