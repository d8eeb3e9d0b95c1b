"""The raw-pixel baseline as an encoder: `pixels` or `pixels:<patch size>`.

CLS is the whole image pooled to p x p (p*p channels); each p-px patch's token is its
own p*p grey values. Every layer gives the same tokens. It has no weights, so its
identity is its patch size and the version of this definition.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from featstore.encode.protocol import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    FeatureBatch,
    Resolved,
)
from featstore.errors import EncoderNotFoundError
from featstore.identity import EncoderInfo

if TYPE_CHECKING:
    import torch


class Pixels(Backbone):
    """The baseline's read-out; `module` has no parameters."""

    autocast = False  # raw pixels, in float32 on every device

    def __init__(self, patch: int) -> None:
        import torch

        self.module = torch.nn.Identity()
        self.patch = patch

    def tokens(
        self, pixels: torch.Tensor, layers: int, patch_layers: tuple[int, ...]
    ) -> FeatureBatch:
        """cls (B, L, p*p): the image pooled to p x p; patch (B, P, h/p, w/p, p*p)."""
        import torch.nn.functional as F

        p = self.patch
        grey = pixels[:, :1].float()
        b, _, h, w = grey.shape
        cls = F.adaptive_avg_pool2d(grey, p).flatten(1)[:, None].expand(-1, layers, -1)
        patch = (
            grey.reshape(b, h // p, p, w // p, p)
            .permute(0, 1, 3, 2, 4)
            .reshape(b, 1, h // p, w // p, p * p)
            .expand(-1, len(patch_layers), -1, -1, -1)
        )
        return FeatureBatch(cls=cls.contiguous(), patch=patch.contiguous())


def resolve(arg: str) -> Resolved:
    """`pixels` (16-px patches) or `pixels:<p>`."""
    if arg.rpartition(":")[2] == "random":
        raise EncoderNotFoundError(
            f"encoder 'pixels:{arg}': the pixel baseline has no weights; drop ':random'"
        )
    if arg and not (arg.isdigit() and 1 <= int(arg) <= 64):
        raise EncoderNotFoundError(f"encoder 'pixels:{arg}': the patch size must be 1 to 64")
    patch = int(arg or 16)
    info = EncoderInfo(
        # the patch size is in the name: results of pixels and pixels:8 are told apart
        name="pixels" if patch == 16 else f"pixels:{patch}",
        source=f"raw pixels, {patch}-px patches",
        weights_sha256=f"raw-pixels-p{patch}-v2",
        model_type="pixels",
        patch_size=patch,
        num_register_tokens=0,
        hidden_size=patch * patch,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        random_init=False,
        backend="pixels",
        backend_version="featstore pixels 2",
        cls_token="pooled",
    )
    return Resolved(info, lambda: Pixels(patch))
