"""The open_clip backend: `open_clip:<name | hf-hub:id | folder>[:random]` and `biomedclip`.

Only the image tower is built (`open_clip.model._build_vision_tower`), from the
model's `open_clip_config.json` (`model_cfg.vision_cfg`) or open_clip's bundled
config of that name, so no text model or tokenizer is fetched. Weights are the
`visual.*` tensors of `open_clip_model.safetensors` / `open_clip_pytorch_model.bin`.
Preprocessing is the config's `preprocess_cfg` over open_clip's defaults (CLIP
mean/std, bicubic).

Tokens: a timm tower (BiomedCLIP) gives its trunk's tokens (`visual.trunk`: CLS,
then patches, before the CLIP projection); a native open_clip ViT gives its class
token and patches through `ln_post`, at its own grid only (its position embeddings
are not resampled). What the tower tells (patch size, width, prefix tokens) and
open_clip's preprocessing defaults are remembered (`featstore.encode.derived`), so a
cached extract imports neither open_clip nor torch.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featstore.encode.derived import info_from, remembered
from featstore.encode.preprocess import interpolation
from featstore.encode.presets import OPEN_CLIP_PRESETS
from featstore.encode.protocol import (
    RANDOM_SEED,
    Backbone,
    FeatureBatch,
    Resolved,
    check_depth,
    files_digest,
    grid,
    hub_folder,
    json_sha256,
    major_version,
    no_random_flag,
    random_init_sha256,
    read_json,
    seeded,
    three,
    weight_files,
)
from featstore.encode.timm_models import TimmBackbone, load_weights
from featstore.errors import EncoderConfigError, EncoderNotFoundError
from featstore.identity import EncoderInfo

if TYPE_CHECKING:
    import torch

CONFIG = "open_clip_config.json"


class NativeViT(Backbone):
    """Tokens of open_clip's own VisionTransformer: class token, then patches (ln_post)."""

    def __init__(self, module: torch.nn.Module, name: str) -> None:
        self.module = module
        self.name = name

    def tokens(
        self, pixels: torch.Tensor, layers: int, patch_layers: tuple[int, ...]
    ) -> FeatureBatch:
        """cls (B, L, D) and patch (B, P, h/p, w/p, D), each through `ln_post`."""
        import torch

        m: Any = self.module
        _, _, h, w = pixels.shape
        p = int(m.patch_size[0])
        if (h // p, w // p) != tuple(m.grid_size):
            size = tuple(s * p for s in m.grid_size)
            raise EncoderConfigError(
                f"open_clip ViT '{self.name}' has fixed position embeddings for "
                f"{size[0]}x{size[1]} px, not {h}x{w}; use resolution {size[0]} for it"
            )
        depth = len(m.transformer.resblocks)
        check_depth(self.name, depth, layers, patch_layers)
        wanted = sorted({depth + i for i in patch_layers} | set(range(depth - layers, depth)))
        out = m.forward_intermediates(
            pixels, indices=wanted, normalize_intermediates=True, intermediates_only=True,
            output_fmt="NLC", output_extra_tokens=True,
        )  # fmt: skip
        patches = dict(zip(wanted, out["image_intermediates"], strict=True))
        prefix = dict(zip(wanted, out["image_intermediates_prefix"], strict=True))
        cls = torch.stack([prefix[b][:, 0] for b in range(depth - layers, depth)], 1)
        patch = torch.stack([grid(patches[depth + i], h, w, p) for i in patch_layers], 1)
        return FeatureBatch(cls, patch)


def _tower(model_cfg: dict[str, Any], where: str) -> torch.nn.Module:
    """The image tower of `model_cfg`, built without weights, errors naming `where`."""
    from open_clip.model import _build_vision_tower

    try:
        return _build_vision_tower(
            model_cfg["embed_dim"], model_cfg["vision_cfg"], model_cfg.get("quick_gelu", False)
        )
    except (RuntimeError, TypeError, ValueError, KeyError, AssertionError) as exc:
        raise EncoderConfigError(
            f"{where}: open_clip cannot build its image tower ({str(exc)[:300]})"
        ) from None


def _backbone(tower: torch.nn.Module, name: str) -> Backbone:
    """A timm tower's trunk (position embeddings resampled per input) or a native ViT."""
    trunk: Any = getattr(tower, "trunk", None)
    if trunk is None:
        if not hasattr(tower, "transformer") or not hasattr(tower, "grid_size"):
            raise EncoderConfigError(
                f"open_clip '{name}': a {type(tower).__name__} image tower, not a ViT with "
                "patch tokens"
            )
        return NativeViT(tower, name)
    if hasattr(trunk, "dynamic_img_size") and hasattr(trunk, "patch_embed"):
        from timm.layers.format import Format

        # What timm's VisionTransformer(dynamic_img_size=True) sets up; open_clip builds
        # the trunk without it, so the tower would accept its training size only.
        trunk.dynamic_img_size = True
        trunk.patch_embed.strict_img_size = False
        trunk.patch_embed.flatten = False
        trunk.patch_embed.output_fmt = Format.NHWC
    return TimmBackbone(trunk, name)


def _derive(config: dict[str, Any], where: str) -> dict[str, Any]:
    """The facts (see `derived`) of `config`'s image tower, built on the meta device."""
    import torch
    from open_clip.transform import PreprocessCfg

    model_cfg = config["model_cfg"]
    with torch.device("meta"):
        tokens = _backbone(_tower(model_cfg, where), where)
    pre = {**asdict(PreprocessCfg()), **config.get("preprocess_cfg", {})}
    m: Any = tokens.module
    if isinstance(tokens, TimmBackbone):
        patch, hidden = tokens.patch, int(m.embed_dim)
        registers, has_cls = tokens.prefix - int(tokens.has_cls), tokens.has_cls
    else:  # a native ViT: one class token, always
        patch, hidden, registers, has_cls = int(m.patch_size[0]), int(m.transformer.width), 0, True
    vision = model_cfg["vision_cfg"]
    return dict(
        model_type=f"open_clip:{vision.get('timm_model_name') or 'vit'}",
        patch_size=patch,
        num_register_tokens=registers,
        hidden_size=hidden,
        mean=three(list(pre["mean"]), f"{where}: mean"),
        std=three(list(pre["std"]), f"{where}: std"),
        backend="open_clip",
        backend_version=major_version("open_clip_torch"),
        config_sha256=json_sha256({"model_cfg": model_cfg, "preprocess_cfg": pre}),
        interpolation=interpolation(pre["interpolation"], f"{where}: preprocess_cfg"),
        cls_token="cls" if has_cls else "pooled",
    )


def _info(
    name: str, source: str, config: dict[str, Any], sha: str, random: bool, memo: Path | None
) -> EncoderInfo:
    """The info of `config`'s tower; its facts remembered under the config's hash."""
    return remembered(
        memo, {"open_clip config": json_sha256(config)}, ("open_clip_torch", "timm"),
        lambda: _derive(config, source),
        lambda facts: info_from(facts, name, source, sha, random),
    )  # fmt: skip


def _checked(config: dict[str, Any], where: str) -> dict[str, Any]:
    model_cfg = config.get("model_cfg", config)
    if not isinstance(model_cfg, dict) or not isinstance(model_cfg.get("vision_cfg"), dict):
        raise EncoderConfigError(
            f"{where}: no image tower (model_cfg.vision_cfg) in its open_clip config; "
            "featstore encodes images, so it needs a CLIP model with a vision tower"
        )
    model_cfg = {"embed_dim": 512, **model_cfg}  # open_clip's CLIP default; not mutated
    return {"model_cfg": model_cfg, "preprocess_cfg": config.get("preprocess_cfg", {})}


def _from_folder(name: str, folder: Path, source: str, memo: Path | None) -> Resolved:
    if not (folder / CONFIG).is_file():
        raise EncoderNotFoundError(
            f"{folder}: no {CONFIG}; an open_clip model folder holds it beside "
            "open_clip_model.safetensors (the hub layout of e.g. BiomedCLIP)"
        )
    config = _checked(read_json(folder / CONFIG), str(folder))
    files = weight_files(folder)
    if not files:
        raise EncoderNotFoundError(f"{folder}: no weights (open_clip_model.safetensors)")
    info = _info(name, source, config, files_digest(files, memo), False, memo)

    def build() -> Backbone:
        tower = _tower(config["model_cfg"], str(folder))
        load_weights(tower, files, folder, prefix="visual.")
        return _backbone(tower, name)

    return Resolved(info, build)


def _random(name: str, config: dict[str, Any], memo: Path | None) -> Resolved:
    config = _checked(config, f"open_clip:{name}")
    sha = random_init_sha256(json_sha256(config), "open_clip_torch")
    info = _info(name, f"random-init(seed={RANDOM_SEED})", config, sha, True, memo)
    return Resolved(
        info, lambda: _backbone(seeded(lambda: _tower(config["model_cfg"], name)), name)
    )


def resolve(target: str, flag: str, memo: Path | None) -> Resolved:
    """A preset (biomedclip), `hf-hub:<id>` or folder, or a bundled open_clip name."""
    if flag not in ("", "random"):
        raise EncoderNotFoundError(f"encoder '{target}:{flag}': the only flag is ':random'")
    if target in OPEN_CLIP_PRESETS:
        spec = OPEN_CLIP_PRESETS[target]
        folder = None if flag else hub_folder(spec["hub"])
        if folder is None:
            return _random(target, spec, memo)
        return _from_folder(target, folder, f"{spec['hub']}@{folder.name}", memo)
    if target.startswith("hf-hub:"):
        no_random_flag(f"open_clip:{target}", flag)
        repo = target.removeprefix("hf-hub:")
        folder = hub_folder(repo)
        if folder is None:
            raise EncoderNotFoundError(
                f"encoder 'open_clip:{target}': {repo} is not in the local hub cache; copy "
                "the cache from a connected machine or pass the model folder"
            )
        return _from_folder(target, folder, f"{repo}@{folder.name}", memo)
    path = Path(target).expanduser()
    if path.is_dir():
        no_random_flag(f"open_clip:{target}", flag)
        return _from_folder(path.name, path, str(path.resolve()), memo)
    model_cfg = remembered(
        memo, {"open_clip name": target}, ("open_clip_torch",), lambda: _by_name(target), dict
    )
    if not flag:
        raise EncoderNotFoundError(
            f"encoder 'open_clip:{target}': its weights are not on this machine; pass the "
            f"folder that holds {CONFIG} and the weights, or 'open_clip:{target}:random'"
        )
    return _random(target, {"model_cfg": model_cfg}, memo)


def _by_name(target: str) -> dict[str, Any]:
    """open_clip's bundled config of that name, or an EncoderNotFoundError."""
    import open_clip

    model_cfg = open_clip.get_model_config(target)
    if model_cfg is None:
        close = difflib.get_close_matches(target, open_clip.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise EncoderNotFoundError(
            f"encoder 'open_clip:{target}': no open_clip config of that name and no folder{hint}"
        )
    return dict(model_cfg)
