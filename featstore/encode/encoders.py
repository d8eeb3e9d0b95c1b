"""Frozen encoders: load through transformers, forward to a `FeatureBatch`.

An encoder is named by a preset (``dinov3-vits16``), a local model folder, a hub id
found in the local Hugging Face cache, or ``pixels`` (the raw-pixel baseline). A
preset resolves to local weights when they exist and otherwise to a fixed-seed
random initialisation of the same architecture, always flagged ``random_init``;
``<preset>:random`` asks for the random init explicitly. Nothing is downloaded
unless FEATSTORE_ALLOW_DOWNLOAD=1 and HF_HUB_OFFLINE is unset.

The encoder carries its own patch size, register count and mean/std, read from the
model folder (``config.json``, ``preprocessor_config.json``), never from YAML.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from featstore.data.fingerprint import files_sha256
from featstore.encode.presets import PRESETS
from featstore.errors import EncoderNotFoundError
from featstore.identity import EncoderInfo

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_SEED = 0


@dataclass(frozen=True)
class FeatureBatch:
    """One forward pass. Shapes never depend on options.

    cls:   (B, L, D) float32, final-norm CLS token of the last L blocks (L >= 1).
    patch: (B, P, rows, cols, D) float32, final-norm patch tokens of P chosen blocks,
           register tokens removed.
    """

    cls: torch.Tensor
    patch: torch.Tensor


def _allow_download() -> bool:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    return not offline and os.environ.get("FEATSTORE_ALLOW_DOWNLOAD") == "1"


def _hub_folder(repo_id: str) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=not _allow_download()))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def _weights_sha256(folder: Path, model: torch.nn.Module, memo: Path | None) -> str:
    files = sorted(
        p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pth") and p.is_file()
    )
    if not files:
        return _state_sha256(model)
    digests = files_sha256(files, memo)
    return hashlib.sha256("".join(digests[str(p)] for p in files).encode()).hexdigest()


def _state_sha256(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def _mean_std(folder: Path | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = folder / "preprocessor_config.json" if folder else None
    if cfg and cfg.is_file():
        data = json.loads(cfg.read_text())
        if "image_mean" in data and "image_std" in data:
            # transformers allows one number for all channels
            mean, std = (
                np.broadcast_to(np.asarray(data[k], float), 3) for k in ("image_mean", "image_std")
            )
            return tuple(map(float, mean)), tuple(map(float, std))
    return IMAGENET_MEAN, IMAGENET_STD  # the DINOv2/v3 web-image (LVD) statistics


class Encoder:
    """A frozen vision transformer in eval mode, ready to `encode` batches."""

    def __init__(
        self,
        model: torch.nn.Module | None,
        info: EncoderInfo,
        device: Literal["auto", "cpu", "cuda"] = "auto",
    ) -> None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.info = info
        self.model = model.eval().to(self.device) if model is not None else None

    @property
    def patch_size(self) -> int:
        """Side of a square patch in pixels (from the model's config)."""
        return self.info.patch_size

    @torch.inference_mode()
    def encode(
        self, pixels: torch.Tensor, layers: int = 1, patch_layers: tuple[int, ...] = (-1,)
    ) -> FeatureBatch:
        """Forward one batch through the frozen model (or the raw-pixel baseline).

        Args:
            pixels: (B, 3, H, W) float32 normalised, H and W multiples of the patch size.
            layers: how many of the last blocks give a CLS token (L).
            patch_layers: blocks whose patch tokens to return (P of them): -1 the last,
                -2 the one before, ...; each through the model's final norm.
        Returns:
            cls (B, L, D) float32 and patch (B, P, H/p, W/p, D) float32, on the encoder's
            device (the caller casts and copies them to the host, off the critical path).
        """
        b, _, h, w = pixels.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"input {h}x{w} is not a multiple of the patch size {p}")
        pixels = pixels.to(self.device, non_blocking=True)
        if self.model is None:
            return _pixel_features(pixels, p, layers, len(patch_layers))
        deep = layers > 1 or patch_layers != (-1,)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        with autocast:
            out = self.model(pixel_values=pixels, output_hidden_states=deep)
        last = out.last_hidden_state.float()
        start = 1 + self.info.num_register_tokens
        if not deep:
            patch = last[:, None, start:].reshape(b, 1, h // p, w // p, -1)
            return FeatureBatch(cls=last[:, :1], patch=patch)
        # DINOv3 names its final norm `norm`, DINOv2 `layernorm`.
        norm = self.model.get_submodule("norm" if hasattr(self.model, "norm") else "layernorm")
        blocks = out.hidden_states[1:]  # [0] is the embedding output
        if max(abs(i) for i in patch_layers) > len(blocks):
            raise ValueError(
                f"patch_layers {list(patch_layers)} reach beyond the {len(blocks)} blocks of "
                f"'{self.info.name}'"
            )
        cls = (
            last[:, :1]
            if layers == 1
            else torch.stack([norm(hs[:, 0]).float() for hs in blocks[-layers:]], 1)
        )
        patch = torch.stack(
            [
                (last if i == -1 else norm(blocks[i]).float())[:, start:].reshape(
                    b, h // p, w // p, -1
                )
                for i in patch_layers
            ],
            1,
        )
        return FeatureBatch(cls=cls, patch=patch)


def _pixel_features(pixels: torch.Tensor, p: int, layers: int, patch_layers: int) -> FeatureBatch:
    """Raw-pixel baseline with p*p channels: the whole image pooled to p x p as 'CLS',
    and each p-px patch's own p*p grey values as its token (the same for every layer)."""
    grey = pixels[:, :1].float()
    b, _, h, w = grey.shape
    cls = F.adaptive_avg_pool2d(grey, p).flatten(1)[:, None].expand(-1, layers, -1)
    patch = (
        grey.reshape(b, h // p, p, w // p, p)
        .permute(0, 1, 3, 2, 4)
        .reshape(b, 1, h // p, w // p, p * p)
        .expand(-1, patch_layers, -1, -1, -1)
    )
    return FeatureBatch(cls=cls.contiguous(), patch=patch.contiguous())


def _from_config(preset: str, spec: dict) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModel

    arch = {k: v for k, v in spec.items() if k not in ("hub", "model_type")}
    config = AutoConfig.for_model(spec["model_type"], **arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        return AutoModel.from_config(config)


def _info(
    name: str, source: str, model: torch.nn.Module, folder: Path | None, sha: str, random_init: bool
) -> EncoderInfo:
    cfg: Any = model.config  # a transformers PretrainedConfig (torch types it Tensor | Module)
    mean, std = _mean_std(folder)
    patch = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
    return EncoderInfo(
        name=name,
        source=source,
        weights_sha256=sha,
        model_type=cfg.model_type,
        patch_size=int(patch),
        num_register_tokens=int(getattr(cfg, "num_register_tokens", 0) or 0),
        hidden_size=int(cfg.hidden_size),
        mean=mean,
        std=std,
        random_init=random_init,
    )


def _load_folder(
    name: str, folder: Path, source: str, memo: Path | None
) -> tuple[torch.nn.Module, EncoderInfo]:
    from transformers import AutoModel

    try:
        model = AutoModel.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise EncoderNotFoundError(
            f"{folder}: not a loadable transformers model ({exc}); it "
            "needs config.json and model.safetensors"
        ) from None
    return model, _info(name, source, model, folder, _weights_sha256(folder, model, memo), False)


def load_encoder(
    spec: str, device: Literal["auto", "cpu", "cuda"] = "auto", memo: Path | None = None
) -> Encoder:
    """Resolve an encoder name (preset, folder, hub id or ``pixels``) and load it.

    `memo` is the file-hash memo (see `featstore.data.fingerprint`) used to hash weight
    files; None hashes them afresh.
    """
    if spec == "pixels" or spec.startswith("pixels:"):
        patch = int(spec.partition(":")[2] or 16)
        info = EncoderInfo(
            "pixels",
            f"raw pixels, {patch}-px patches",
            f"raw-pixels-p{patch}-v2",
            "pixels",
            patch,
            0,
            patch * patch,
            IMAGENET_MEAN,
            IMAGENET_STD,
            False,
        )
        return Encoder(None, info, device)
    preset, _, flag = spec.partition(":")
    if preset in PRESETS:
        if flag not in ("", "random"):
            raise EncoderNotFoundError(f"encoder '{spec}': unknown flag ':{flag}'; use ':random'")
        folder = None if flag else _hub_folder(PRESETS[preset]["hub"])
        if folder is not None:
            model, info = _load_folder(
                preset, folder, f"{PRESETS[preset]['hub']}@{folder.name}", memo
            )
            return Encoder(model, info, device)
        model = _from_config(preset, PRESETS[preset])
        info = _info(
            preset, f"random-init(seed={RANDOM_SEED})", model, None, _state_sha256(model), True
        )
        return Encoder(model, info, device)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".pth":  # Meta's original DINOv3 checkpoint
        from featstore.encode.dinov3_pth import load_pth

        model, _ = load_pth(path, PRESETS)
        sha = files_sha256([path], memo)[str(path)]
        return Encoder(
            model, _info(path.stem, str(path.resolve()), model, path.parent, sha, False), device
        )
    if path.is_dir():
        model, info = _load_folder(path.name, path, str(path.resolve()), memo)
        return Encoder(model, info, device)
    if spec.count("/") == 1 and not path.exists():
        folder = _hub_folder(spec)
        if folder is not None:
            model, info = _load_folder(spec, folder, f"{spec}@{folder.name}", memo)
            return Encoder(model, info, device)
    from huggingface_hub.constants import HF_HUB_CACHE

    raise EncoderNotFoundError(
        f"encoder '{spec}' not found: it is not a preset ({', '.join(PRESETS)}, pixels), not a "
        f"local folder, and not a hub id in the cache {HF_HUB_CACHE}. Provide weights with "
        "`huggingface-cli download <id>` on a connected machine and copy the cache, or pass "
        "the folder that holds config.json and model.safetensors."
    )
