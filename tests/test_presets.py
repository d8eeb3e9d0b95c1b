"""DINOv3 presets build the published architectures (random init, so no download).

Only ViT-S/16 and ViT-B/16: the larger presets take too long to build on a 2-core
CPU. Sizes are the DINOv3 model cards' (facebook/dinov3-vit{s,b}16-pretrain-lvd1689m:
21.6M and 85.7M parameters); 2% is far tighter than one block too many or too few
(~8% of either model) or a gated MLP (the "plus" variants, +33% for ViT-S).
"""

from __future__ import annotations

import pytest
import torch

from featstore.encode.encoders import load_encoder

PUBLISHED = {
    # name: (parameters, hidden size, attention heads)
    "dinov3-vits16": (21.6e6, 384, 6),
    "dinov3-vitb16": (85.7e6, 768, 12),
}


@pytest.fixture(scope="module", params=sorted(PUBLISHED))
def built(request):
    """One random-init build per preset, shared by this module's tests (~1-3 s each)."""
    return request.param, load_encoder(f"{request.param}:random", "cpu")


def test_parameter_count_matches_the_model_card(built):
    name, enc = built
    params, hidden, heads = PUBLISHED[name]
    count = sum(p.numel() for p in enc.model.parameters())
    assert count == pytest.approx(params, rel=0.02), f"{name}: {count:,} parameters"
    assert enc.info.hidden_size == hidden
    assert enc.model.config.num_attention_heads == heads  # 64-dim heads in both


def test_info_carries_patch_size_and_registers(built):
    name, enc = built
    assert enc.info.name == name
    assert enc.info.patch_size == 16 and enc.patch_size == 16
    assert enc.info.num_register_tokens == 4
    assert enc.info.random_init and enc.info.source.startswith("random-init")


def test_encode_shapes_and_tokens_at_32_px(built):
    name, enc = built
    hidden = PUBLISHED[name][1]
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = enc.encode(x)
    assert out.cls.shape == (1, 1, hidden) and out.cls.dtype == torch.float32
    assert out.patch.shape == (1, 1, 2, 2, hidden)
    assert torch.isfinite(out.cls).all() and torch.isfinite(out.patch).all()
    # The model's own sequence is CLS, 4 registers, then the 2x2 patches row by row:
    # the encoder keeps exactly the first and the last four.
    with torch.inference_mode():
        seq = enc.model(pixel_values=x).last_hidden_state
    assert seq.shape == (1, 1 + 4 + 4, hidden)
    torch.testing.assert_close(out.cls[:, 0], seq[:, 0])
    torch.testing.assert_close(out.patch[:, 0], seq[:, 5:].reshape(1, 2, 2, hidden))


def test_random_init_is_reproducible():
    # A fixed seed, so a "random" feature set can be rebuilt and compared.
    a = load_encoder("dinov3-vits16:random", "cpu")
    b = load_encoder("dinov3-vits16:random", "cpu")
    assert a.info.weights_sha256 == b.info.weights_sha256
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a.encode(x).cls, b.encode(x).cls)
