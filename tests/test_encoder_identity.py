"""An encoder's identity covers its architecture and backend; broken folders are named.

The identity is read from config files and weight hashes without building a model,
so these tests also check that resolving never builds one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import OPEN_CLIP_CFG, save_tiny_open_clip, save_tiny_timm
from test_identity import RECIPE

from featstore.encode import hf, timm_models
from featstore.encode.encoders import load_encoder, resolve_encoder
from featstore.errors import EncoderConfigError, EncoderNotFoundError, FeatstoreError
from featstore.identity import SetIdentity


def _key(spec: str) -> str:
    return SetIdentity(RECIPE, spec, resolve_encoder(spec).info).key()


def _edit(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = data
        for p in parents:
            node = node[p]
        node[leaf] = value
    path.write_text(json.dumps(data))


def test_editing_config_json_changes_the_key(tmp_path, tiny_dinov3):
    shutil.copytree(tiny_dinov3, tmp_path / "hf")
    before = _key(str(tmp_path / "hf"))
    _edit(tmp_path / "hf" / "config.json", layer_norm_eps=1e-3)  # same weights, other model
    assert _key(str(tmp_path / "hf")) != before
    save_tiny_timm(tmp_path / "timm")
    before = _key(f"timm:{tmp_path / 'timm'}")
    _edit(tmp_path / "timm" / "config.json", model_args__qkv_bias=False)
    assert _key(f"timm:{tmp_path / 'timm'}") != before
    _edit(tmp_path / "timm" / "config.json", pretrained_cfg__interpolation="bilinear")
    info = resolve_encoder(f"timm:{tmp_path / 'timm'}").info
    assert info.interpolation == "bilinear"


def test_backends_never_share_a_key(tmp_path, tiny_dinov3):
    save_tiny_timm(tmp_path / "timm")
    save_tiny_open_clip(tmp_path / "clip", OPEN_CLIP_CFG)
    specs = [
        str(tiny_dinov3),
        f"timm:{tmp_path / 'timm'}",
        f"open_clip:{tmp_path / 'clip'}",
        "pixels:8",
        "dinov3-vits16:random",  # the same ViT-S/16 DINOv3 architecture through two backends
        "timm:vit_small_patch16_dinov3.lvd1689m:random",
        "biomedclip",
        "open_clip:ViT-B-16:random",
        "dinov2-vits14",
        "rad-dino",
    ]
    infos = [resolve_encoder(s).info for s in specs]
    assert len({SetIdentity(RECIPE, s, i).key() for s, i in zip(specs, infos, strict=True)}) == len(
        specs
    )
    assert [i.backend for i in infos[:4]] == ["hf", "timm", "open_clip", "pixels"]
    assert all(i.backend_version for i in infos)


def test_presets_without_weights_are_flagged_random_inits_of_their_architecture():
    for spec, patch, hidden, interp in [
        ("biomedclip", 16, 768, "bicubic"),
        ("rad-dino", 14, 768, "bicubic"),
        ("dinov2-vitl14", 14, 1024, "bicubic"),
        ("timm:vit_base_patch16_dinov3.lvd1689m", 16, 768, "bicubic"),
    ]:
        info = resolve_encoder(spec).info
        assert info.random_init and info.source.startswith("random-init")
        assert (info.patch_size, info.hidden_size, info.interpolation) == (patch, hidden, interp)
    assert resolve_encoder("timm:vit_base_patch16_dinov3.lvd1689m").info.num_register_tokens == 4
    assert resolve_encoder("biomedclip").info.mean[0] == pytest.approx(0.48145466)


def test_resolving_builds_no_model(tmp_path, tiny_dinov3, monkeypatch):
    save_tiny_timm(tmp_path / "timm")

    def boom(*_a, **_k):
        raise AssertionError("resolving an encoder must not build its model")

    monkeypatch.setattr(timm_models.TimmBackbone, "__init__", boom)
    monkeypatch.setattr(hf.HFBackbone, "__init__", boom)
    for spec in (str(tiny_dinov3), f"timm:{tmp_path / 'timm'}", "dinov3-vitl16"):
        assert load_encoder(spec, "cpu").info.hidden_size > 0


def _expect(exc: type[FeatstoreError], spec: str, named: str, build: bool = False) -> None:
    with pytest.raises(exc) as err:
        enc = load_encoder(spec, "cpu")
        if build:
            enc.load()
    assert named in str(err.value), str(err.value)


def test_hostile_encoders_name_the_folder(tmp_path, tiny_dinov3):
    _expect(EncoderNotFoundError, "foo:bar", "unknown backend prefix 'foo:'")
    _expect(EncoderNotFoundError, "timm:vit_nonexistent_patch16", "vit_nonexistent_patch16")
    _expect(EncoderNotFoundError, "open_clip:ViT-Q-99", "ViT-Q-99")
    # an open_clip config without an image tower
    (tmp_path / "text-only").mkdir()
    (tmp_path / "text-only" / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": {"embed_dim": 16, "text_cfg": OPEN_CLIP_CFG["text_cfg"]}})
    )
    (tmp_path / "text-only" / "open_clip_model.safetensors").write_bytes(b"")
    _expect(EncoderConfigError, f"open_clip:{tmp_path / 'text-only'}", str(tmp_path / "text-only"))
    # weights whose shapes do not fit the config (timm, transformers, open_clip)
    bad = save_tiny_timm(tmp_path / "timm-bad")
    _edit(bad / "config.json", model_args__embed_dim=48, model_args__num_heads=3)
    _expect(EncoderConfigError, f"timm:{bad}", str(bad), build=True)
    shutil.copytree(tiny_dinov3, tmp_path / "hf-bad")
    _edit(tmp_path / "hf-bad" / "config.json", intermediate_size=48)
    _expect(EncoderConfigError, str(tmp_path / "hf-bad"), str(tmp_path / "hf-bad"), build=True)
    clip = tmp_path / "clip-bad"
    save_tiny_open_clip(clip, OPEN_CLIP_CFG)
    small = "vit_small_patch16_224"  # 384 wide where the weights are 192
    _edit(clip / "open_clip_config.json", model_cfg__vision_cfg__timm_model_name=small)
    _expect(EncoderConfigError, f"open_clip:{clip}", str(clip), build=True)
    # a text model's config.json: not a vision backbone
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    torch.save({}, bert / "pytorch_model.bin")
    _expect(EncoderConfigError, str(bert), str(bert))
    # a malformed preprocessor_config.json
    shutil.copytree(tiny_dinov3, tmp_path / "hf-pre")
    (tmp_path / "hf-pre" / "preprocessor_config.json").write_text('{"image_mean": [0.5,')
    _expect(EncoderConfigError, str(tmp_path / "hf-pre"), str(tmp_path / "hf-pre"))
    # a timm folder whose config.json is not timm's
    _expect(EncoderNotFoundError, f"timm:{tiny_dinov3}", str(tiny_dinov3))


def test_timm_name_without_local_weights_asks_for_a_folder_or_random():
    _expect(EncoderNotFoundError, "timm:vit_tiny_patch16_224", "timm:vit_tiny_patch16_224:random")
    assert resolve_encoder("timm:vit_tiny_patch16_224:random").info.random_init


def test_the_comparison_study_resolves_every_encoder_at_every_size():
    from conftest import REPO

    from featstore.data.manifest import load_manifest
    from featstore.report.references import published_model

    # need_data=False: the study's encoders and sizes are checked on a clone without
    # ../shared/data too (the datasets' paths are not opened)
    m = load_manifest(REPO / "manifests" / "compare.yaml", need_data=False)
    cells = m.cells(baseline=False)
    specs = {c.encoder for c in cells}
    assert {"biomedclip", "rad-dino", "dinov2-vits14", "dinov3-vitb16"} <= specs
    infos = {s: resolve_encoder(s).info for s in specs}
    for c in cells:
        assert c.resolution % infos[c.encoder].patch_size == 0, c
    assert {infos[s].backend for s in specs} == {"hf", "open_clip"}
    assert published_model("biomedclip") == "BiomedCLIP"
