"""Shared fixtures: tiny real parts (a DINOv3 saved with save_pretrained, real files)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

if TYPE_CHECKING:  # featstore is imported inside the helpers, as elsewhere in this file
    from featstore.identity import EncoderInfo, Recipe

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """File-hash memo and HF cache in temp folders; never touch the user's."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("FEATSTORE_HOME", str(home / "featstore"))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("FEATSTORE_CACHE", raising=False)


@pytest.fixture
def gpu_device():
    """The CUDA device of a `gpu`-marked test; without one the test is skipped.

    FEATSTORE_GPU_STANDIN=cpu (set by `benchmarks/gpu/run.sh --dry-run`) runs such tests
    on the CPU instead: their code runs, but nothing about CUDA is checked.
    """
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("FEATSTORE_GPU_STANDIN") == "cpu":
        return torch.device("cpu")
    pytest.skip("needs a CUDA device (FEATSTORE_GPU_STANDIN=cpu runs it on the CPU)")


def save_tiny_vit(config_cls, model_cls, folder: Path, seed: int, **overrides) -> Path:
    """A 2-block ViT with 8-px patches, fixed-seed init, saved like real weights."""
    import torch

    arch = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        patch_size=8,
        image_size=32,
    )
    torch.manual_seed(seed)
    model_cls(config_cls(**{**arch, **overrides})).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_dinov3(tmp_path_factory) -> Path:
    """A tiny DINOv3 ViT (patch 8, 2 registers) saved like real weights, with mean/std."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    folder = tmp_path_factory.mktemp("tiny-dinov3")
    save_tiny_vit(DINOv3ViTConfig, DINOv3ViTModel, folder, seed=1, num_register_tokens=2)
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]})
    )
    return folder


# The tiny timm and open_clip models of the backend tests, saved in their
# ecosystems' folder layouts (timm `save_for_hf`, open_clip's hub layout).
TINY_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=0)


def save_tiny_timm(folder: Path, seed: int = 0, **overrides) -> Path:
    """A 2-block timm ViT (8-px patches, 2 register tokens) in timm's save_for_hf layout,
    with its own mean/std in pretrained_cfg."""
    import timm
    import torch
    from timm.models import save_for_hf

    args = {**TINY_VIT, "reg_tokens": 2, **overrides}
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **args)
    save_for_hf(model, folder, model_args=args, safe_serialization=True)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["pretrained_cfg"].update(mean=[0.3, 0.4, 0.5], std=[0.2, 0.25, 0.3])
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


OPEN_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {
        "timm_model_name": "vit_tiny_patch16_224",
        "timm_model_pretrained": False,
        "timm_pool": "",
        "timm_proj": "linear",
        "image_size": 224,
    },
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}


def save_tiny_open_clip(folder: Path, model_cfg: dict, seed: int = 0):
    """A CLIP built by open_clip from `model_cfg`, saved in the hub layout."""
    import torch
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = CLIP(**model_cfg).eval()
    folder.mkdir(parents=True, exist_ok=True)
    pre = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
    config = {"model_cfg": model_cfg, "preprocess_cfg": pre}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_file(model.state_dict(), folder / "open_clip_model.safetensors")
    return model


@pytest.fixture(scope="session")
def tiny_timm(tmp_path_factory) -> Path:
    return save_tiny_timm(tmp_path_factory.mktemp("tiny-timm"))


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-clip")
    return folder, save_tiny_open_clip(folder, OPEN_CLIP_CFG)


def write_manifest(
    tmp: Path, datasets: str, encoders: str, resolutions: str = "[32]", extra: str = ""
) -> Path:
    path = tmp / "manifest.yaml"
    path.write_text(
        f"cache: cache\nencoders: {encoders}\nresolutions: {resolutions}\n"
        f"baseline: 'pixels:8'\n{extra}"
        f"datasets:\n{datasets}"
    )
    return path


SYNTH = """\
  - name: {name}
    format: synthetic
    synthetic: {{kind: {kind}, n: {n}, size: {size}, slices: {slices}, seed: 0}}
    path: data/{name}
    task: {task}
    dims: {dims}
    {splits}
