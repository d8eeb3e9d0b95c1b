"""Published DINOv3 ViT architectures, as plain data (no torch), smallest first.

The encoder loader builds a preset's architecture from these numbers; the report
orders models by size from the same list.
"""

from __future__ import annotations

from typing import Any

# Published DINOv3 ViT architectures (Siméoni et al. 2025, and the transformers configs).
_DINOV3: dict[str, Any] = dict(
    model_type="dinov3_vit",
    patch_size=16,
    num_register_tokens=4,
    layerscale_value=1.0,
    rope_theta=100.0,
    key_bias=False,
)
PRESETS: dict[str, dict[str, Any]] = {
    "dinov3-vits16": dict(
        _DINOV3,
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        hub="facebook/dinov3-vits16-pretrain-lvd1689m",
    ),
    "dinov3-vits16plus": dict(
        _DINOV3,
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        use_gated_mlp=True,
        hub="facebook/dinov3-vits16plus-pretrain-lvd1689m",
    ),
    "dinov3-vitb16": dict(
        _DINOV3,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        hub="facebook/dinov3-vitb16-pretrain-lvd1689m",
    ),
    "dinov3-vitl16": dict(
        _DINOV3,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        hub="facebook/dinov3-vitl16-pretrain-lvd1689m",
    ),
    "dinov3-vith16plus": dict(
        _DINOV3,
        hidden_size=1280,
        num_hidden_layers=32,
        num_attention_heads=20,
        intermediate_size=5120,
        use_gated_mlp=True,
        hub="facebook/dinov3-vith16plus-pretrain-lvd1689m",
    ),
    "dinov3-vit7b16": dict(
        _DINOV3,
        hidden_size=4096,
        num_hidden_layers=40,
        num_attention_heads=32,
        intermediate_size=8192,
        use_gated_mlp=True,
        layerscale_value=1e-5,
        hub="facebook/dinov3-vit7b16-pretrain-lvd1689m",
    ),
}
