"""Preprocessing on the encoder's device: integer pixels in, encoder input out (torch).

With `--preprocess-on device` the DataLoader workers only decode: each sample travels
as the integers it is stored in (uint8, int16, ...: the narrowest exact integer
dtype; float data stays float32) with its intensity mapping (lo, scale), and the
mapping, resize, grey-to-RGB and mean/std run here as batched torch ops on the
device. The steps and their order are those of `featstore.encode.preprocess`:

    unit = clip((x - lo) * scale, 0, 1)  # one (lo, scale) per sample, from unit_map
    fit  = pad onto a zero canvas | resize (the encoder's bilinear or bicubic, antialiased) | as is
    out  = (fit - mean) / std            # grey replicated to 3 channels

Intensity, pad and normalisation are the same float32 operations as on the CPU
(bit-identical for `window`, `minmax` and `none`; `percentile` bounds are float64
there and float32 here). The resize is torch's antialiased bilinear, which
implements PIL's filter but computes its weights in float32: it differs from PIL by
up to ~1e-5 on [0, 1] intensities (docs/scaling-out.md, "Preprocessing on the device"). Bicubic
(timm and open_clip models ask for it) is torch's antialiased bicubic, which uses
PIL's kernel (a = -0.5); both paths leave its overshoot beyond [0, 1] unclipped. Masks are
not handled here: they stay nearest-neighbour on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import numpy as np

from featstore.data.settings import Intensity
from featstore.encode.preprocess import unit_map
from featstore.identity import Preprocess

if TYPE_CHECKING:  # imported where batches are built or run: `resolve` needs no torch
    import torch

Setting = Literal["auto", "cpu", "device"]
Placement = Literal["cpu", "device"]
# Narrowest first; int32 is not used for float data (no smaller than float32).
_INTS = (np.uint8, np.int8, np.int16, np.uint16, np.int32)


def resolve(setting: Setting, device: str, channels: bool = False) -> Placement:
    """Where preprocessing runs: `auto` is the device on CUDA and the CPU otherwise.
    Multi-channel samples (`channels`: a dataset's `channels:` block) always on the
    CPU: their per-input intensity rules and channel mapping live in `preprocess`."""
    if channels:
        return "cpu"
    if setting == "auto":
        return "device" if device == "cuda" else "cpu"
    return setting


def narrowest(image: np.ndarray) -> np.ndarray:
    """The same values in the smallest integer dtype that holds them exactly, or float32.

    Integer input is checked by range only; float input must also be whole numbers.
    Always native byte order (torch refuses big-endian arrays).
    """
    floats = image.dtype.kind == "f"
    if image.size == 0 or image.dtype.kind not in "uif":
        return image.astype(np.float32)
    lo, hi = image.min(), image.max()
    for t in _INTS[:-1] if floats else _INTS:
        info = np.iinfo(t)
        if info.min <= lo and hi <= info.max:
            out = image.astype(t, copy=False)
            if not floats or np.array_equal(out, image):
                return out
            break  # in range but fractional: keep float
    return image.astype(np.float32, copy=False)


@dataclass(frozen=True)
class RawSample:
    """One decoded sample before preprocessing.

    image: (D, H, W, C) in its narrowest exact dtype; lo, scale: its intensity mapping.
    """

    image: np.ndarray
    lo: float
    scale: float


def raw_sample(
    image: np.ndarray, intensity: Intensity, span: tuple[float, float] | None = None
) -> RawSample:
    """Narrow a decoded sample and compute its mapping over the whole sample (volume;
    `span`: the whole sample's (min, max) where `image` is a slice run of it)."""
    x = narrowest(image)
    mapping = unit_map(x, intensity, span)
    lo, scale = (0.0, 1.0) if mapping is None else mapping  # none: clip only
    return RawSample(x, float(lo), float(scale))


@dataclass(frozen=True)
class Part:
    """Slices first..first+n of `sample`, to land on batch rows row..row+n."""

    row: int
    sample: RawSample
    first: int
    n: int


@dataclass(frozen=True)
class RawGroup:
    """Items of one batch that share a size and dtype, preprocessed in one call.

    pixels: (n, H, W, C) integer or float32; rows: (n,) int64 rows in the batch;
    lo, scale: (n,) float32 intensity mapping of each row.
    """

    pixels: torch.Tensor
    rows: torch.Tensor
    lo: torch.Tensor
    scale: torch.Tensor


@dataclass(frozen=True)
class RawPixels:
    """One batch of undecided pixels: `n` rows, grouped by size; rows in no group
    (unreadable samples) become zeros, as on the CPU path."""

    n: int
    groups: tuple[RawGroup, ...]

    def __len__(self) -> int:
        return self.n

    def pin_memory(self) -> RawPixels:
        """Page-locked copies, so that the copies to a GPU can be non-blocking."""
        pinned = tuple(
            replace(g, **{k: getattr(g, k).pin_memory() for k in ("pixels", "rows", "lo", "scale")})
            for g in self.groups
        )
        return RawPixels(self.n, pinned)

    @property
    def nbytes(self) -> int:
        """Bytes this batch moves from a worker to the device."""
        return sum(
            t.numel() * t.element_size()
            for g in self.groups
            for t in (g.pixels, g.rows, g.lo, g.scale)
        )


def pack(n: int, parts: Sequence[Part]) -> RawPixels:
    """Group a batch's parts by (H, W, C, dtype): one array copy per group (in a worker)."""
    import torch

    keys: dict[tuple[object, ...], list[Part]] = {}
    for p in parts:
        img = p.sample.image
        keys.setdefault((*img.shape[1:], img.dtype.str), []).append(p)
    groups = []
    for members in keys.values():
        pixels = np.concatenate([p.sample.image[p.first : p.first + p.n] for p in members])
        rows = np.concatenate([np.arange(p.row, p.row + p.n) for p in members])
        lo = np.concatenate([np.full(p.n, p.sample.lo, np.float32) for p in members])
        scale = np.concatenate([np.full(p.n, p.sample.scale, np.float32) for p in members])
        groups.append(RawGroup(*(torch.from_numpy(a) for a in (pixels, rows, lo, scale))))
    return RawPixels(n, tuple(groups))


def _fit(x: torch.Tensor, size: int, fit: str, interpolation: str = "bilinear") -> torch.Tensor:
    """(n, C, H, W) float32 -> (n, C, size, size), as `preprocess._fit_plane` does."""
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    if fit == "pad" and h <= size and w <= size:
        out = x.new_zeros((*x.shape[:2], size, size))
        top, left = (size - h) // 2, (size - w) // 2
        out[:, :, top : top + h, left : left + w] = x
        return out
    if (h, w) == (size, size):
        return x
    # PIL's filters widen their kernel when shrinking; antialias=True does the same.
    return F.interpolate(x, (size, size), mode=interpolation, antialias=True, align_corners=False)


def to_input(
    pixels: torch.Tensor | RawPixels, pre: Preprocess, device: torch.device
) -> torch.Tensor:
    """Encoder input on `device`: (B, 3, R, R) float32, normalised.

    A tensor (the CPU path already preprocessed it) is returned as it is; raw pixels
    are copied to `device` (non-blocking when pinned) and preprocessed there.
    """
    import torch

    if isinstance(pixels, torch.Tensor):
        return pixels
    r = pre.resolution
    out = torch.zeros((pixels.n, 3, r, r), dtype=torch.float32, device=device)
    mean = torch.tensor(pre.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    for g in pixels.groups:
        x = g.pixels.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
        lo = g.lo.to(device, non_blocking=True).view(-1, 1, 1, 1)
        scale = g.scale.to(device, non_blocking=True).view(-1, 1, 1, 1)
        x = _fit(((x - lo) * scale).clamp_(0.0, 1.0), r, pre.fit, pre.interpolation)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        out.index_copy_(0, g.rows.to(device, non_blocking=True), (x - mean) / std)
    return out
