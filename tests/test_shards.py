"""Sharded sets (format 4): a unit of work is one zarr shard of several chunks, units
grow with the set so that its objects stay few, and resume, verify, repair and
`--shard` hold as they did for one chunk a unit."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import a_mark_written, synth_entry, write_manifest
from test_extract import _spawn_extract
from typer.testing import CliRunner

from featstore.data.manifest import load_manifest
from featstore.extraction.run import Options
from featstore.places import files
from featstore.store import arrays
from featstore.store.integrity import Kind
from featstore.store.schema import MARKS
from featstore.store.sets import FeatureSet
from pipelines import extract
from pipelines.cli import app

cli = CliRunner()
SHARDED = "batch_size: 4\nunit_items: 4\nmax_units: 3\n"  # chunks of 4, at most 3 units


def _run(mpath: Path, **opts):
    m = load_manifest(mpath)
    return extract.run(m, Options(progress=False, **opts), baseline=False, echo=lambda *_: None)


def _objects(path: Path) -> dict[str, bytes]:
    """Every data object of a set (shards, chunks of marks), metadata excluded."""
    return {
        str(f.relative_to(path)): f.read_bytes()
        for f in sorted(path.rglob("*"))
        if f.is_file() and "/c/" in f.as_posix()
    }


@pytest.mark.parametrize("encoder", ["pixels:8"])
def test_files_per_set_stay_bounded_as_units_grow(tmp_path, encoder):
    """16, 64 and 256 images in chunks of 2 items: 8 to 128 chunks, but never more than
    4 units (shards), so every set has the same number of files; a format-3 set had
    one file per chunk of every array (about 12 per unit: 1,500 files at 256 items)."""
    counts = {}
    for n in (16, 64, 256):
        work = tmp_path / str(n)
        work.mkdir()
        extra = "batch_size: 2\nunit_items: 2\nmax_units: 4\n"
        mpath = write_manifest(work, synth_entry("d", "cls2d", n=n), f"['{encoder}']", extra=extra)
        (s,) = _run(mpath)
        fs = FeatureSet(s.path)
        layout = fs.layout
        assert layout.chunk_items == 2 and layout.n_units == 4
        assert layout.shard_chunks == n // 8  # units grew, not their number
        assert fs.verify() == []
        counts[n] = len(files(s.path))
    assert counts[16] == counts[64] == counts[256], counts
    assert counts[256] < 128  # fewer files than one array has chunks


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tiny_dinov3):
    """A complete 2D segmentation set of 3 units of 2 chunks (patch tokens and masks),
    and its manifest."""
    work = tmp_path_factory.mktemp("sharded")
    mpath = write_manifest(
        work, synth_entry("d", "seg2d", n=20), f"['{tiny_dinov3}']", extra=SHARDED
    )
    (s,) = _run(mpath)
    layout = FeatureSet(s.path).layout
    assert (layout.chunk_items, layout.shard_chunks, layout.n_units) == (4, 2, 3)
    return mpath, s.path


@pytest.fixture
def copy(sharded, tmp_path):
    mpath, path = sharded
    cache = tmp_path / "cache"
    shutil.copytree(path, cache / path.name)
    text = mpath.read_text().replace("cache: cache", f"cache: {cache}")
    text = text.replace("path: data/d", f"path: {mpath.parent / 'data' / 'd'}")
    (tmp_path / "m.yaml").write_text(text)
    return tmp_path / "m.yaml", cache / path.name


def test_a_sharded_set_is_zarr_sharding_with_a_checksum_per_chunk(sharded):
    _, path = sharded
    meta = json.loads((path / "cls" / "zarr.json").read_text())
    (codec,) = meta["codecs"]
    assert codec["name"] == "sharding_indexed"
    assert codec["configuration"]["chunk_shape"][0] == 4
    assert meta["chunk_grid"]["configuration"]["chunk_shape"][0] == 8  # a shard = a unit
    inner = [c["name"] for c in codec["configuration"]["codecs"]]
    assert inner[-1] == "crc32c"
    assert sorted(p.name for p in (path / "cls" / "c").iterdir()) == ["0", "1", "2"]
    # one object per unit for the coordinates too, and one small chunk per unit of marks
    assert sorted(p.name for p in (path / "sample" / "c").iterdir()) == ["0", "1", "2"]
    assert sorted(p.name for p in (path / MARKS / "c").iterdir()) == ["0", "1", "2"]


@pytest.mark.parametrize("where", ["chunk", "index"])
def test_repair_of_a_damaged_shard_rewrites_its_unit_byte_identical(copy, sharded, where):
    """A flipped byte in one chunk of a shard, or in the shard's index: verify names the
    unit, a probe-side open refuses, and --repair recomputes that unit only (its whole
    shard) and ends byte-identical to the clean set."""
    mpath, path = copy
    shard = path / "patch" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 4 if where == "chunk" else len(data) - 9] ^= 0x10
    shard.write_bytes(bytes(data))
    problems = FeatureSet(path).verify()
    assert [(p.kind, p.array, p.unit) for p in problems] == [(Kind.CHUNK, "patch", 1)]
    out = cli.invoke(app, ["verify", str(path)])
    assert out.exit_code == 1 and "FAIL patch unit 1: checksum mismatch" in out.output
    (fixed,) = _run(mpath, repair=True)
    assert fixed.status == "repaired" and fixed.items == 8  # one unit: 2 chunks of 4
    assert FeatureSet(path).verify() == []
    assert _objects(path) == _objects(sharded[1])


def test_a_lost_shard_is_found_and_repaired(copy, sharded):
    mpath, path = copy
    (path / "cls" / "c" / "2" / "0").unlink()
    assert "cls unit 2: chunk file missing" in [str(p) for p in FeatureSet(path).verify()]
    with pytest.raises(Exception, match="lost chunks"):
        _run(mpath)
    (fixed,) = _run(mpath, repair=True)
    assert fixed.status == "repaired" and fixed.items == 4  # the last unit is one chunk
    assert _objects(path) == _objects(sharded[1])


def test_a_half_written_shard_is_never_counted_done(copy, sharded):
    """What a kill between a unit's data and its mark leaves (its shards written, one of
    them cut short by a store without atomic writes, no mark): the unit is pending,
    and the resume writes its shards whole (never reading the cut one) to the same
    bytes."""
    mpath, path = copy
    root = arrays.group(path, "r+")
    root.attrs["complete"] = False
    (path / MARKS / "c" / "1").unlink()
    cut = path / "cls" / "c" / "1" / "0"
    cut.write_bytes(cut.read_bytes()[:-30])
    assert FeatureSet(path).pending_units() == [1]
    (resumed,) = _run(mpath)
    assert resumed.status == "resumed" and resumed.items == 8
    assert FeatureSet(path).verify() == []
    assert _objects(path) == _objects(sharded[1])


def test_killed_sharded_run_resumes_byte_identical(tmp_path, tiny_dinov3):
    """A run killed after its first unit's mark (units of 6 chunks) resumes to the
    bytes of an uninterrupted run."""
    entry = synth_entry("d", "cls3d", n=24, slices=24)  # 576 slices, 72 chunks of 8
    extra = "batch_size: 4\nunit_items: 8\nmax_units: 12\n"
    (tmp_path / "clean").mkdir()
    (ref,) = _run(write_manifest(tmp_path / "clean", entry, f"['{tiny_dinov3}']", "[64]", extra))
    assert FeatureSet(ref.path).layout.shard_chunks == 6
    killed = tmp_path / "killed"
    killed.mkdir()
    mpath = write_manifest(killed, entry, f"['{tiny_dinov3}']", "[64]", extra)
    proc = _spawn_extract(mpath, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path = killed / "cache" / ref.path.name
    deadline = time.time() + 120
    while time.time() < deadline and not a_mark_written(path / MARKS / "c"):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = FeatureSet(path).pending_units()
    assert 0 < len(left) < 12, "the run must be killed part-way"
    (resumed,) = _run(mpath)
    assert resumed.status == "resumed" and resumed.items == sum(
        len(range(576)[FeatureSet(path).layout.unit_slice(u)]) for u in left
    )
    assert _objects(path) == _objects(ref.path)


def test_two_shard_processes_own_whole_shards_and_end_identical(tmp_path, sharded):
    """`--shard 0/2` and `1/2` at once on a sharded set: each owns whole units (shards),
    so no shard is written by both, and the set equals the one-process set."""
    mpath, ref = sharded
    work = tmp_path / "two"
    shutil.copytree(mpath.parent / "data", work / "data")
    shutil.copy(mpath, work / "manifest.yaml")
    out = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}
    procs = [_spawn_extract(work / "manifest.yaml", "--shard", f"{i}/2", **out) for i in range(2)]
    outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    path = work / "cache" / ref.name
    assert FeatureSet(path).verify() == []
    assert _objects(path) == _objects(ref)
