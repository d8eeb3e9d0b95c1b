"""timm and open_clip beside transformers: stored tokens == an independent forward pass.

Each backend's tiny model is built with its own library (timm `save_for_hf`, an
open_clip `CLIP` from a small config), saved in its ecosystem's folder layout and
extracted through the production pipeline. The test then preprocesses the images
itself (min-max to [0, 1], PIL resize with the filter the model's config names, the
config's mean/std) and compares the stored CLS and patch tokens with the model's
own forward (timm `forward_features`; open_clip `visual.trunk.forward_features`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from conftest import OPEN_CLIP_CFG, TINY_VIT, save_tiny_open_clip, synth_entry, write_manifest
from PIL import Image

from featstore.data import readers
from featstore.data.manifest import load_manifest
from featstore.encode.encoders import Encoder, load_encoder
from featstore.extraction.run import Options
from pipelines import extract


def _extract(tmp: Path, spec: str, size: int, resolution: int, extra: str = ""):
    mpath = write_manifest(
        tmp, synth_entry("d", "cls2d", n=6, size=size), f"['{spec}']", f"[{resolution}]", extra
    )
    run = extract.run(
        load_manifest(mpath), Options(progress=False), baseline=False, echo=lambda *_: None
    )
    return load_manifest(mpath), run


def _pixels(m, resolution: int, filt, mean, std) -> torch.Tensor:
    """The test's own preprocessing: min-max, PIL resize with `filt`, grey to RGB, mean/std."""
    ds = m.datasets[0]
    out = []
    for s in readers.list_samples(ds):
        img = readers.load(ds, s).image[0, :, :, 0].astype(np.float32)
        unit = (img - img.min()) / (img.max() - img.min())
        small = np.asarray(Image.fromarray(unit).resize((resolution, resolution), filt))
        rgb = np.stack([small] * 3)
        out.append((rgb - np.asarray(mean)[:, None, None]) / np.asarray(std)[:, None, None])
    return torch.from_numpy(np.stack(out).astype(np.float32))


def _close(stored: xr.DataArray, ref: torch.Tensor) -> None:
    np.testing.assert_allclose(stored.values, ref.numpy().astype(np.float16), rtol=0, atol=3e-3)


def _timm_reference(folder: Path, pixels: torch.Tensor) -> torch.Tensor:
    """timm's own forward_features of the saved tiny ViT: (B, 3 + 16, 32)."""
    import timm
    from safetensors.torch import load_file

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, reg_tokens=2, **TINY_VIT)
    model.load_state_dict(load_file(folder / "model.safetensors"))
    with torch.no_grad():
        return model.eval().forward_features(pixels)


def test_timm_folder_stores_the_tokens_of_its_own_forward(tmp_path, tiny_timm):
    m, (summary,) = _extract(tmp_path, f"timm:{tiny_timm}", size=48, resolution=32)
    xs = xr.open_zarr(summary.path)
    enc = xs.attrs["encoder"]
    assert enc["backend"] == "timm" and enc["interpolation"] == "bicubic"
    assert enc["num_register_tokens"] == 2 and enc["cls_token"] == "cls"
    assert xs.attrs["preprocess"]["mean"] == [0.3, 0.4, 0.5]  # the folder's own pretrained_cfg
    pixels = _pixels(m, 32, Image.Resampling.BICUBIC, [0.3, 0.4, 0.5], [0.2, 0.25, 0.3])
    tokens = _timm_reference(tiny_timm, pixels)
    _close(xs.cls, tokens[:, 0])
    _close(xs.patch, tokens[:, 3:].reshape(len(tokens), 4, 4, 32))  # CLS + 2 registers


