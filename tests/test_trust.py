"""Trust the cache: corrupt, delete, truncate, edit, kill, interrupt; never a silent score."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zarr
from conftest import REPO, synth_entry, write_manifest
from typer.testing import CliRunner

from featstore import places
from featstore.data.manifest import load_manifest
from featstore.errors import FeatstoreError, StoreBusyError
from featstore.extraction.run import Options
from featstore.probing.evaluation import probe_set
from featstore.store import claims
from featstore.store.integrity import Kind
from featstore.store.sets import FeatureSet
from pipelines import extract
from pipelines.cli import app

runner = CliRunner()
ARRAYS = ["cls", "patch", "mask", "sample", "slice", "split"]


def _run(mpath: Path, **opts):
    m = load_manifest(mpath)
    return extract.run(m, Options(progress=False, **opts), baseline=False, echo=lambda *_: None)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_dinov3):
    """A complete 2D segmentation set of 3 units, and its manifest."""
    work = tmp_path_factory.mktemp("ref")
    extra = "batch_size: 4\nunit_items: 4\n"
    mpath = write_manifest(work, synth_entry("d", "seg2d", n=12), f"['{tiny_dinov3}']", extra=extra)
    (summary,) = _run(mpath)
    return mpath, summary.path


@pytest.fixture
def copy(reference, tmp_path):
    """A private copy of the reference set (and its manifest pointing at the copy)."""
    mpath, path = reference
    cache = tmp_path / "cache"
    shutil.copytree(path, cache / path.name)
    text = mpath.read_text().replace("cache: cache", f"cache: {cache}")
    text = text.replace("path: data/d", f"path: {mpath.parent / 'data' / 'd'}")
    (tmp_path / "m.yaml").write_text(text)
    return tmp_path / "m.yaml", cache / path.name


def _chunk(path: Path, name: str, unit: int) -> Path:
    chunk = path / name / "c" / str(unit)
    return chunk if chunk.is_file() else next(p for p in sorted(chunk.rglob("*")) if p.is_file())


def _damage(file: Path, how: str) -> None:
    data = file.read_bytes()
    if how == "flip":  # a byte of the payload (a mark's chunk is 1 byte and its crc32c)
        i = len(data) - 9 if len(data) > 9 else 0
        file.write_bytes(data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1 :])
    elif how == "truncate":
        file.write_bytes(data[: len(data) // 2])
    else:
        file.unlink()


def _probe(mpath: Path, path: Path):
    return probe_set(path, load_manifest(mpath).datasets[0])


@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
@pytest.mark.parametrize("name", ARRAYS)
def test_damaged_chunk_fails_verify_and_probe(copy, name, how):
    mpath, path = copy
    _damage(_chunk(path, name, 1), how)
    result = runner.invoke(app, ["verify", str(path)])
    assert result.exit_code == 1, result.output
    assert f"FAIL {name} unit 1:" in result.output
    assert "Traceback" not in result.output
    kinds = {(p.kind, p.array, p.unit) for p in FeatureSet(path).verify()}
    assert (Kind.CHUNK, name, 1) in kinds
    with pytest.raises(FeatstoreError, match=r"verify|repair|extract"):
        _probe(mpath, path)


def _chunks(path: Path) -> dict[str, bytes]:
    return {
        str(f.relative_to(path)): f.read_bytes()
        for f in sorted(path.rglob("*"))
        if f.is_file() and "/c/" in f.as_posix()
    }


@pytest.mark.parametrize("name", ["cls", "patch", "mask", "split"])
def test_repair_recomputes_only_bad_units_byte_identical(copy, reference, name):
    mpath, path = copy
    _damage(_chunk(path, name, 2), "flip")
    (cached,) = _run(mpath)
    assert cached.status == "cached"  # a plain run does not read every chunk
    (fixed,) = _run(mpath, repair=True)
    assert fixed.status == "repaired" and fixed.items == (4 if name != "split" else 0)
    assert FeatureSet(path).verify() == []
    assert _chunks(path) == _chunks(reference[1])


def _edit_attrs(path: Path, edit) -> None:
    root = zarr.open_group(path, mode="r+", use_consolidated=False)
    attrs = dict(root.attrs)
    edit(attrs)
    root.attrs.put(attrs)


@pytest.mark.parametrize(
    "edit",
    [
        lambda a: a["preprocess"].update(resolution=64),
        lambda a: a["identity"]["recipe"].update(resolution=64),
        lambda a: a.update(skipped={"img0000": "edited"}),
        lambda a: a["encoder"].update(random_init=True),
        lambda a: a["layout"].update(n_items="lots"),
        lambda a: a["layout"].update(bogus=1),
        lambda a: a["layout"].update(rows=7),
    ],
    ids=[
        "readable-resolution",
        "identity",
        "skipped",
        "encoder",
        "layout-type",
        "layout-key",
        "layout-shape",
    ],
)
def test_edited_attributes_are_caught(copy, edit):
    mpath, path = copy
    _edit_attrs(path, edit)
    result = runner.invoke(app, ["verify", str(path)])
    assert result.exit_code == 1 and "FAIL attributes" in result.output, result.output
    with pytest.raises(FeatstoreError):
        _probe(mpath, path)


def test_consolidated_metadata_that_disagrees_is_caught_and_not_used(copy):
    mpath, path = copy
    meta = json.loads((path / "zarr.json").read_text())
    meta["consolidated_metadata"]["metadata"]["cls"]["shape"][0] = 8
    (path / "zarr.json").write_text(json.dumps(meta))
    result = runner.invoke(app, ["verify", str(path)])
    assert result.exit_code == 1 and "FAIL metadata" in result.output, result.output
    rows = _probe(mpath, path).rows  # reads go by the arrays' own metadata
    assert rows and all(r.n_test > 0 for r in rows)


@pytest.mark.filterwarnings("ignore:Object at .* is not recognized:UserWarning")  # the damage
@pytest.mark.parametrize("name", ["patch", "mask", "sample"])
def test_an_array_without_its_metadata_is_caught_and_not_repaired(copy, name):
    """Its zarr.json gone, zarr skips the array; a repair used to re-consolidate the set
    without it and verify then said ok."""
    mpath, path = copy
    (path / name / "zarr.json").unlink()
    result = runner.invoke(app, ["verify", str(path)])
    assert result.exit_code == 1 and f"FAIL metadata: array '{name}'" in result.output
    with pytest.raises(FeatstoreError, match=f"array '{name}'"):
        _probe(mpath, path)
    with pytest.raises(FeatstoreError, match="cannot be repaired"):
        _run(mpath, repair=True)
    assert runner.invoke(app, ["verify", str(path)]).exit_code == 1


def test_invalid_json_is_a_clear_error(copy):
    mpath, path = copy
    (path / "zarr.json").write_text("{ not json")
    result = runner.invoke(app, ["verify", str(path)])
    assert (
        result.exit_code == 1 and "FAIL metadata" in result.output and "zarr.json" in result.output
    )
    with pytest.raises(FeatstoreError, match=r"zarr.json"):
        _probe(mpath, path)
    listing = runner.invoke(app, ["ls", str(path.parent)])
    assert listing.exit_code == 0 and "zarr.json" in listing.output


def test_folder_without_root_metadata_is_rebuilt(copy, reference):
    mpath, path = copy
    (path / "zarr.json").unlink()  # what a kill during a non-atomic delete left
    (summary,) = _run(mpath)
    assert summary.status == "new" and _chunks(path) == _chunks(reference[1])


def test_leftovers_of_dead_processes_are_cleaned(copy):
    mpath, path = copy
    dead = 2**22 + 17  # no such pid (pid_max is 2**22)
    for stem in (f".{path.name}.tmp{dead}", f".{path.name}.old{dead}"):
        (path.parent / stem).mkdir()
    mine = path.parent / f".{path.name}.tmp{os.getpid()}"  # a live process's: kept
    mine.mkdir()
    _run(mpath)
    assert sorted(p.name for p in path.parent.glob(".*.zarr.*")) == [mine.name]


def test_overwrite_refuses_while_another_process_works(copy):
    mpath, path = copy
    with claims.claim(path):  # this process "extracts" the set
        other = subprocess.run(
            [
                str(Path(sys.executable).parent / "featstore"),
                "extract",
                "--manifest",
                str(mpath),
                "--no-baseline",
                "--overwrite",
                "--workers",
                "0",
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
    assert other.returncode == 2, other.stdout + other.stderr
    assert f"pid {os.getpid()}" in other.stderr and "is extracting" in other.stderr
    assert (path / "zarr.json").is_file()  # nothing deleted
    claims.claims_dir(path).mkdir()
    stale = claims.claims_dir(path) / "somehost-1.json"
    stale.write_text(json.dumps({"host": os.uname().nodename, "pid": 2**22 + 17, "started": 0}))
    (summary,) = _run(mpath, overwrite=True)  # a dead process's claim is taken over
    assert summary.status == "new" and not list(claims.claims_dir(path).glob("*.json"))


def test_claims_beat_and_other_hosts_expire(copy, monkeypatch):
    """A claim is rewritten while its extract runs; one from another host (whose pid
    cannot be checked here) counts until CLAIM_STALE seconds pass without a beat."""
    _, path = copy
    monkeypatch.setattr(claims, "CLAIM_BEAT", 0.05)
    with claims.claim(path):
        (mine,) = claims.claims_dir(path).glob("*.json")
        first = json.loads(mine.read_text())["beat"]
        time.sleep(0.3)
        assert json.loads(mine.read_text())["beat"] > first
    folder = claims.claims_dir(path)
    folder.mkdir()
    now = time.time()
    for name, beat in (("fresh", now - 30), ("gone", now - claims.CLAIM_STALE - 1)):
        info = {"host": f"node-{name}", "pid": 1, "started": now - 7200, "beat": beat}
        (folder / f"node-{name}-1.json").write_text(json.dumps(info))
    assert [c["host"] for c in claims.live_claims(path)] == ["node-fresh"]
    assert not (folder / "node-gone-1.json").exists()
    with pytest.raises(StoreBusyError, match=r"node-fresh.*expires 10 minutes"):
        claims.refuse_if_busy(path, "replacing it")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_cleanly_and_says_how_to_resume(tmp_path, tiny_dinov3, sig):
    entry = synth_entry("d", "cls3d", n=24, slices=24)
    mpath = write_manifest(tmp_path, entry, f"['{tiny_dinov3}']", "[64]", "batch_size: 4\n")
    cmd = [str(Path(sys.executable).parent / "featstore"), "extract", "--manifest", str(mpath)]
    proc = subprocess.Popen(
        [*cmd, "--no-baseline", "--workers", "0"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 120
    marks = list((tmp_path / "cache").glob("*.zarr/_featstore/done/c"))
    while time.time() < deadline and not (marks and any(marks[0].iterdir())):
        time.sleep(0.01)
        marks = list((tmp_path / "cache").glob("*.zarr/_featstore/done/c"))
    proc.send_signal(sig)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + sig, out
    last = out.strip().splitlines()[-1]
    assert "rerun" in last and "resume" in last, out
    (path,) = (tmp_path / "cache").glob("*.zarr")
    assert (
        FeatureSet(path).pending_units() and FeatureSet(path).verify(require_complete=False) == []
    )
    (resumed,) = _run(mpath)
    assert resumed.status == "resumed" and FeatureSet(path).verify() == []


@pytest.mark.parametrize("point", ["removing", "publishing"])
def test_kill_during_overwrite_leaves_a_usable_cache(copy, reference, point, tmp_path):
    """The kill lands inside the overwrite, at a named point: the old set renamed aside
    but not deleted (removing), or the new skeleton built but not in place (publishing).
    The process pauses there (FEATSTORE_TEST_PAUSE_AT) until it is killed."""
    mpath, path = copy
    paused = tmp_path / "paused"
    cmd = [str(Path(sys.executable).parent / "featstore"), "extract", "--manifest", str(mpath)]
    proc = subprocess.Popen(
        [*cmd, "--no-baseline", "--workers", "0", "--overwrite"],
        cwd=REPO,
        env={**os.environ, places.TEST_PAUSE: f"{point}:{paused}"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not paused.exists():  # the process says it is there, and waits
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the overwrite never paused at '{point}' (exit {proc.poll()})")
        time.sleep(0.01)
    kind = "old" if point == "removing" else "tmp"
    assert not path.exists() and list(path.parent.glob(f".{path.name}.{kind}*"))
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL  # killed there, not ended on its own
    (summary,) = _run(mpath)  # a plain run afterwards: no traceback, a whole set
    assert summary.status == "new"
    assert FeatureSet(path).verify() == [] and _chunks(path) == _chunks(reference[1])
    assert not list(path.parent.glob(f".{path.name}.old*")) and not list(
        path.parent.glob(f".{path.name}.tmp*")
    )


def test_full_disk_names_the_cache_and_marks_nothing_unwritten(tmp_path, tiny_dinov3):
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(
            "a really full disk needs a 1 MB tmpfs: run as root where `mount -t tmpfs` is "
            "allowed (a VM, or a container with CAP_SYS_ADMIN); tests/test_edges.py::"
            "test_a_full_disk_in_any_phase_is_the_disk_full_message covers the same phases "
            f"(memo, claim, skeleton, units, finish) without it: {mounted.stderr.decode()[:200]}"
        )
    try:
        entry = synth_entry("d", "seg2d", n=64)  # ~2 MB of tokens and masks at 128 px
        extra = "batch_size: 4\nunit_items: 4\ncodec: none\n"
        mpath = write_manifest(tmp_path, entry, f"['{tiny_dinov3}']", "[128]", extra)
        mpath.write_text(mpath.read_text().replace("cache: cache", f"cache: {small}"))
        with pytest.raises(FeatstoreError, match=rf"cache folder {small} is full.*needs about"):
            _run(mpath)
        (path,) = small.glob("*.zarr")
        assert FeatureSet(path).pending_units()  # it did run out of space
        assert FeatureSet(path).verify(require_complete=False) == []  # marked = written
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_a_complete_set_that_lost_a_chunk_is_not_reported_cached(copy, reference):
    mpath, path = copy
    _damage(_chunk(path, "mask", 1), "delete")
    with pytest.raises(FeatstoreError, match=r"lost chunks \(mask unit 1.*--repair"):
        _run(mpath)
    (fixed,) = _run(mpath, repair=True)
    assert fixed.status == "repaired" and _chunks(path) == _chunks(reference[1])


@pytest.mark.parametrize("how", ["delete", "flip"])
def test_a_lost_or_damaged_mark_of_a_complete_set_is_found_and_repaired(copy, reference, how):
    """Marks are data: a lost mark made a plain run ask for --repair, and --repair found
    nothing (a missing mark read as a pending unit), so the advice looped."""
    mpath, path = copy
    _damage(_chunk(path, "_featstore/done", 1), how)
    result = runner.invoke(app, ["verify", str(path)])
    assert result.exit_code == 1 and "FAIL _featstore/done unit 1:" in result.output
    if how == "delete":
        with pytest.raises(FeatstoreError, match=r"lost chunks \(_featstore/done unit 1.*--repair"):
            _run(mpath)
    (fixed,) = _run(mpath, repair=True)
    assert fixed.status == "repaired" and fixed.items == 4
    assert FeatureSet(path).verify() == [] and _chunks(path) == _chunks(reference[1])
