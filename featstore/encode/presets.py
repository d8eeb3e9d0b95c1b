"""Preset encoders' published architectures and preprocessing, as plain data (no torch).

`PRESETS` are the DINOv3 ViTs (transformers), smallest first: the report orders
models by size from that list. The comparison presets follow: DINOv2 and RAD-DINO
(transformers), BiomedCLIP (open_clip) and timm's DINOv3 names. A backend builds a
preset's architecture from these numbers when its weights are not on this machine.
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

# Comparison encoders of the seed and its readers (issue 18), each with its published
# architecture and preprocessing; without local weights each is a flagged random init.
# transformers DINOv2 (facebook/dinov2-*: ImageNet mean/std, bicubic; patch 14).
_DINOV2: dict[str, Any] = dict(
    model_type="dinov2",
    patch_size=14,
    image_size=518,
    mlp_ratio=4,
    layerscale_value=1.0,
    interpolation="bicubic",
)
HF_PRESETS: dict[str, dict[str, Any]] = {
    "dinov2-vits14": dict(
        _DINOV2,
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        hub="facebook/dinov2-small",
    ),
    "dinov2-vitb14": dict(
        _DINOV2,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        hub="facebook/dinov2-base",
    ),
    "dinov2-vitl14": dict(
        _DINOV2,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        hub="facebook/dinov2-large",
    ),
    # RAD-DINO (Pérez-García et al. 2025): a DINOv2 ViT-B/14 trained on chest X-rays,
    # with its own grey-level statistics (microsoft/rad-dino preprocessor_config.json).
    "rad-dino": dict(
        _DINOV2,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        mean=(0.5307, 0.5307, 0.5307),
        std=(0.2583, 0.2583, 0.2583),
        hub="microsoft/rad-dino",
    ),
}

# open_clip models by their open_clip_config.json, so that the image tower builds
# without the hub (the text tower is never built). BiomedCLIP (Zhang et al. 2023):
# a timm ViT-B/16 trunk, CLIP mean/std, 224 px, bicubic.
OPEN_CLIP_PRESETS: dict[str, dict[str, Any]] = {
    "biomedclip": dict(
        hub="microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
        model_cfg=dict(
            embed_dim=512,
            vision_cfg=dict(
                timm_model_name="vit_base_patch16_224",
                timm_model_pretrained=False,
                timm_pool="",
                timm_proj="linear",
                image_size=224,
            ),
        ),
        preprocess_cfg=dict(
            mean=(0.48145466, 0.4578275, 0.40821073),
            std=(0.26862954, 0.26130258, 0.27577711),
        ),
    ),
}

# timm's DINOv3 names (weights on the hub as timm/<name>): presets that fall back to a
# random init, like the transformers DINOv3 presets.
TIMM_PRESETS: tuple[str, ...] = (
    "vit_small_patch16_dinov3.lvd1689m",
    "vit_small_plus_patch16_dinov3.lvd1689m",
    "vit_base_patch16_dinov3.lvd1689m",
    "vit_large_patch16_dinov3.lvd1689m",
    "vit_huge_plus_patch16_dinov3.lvd1689m",
    "vit_7b_patch16_dinov3.lvd1689m",
)


def preset_names() -> list[str]:
    """Every preset a manifest can name without a prefix (timm ones take `timm:`)."""
    return [*PRESETS, *HF_PRESETS, *OPEN_CLIP_PRESETS, *(f"timm:{n}" for n in TIMM_PRESETS)]


# timm ViT size names -> token width (vit_<size>_patch...: small, base, ..., 7b)
_TIMM_WIDTH = {"small": 384, "small_plus": 384, "base": 768, "large": 1024, "huge_plus": 1280}
_TIMM_WIDTH |= {"7b": 4096}


def preset_width(name: str) -> int | None:
    """The token width of a preset's architecture (its size class), None for encoders
    that are not presets (a folder, a hub id): the report orders models by it."""
    name = name.removesuffix(":random").removeprefix("timm:")
    config = PRESETS.get(name) or HF_PRESETS.get(name)
    if config is not None:
        return int(config["hidden_size"])
    if name in OPEN_CLIP_PRESETS:
        name = OPEN_CLIP_PRESETS[name]["model_cfg"]["vision_cfg"]["timm_model_name"]
    size = name.removeprefix("vit_").split("_patch")[0] if name.startswith("vit_") else ""
    return _TIMM_WIDTH.get(size)


def preset_family(name: str) -> tuple[str, int] | None:
    """(family, place in its size ladder) of a preset, None for encoders outside a
    ladder (BiomedCLIP, RAD-DINO, a folder): DINOv3 (`PRESETS`, S < S+ < B < L < H+ <
    7B), its timm names (`timm:dinov3`), DINOv2 (S < B < L). The report's "does scale
    help?" steps go between successive places of one family."""
    name = name.removesuffix(":random")
    if name in PRESETS:
        return "dinov3", list(PRESETS).index(name)
    if name.removeprefix("timm:") in TIMM_PRESETS and name.startswith("timm:"):
        return "timm:dinov3", TIMM_PRESETS.index(name.removeprefix("timm:"))
    ladder = [n for n in HF_PRESETS if n.startswith("dinov2-")]
    if name in ladder:
        return "dinov2", ladder.index(name)
    return None