def test_manifest_preprocessing_replaces_the_models_and_is_recorded(tmp_path, tiny_timm):
    spec = f"timm:{tiny_timm}"
    extra = f"preprocessing:\n  '{spec}': {{interpolation: bilinear, mean: [0.5, 0.5, 0.5]}}\n"
    m, (summary,) = _extract(tmp_path, spec, size=48, resolution=32, extra=extra)
    xs = xr.open_zarr(summary.path)
    assert xs.attrs["preprocess"]["interpolation"] == "bilinear"
    assert xs.attrs["preprocess"]["mean"] == [0.5] * 3
    assert xs.attrs["encoder"]["interpolation"] == "bicubic"  # the model's own, kept beside
    recipe = xs.attrs["identity"]["recipe"]
    assert dict(map(tuple, recipe["preprocessing"]))["interpolation"] == "bilinear"
    pixels = _pixels(m, 32, Image.Resampling.BILINEAR, [0.5] * 3, [0.2, 0.25, 0.3])
    tokens = _timm_reference(tiny_timm, pixels)
    _close(xs.cls, tokens[:, 0])
    _, (own,) = _extract(tmp_path, spec, size=48, resolution=32)  # same cache and data
    assert own.path != summary.path and own.status == "new"


def test_open_clip_stores_the_trunk_tokens_not_the_projection(tmp_path, tiny_clip):
    folder, clip = tiny_clip
    m, (summary,) = _extract(tmp_path, f"open_clip:{folder}", size=240, resolution=224)
    xs = xr.open_zarr(summary.path)
    assert xs.attrs["encoder"]["backend"] == "open_clip"
    assert xs.sizes["channel"] == 192  # vit_tiny's width, not the 16-d CLIP embedding
    pre = json.loads((folder / "open_clip_config.json").read_text())["preprocess_cfg"]
    pixels = _pixels(m, 224, Image.Resampling.BICUBIC, pre["mean"], pre["std"])
    with torch.no_grad():
        tokens = clip.visual.trunk.forward_features(pixels)
    _close(xs.cls, tokens[:, 0])
    _close(xs.patch, tokens[:, 1:].reshape(len(tokens), 14, 14, 192))


def test_open_clip_trunk_at_another_size_resamples_its_position_embeddings(tiny_clip):
    import timm

    folder, clip = tiny_clip
    enc = load_encoder(f"open_clip:{folder}", "cpu")
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=0, dynamic_img_size=True)
    ref.load_state_dict(clip.visual.trunk.state_dict(), strict=False)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = ref.eval().forward_features(x)
    out = enc.encode(x)
    torch.testing.assert_close(out.cls[:, 0], tokens[:, 0])
    torch.testing.assert_close(out.patch[:, 0], tokens[:, 1:].reshape(2, 4, 6, 192))


def test_native_open_clip_vit_gives_class_and_patch_tokens_through_ln_post(tmp_path):
    cfg = {
        "embed_dim": 16,
        "vision_cfg": dict(layers=2, width=32, head_width=16, patch_size=8, image_size=32),
        "text_cfg": OPEN_CLIP_CFG["text_cfg"],
    }
    clip = save_tiny_open_clip(tmp_path / "native", cfg)
    enc = load_encoder(f"open_clip:{tmp_path / 'native'}", "cpu")
    assert enc.info.patch_size == 8 and enc.info.hidden_size == 32
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    visual = clip.visual
    visual.output_tokens, visual.proj = True, None  # unprojected CLS and the tokens
    with torch.no_grad():
        pooled, tokens = visual(x)
    out = enc.encode(x, layers=2, patch_layers=(-2, -1))
    torch.testing.assert_close(out.cls[:, -1], pooled)
    torch.testing.assert_close(out.patch[:, -1], tokens.reshape(2, 4, 4, 32))
    with pytest.raises(ValueError, match="fixed position embeddings for 32x32"):
        enc.encode(torch.zeros(1, 3, 48, 48))


