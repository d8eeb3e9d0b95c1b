"""Encoder zoo: presets, DINOv2 by path, Meta's .pth checkpoints, the pixel baseline."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import save_tiny_vit
from transformers import AutoModel, Dinov2Config, Dinov2Model

from featstore.encode.encoders import load_encoder


def _meta_layout(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Write a transformers DINOv3 state dict the way the dinov3 repository stores it."""
    out, blocks = {}, {}
    for key, value in hf_state.items():
        m = re.match(r"model\.layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)", key)
        if m:
            blocks.setdefault((m[1], m[3]), {})[m[2]] = value
            continue
        key = (
            key.replace("embeddings.cls_token", "cls_token")
            .replace("embeddings.mask_token", "mask_token")
            .replace("embeddings.register_tokens", "storage_tokens")
            .replace("embeddings.patch_embeddings.", "patch_embed.proj.")
        )
        key = re.sub(r"model\.layer\.(\d+)\.attention\.o_proj", r"blocks.\1.attn.proj", key)
        key = re.sub(r"model\.layer\.(\d+)\.layer_scale(\d)\.lambda1", r"blocks.\1.ls\2.gamma", key)
        key = re.sub(r"model\.layer\.(\d+)\.mlp\.up_proj", r"blocks.\1.mlp.fc1", key)
        key = re.sub(r"model\.layer\.(\d+)\.mlp\.down_proj", r"blocks.\1.mlp.fc2", key)
        key = re.sub(r"model\.layer\.(\d+)\.", r"blocks.\1.", key)
        out[key] = value[:, 0] if key == "mask_token" else value
    for (block, kind), qkv in blocks.items():
        k = qkv.get("k", torch.zeros_like(qkv["q"]))  # DINOv3 masks the key bias to zero
        out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([qkv["q"], k, qkv["v"]])
        if kind == "bias":
            out[f"blocks.{block}.attn.qkv.bias_mask"] = torch.cat(
                [torch.ones_like(k), torch.zeros_like(k), torch.ones_like(k)]
            )
    out["rope_embed.periods"] = torch.ones(4)
    return out


def test_meta_pth_checkpoint_gives_the_same_features(tiny_dinov3, tmp_path):
    hf = AutoModel.from_pretrained(tiny_dinov3).eval()
    torch.save(_meta_layout(hf.state_dict()), tmp_path / "tiny.pth")
    (tmp_path / "config.json").write_text((tiny_dinov3 / "config.json").read_text())
    enc = load_encoder(str(tmp_path / "tiny.pth"), "cpu")
    x = torch.randn(2, 3, 32, 32)
    ref = hf(pixel_values=x).last_hidden_state
    got = enc.encode(x)
    torch.testing.assert_close(got.cls[:, 0], ref[:, 0])
    torch.testing.assert_close(got.patch[:, 0], ref[:, 3:].reshape(2, 4, 4, -1))
    assert not enc.info.random_init and len(enc.info.weights_sha256) == 64


def test_pth_without_architecture_is_explained(tmp_path):
    torch.save({"cls_token": torch.zeros(1, 1, 8)}, tmp_path / "weights.pth")
    with pytest.raises(FileNotFoundError, match="cannot tell the architecture"):
        load_encoder(str(tmp_path / "weights.pth"))


def test_dinov2_folder_loads_through_the_same_interface(tmp_path):
    save_tiny_vit(Dinov2Config, Dinov2Model, tmp_path, seed=0)
    enc = load_encoder(str(tmp_path), "cpu")
    assert enc.info.model_type == "dinov2" and enc.info.num_register_tokens == 0
    x = torch.randn(2, 3, 32, 32)
    out = enc.encode(x, layers=2)
    assert out.cls.shape == (2, 2, 32) and out.patch.shape == (2, 1, 4, 4, 32)
    ref = Dinov2Model.from_pretrained(tmp_path).eval()(pixel_values=x).last_hidden_state
    torch.testing.assert_close(out.cls[:, -1], ref[:, 0])
    torch.testing.assert_close(out.patch[:, 0], ref[:, 1:].reshape(2, 4, 4, 32))


def test_pixel_baseline_shapes():
    enc = load_encoder("pixels", "cpu")
    x = torch.randn(3, 3, 64, 64)
    out = enc.encode(x)
    assert enc.info.hidden_size == 256  # cls and patch share the channel dimension
    assert out.cls.shape == (3, 1, 256) and out.patch.shape == (3, 1, 4, 4, 256)
    torch.testing.assert_close(out.patch[1, 0, 2, 3], x[1, 0, 32:48, 48:64].reshape(-1))
    small = load_encoder("pixels:8", "cpu")
    out8 = small.encode(x)
    assert out8.cls.shape == (3, 1, 64) and out8.patch.shape == (3, 1, 8, 8, 64)
    # result rows name the encoder: two patch sizes must not share a name
    assert (enc.info.name, small.info.name) == ("pixels", "pixels:8")


def test_patch_tokens_of_chosen_blocks_go_through_the_final_norm(tiny_dinov3):
    enc = load_encoder(str(tiny_dinov3), "cpu")
    x = torch.randn(2, 3, 32, 32)
    out = enc.encode(x, patch_layers=(-2, -1))
    assert out.patch.shape == (2, 2, 4, 4, 32)
    model = AutoModel.from_pretrained(tiny_dinov3).eval()
    with torch.no_grad():
        ref = model(pixel_values=x, output_hidden_states=True)
    norm = model.norm
    first_block = norm(ref.hidden_states[1])[:, 3:].reshape(2, 4, 4, 32)  # 2 blocks: -2 is #1
    torch.testing.assert_close(out.patch[:, 0], first_block)
    torch.testing.assert_close(out.patch[:, 1], enc.encode(x).patch[:, 0])
    with pytest.raises(ValueError, match="reach beyond the 2 blocks"):
        enc.encode(x, patch_layers=(-3, -1))
