"""Extract: stored tokens == a direct forward pass; reuse, resume, mismatch, verify."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from conftest import REPO, a_mark_written, a_recipe, small_weights, synth_entry, write_manifest
from transformers import AutoModel

from featstore.data import readers
from featstore.data.manifest import load_manifest
from featstore.encode.encoders import Encoder, load_encoder
from featstore.encode.preprocess import preprocess
from featstore.errors import EncoderNotFoundError, StoreMismatchError
from featstore.extraction.run import Options
from featstore.identity import SetIdentity, requested
from featstore.store import arrays, schema
from featstore.store.sets import FeatureSet
from pipelines import extract


def _run(manifest_path: Path, baseline: bool = True, **opts):
    return extract.run(
        load_manifest(manifest_path),
        Options(progress=False, **opts),
        baseline=baseline,
        echo=lambda *_: None,
    )


@pytest.mark.parametrize("kind", ["cls2d", "seg3d"])
def test_stored_tokens_equal_direct_forward(tmp_path, tiny_dinov3, kind):
    mpath = write_manifest(
        tmp_path,
        synth_entry("d", kind, n=8),
        f"['{tiny_dinov3}']",
        extra="batch_size: 5\nunit_items: 10\n",
    )
    (summary, _) = _run(mpath)
    xs = xr.open_zarr(summary.path)
    assert xs.attrs["complete"] is True and xs.attrs["encoder"]["random_init"] is False
    assert xs.attrs["encoder"]["num_register_tokens"] == 2
    assert xs.attrs["preprocess"]["mean"] == [0.5, 0.4, 0.3]  # read from the model folder
    assert dict(xs.patch.sizes) == {"item": len(xs.item), "row": 4, "col": 4, "channel": 32}

    m = load_manifest(mpath)
    ds = m.datasets[0]
    samples = readers.list_samples(ds)
    encoder = load_encoder(str(tiny_dinov3), "cpu")
    prep = readers.prepare(ds)
    pre = requested(ds, m, prep.fingerprint, str(tiny_dinov3), 32)
    pre = pre.with_weights(encoder.info).preprocess()
    pixels = np.concatenate([preprocess(readers.load(ds, s).image, None, pre)[0] for s in samples])
    model = AutoModel.from_pretrained(tiny_dinov3).eval()
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    np.testing.assert_allclose(xs.cls.values, out[:, 0].astype(np.float16), rtol=0, atol=2e-3)
    patch = out[:, 3:].reshape(len(out), 4, 4, 32)  # 1 CLS + 2 registers dropped
    np.testing.assert_allclose(xs.patch.values, patch.astype(np.float16), rtol=0, atol=2e-3)
    assert list(xs.slice.values[:3]) == ([0, 1, 2] if kind == "seg3d" else [0, 0, 0])
    if kind == "seg3d":
        assert xs.mask.dtype == np.uint8 and set(np.unique(xs.mask.values)) <= {0, 1, 2}


def test_second_run_is_cached_without_forward(tmp_path, tiny_dinov3, monkeypatch):
    mpath = write_manifest(tmp_path, synth_entry("d", "cls2d"), f"['{tiny_dinov3}']")
    first = _run(mpath)
    assert [s.status for s in first] == ["new", "new"]  # encoder + pixel baseline

    def no_forward(*_a, **_k):
        raise AssertionError("a cached feature set must not run the encoder")

    monkeypatch.setattr(Encoder, "encode", no_forward)
    again = _run(mpath)
    assert [s.status for s in again] == ["cached", "cached"]
    # Another manifest asking for the same content gets the same set back.
    other = tmp_path / "other"
    other.mkdir()
    (other / "m.yaml").write_text(
        mpath.read_text()
        .replace("cache: cache", f"cache: {tmp_path}/cache")
        .replace("name: d", "name: renamed")
        .replace("path: data/d", f"path: {tmp_path}/data/d")
    )
    assert [s.status for s in _run(other / "m.yaml")] == ["cached", "cached"]


def test_other_resolution_is_other_set_and_patch_grid(tmp_path, tiny_dinov3):
    mpath = write_manifest(tmp_path, synth_entry("d", "cls2d"), f"['{tiny_dinov3}']", "[32, 48]")
    made_sets = [s for s in _run(mpath, baseline=False)]
    assert len({s.path for s in made_sets}) == 2
    for s in made_sets:
        xs = xr.open_zarr(s.path)
        assert xs.sizes["row"] == xs.sizes["col"] == s.resolution // 8


def test_resolution_not_multiple_of_patch(tmp_path, tiny_dinov3):
    mpath = write_manifest(tmp_path, synth_entry("d", "cls2d"), f"['{tiny_dinov3}']", "[36]")
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        _run(mpath)


def test_mismatch_is_an_error_and_overwrite_replaces(tmp_path, tiny_dinov3):
    mpath = write_manifest(tmp_path, synth_entry("d", "cls2d"), f"['{tiny_dinov3}']")
    (s, _) = _run(mpath)
    root = zarr.open_group(s.path, mode="r+", use_consolidated=False)
    ident = root.attrs["identity"]
    ident["recipe"]["dtype"] = "float32"  # written by "another" configuration
    root.attrs["identity"] = ident
    with pytest.raises(StoreMismatchError, match=r"dtype: stored 'float32', requested 'float16'"):
        _run(mpath)
    assert (s.path / "cls").is_dir()  # nothing was deleted
    (again, _) = _run(mpath, overwrite=True)
    assert (
        again.status == "new"
        and FeatureSet(again.path).attrs["identity"]["recipe"]["dtype"] == "float16"
    )


def test_verify_catches_missing_chunk(tmp_path, tiny_dinov3):
    mpath = write_manifest(
        tmp_path,
        synth_entry("d", "cls2d", n=12),
        f"['{tiny_dinov3}']",
        extra="batch_size: 4\nunit_items: 4\n",
    )
    (s, _) = _run(mpath)
    assert FeatureSet(s.path).verify() == []
    chunk = s.path / "patch" / "c" / "1" / "0" / "0" / "0"
    assert chunk.is_file()
    chunk.unlink()
    problems = FeatureSet(s.path).verify()
    assert "patch unit 1: chunk file missing" in [str(p) for p in problems]
    from typer.testing import CliRunner

    from pipelines.cli import app

    result = CliRunner().invoke(app, ["verify", str(s.path)])
    assert result.exit_code == 1 and "FAIL patch unit 1: chunk file missing" in result.output


def test_skip_bad_records_and_continues(tmp_path, tiny_dinov3):
    mpath = write_manifest(tmp_path, synth_entry("d", "cls2d", n=12), f"['{tiny_dinov3}']")
    readers.list_samples(load_manifest(mpath).datasets[0])  # generates the files
    bad = tmp_path / "data" / "d" / "images" / "img0003.png"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"img0003\.png: cannot decode image"):
        _run(mpath, baseline=False)
    (s,) = _run(mpath, baseline=False, skip_bad=True)
    assert list(s.skipped) == ["img0003"]
    attrs = FeatureSet(s.path).attrs
    assert list(attrs["skipped"]) == ["img0003"] and attrs["complete"]
    assert FeatureSet(s.path).verify() == []


def test_missing_encoder_says_where_it_looked(tmp_path):
    with pytest.raises(EncoderNotFoundError, match="not a hub id in the cache"):
        load_encoder("nobody/no-such-model")


def test_preset_without_weights_is_flagged_random_init():
    enc = load_encoder("dinov3-vits16")
    assert enc.info.random_init and enc.info.num_register_tokens == 4
    assert enc.info.hidden_size == 384 and enc.info.patch_size == 16
    again = load_encoder("dinov3-vits16:random")
    assert again.info.weights_sha256 == enc.info.weights_sha256  # fixed seed


def _spawn_extract(mpath: Path, *args: str, **popen) -> subprocess.Popen:
    """`featstore extract` on `mpath` in its own process (no baseline, no workers)."""
    cmd = [
        str(Path(sys.executable).parent / "featstore"),
        "extract",
        "--manifest",
        str(mpath),
        "--no-baseline",
        "--workers",
        "0",
        *args,
    ]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, **popen)


def _chunks(path: Path) -> dict[str, bytes]:
    return {
        str(f.relative_to(path)): f.read_bytes()
        for f in sorted(path.rglob("*"))
        if f.is_file() and "/c/" in f.as_posix() and not f.name.endswith(".json")
    }


def test_killed_run_resumes_byte_identical(tmp_path, tiny_dinov3):
    # Enough work (72 units at 64 px) that the run is still busy for seconds after its
    # first mark, even when this polling process is slow to be scheduled.
    entry = synth_entry("d", "cls3d", n=24, slices=24)
    extra = "batch_size: 4\nunit_items: 8\n"  # two batches per unit
    (tmp_path / "clean").mkdir()
    clean = write_manifest(tmp_path / "clean", entry, f"['{tiny_dinov3}']", "[64]", extra)
    (ref, _) = _run(clean)
    killed = tmp_path / "killed"
    killed.mkdir()
    mpath = write_manifest(killed, entry, f"['{tiny_dinov3}']", "[64]", extra)
    proc = _spawn_extract(mpath, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marks = killed / "cache" / ref.path.name / "_featstore" / "done" / "c"
    deadline = time.time() + 120
    while time.time() < deadline and not a_mark_written(marks):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    path = killed / "cache" / ref.path.name
    # Whatever the kill interrupted (even a half-written chunk file) must not survive.
    left = FeatureSet(path).pending_units()
    assert 0 < len(left) < ref.items // 8, "the run must be killed part-way"
    (resumed,) = _run(mpath, baseline=False)
    assert resumed.status == "resumed" and 0 < resumed.items < ref.items  # only unmarked units
    assert _chunks(path) == _chunks(ref.path)


def test_shards_split_units_and_end_identical(tmp_path, tiny_dinov3):
    entry = synth_entry("d", "cls3d", n=8, slices=12)
    (tmp_path / "clean").mkdir()
    (ref, _) = _run(
        write_manifest(
            tmp_path / "clean", entry, f"['{tiny_dinov3}']", extra="batch_size: 8\nunit_items: 8\n"
        )
    )
    mpath = write_manifest(
        tmp_path, entry, f"['{tiny_dinov3}']", extra="batch_size: 8\nunit_items: 8\n"
    )
    procs = [
        _spawn_extract(mpath, "--shard", f"{i}/2", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    path = tmp_path / "cache" / ref.path.name
    assert FeatureSet(path).attrs["complete"] and FeatureSet(path).verify() == []
    assert _chunks(path) == _chunks(ref.path)
    assert not list(path.parent.glob(".*tmp*"))  # no leftover skeletons


def test_intermediate_layers_and_float32(tmp_path, tiny_dinov3):
    mpath = write_manifest(
        tmp_path,
        synth_entry("d", "cls2d", n=8),
        f"['{tiny_dinov3}']",
        extra="layers: 2\ndtype: float32\n",
    )
    (s,) = _run(mpath, baseline=False)
    xs = xr.open_zarr(s.path)
    assert xs.cls.dims == ("item", "layer", "channel") and xs.sizes["layer"] == 2
    assert xs.cls.dtype == np.float32 and xs.patch.dtype == np.float32
    # the last layer's CLS is the final-norm CLS that layers: 1 stores
    (one,) = _run(
        write_manifest(
            tmp_path, synth_entry("d", "cls2d", n=8), f"['{tiny_dinov3}']", extra="dtype: float32\n"
        ),
        baseline=False,
    )
    np.testing.assert_allclose(xs.cls.values[:, -1], xr.open_zarr(one.path).cls.values, atol=1e-5)


def test_ls_and_info_commands(tmp_path, tiny_dinov3):
    from typer.testing import CliRunner

    from pipelines.cli import app

    mpath = write_manifest(tmp_path, synth_entry("d", "seg2d", n=8), f"['{tiny_dinov3}']")
    summaries = _run(mpath)
    runner = CliRunner()
    listing = runner.invoke(app, ["ls", str(tmp_path / "cache")])
    assert listing.exit_code == 0
    assert "d " in listing.output and "pixels" in listing.output and "True" in listing.output
    info = runner.invoke(app, ["info", str(summaries[0].path)])
    assert info.exit_code == 0 and '"complete": true' in info.output
    assert '"random_init": false' in info.output


def _small_store(path: Path, rows: int) -> schema.Layout:
    """A 4-item, 2-unit feature set allocated at `path` (no data written)."""
    layout = schema.Layout(
        n_items=4,
        chunk_items=2,
        channels=8,
        layers=1,
        rows=rows,
        cols=rows,
        mask_size=0,
        n_classes=0,
        dtype="float16",
    )
    recipe = a_recipe(resolution=16 * rows or 16, patch=rows > 0)
    weights = small_weights()
    items = schema.Items(list("abcd"), [0] * 4, ["train"] * 4, np.zeros(4, np.int64))
    arrays.create(path, SetIdentity(recipe, "e", weights), layout, items, {"name": "t"})
    return layout


def test_unit_writer_refuses_wrong_shapes(tmp_path):
    _small_store(tmp_path / "s.zarr", rows=2)
    writer = FeatureSet(tmp_path / "s.zarr").writer()
    with pytest.raises(ValueError, match=r"cls: got \(2, 16\) for unit 0, expected \(2, 8\)"):
        writer.write(0, np.zeros((2, 16)), np.zeros((2, 2, 2, 8)), None)
    assert FeatureSet(tmp_path / "s.zarr").pending_units() == [0, 1]  # nothing marked


def test_resume_discards_half_written_chunks(tmp_path):
    path = tmp_path / "s.zarr"
    _small_store(path, rows=0)
    (path / "cls" / "c" / "1").mkdir(parents=True)
    mine = path / "cls" / "c" / "1" / "0.5f3a.partial"
    other = path / "cls" / "c" / "0.9e1b.partial"  # unit 0: another shard's write
    mine.write_bytes(b"half")
    (path / "cls" / "c" / "0").mkdir()
    other.write_bytes(b"half")
    assert FeatureSet(path).discard_partials([1]) == 1
    assert not mine.exists() and other.exists()


def test_extract_leaves_no_state_behind(tmp_path):
    """torch's thread count is restored (a notebook's own setting survives
    `featstore.extract`), and no MedMNIST file stays in memory after it."""
    import torch

    import featstore
    from featstore.data import medmnist

    rng = np.random.default_rng(0)
    splits = ("train", "val", "test")
    data = {f"{s}_images": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8) for s in splits}
    data |= {f"{s}_labels": (np.arange(4) % 2)[:, None].astype(np.uint8) for s in splits}
    np.savez(tmp_path / "m.npz", **data)
    mpath = tmp_path / "manifest.yaml"
    mpath.write_text(
        "cache: cache\nencoders: ['pixels:8']\nresolutions: [32]\nbaseline: 'pixels:8'\n"
        "datasets:\n  - {name: m, format: medmnist, path: m.npz, task: classification, dims: 2}\n"
    )
    before = torch.get_num_threads()
    mine = len(os.sched_getaffinity(0)) + 1  # never the count an extract picks (free cores)
    torch.set_num_threads(mine)
    try:
        (made,) = featstore.extract(mpath, device="cpu", progress=False, echo=lambda *_: None)
        assert made.status == "new" and torch.get_num_threads() == mine
    finally:
        torch.set_num_threads(before)
    assert medmnist._LastNpz.key is None  # the arrays read to list and decode it are dropped


def test_a_repair_only_extract_says_it_repaired(tmp_path):
    """`--repair` that only recomputes a damaged unit used to end `done: 0 new, 0
    resumed, 0 cached`, as if nothing had happened."""
    extra = "batch_size: 4\nunit_items: 4\n"
    mpath = write_manifest(tmp_path, synth_entry("d", "cls2d", n=12), "[]", extra=extra)
    (s,) = _run(mpath)
    next(f for f in (s.path / "cls" / "c").rglob("*") if f.is_file()).unlink()
    lines: list[str] = []
    opts = Options(progress=False, repair=True)
    (fixed,) = extract.run(load_manifest(mpath), opts, echo=lines.append)
    assert fixed.status == "repaired" and fixed.items == 4
    assert lines[-1] == "done: 0 new, 0 resumed, 1 repaired, 0 cached, 0 samples skipped"