def test_timm_deeper_layers_match_forward_intermediates(tiny_timm):
    import timm

    enc = load_encoder(f"timm:{tiny_timm}", "cpu")
    ref = timm.create_model(f"local-dir:{tiny_timm}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = enc.encode(x, layers=2, patch_layers=(-2, -1))
    with torch.no_grad():
        block0 = ref.norm(ref.blocks[0](ref.norm_pre(ref._pos_embed(ref.patch_embed(x)))))
        last = ref.forward_features(x)
    torch.testing.assert_close(out.cls[:, 0], block0[:, 0])
    torch.testing.assert_close(out.cls[:, 1], last[:, 0])
    torch.testing.assert_close(out.patch[:, 0], block0[:, 3:].reshape(2, 4, 4, 32))
    with pytest.raises(ValueError, match="reach beyond the 2 blocks"):
        enc.encode(x, patch_layers=(-3,))


def test_a_cached_run_never_builds_the_model(tmp_path, tiny_timm, monkeypatch):
    _extract(tmp_path, f"timm:{tiny_timm}", size=32, resolution=32)

    def no_build(self):
        raise AssertionError("a cached feature set must not build the encoder")

    monkeypatch.setattr(Encoder, "load", no_build)
    _, (again,) = _extract(tmp_path, f"timm:{tiny_timm}", size=32, resolution=32)
    assert again.status == "cached"


def test_resolution_off_the_patch_grid_is_refused_for_that_encoder(tmp_path, tiny_timm):
    with pytest.raises(ValueError, match=r"not a multiple of the patch size 8 of 'tiny-timm"):
        _extract(tmp_path, f"timm:{tiny_timm}", size=32, resolution=36)


def test_timm_dinov3_preset_skips_its_four_registers():
    """timm's DINOv3 (an Eva: rope, 4 registers) through both read-outs."""
    enc = load_encoder("timm:vit_small_patch16_dinov3.lvd1689m", "cpu")
    assert enc.info.random_init and enc.info.num_register_tokens == 4
    x = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        seq = enc.model.forward_features(x)  # CLS, 4 registers, 2 x 3 patches
    assert seq.shape == (1, 1 + 4 + 6, 384)
    out = enc.encode(x)
    torch.testing.assert_close(out.cls[:, 0], seq[:, 0])
    torch.testing.assert_close(out.patch[:, 0], seq[:, 5:].reshape(1, 2, 3, 384))
    deep = enc.encode(x, layers=2, patch_layers=(-2, -1))
    torch.testing.assert_close(deep.cls[:, 1], seq[:, 0])
    torch.testing.assert_close(deep.patch[:, 1], out.patch[:, 0])
    assert not torch.allclose(deep.patch[:, 0], deep.patch[:, 1])


def test_a_study_compares_three_backends_in_one_report(tmp_path, tiny_timm, tiny_clip):
    """issue 18: one study over transformers, timm and open_clip encoders gives one
    report table (every encoder x size) and the size and resolution plots."""
    from conftest import save_tiny_vit
    from transformers import DINOv3ViTConfig, DINOv3ViTModel
    from typer.testing import CliRunner

    from pipelines.cli import app

    hf = save_tiny_vit(DINOv3ViTConfig, DINOv3ViTModel, tmp_path / "tiny-hf", seed=1)
    specs = [str(hf), f"timm:{tiny_timm}", f"open_clip:{tiny_clip[0]}"]
    study = f"studies:\n  - {{name: backbones, encoders: {specs}, resolutions: [32, 48]}}\n"
    mpath = write_manifest(tmp_path, synth_entry("d", "cls2d", n=24), "[]", "[32]", study)
    runner = CliRunner()
    out = tmp_path / "results"
    base = ["--manifest", str(mpath), "--study", "backbones"]
    for cmd in (["extract", *base], ["probe", *base, "--out", str(out)]):
        result = runner.invoke(app, cmd)
        assert result.exit_code == 0, result.output
    rows = pd.read_csv(out / "results.csv")
    sets = [xr.open_zarr(z) for z in (tmp_path / "cache").glob("*.zarr")]
    backends = {xs.attrs["encoder"].get("backend") for xs in sets}
    assert backends == {"hf", "timm", "open_clip", "pixels"}, backends
    assert set(map(int, rows.resolution)) == {32, 48}
    assert rows.groupby(["encoder", "resolution"]).ngroups == 4 * 2  # 3 backends + pixels
    assert runner.invoke(app, ["report", "--out", str(out)]).exit_code == 0
    md = (out / "report.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("|") and "@ 32px" in ln]
    assert len(table) == 4, md  # one row per encoder at 32 px, in the one table of `d`
    for name in ("resolution.png", "size.png"):
        assert (out / "plots" / name).stat().st_size > 0
