"""Encoder specs -> backends: the one place that knows the spec grammar.

    hf:<folder | hub id | file.pth>         transformers (the default without a prefix)
    timm:<model name | folder>[:random]     timm
    open_clip:<name | hf-hub:id | folder>[:random]
    pixels[:<patch size>]                   the raw-pixel baseline
    <preset>[:random]                       dinov3-*, dinov2-*, rad-dino, biomedclip

A preset resolves to local weights when they exist (the local Hugging Face cache) and
otherwise to a fixed-seed random initialisation of the same architecture, always
flagged ``random_init``; ``:random`` asks for the random init explicitly. Nothing is
downloaded unless FEATSTORE_ALLOW_DOWNLOAD=1 and HF_HUB_OFFLINE is unset.

Resolving reads config files, hashes weight files and reads the facts memo
(`featstore.encode.derived`), without importing torch or a backend library; the
model is built by the `Encoder` when a batch must be computed (see
`featstore.encode.protocol`).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from featstore.encode import hf, open_clip_models, pixels, timm_models
from featstore.encode.presets import OPEN_CLIP_PRESETS, preset_names
from featstore.encode.protocol import Device, Encoder, FeatureBatch, Resolved
from featstore.errors import EncoderNotFoundError

__all__ = ["BACKENDS", "Encoder", "FeatureBatch", "load_encoder", "resolve_encoder"]

# The one table of backends: a spec's prefix -> the module that resolves it. Each has
# `resolve(target, flag, memo)`, but for the pixel baseline's `resolve(patch)`.
BACKENDS: dict[str, ModuleType] = {
    "hf": hf,
    "timm": timm_models,
    "open_clip": open_clip_models,
    "pixels": pixels,
}


def _split_flag(rest: str) -> tuple[str, str]:
    """'name:random' -> ('name', 'random'); a Windows-free path never ends in ':x'."""
    target, sep, flag = rest.rpartition(":")
    if sep and flag == "random":
        return target, flag
    return rest, ""


def resolve_encoder(spec: str, memo: Path | None = None) -> Resolved:
    """The backend's `Resolved` for `spec`: info from files, the model not yet built.

    `memo` is the file-hash memo (see `featstore.data.fingerprint`) used to hash weight
    files; None hashes them afresh.
    """
    prefix, sep, rest = spec.partition(":")
    if prefix == "pixels":
        return pixels.resolve(rest)
    if sep and prefix in BACKENDS:
        target, flag = _split_flag(rest)
        if not target:
            raise EncoderNotFoundError(f"encoder '{spec}': nothing after '{prefix}:'")
        found: Resolved = BACKENDS[prefix].resolve(target, flag, memo)
        return found
    if prefix in OPEN_CLIP_PRESETS:
        return open_clip_models.resolve(prefix, rest, memo)
    if prefix in hf.presets():
        if rest not in ("", "random"):
            raise EncoderNotFoundError(f"encoder '{spec}': unknown flag ':{rest}'; use ':random'")
        return hf.resolve(prefix, rest, memo)
    target, flag = _split_flag(spec)
    if flag and Path(target).expanduser().exists():  # a folder or a .pth: hf's
        return hf.resolve(target, flag, memo)
    if sep and not Path(spec).expanduser().exists():
        raise EncoderNotFoundError(
            f"encoder '{spec}': unknown backend prefix '{prefix}:'; use one of "
            f"{', '.join(p + ':' for p in BACKENDS)}, or a preset ({', '.join(preset_names())})"
        )
    return hf.resolve(spec, "", memo)


def load_encoder(spec: str, device: Device = "auto", memo: Path | None = None) -> Encoder:
    """Resolve an encoder spec (see the module docstring) into an `Encoder`.

    Cheap: the encoder knows its `info` (identity, preprocessing) at once and builds
    its model on the first `encode` (or `load()`).
    """
    return Encoder(resolve_encoder(spec, memo), device)
