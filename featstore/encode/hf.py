"""The transformers backend: `hf:<folder | hub id | .pth>` and the DINOv3/DINOv2 presets.

Any `AutoModel` vision backbone whose sequence is CLS, register tokens, then patches
row by row (DINOv3, DINOv2, DINOv2 with registers, RAD-DINO, ViT). Its identity comes
from `config.json`, `preprocessor_config.json` and the weight files' hashes, read as
JSON: transformers is imported only to build the model.
"""

from __future__ import annotations

from pathlib import Path
from pickle import UnpicklingError
from typing import TYPE_CHECKING, Any

from featstore.encode.dinov3_pth import load_pth, pth_config
from featstore.encode.preprocess import interpolation
from featstore.encode.presets import HF_PRESETS, PRESETS
from featstore.encode.protocol import (
    IMAGENET_MEAN,
    IMAGENET_STD,
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
from featstore.encode.weights import check_weights
from featstore.errors import EncoderConfigError, EncoderNotFoundError
from featstore.identity import EncoderInfo

if TYPE_CHECKING:
    import torch

# config.json keys that record where and how a file was written, not the architecture
_NOT_ARCHITECTURE = ("transformers_version", "_name_or_path", "_commit_hash", "torch_dtype")
_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's codes, as preprocessor_config.json has them
_PRESET_PREPROCESS = ("hub", "mean", "std", "interpolation")


def presets() -> dict[str, dict[str, Any]]:
    """The transformers presets by name: DINOv3, then DINOv2 and RAD-DINO."""
    return {**PRESETS, **HF_PRESETS}


class HFBackbone(Backbone):
    """Tokens of a transformers ViT: CLS at 0, `registers` skipped, then the patches."""

    def __init__(self, module: torch.nn.Module, info: EncoderInfo) -> None:
        self.module = module
        self.name = info.name
        self.start = 1 + info.num_register_tokens
        self.patch = info.patch_size

    def tokens(
        self, pixels: torch.Tensor, layers: int, patch_layers: tuple[int, ...]
    ) -> FeatureBatch:
        """cls (B, L, D) of the last L blocks; patch (B, P, h/p, w/p, D); final norm."""
        import torch

        _, _, h, w = pixels.shape
        p = self.patch
        deep = layers > 1 or patch_layers != (-1,)
        out = self.module(pixel_values=pixels, output_hidden_states=deep)
        last = out.last_hidden_state
        if not deep:
            return FeatureBatch(last[:, :1], grid(last[:, self.start :], h, w, p)[:, None])
        # DINOv3 names its final norm `norm`, DINOv2 and ViT `layernorm`.
        norm = self.module.get_submodule("norm" if hasattr(self.module, "norm") else "layernorm")
        blocks = out.hidden_states[1:]  # [0] is the embedding output
        check_depth(self.name, len(blocks), layers, patch_layers)
        cls = (
            last[:, :1]
            if layers == 1
            else torch.stack([norm(hs[:, 0]) for hs in blocks[-layers:]], 1)
        )
        patch = torch.stack(
            [
                grid((last if i == -1 else norm(blocks[i]))[:, self.start :], h, w, p)
                for i in patch_layers
            ],
            1,
        )
        return FeatureBatch(cls, patch)


def _architecture(config: dict[str, Any], where: Path | str) -> dict[str, Any]:
    """The architecture part of a config.json, checked to be a vision backbone."""
    if "vision_config" in config:
        raise EncoderConfigError(
            f"{where}: a composite model ({config.get('model_type')}) with a vision_config; "
            "featstore needs a vision backbone: use open_clip:<name> for CLIP models, or "
            "save the vision tower alone"
        )
    missing = [k for k in ("model_type", "patch_size", "hidden_size") if k not in config]
    if missing:
        raise EncoderConfigError(
            f"{where}: config.json has no {', '.join(missing)}: not a vision transformer "
            f"backbone (model_type {config.get('model_type')!r}); featstore needs a ViT such "
            "as DINOv3, DINOv2 or RAD-DINO"
        )
    return {k: v for k, v in config.items() if k not in _NOT_ARCHITECTURE}


def _preprocessing(folder: Path | None) -> dict[str, Any]:
    """mean, std and interpolation from preprocessor_config.json (DINO defaults without)."""
    path = folder / "preprocessor_config.json" if folder else None
    data = read_json(path) if path is not None and path.is_file() else {}
    resample = data.get("resample", 2)
    return dict(
        mean=three(data.get("image_mean", IMAGENET_MEAN), f"{path}: image_mean"),
        std=three(data.get("image_std", IMAGENET_STD), f"{path}: image_std"),
        interpolation=interpolation(_RESAMPLE.get(resample, resample), f"{path}: resample"),
    )


def _info(
    name: str, source: str, arch: dict[str, Any], pre: dict[str, Any], sha: str, random: bool
) -> EncoderInfo:
    patch = arch["patch_size"]
    return EncoderInfo(
        name=name,
        source=source,
        weights_sha256=sha,
        model_type=str(arch["model_type"]),
        patch_size=int(patch if isinstance(patch, int) else patch[0]),
        num_register_tokens=int(arch.get("num_register_tokens", 0) or 0),
        hidden_size=int(arch["hidden_size"]),
        mean=pre["mean"],
        std=pre["std"],
        random_init=random,
        backend="hf",
        backend_version=major_version("transformers"),
        config_sha256=json_sha256(arch),
        interpolation=pre["interpolation"],
    )


def _from_folder(name: str, folder: Path, source: str, memo: Path | None) -> Resolved:
    if not (folder / "config.json").is_file():
        raise EncoderNotFoundError(
            f"{folder}: no config.json; a transformers model folder holds config.json and "
            "model.safetensors (save_pretrained's layout)"
        )
    arch = _architecture(read_json(folder / "config.json"), folder)
    files = weight_files(folder)
    if not files:
        raise EncoderNotFoundError(f"{folder}: no weights (model.safetensors) beside config.json")
    info = _info(name, source, arch, _preprocessing(folder), files_digest(files, memo), False)
    return Resolved(info, lambda: HFBackbone(_load_folder(folder), info))


def _load_folder(folder: Path) -> torch.nn.Module:
    from safetensors import SafetensorError
    from transformers import AutoModel

    try:
        model, loading = AutoModel.from_pretrained(
            folder, local_files_only=True, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError, SafetensorError, UnpicklingError) as exc:
        raise EncoderConfigError(
            f"{folder}: not a loadable transformers model ({str(exc)[:300]}); the weights "
            "must fit config.json"
        ) from None
    bad = loading.get("missing_keys") or loading.get("mismatched_keys")
    if bad:
        raise EncoderConfigError(
            f"{folder}: the weights do not fit config.json (missing or mismatched: "
            f"{sorted(map(str, bad))[:4]}); restore the matching config.json or weights"
        )
    return model


def _random(name: str, spec: dict[str, Any]) -> Resolved:
    arch = {k: v for k, v in spec.items() if k not in _PRESET_PREPROCESS}
    pre = dict(
        mean=tuple(spec.get("mean", IMAGENET_MEAN)),
        std=tuple(spec.get("std", IMAGENET_STD)),
        interpolation=interpolation(spec.get("interpolation", "bilinear"), name),
    )
    sha = random_init_sha256(json_sha256(arch), "transformers")
    info = _info(name, f"random-init(seed={RANDOM_SEED})", arch, pre, sha, True)

    def build() -> Backbone:
        from transformers import AutoConfig, AutoModel

        cfg = AutoConfig.for_model(
            arch["model_type"], **{k: v for k, v in arch.items() if k != "model_type"}
        )
        return HFBackbone(seeded(lambda: AutoModel.from_config(cfg)), info)

    return Resolved(info, build)


def _from_pth(path: Path, memo: Path | None) -> Resolved:
    check_weights([path])
    config, arch_name = pth_config(path, PRESETS)
    arch = _architecture(config, path)
    pre = _preprocessing(path.parent if (path.parent / "config.json").is_file() else None)
    info = _info(path.stem, str(path.resolve()), arch, pre, files_digest([path], memo), False)
    return Resolved(
        info,
        lambda: HFBackbone(load_pth(path, config, arch_name), info),
    )


def resolve(target: str, flag: str, memo: Path | None) -> Resolved:
    """A preset (`flag` "random" forces its random init), `.pth` file, folder or hub id."""
    table = presets()
    if target in table:
        spec = table[target]
        folder = None if flag else hub_folder(spec["hub"])
        if folder is None:
            return _random(target, spec)
        return _from_folder(target, folder, f"{spec['hub']}@{folder.name}", memo)
    path = Path(target).expanduser()
    if flag and (path.exists() or target.count("/") == 1):
        no_random_flag(target, flag)
    if flag:
        raise EncoderNotFoundError(
            f"encoder '{target}:{flag}': only presets take ':random' ({', '.join(table)})"
        )
    if path.is_file() and path.suffix == ".pth":  # Meta's original DINOv3 checkpoint
        return _from_pth(path, memo)
    if path.is_dir():
        return _from_folder(path.name, path, str(path.resolve()), memo)
    if target.count("/") == 1 and not path.exists():
        folder = hub_folder(target)
        if folder is not None:
            return _from_folder(target, folder, f"{target}@{folder.name}", memo)
    from huggingface_hub.constants import HF_HUB_CACHE

    raise EncoderNotFoundError(
        f"encoder '{target}' not found: it is not a preset ({', '.join(table)}), not a "
        f"local folder, and not a hub id in the cache {HF_HUB_CACHE}. Provide weights with "
        "`huggingface-cli download <id>` on a connected machine and copy the cache, or pass "
        "the folder that holds config.json and model.safetensors."
    )
