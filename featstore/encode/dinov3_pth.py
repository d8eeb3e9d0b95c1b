"""Meta's original DINOv3 ViT checkpoints (`.pth`, dinov3 repository layout) -> transformers.

The dinov3 repository stores one fused `qkv` projection per block (with a
`bias_mask` that zeroes the key bias), `storage_tokens` for the registers, `ls1/ls2`
layer scales and `mlp.fc1/fc2` (or `w1/w2/w3` for SwiGLU). `convert_state_dict`
renames and splits them into `DINOv3ViTModel`'s layout; the architecture comes from a
preset name in the file name (`dinov3_vitb16_pretrain_...pth`) or a `config.json`
beside the file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from featstore.errors import EncoderNotFoundError

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


def load_pth(path: Path, presets: dict[str, dict]) -> tuple[torch.nn.Module, str]:
    """A DINOv3ViTModel with the weights of `path`; returns (model, architecture name)."""
    from transformers import AutoConfig, DINOv3ViTConfig, DINOv3ViTModel

    if (path.parent / "config.json").is_file():
        config = AutoConfig.from_pretrained(path.parent)
        arch = json.loads((path.parent / "config.json").read_text()).get("model_type", "")
    else:
        name = path.name.replace("_", "-")
        found = [p for p in presets if name.startswith(p + "-") or name.startswith(p + ".")]
        if not found:
            raise EncoderNotFoundError(
                f"{path}: cannot tell the architecture; name the file like Meta does "
                f"(dinov3_vitb16_pretrain_lvd1689m.pth) or put a config.json beside it"
            )
        arch = max(found, key=len)
        spec = {k: v for k, v in presets[arch].items() if k not in ("hub", "model_type")}
        config = DINOv3ViTConfig(**spec)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise EncoderNotFoundError(f"{path}: not a readable PyTorch checkpoint ({exc})") from None
    state = state.get("model", state) if isinstance(state, dict) else state
    model = DINOv3ViTModel(config)
    missing, unexpected = model.load_state_dict(convert_state_dict(state), strict=False)
    if missing or unexpected:
        raise EncoderNotFoundError(
            f"{path}: checkpoint does not fit the {arch} architecture; "
            f"missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    return model.eval(), arch