"""


def synth_entry(name: str, kind: str, n: int = 12, size: int = 32, slices: int = 6) -> str:
    task = "segmentation" if kind.startswith("seg") else "classification"
    dims = 3 if kind.endswith("3d") else 2
    splits = "splits: {ratios: [0.5, 0.25, 0.25], seed: 0}" if dims == 3 else ""
    return SYNTH.format(
        name=name, kind=kind, n=n, size=size, slices=slices, task=task, dims=dims, splits=splits
    )


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "PROVENANCE.md").is_file():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (see docs/real-data.md)")
    return SHARED_DATA


def sklearn_seg_scores(pred, truth, n_classes: int) -> dict[str, float]:
    """Dice, precision and recall of 2D label maps (n, H, W) computed with scikit-learn,
    independently of featstore: per image and foreground class (left out when the class
    is in neither map), averaged over classes, then over images."""
    from sklearn import metrics as skm

    fns = {"dice": skm.f1_score, "precision": skm.precision_score, "recall": skm.recall_score}
    per: dict[str, list[float]] = {m: [] for m in fns}
    for p, t in zip(pred, truth, strict=True):
        present = [c for c in range(1, n_classes) if (p == c).any() or (t == c).any()]
        if not present:
            continue
        for m, fn in fns.items():
            per[m].append(
                float(
                    np.mean([fn(t.ravel() == c, p.ravel() == c, zero_division=0) for c in present])
                )
            )
    return {m: float(np.mean(v)) for m, v in per.items()}


def refit_linear_seg_head(xs, ds):
    """The linear segmentation head as `featstore probe` fits it (seed 0, one BLAS
    thread), and its predictions and masks of the test images."""
    from threadpoolctl import threadpool_limits

    from featstore.probing.options import ProbeOptions
    from featstore.probing.segmentation import fit_linear_head, seg_set

    s = seg_set(xs, ds, None)
    with threadpool_limits(limits=1):
        head = fit_linear_head(s, ProbeOptions())
        patch, truth = s.read(True)(np.concatenate(s.test_vols))
        return head.predict(patch, s.size), truth, s.n_classes


def a_mark_written(marks: Path) -> bool:
    """Whether a unit's done mark (a chunk file `<unit>` of `_featstore/done/c`) is in
    place. zarr writes `<unit>.<uuid>.partial` first and renames it, so a poll that
    counted any file could see the partial one, and a kill then leaves no unit done."""
    try:
        return any(p.name.isdigit() for p in marks.iterdir())
    except FileNotFoundError:  # the folder is not there yet
        return False


def a_recipe(**changes: Any) -> Recipe:
    """A small 2D classification recipe for store-level tests, with `changes` applied."""
    from featstore.data.settings import Intensity
    from featstore.identity import Recipe

    fields: dict[str, Any] = dict(
        dataset="0" * 64, task="classification", dims=2, slice_axis="axial",
        fill_outlines=False, mask_map=(), metadata=(), resolution=32,
        intensity=Intensity(), fit="resize", layers=1, dtype="float16", patch=True,
    )  # fmt: skip
    return Recipe(**{**fields, **changes})


def small_weights() -> EncoderInfo:
    """The encoder facts of store-level tests: an 8-wide, patch-16 model named 'e'."""
    from featstore.identity import EncoderInfo

    return EncoderInfo("e", "test", "1" * 64, "t", 16, 0, 8, (0, 0, 0), (1, 1, 1), False)


def on_cluster(manifest, client, opts=None, **kw):
    """`extract_manifest` with its units as tasks on the test's own dask `client`."""
    from featstore.extraction.cluster import ClusterRunner
    from featstore.extraction.run import Options, extract_manifest

    opts = opts or Options()
    return extract_manifest(manifest, opts, ClusterRunner.on(client, opts), **kw)


@pytest.fixture(scope="session")
def served_study(tmp_path_factory) -> Path:
    """A tiny extracted and probed study for `featstore serve`'s tests: one 2D
    classification dataset (24 items) through pixels:4 and the pixels:8 baseline
    (two sets of the same items), through the CLI. Returns its folder, with
    cache/ and out/ in it."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    folder = tmp_path_factory.mktemp("served")
    mpath = write_manifest(folder, synth_entry("c2", "cls2d", n=24), "['pixels:4']")
    with pytest.MonkeyPatch.context() as mp:  # session-wide: the autouse fixture is not
        mp.setenv("FEATSTORE_HOME", str(folder / "home"))
        mp.delenv("FEATSTORE_CACHE", raising=False)
        for cmd in (["extract"], ["probe", "--out", str(folder / "out")]):
            result = CliRunner().invoke(app, [*cmd, "--manifest", str(mpath)])
            assert result.exit_code == 0, result.output
    return folder
