"""One contract over every encoder backend (`BACKENDS`), as zarr's `StoreTests` does for
stores: a new backend is a module, a line in `BACKENDS` and an entry in `CONTRACT`.

For each backend's tiny model, saved in its ecosystem's layout:
- its info (identity, preprocessing) is known without building the model;
- `encode` returns a `FeatureBatch` of the documented shapes for any layer choice;
- the tokens a real `featstore extract` stores equal the library's own forward pass
  on the same pixels (transformers `last_hidden_state`, timm `forward_features`,
  open_clip's `visual.trunk`, the raw patches of the pixel baseline);
- a folder is not a random init, and ':random' on a name is one, flagged in its label.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import (
    OPEN_CLIP_CFG,
    save_tiny_open_clip,
    save_tiny_timm,
    synth_entry,
    write_manifest,
)

from featstore.data import readers
from featstore.data.manifest import load_manifest
from featstore.encode.encoders import BACKENDS, load_encoder, resolve_encoder
from featstore.encode.preprocess import preprocess
from featstore.extraction.run import Options
from featstore.identity import requested
from pipelines import extract

Tokens = tuple[np.ndarray, np.ndarray]  # cls (B, D), patch (B, rows, cols, D)


@dataclass(frozen=True)
class Entry:
    """A backend's fixture: how to save its tiny model, its spec, the library's own
    forward pass, the input size to test at, and a name that gives a random init."""

    save: Callable[[Path], Path]
    spec: Callable[[Path], str]
    forward: Callable[[Path, torch.Tensor], Tokens]
    resolution: int
    random_name: str | None


def _save_hf(folder: Path) -> Path:
    from conftest import save_tiny_vit
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    save_tiny_vit(DINOv3ViTConfig, DINOv3ViTModel, folder, seed=1, num_register_tokens=2)
    return folder


def _hf_forward(folder: Path, x: torch.Tensor) -> Tokens:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder).eval()
    out = model(pixel_values=x).last_hidden_state.numpy()
    skip = 1 + model.config.num_register_tokens
    h = x.shape[-1] // model.config.patch_size
    return out[:, 0], out[:, skip:].reshape(len(out), h, h, out.shape[-1])


def _timm_forward(folder: Path, x: torch.Tensor) -> Tokens:
    import timm
    from safetensors.torch import load_file

    cfg = json.loads((folder / "config.json").read_text())
    model = timm.create_model(cfg["architecture"], pretrained=False, **cfg["model_args"])
    model.load_state_dict(load_file(folder / "model.safetensors"))
    out = model.eval().forward_features(x).numpy()
    h = x.shape[-1] // model.patch_embed.patch_size[0]
    return out[:, 0], out[:, model.num_prefix_tokens :].reshape(len(out), h, h, out.shape[-1])


def _save_clip(folder: Path) -> Path:
    save_tiny_open_clip(folder, OPEN_CLIP_CFG)
    return folder


def _clip_forward(folder: Path, x: torch.Tensor) -> Tokens:
    from open_clip.model import CLIP
    from safetensors.torch import load_file

    clip = CLIP(**OPEN_CLIP_CFG).eval()
    clip.load_state_dict(load_file(folder / "open_clip_model.safetensors"))
    out = clip.visual.trunk.forward_features(x).numpy()
    h = x.shape[-1] // 16
    return out[:, 0], out[:, 1:].reshape(len(out), h, h, out.shape[-1])


def _pixels_forward(_: Path, x: torch.Tensor) -> Tokens:
    """The baseline's definition written out: 8-px patches of channel 0 as tokens, the
    image average-pooled to 8 x 8 as CLS."""
    grey = x[:, 0].numpy()
    b, h, w = grey.shape
    patch = grey.reshape(b, h // 8, 8, w // 8, 8).transpose(0, 1, 3, 2, 4).reshape(b, 4, 4, 64)
    cls = grey.reshape(b, 8, h // 8, 8, w // 8).mean(axis=(2, 4)).reshape(b, 64)
    return cls, patch


CONTRACT: dict[str, Entry] = {
    "hf": Entry(_save_hf, str, _hf_forward, 32, "dinov3-vits16"),
    "timm": Entry(
        save_tiny_timm, lambda f: f"timm:{f}", _timm_forward, 32, "timm:vit_tiny_patch16_224"
    ),
    "open_clip": Entry(_save_clip, lambda f: f"open_clip:{f}", _clip_forward, 224, "biomedclip"),
    "pixels": Entry(lambda f: f, lambda _: "pixels:8", _pixels_forward, 32, None),
}


def test_every_backend_has_a_contract_entry():
    assert set(CONTRACT) == set(BACKENDS)


@pytest.fixture(scope="module", params=sorted(CONTRACT))
def backend(request, tmp_path_factory) -> tuple[str, Entry, Path]:
    entry = CONTRACT[request.param]
    folder = entry.save(tmp_path_factory.mktemp(request.param))
    return request.param, entry, folder


def test_info_is_known_without_building_the_model(backend, monkeypatch):
    """No weights are read and no model is loaded to know the info (timm and open_clip
    may instantiate the architecture on the meta device to read its facts)."""
    import safetensors.torch
    import transformers

    name, entry, folder = backend

    def loads(*_a, **_k):
        raise AssertionError("weights read to resolve an encoder")

    monkeypatch.setattr(safetensors.torch, "load_file", loads)
    monkeypatch.setattr(torch, "load", loads)
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", loads)
    enc = load_encoder(entry.spec(folder), "cpu")
    info = enc.info
    assert info.backend == name and not enc.loaded
    assert info.patch_size > 0 and info.hidden_size > 0 and len(info.mean) == len(info.std) == 3
    monkeypatch.undo()
    assert enc.load() is not None and enc.loaded


@pytest.mark.parametrize(("layers", "patch_layers"), [(1, (-1,)), (2, (-1, -2))])
def test_encode_returns_the_documented_shapes(backend, layers, patch_layers):
    _, entry, folder = backend
    enc = load_encoder(entry.spec(folder), "cpu")
    r, p = entry.resolution, enc.info.patch_size
    out = enc.encode(torch.zeros(3, 3, r, r), layers, patch_layers)
    d = enc.info.hidden_size
    assert tuple(out.cls.shape) == (3, layers, d)
    assert tuple(out.patch.shape) == (3, len(patch_layers), r // p, r // p, d)
    assert out.cls.dtype == out.patch.dtype == torch.float32


def test_stored_tokens_equal_the_librarys_own_forward(backend, tmp_path):
    _, entry, folder = backend
    spec, r = entry.spec(folder), entry.resolution
    mpath = write_manifest(
        tmp_path, synth_entry("d", "cls2d", n=6, size=r + 8), f"['{spec}']", f"[{r}]"
    )
    m = load_manifest(mpath)
    (summary,) = extract.run(m, Options(progress=False), baseline=False, echo=lambda *_: None)
    xs = xr.open_zarr(summary.path)

    ds = m.datasets[0]
    enc = load_encoder(spec, "cpu")
    pre = requested(ds, m, readers.prepare(ds).fingerprint, spec, r)
    pre = pre.with_weights(enc.info).preprocess()
    samples = readers.list_samples(ds)
    x = np.concatenate([preprocess(readers.load(ds, s).image, None, pre)[0] for s in samples])
    with torch.no_grad():
        cls, patch = entry.forward(folder, torch.from_numpy(x))
    atol = 2e-3 * max(1.0, float(np.abs(patch).max()))  # float16 storage
    np.testing.assert_allclose(xs.cls.values, cls, rtol=1e-2, atol=atol)
    np.testing.assert_allclose(xs.patch.values, patch, rtol=1e-2, atol=atol)


def test_a_folder_is_not_a_random_init_and_a_random_name_is_flagged(backend):
    _, entry, folder = backend
    assert not resolve_encoder(entry.spec(folder)).info.random_init
    if entry.random_name is None:
        return
    info = resolve_encoder(f"{entry.random_name}:random").info
    assert info.random_init and info.label.endswith("[random_init]")
