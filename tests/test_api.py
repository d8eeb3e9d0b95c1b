"""The Python API on real files: multi-label and several layers through extract, store, probe."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import synth_entry, write_manifest
from PIL import Image

import featstore
from featstore.errors import StoreIncompleteError

LABELS = ["0;0;1", "1;0;1", "0;1;0", "1;1;0"]


def _multilabel(folder, n: int = 24) -> str:
    """PNG images whose three labels are visible (bright quadrants), and their index."""
    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True)
    rows = ["image,label,split"]
    for i in range(n):
        label = LABELS[i % 4]
        img = rng.integers(0, 60, (32, 32)).astype(np.uint8)
        for j, on in enumerate(label.split(";")):
            if on == "1":
                img[16 * (j // 2) : 16 * (j // 2) + 16, 16 * (j % 2) : 16 * (j % 2) + 16] += 150
        Image.fromarray(img).save(folder / "img" / f"{i}.png")
        split = ("train", "train", "val", "test")[(i // 4) % 4] if i < 16 else "train"
        rows.append(f"img/{i}.png,{label},{split}")
    (folder / "index.csv").write_text("\n".join(rows) + "\n")
    return (
        "  - name: ml\n    format: images\n    path: ml\n    index: index.csv\n"
        "    task: multilabel\n    dims: 2\n"
    )


def test_multilabel_with_layers_through_extract_store_and_probe(tmp_path, tiny_dinov3):
    entry = _multilabel(tmp_path / "ml")
    mpath = write_manifest(tmp_path, entry, f"['{tiny_dinov3}']", extra="layers: 2\n")
    summaries = featstore.extract(mpath, progress=False, echo=lambda *_: None)
    assert {s.status for s in summaries} == {"new"}
    xs = featstore.open_features(mpath, "ml", str(tiny_dinov3))
    assert xs.cls.dims == ("item", "layer", "channel") and xs.sizes["layer"] == 2
    assert xs.label.dims == ("item", "class") and xs.sizes["class"] == 3
    assert xs.label.values[1].tolist() == [1, 0, 1]
    df = featstore.probe(mpath)
    linear = df[(df.probe == "linear") & (df.metric == "auroc")]
    assert len(linear) == 2 and linear.value.notna().all()  # encoder and pixel baseline
    pixels = linear[linear.encoder.str.startswith("pixels")].value.iloc[0]
    assert pixels > 0.8  # bright quadrants are easy for raw pixels


def test_open_features_pools_volumes_for_a_custom_model(tmp_path, tiny_dinov3):
    mpath = write_manifest(tmp_path, synth_entry("vols", "cls3d", n=12), f"['{tiny_dinov3}']")
    featstore.extract(mpath, baseline=False, progress=False, echo=lambda *_: None)
    xs = featstore.open_features(mpath, "vols", str(tiny_dinov3), 32)
    volumes = xs.cls.astype("float32").groupby("sample").mean()
    label = xs.label.groupby("sample").first()
    split = xs.split.groupby("sample").first()  # as the example of docs/api.md
    assert volumes.sizes["sample"] == 12 and volumes.shape[1] == 32
    assert list(split.sample.values) == list(volumes.sample.values)
    # each volume's mean, computed from the raw items in a plain loop
    cls = xs.cls.values.astype(np.float32)
    for j, sid in enumerate(volumes.sample.values):
        mine = np.flatnonzero(xs.sample.values == sid)
        np.testing.assert_allclose(volumes.values[j], cls[mine].mean(0), rtol=1e-5, atol=1e-6)
        assert label.values[j] == xs.label.values[mine[0]]


def test_open_features_without_a_set_says_how_to_make_it(tmp_path, tiny_dinov3):
    mpath = write_manifest(tmp_path, synth_entry("d", "cls2d"), f"['{tiny_dinov3}']")
    with (
        pytest.raises(StoreIncompleteError, match=r"no complete feature set.*featstore.extract"),
        pytest.warns(UserWarning, match=r"d: data folder .* is absent"),  # never generated
    ):
        featstore.open_features(mpath, "d", str(tiny_dinov3))
