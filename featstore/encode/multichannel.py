"""Features of multi-channel samples encoded channel by channel (torch).

With `channels: {mode: per-channel}` each item's pixels hold G encoder inputs side by
side, (B, 3G, R, R) (`preprocess.input_groups`): each is one input channel as grey.
They are forwarded as B x G images and joined per item: `concat` puts the G feature
vectors one after the other along the channel dim (input order), `mean` averages them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from featstore.data.settings import Channels
from featstore.encode.protocol import FeatureBatch

if TYPE_CHECKING:
    import torch

    from featstore.encode.protocol import Encoder


def encode_inputs(
    encoder: Encoder,
    pixels: torch.Tensor,
    layers: int,
    patch_layers: tuple[int, ...],
    channels: Channels | None,
) -> FeatureBatch:
    """`encoder.encode` of (B, 3G, R, R) pixels, G encoder inputs per item, joined by
    `channels.combine`: cls (B, L, D'), patch (B, P, rows, cols, D'), D' =
    `channels.width(D)`. G = 1 (no `channels:`, or mode rgb) is one plain forward pass."""
    b, c, h, w = pixels.shape
    g = c // 3
    if channels is None or g == 1:
        return encoder.encode(pixels, layers, patch_layers)
    fb = encoder.encode(pixels.reshape(b * g, 3, h, w), layers, patch_layers)
    cls = fb.cls.reshape(b, g, *fb.cls.shape[1:])  # (B, G, L, D)
    patch = fb.patch.reshape(b, g, *fb.patch.shape[1:])  # (B, G, P, rows, cols, D)
    if channels.combine == "mean":
        return FeatureBatch(cls=cls.mean(1), patch=patch.mean(1))
    cls = cls.permute(0, 2, 1, 3).reshape(b, cls.shape[2], g * cls.shape[3])
    patch = patch.permute(0, 2, 3, 4, 1, 5).reshape(b, *patch.shape[2:5], g * patch.shape[5])
    return FeatureBatch(cls=cls, patch=patch)
