"""Meta's original DINOv3 ViT checkpoints (`.pth`, dinov3 repository layout) -> transformers.

The dinov3 repository stores one fused `qkv` projection per block (with a
`bias_mask` that zeroes the key bias), `storage_tokens` for the registers, `ls1/ls2`
layer scales and `mlp.fc1/fc2` (or `w1/w2/w3` for SwiGLU). `convert_state_dict`
renames and splits them into `DINOv3ViTModel`'s layout; the architecture comes from a
preset name in the file name (`dinov3_vitb16_pretrain_...pth`) or a `config.json`
beside the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featstore.encode.protocol import read_json
from featstore.encode.weights import read_state
from featstore.errors import EncoderConfigError, EncoderNotFoundError

if TYPE_CHECKING:
    import torch

_RENAMES = [
    (r"^cls_token$", "embeddings.cls_token"),
    (r"^mask_token$", "embeddings.mask_token"),
    (r"^storage_tokens$", "embeddings.register_tokens"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embeddings."),
    (r"^blocks\.(\d+)\.norm(\d)\.", r"model.layer.\1.norm\2."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"model.layer.\1.attention.o_proj."),
    (r"^blocks\.(\d+)\.ls(\d)\.gamma$", r"model.layer.\1.layer_scale\2.lambda1"),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", r"model.layer.\1.mlp.up_proj."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"model.layer.\1.mlp.down_proj."),
    (r"^blocks\.(\d+)\.mlp\.w1\.", r"model.layer.\1.mlp.gate_proj."),  # SwiGLU: silu(w1) * w2
    (r"^blocks\.(\d+)\.mlp\.w2\.", r"model.layer.\1.mlp.up_proj."),
    (r"^blocks\.(\d+)\.mlp\.w3\.", r"model.layer.\1.mlp.down_proj."),
    (r"^norm\.", "norm."),
]
_DROPPED = re.compile(r"(^rope_embed\.|^local_cls_norm\.|^head\.|\.bias_mask$|^dino_head|^ibot)")
_QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")


def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta layout -> transformers layout (tensors are not copied unless split)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if _DROPPED.search(key):
            continue
        qkv = _QKV.match(key)
        if qkv:
            block, kind = qkv.groups()
            q, k, v = value.chunk(3, dim=0)
            prefix = f"model.layer.{block}.attention"
            out[f"{prefix}.q_proj.{kind}"] = q
            out[f"{prefix}.v_proj.{kind}"] = v
            if kind == "weight":  # the key bias is masked to zero in DINOv3: not a parameter
                out[f"{prefix}.k_proj.{kind}"] = k
            continue
        new = key
        for pattern, repl in _RENAMES:
            new, n = re.subn(pattern, repl, new)
            if n:
                break
        else:
            raise EncoderNotFoundError(f"unexpected key {key!r} in a DINOv3 .pth checkpoint")
        if new == "embeddings.mask_token" and value.ndim == 2:
            value = value[:, None]
        out[new] = value
    return out


def pth_config(path: Path, presets: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """The architecture of a `.pth` checkpoint, as a config dict, and its name: from a
    `config.json` beside the file, else from a preset named in the file name."""
    if (path.parent / "config.json").is_file():
        config = read_json(path.parent / "config.json")
        return config, str(config.get("model_type", ""))
    name = path.name.replace("_", "-")
    found = [p for p in presets if name.startswith(p + "-") or name.startswith(p + ".")]
    if not found:
        raise EncoderNotFoundError(
            f"{path}: cannot tell the architecture; name the file like Meta does "
            f"(dinov3_vitb16_pretrain_lvd1689m.pth) or put a config.json beside it"
        )
    arch = max(found, key=len)
    return {k: v for k, v in presets[arch].items() if k != "hub"}, arch


def load_pth(path: Path, config: dict[str, Any], arch: str) -> torch.nn.Module:
    """A DINOv3ViTModel of architecture `config` with the weights of `path`."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    spec = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    state = read_state(path)
    inner = state.get("model")  # Meta's training checkpoints nest the weights
    if isinstance(inner, dict):
        state = inner
    model = DINOv3ViTModel(DINOv3ViTConfig(**spec))
    try:
        missing, unexpected = model.load_state_dict(convert_state_dict(state), strict=False)
    except RuntimeError as exc:  # a tensor whose shape the architecture does not have
        raise EncoderConfigError(
            f"{path}: checkpoint does not fit the {arch} architecture ({str(exc)[:300]})"
        ) from None
    if missing or unexpected:
        raise EncoderConfigError(
            f"{path}: checkpoint does not fit the {arch} architecture; "
            f"missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    return model.eval()
