"""The timm backend: `timm:<model name | hf-hub:id | folder>[:random]`.

A folder is timm's own `save_for_hf` layout (`config.json` with `architecture`,
`model_args` and `pretrained_cfg`, beside `model.safetensors` or
`pytorch_model.bin`). A name is built by `timm.create_model`; its weights come from
the local hub cache (`pretrained_cfg.hf_hub_id`), else `:random` (and timm's DINOv3
presets) give a flagged fixed-seed random init. Preprocessing is timm's
`resolve_data_config`: mean, std, interpolation. Token facts (patch size, prefix
tokens, width, depth) are read from the model built on the `meta` device: no memory,
no weights, no network; they are remembered (`featstore.encode.derived`), so a cached
extract imports neither timm nor torch.
"""

from __future__ import annotations

import difflib
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featstore.encode.derived import info_from, remembered
from featstore.encode.preprocess import interpolation
from featstore.encode.presets import TIMM_PRESETS
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
from featstore.encode.weights import read_state
from featstore.errors import EncoderConfigError, EncoderNotFoundError

if TYPE_CHECKING:
    import torch

# Every model is built with position embeddings resampled to the input's grid, so one
# set of weights serves each resolution (timm's own `dynamic_img_size`).
_ARGS = {"dynamic_img_size": True}
RANDOM = f"random-init(seed={RANDOM_SEED})"  # the source of a random init


class TimmBackbone(Backbone):
    """Tokens of a timm ViT: `prefix` tokens (CLS first, then registers) and patches."""

    def __init__(self, module: torch.nn.Module, name: str) -> None:
        self.module = module
        self.name = name
        self.prefix = int(getattr(module, "num_prefix_tokens", 0))
        self.has_cls = getattr(module, "cls_token", None) is not None
        self.patch = patch_size(module, name)

    def tokens(
        self, pixels: torch.Tensor, layers: int, patch_layers: tuple[int, ...]
    ) -> FeatureBatch:
        """cls (B, L, D): CLS (or the pooled token, L = 1 only); patch (B, P, h/p, w/p, D)."""
        import torch

        _, _, h, w = pixels.shape
        m: Any = self.module
        if layers == 1 and patch_layers == (-1,):
            x = m.forward_features(pixels)  # (B, N, D) after the final norm
            cls = x[:, :1] if self.has_cls else m.forward_head(x, pre_logits=True)[:, None]
            return FeatureBatch(cls, grid(x[:, self.prefix :], h, w, self.patch)[:, None])
        if not self.has_cls:
            raise EncoderConfigError(
                f"timm model '{self.name}' has no CLS token: its pooled token exists for the "
                "last block only, so `layers` must be 1 (patch_layers work)"
            )
        depth = len(m.blocks)
        check_depth(self.name, depth, layers, patch_layers)
        wanted = sorted({depth + i for i in patch_layers} | set(range(depth - layers, depth)))
        out = m.forward_intermediates(
            pixels, indices=wanted, return_prefix_tokens=True, norm=True,
            output_fmt="NLC", intermediates_only=True,
        )  # fmt: skip
        by_block = dict(zip(wanted, out, strict=True))  # block -> (patch, prefix)
        cls = torch.stack([by_block[b][1][:, 0] for b in range(depth - layers, depth)], 1)
        patch = torch.stack(
            [grid(by_block[depth + i][0], h, w, self.patch) for i in patch_layers], 1
        )
        return FeatureBatch(cls, patch)


def patch_size(module: torch.nn.Module, where: str) -> int:
    """The square patch side of a timm ViT, or an EncoderConfigError naming `where`."""
    embed = getattr(module, "patch_embed", None)
    size = getattr(embed, "patch_size", None)
    if size is None or not hasattr(module, "blocks") or not hasattr(module, "forward_features"):
        raise EncoderConfigError(
            f"{where}: a {type(module).__name__}, not a vision transformer with patch "
            "tokens; featstore stores CLS and patch tokens of ViT backbones"
        )
    p = (size, size) if isinstance(size, int) else tuple(size)
    if p[0] != p[1]:
        raise EncoderConfigError(f"{where}: patches of {p[0]}x{p[1]} px; featstore needs square")
    return int(p[0])


def create(source: str, where: str) -> torch.nn.Module:
    """`timm.create_model(source)` without weights, errors naming `where`."""
    import timm

    try:
        return timm.create_model(source, pretrained=False, dynamic_img_size=True)
    except (RuntimeError, TypeError, ValueError, KeyError) as exc:
        raise EncoderConfigError(
            f"{where}: timm cannot build this model as a ViT backbone ({str(exc)[:300]})"
        ) from None


