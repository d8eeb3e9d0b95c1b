"""Preprocessing on the device (`--preprocess-on device`), run here on the CPU.

The same torch code runs on a GPU; here it runs on the CPU and is checked against the
CPU path (numpy + PIL) on real files written by the test: 8-bit grey and RGB PNGs,
16-bit PNG and TIFF, an int16 NIfTI CT volume, a DICOM series, MedMNIST, in both fit
modes. Intensity, pad and mean/std are the same float32 operations on both paths;
only the resize differs (torch's antialiased bilinear computes its weights in
float32, PIL in float64). Measured (normalised units, std 0.2-0.3): 7e-7 at the
sizes used here, 4.2e-5 for 512 -> 224 px; 0 where an image is padded or already at
size (percentile bounds add ~5e-7). Stored float32 tokens of the tiny encoder
differed by at most 1.3e-6 (values up to ~4).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import synth_entry, write_manifest
from PIL import Image
from test_readers import _dicom_series
from typer.testing import CliRunner

from featstore.data import readers
from featstore.data.manifest import Dataset, load_manifest
from featstore.data.settings import Intensity, Synthetic
from featstore.encode.devprep import RawPixels, narrowest, to_input
from featstore.errors import StoreMismatchError
from featstore.extraction.batches import Batches, plan_batches
from featstore.extraction.run import Options
from featstore.identity import Preprocess
from featstore.store import schema, sets
from featstore.store.sets import FeatureSet
from pipelines import extract
from pipelines.cli import app

CPU = torch.device("cpu")
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # the tiny encoder's, distinct per channel
RESIZED = 1e-4  # bound on |device - cpu| where images are resized (measured: <= 4.2e-5)


def _layout(n: int, r: int, masks: bool = False) -> schema.Layout:
    return schema.Layout(
        n_items=n, chunk_items=4, channels=8, layers=1, rows=1, cols=1,
        mask_size=r if masks else 0, n_classes=0, dtype="float16",
    )  # fmt: skip


def _both(
    ds: Dataset,
    r: int,
    fit: str = "resize",
    device: torch.device = CPU,
    interpolation: str = "bilinear",
    **intensity,
):
    """(cpu pixels, device pixels, cpu masks, device masks, shipped dtypes, batches)."""
    prep = readers.prepare(ds)
    pre = Preprocess(r, Intensity(**intensity), MEAN, STD, fit, interpolation)
    layout = _layout(len(prep.index), r, ds.task == "segmentation")
    plan = plan_batches(layout, list(range(layout.n_units)), 4)
    cpu = [Batches(prep, pre, layout, plan)[k] for k in range(len(plan))]
    dev = [Batches(prep, pre, layout, plan, "device")[k] for k in range(len(plan))]
    assert all(isinstance(b.pixels, RawPixels) for b in dev)
    a = torch.cat([b.pixels for b in cpu if isinstance(b.pixels, torch.Tensor)]).numpy()
    pinned = [b.pin_memory() if device.type == "cuda" else b for b in dev]  # as DataLoader does
    b = torch.cat([to_input(b.pixels, pre, device) for b in pinned]).cpu().numpy()
    dtypes = {
        g.pixels.dtype for d in dev if isinstance(d.pixels, RawPixels) for g in d.pixels.groups
    }
    masks = [
        np.concatenate([x.masks for x in s]) if s[0].masks is not None else None for s in (cpu, dev)
    ]
    return a, b, masks[0], masks[1], dtypes, dev


def _images(folder: Path, arrays: list[np.ndarray], suffix: str = ".png") -> Dataset:
    folder.mkdir(exist_ok=True)
    rows = []
    for i, arr in enumerate(arrays):
        Image.fromarray(arr).save(folder / f"{i}{suffix}")
        rows.append(f"{i}{suffix},{i % 2},{('train', 'val', 'test')[i % 3]}")
    (folder / "index.csv").write_text("image,label,split\n" + "\n".join(rows) + "\n")
    return Dataset(
        name="i", format="images", path=folder, index="index.csv", task="classification", dims=2
    )


def _synthetic(tmp_path: Path, kind: str, size: int) -> Dataset:
    task = "segmentation" if kind.startswith("seg") else "classification"
    return Dataset(
        name=kind, format="synthetic", path=tmp_path / kind, task=task, dims=2,
        synthetic=Synthetic(kind=kind, n=6, size=size),
    )  # fmt: skip


def test_narrowest_is_exact_and_small():
    ct = np.arange(-1024, 3072, dtype=np.float32)
    assert narrowest(np.arange(256, dtype=np.float32)).dtype == np.uint8
    assert narrowest(ct).dtype == np.int16 and np.array_equal(narrowest(ct), ct)
    assert narrowest(np.array([0, 60000], np.int32)).dtype == np.uint16
    assert narrowest(np.array([0.5, 2.0], np.float32)).dtype == np.float32  # not whole
    assert narrowest(np.array([1e9], np.float64)).dtype == np.float32  # as the CPU path
    big_endian = np.array([1, 40000], ">u2")
    assert narrowest(big_endian).dtype == np.dtype("=u2")  # native: torch refuses ">u2"


@pytest.mark.parametrize(
    ("size", "r", "fit"),
    [(40, 32, "resize"), (24, 32, "resize"), (24, 32, "pad"), (40, 32, "pad"), (32, 32, "resize")],
)
def test_grey_png_matches_the_cpu_path(tmp_path, size, r, fit):
    a, b, *_, dtypes, _ = _both(_synthetic(tmp_path, "cls2d", size), r, fit, mode="minmax")
    assert dtypes == {torch.uint8}
    assert a.shape == b.shape == (6, 3, r, r)
    if size == r or (fit == "pad" and size < r):  # no resize: the same float32 operations
        np.testing.assert_array_equal(b, a)
    else:
        assert 0 < np.abs(a - b).max() <= RESIZED


@pytest.mark.parametrize(("size", "r"), [(40, 32), (24, 32), (96, 64)])
def test_bicubic_on_the_device_is_pils_bicubic(tmp_path, size, r):
    """timm and open_clip models ask for bicubic: torch's antialiased bicubic uses PIL's
    kernel (a = -0.5), so both paths agree as closely as for bilinear."""
    ds = _synthetic(tmp_path, "cls2d", size)
    a, b, *_ = _both(ds, r, interpolation="bicubic", mode="minmax")
    assert 0 < np.abs(a - b).max() <= RESIZED
    linear, *_ = _both(ds, r, mode="minmax")
    assert np.abs(a - linear).max() > 100 * RESIZED  # the filter was honoured


def test_rgb_of_mixed_sizes_matches_and_is_grouped_by_size(tmp_path):
    rng = np.random.default_rng(0)
    shapes = [(30, 20), (30, 20), (12, 50), (30, 20), (64, 64), (12, 50)]
    arrays = [rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in shapes]
    ds = _images(tmp_path / "rgb", arrays)
    for fit in ("resize", "pad"):
        a, b, *_, dtypes, dev = _both(ds, 32, fit, mode="window", center=100, width=150)
        assert dtypes == {torch.uint8}
        assert np.abs(a - b).max() <= RESIZED
        assert len(dev[0].pixels.groups) == 2  # items 0-3: two sizes, one call each
    channels = a.reshape(6, 3, -1)
    assert not np.allclose(channels[:, 0], channels[:, 1])  # colour kept, not grey


@pytest.mark.parametrize("suffix", [".png", ".tiff"])
def test_uint16_pictures_travel_as_uint16(tmp_path, suffix):
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 65535, (48, 40), dtype=np.uint16) for _ in range(5)]
    ds = _images(tmp_path / "u16", arrays, suffix)
    a, b, *_, dtypes, dev = _both(ds, 32, mode="percentile", low=1, high=99)
    assert dtypes == {torch.uint16}
    assert np.abs(a - b).max() <= RESIZED
    float_bytes = 4 * 3 * 32 * 32 * len(dev[0].pixels)
    assert dev[0].pixels.nbytes < float_bytes  # 2 x 48 x 40 per item, vs 4 x 3 x 32 x 32


def test_int16_nifti_ct_window_matches(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "ct"
    folder.mkdir()
    for i in range(3):
        vol = rng.integers(-1024, 2000, (40, 36, 5)).astype(np.int16)
        nib.save(nib.Nifti1Image(vol, np.diag([-0.8, 0.8, 2.0, 1.0])), folder / f"v{i}.nii.gz")
    rows = "\n".join(f"v{i}.nii.gz,{i % 2},{('train', 'val', 'test')[i]}" for i in range(3))
    (folder / "index.csv").write_text("image,label,split\n" + rows + "\n")
    ds = Dataset(
        name="ct", format="nifti", path=folder, index="index.csv", task="classification", dims=3
    )
    for fit, r in (("resize", 32), ("pad", 48)):
        a, b, *_, dtypes, _ = _both(ds, r, fit, mode="window", center=40, width=400)
        assert dtypes == {torch.int16}  # read as float32 HU, sent as the integers they are
        if fit == "pad":
            np.testing.assert_array_equal(b, a)
        else:
            assert np.abs(a - b).max() <= RESIZED


def test_dicom_and_medmnist_match(tmp_path):
    _dicom_series(tmp_path / "series", 5)
    (tmp_path / "index.csv").write_text("image,label,split\nseries,1,train\n")
    ds = Dataset(
        name="d", format="dicom", path=tmp_path, index="index.csv", task="classification", dims=3
    )
    a, b, *_, dtypes, _ = _both(ds, 16, mode="minmax")
    assert dtypes == {torch.int16}
    assert np.abs(a - b).max() <= RESIZED
    rng = np.random.default_rng(3)
    splits = ("train", "val", "test")
    arrays = {f"{s}_images": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8) for s in splits}
    arrays |= {f"{s}_labels": np.zeros((4, 1), np.uint8) for s in splits}
    np.savez(tmp_path / "m.npz", **arrays)
    mm = Dataset(
        name="m", format="medmnist", path=tmp_path / "m.npz", task="classification", dims=2
    )
    a, b, *_, dtypes, _ = _both(mm, 32, "pad", mode="none")
    assert dtypes == {torch.uint8}
    np.testing.assert_array_equal(b, a)


def test_masks_stay_nearest_on_the_cpu(tmp_path):
    a, b, ma, mb, *_ = _both(_synthetic(tmp_path, "seg2d", 40), 32, mode="minmax")
    assert ma is not None and mb is not None and np.array_equal(ma, mb)
    assert np.abs(a - b).max() <= RESIZED


def test_unreadable_sample_rows_are_zeros_on_both_paths(tmp_path):
    ds = _synthetic(tmp_path, "cls2d", 40)
    readers.prepare(ds)
    (tmp_path / "cls2d" / "images" / "img0001.png").write_bytes(b"not a png")
    a, b, *_ = _both(ds, 32, mode="minmax")
    assert not a[1].any() and not b[1].any() and b[0].any()


def _run(mpath, **opts):
    m = load_manifest(mpath)
    return extract.run(m, Options(progress=False, **opts), baseline=False, echo=lambda *_: None)


def test_features_agree_and_the_set_is_shared(tmp_path, tiny_dinov3):
    """End to end with a tiny DINOv3: 40 px PNGs resized to 32 px, float32 storage."""
    made_sets = {}
    for where in ("cpu", "device"):
        (tmp_path / where).mkdir()
        m = write_manifest(
            tmp_path / where, synth_entry("d", "cls2d", n=8, size=40), f"['{tiny_dinov3}']",
            extra="dtype: float32\nbatch_size: 4\nunit_items: 4\n",
        )  # fmt: skip
        (made_sets[where],) = _run(m, device="cpu", preprocess_on=where)
    cpu, dev = (sets.open_set(made_sets[w].path) for w in ("cpu", "device"))
    assert (
        made_sets["cpu"].path.name == made_sets["device"].path.name
    )  # one cache key: provenance only
    assert cpu.attrs["compute"] == {"device": "cpu", "preprocess_on": "cpu"}
    assert dev.attrs["compute"] == {"device": "cpu", "preprocess_on": "device"}
    for name in ("cls", "patch"):
        diff = np.abs(cpu[name].values - dev[name].values).max()
        assert 0 < diff <= 1e-5, f"{name}: {diff}"  # measured 1.3e-6; tokens reach ~4


def test_a_set_is_not_finished_with_another_placement(tmp_path, tiny_dinov3):
    mpath = write_manifest(
        tmp_path, synth_entry("d", "cls2d", n=8, size=40), f"['{tiny_dinov3}']",
        extra="batch_size: 4\nunit_items: 4\n",
    )  # fmt: skip
    (made,) = _run(mpath, preprocess_on="cpu", shard=(0, 2))  # half the units: incomplete
    assert FeatureSet(made.path).pending_units()
    with pytest.raises(StoreMismatchError, match=r"--preprocess-on cpu.*--preprocess-on device"):
        _run(mpath, preprocess_on="device")
    (done,) = _run(mpath, preprocess_on="cpu")
    assert done.status == "resumed"
    (again,) = _run(mpath, preprocess_on="device")
    assert again.status == "cached"  # a complete set serves either placement


def test_device_placement_resumes_byte_identical(tmp_path, tiny_dinov3):
    """Half the units in one run, the rest in another == one clean run, byte for byte."""
    made_sets = []
    for name, shards in (("clean", [(0, 1)]), ("halves", [(1, 2), (0, 1)])):
        (tmp_path / name).mkdir()
        m = write_manifest(
            tmp_path / name, synth_entry("v", "cls3d", n=6, size=24, slices=6),
            f"['{tiny_dinov3}']", extra="batch_size: 4\nunit_items: 8\n",
        )  # fmt: skip
        for shard in shards:
            (made,) = _run(m, preprocess_on="device", shard=shard)
        made_sets.append(made.path)
    chunks = [
        {
            str(f.relative_to(p)): f.read_bytes()
            for f in sorted(p.rglob("*"))
            if f.is_file() and "/c/" in str(f)
        }
        for p in made_sets
    ]
    assert chunks[0] and chunks[0] == chunks[1]


def test_cli_option_is_checked_and_recorded(tmp_path):
    m = write_manifest(tmp_path, synth_entry("d", "cls2d", n=6), "['pixels:8']")
    args = ["extract", "--manifest", str(m), "--no-baseline", "--device", "cpu"]
    bad = CliRunner().invoke(app, [*args, "--preprocess-on", "gpu"])
    assert bad.exit_code == 2 and "--preprocess-on must be auto, cpu or device" in bad.output
    ok = CliRunner().invoke(app, [*args, "--preprocess-on", "device"])
    assert ok.exit_code == 0, ok.output
    (path,) = (tmp_path / "cache").glob("*.zarr")
    assert FeatureSet(path).attrs["compute"] == {"device": "cpu", "preprocess_on": "device"}


@pytest.mark.gpu
def test_cuda_preprocessing_matches_the_cpu_path(tmp_path, gpu_device):
    cuda = gpu_device
    grey = _synthetic(tmp_path, "cls2d", 96)
    for fit, r in (("resize", 64), ("pad", 128)):
        a, b, *_ = _both(grey, r, fit, cuda, mode="minmax")
        assert np.abs(a - b).max() <= RESIZED
    rng = np.random.default_rng(1)
    u16 = _images(tmp_path / "u16", [rng.integers(0, 65535, (48, 40), dtype=np.uint16)] * 5)
    a, b, *_, dtypes, _ = _both(u16, 32, "resize", cuda, mode="percentile")
    assert dtypes == {torch.uint16} and np.abs(a - b).max() <= RESIZED