def _derive(source: str, where: str, cfg_sha: str) -> dict[str, Any]:
    """The facts of timm model `source` (see `derived`), from it built on the meta device."""
    import torch
    from timm.data.config import resolve_data_config

    with torch.device("meta"):
        m: Any = create(source, where)
    data = resolve_data_config(model=m)
    has_cls = getattr(m, "cls_token", None) is not None
    return dict(
        model_type=f"timm:{m.default_cfg.get('architecture', type(m).__name__)}",
        patch_size=patch_size(m, where),
        num_register_tokens=int(m.num_prefix_tokens) - int(has_cls),
        hidden_size=int(m.embed_dim),
        mean=three(list(data["mean"]), f"{where}: mean"),
        std=three(list(data["std"]), f"{where}: std"),
        backend="timm",
        backend_version=major_version("timm"),
        config_sha256=cfg_sha,
        interpolation=interpolation(
            data.get("interpolation", "bicubic"), f"{where}: pretrained_cfg"
        ),
        cls_token="cls" if has_cls else "pooled",
    )


def load_weights(module: torch.nn.Module, files: list[Path], where: Path, prefix: str = "") -> None:
    """Load `files` (safetensors first) into `module`, strictly; keys under `prefix` only."""
    path = next((f for f in files if f.suffix == ".safetensors"), files[0])
    state = read_state(path)
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # missing, unexpected or wrongly shaped tensors
        raise EncoderConfigError(
            f"{where}: the weights in {path.name} do not fit the architecture in its config "
            f"({str(exc).strip()[:400]}); restore the matching config or weights"
        ) from None


def _from_folder(name: str, folder: Path, source: str, memo: Path | None) -> Resolved:
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    if "architecture" not in config:
        raise EncoderNotFoundError(
            f"{folder}: not a timm model folder (its config.json, if any, has no "
            "'architecture'); save one with timm.models.save_for_hf(model, folder, "
            "safe_serialization=True)"
        )
    files = weight_files(folder)
    if not files:
        raise EncoderNotFoundError(f"{folder}: no weights (model.safetensors) beside config.json")
    sha = files_digest(files, memo)
    cfg_sha = json_sha256({**config, **_ARGS})
    info = remembered(
        memo, {"timm folder": cfg_sha}, ("timm",),
        lambda: _derive(f"local-dir:{folder}", str(folder), cfg_sha),
        lambda facts: info_from(facts, name, source, sha, False),
    )  # fmt: skip

    def build() -> Backbone:
        module = create(f"local-dir:{folder}", str(folder))
        load_weights(module, files, folder)
        return TimmBackbone(module, name)

    return Resolved(info, build)


def _known(name: str) -> None:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise EncoderNotFoundError(
            f"encoder 'timm:{name}': timm {major_version('timm').split()[1]}.x has no model "
            f"of that name and no folder of that name exists{hint}"
        )


def resolve(target: str, flag: str, memo: Path | None) -> Resolved:
    """A timm folder, or a model name (weights from the hub cache, or `:random`)."""
    path = Path(target).expanduser()
    if flag not in ("", "random"):
        raise EncoderNotFoundError(f"encoder 'timm:{target}:{flag}': the only flag is ':random'")
    if path.is_dir():
        no_random_flag(f"timm:{target}", flag)
        return _from_folder(path.name, path, str(path.resolve()), memo)
    if target.startswith("hf-hub:"):  # e.g. a gated pathology model, once in the cache
        no_random_flag(f"timm:{target}", flag)
        repo = target.removeprefix("hf-hub:")
        folder = hub_folder(repo)
        if folder is None:
            raise EncoderNotFoundError(
                f"encoder 'timm:{target}': {repo} is not in the local hub cache; log in and "
                "download it on a connected machine, then copy the cache or pass the folder"
            )
        return _from_folder(target, folder, f"{repo}@{folder.name}", memo)
    hub, info = remembered(
        memo, {"timm name": target}, ("timm",), lambda: _by_name(target),
        lambda found: (_hub(found["hub"]), info_from(found["facts"], target, RANDOM, "", True)),
    )  # fmt: skip
    folder = hub_folder(hub) if hub and not flag else None
    if folder is not None:
        return _from_folder(target, folder, f"{hub}@{folder.name}", memo)
    if not flag and target not in TIMM_PRESETS:
        raise EncoderNotFoundError(
            f"encoder 'timm:{target}': no local weights (hub id {hub or 'none'} is not in the "
            f"cache); pass the folder that holds config.json and model.safetensors, or "
            f"'timm:{target}:random' for a flagged random init"
        )
    info = replace(info, weights_sha256=random_init_sha256(info.config_sha256, "timm"))
    return Resolved(info, lambda: TimmBackbone(seeded(lambda: create(target, target)), target))


def _by_name(target: str) -> dict[str, Any]:
    """A timm name's hub id and facts (its architecture is timm's registered config)."""
    _known(target)
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(target)
    arch = {"architecture": target, "pretrained_cfg": cfg.to_dict() if cfg else {}, **_ARGS}
    facts = _derive(target, f"timm:{target}", json_sha256(arch))
    return {"hub": cfg.hf_hub_id if cfg is not None else None, "facts": facts}


def _hub(hub: object) -> str | None:
    if hub is not None and not isinstance(hub, str):
        raise TypeError(f"hub id {hub!r}")
    return hub
