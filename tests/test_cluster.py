"""Extraction on a 2-worker dask LocalCluster (CPU): byte-identical, survives a lost worker."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import on_cluster, synth_entry, write_manifest

from featstore.data.manifest import load_manifest
from featstore.extraction.run import Encoded, Options
from featstore.store.sets import FeatureSet
from pipelines import extract

distributed = pytest.importorskip("distributed")
EXTRA = "batch_size: 4\nunit_items: 8\n"
UNITS_OF_4 = "batch_size: 4\nunit_items: 4\n"


def _chunks(path):
    return {
        str(f.relative_to(path)): f.read_bytes()
        for f in sorted(path.rglob("*"))
        if f.is_file() and "/c/" in f.as_posix()
    }


@pytest.fixture(scope="module")
def client():
    from featstore.extraction.cluster import client_for

    with client_for("local:2", None, threads=1) as c:
        yield c


def _manifests(tmp_path, tiny_dinov3, n=8, slices=12):
    entry = synth_entry("d", "seg3d", n=n, slices=slices)
    out = []
    for name in ("single", "cluster"):
        (tmp_path / name).mkdir()
        out.append(write_manifest(tmp_path / name, entry, f"['{tiny_dinov3}']", "[32]", EXTRA))
    return out


def test_cluster_extract_is_byte_identical_to_one_process(tmp_path, tiny_dinov3, client):

    single, clustered = _manifests(tmp_path, tiny_dinov3)
    opts = Options(threads=1, progress=False)
    (ref,) = extract.run(load_manifest(single), opts, baseline=False, echo=lambda *_: None)
    lines: list[str] = []
    (got,) = on_cluster(load_manifest(clustered), client, opts, baseline=False, echo=lines.append)
    assert got.status == "new" and got.items == ref.items and got.path.name == ref.path.name
    assert "dask dashboard" in lines[0]
    assert FeatureSet(got.path).verify() == []
    assert _chunks(got.path) == _chunks(ref.path)


def test_the_cluster_prints_the_random_init_note_as_a_local_run_does(tmp_path, client):
    """The embedded ViT-S/16 without weights is a random init: both paths say so once."""
    entry = synth_entry("d", "cls2d", n=6)
    mpath = write_manifest(tmp_path, entry, "[dinov3-vits16]", "[32]", EXTRA)
    opts = Options(threads=1, progress=False)
    printed: dict[str, list[str]] = {"local": [], "cluster": []}
    extract.run(load_manifest(mpath), opts, baseline=False, echo=printed["local"].append)

    manifest = load_manifest(mpath)
    on_cluster(manifest, client, opts, baseline=False, echo=printed["cluster"].append)
    for where, lines in printed.items():
        notes = [x for x in lines if "RANDOM INIT" in x]
        assert len(notes) == 1 and "'dinov3-vits16'" in notes[0], (where, lines)


def test_a_killed_worker_loses_nothing(tmp_path, tiny_dinov3, client):

    single, clustered = _manifests(tmp_path, tiny_dinov3, n=16, slices=16)
    opts = Options(threads=1, progress=False)
    (ref,) = extract.run(load_manifest(single), opts, baseline=False, echo=lambda *_: None)
    pids = list(client.run(os.getpid).values())
    result: dict[str, object] = {}

    def work() -> None:
        m = load_manifest(clustered)
        result["s"] = on_cluster(m, client, opts, baseline=False, echo=lambda *_: None)

    thread = threading.Thread(target=work)
    thread.start()
    marks = clustered.parent / "cache" / ref.path.name / "_featstore" / "done" / "c"
    deadline = time.time() + 120
    while time.time() < deadline and not (marks.is_dir() and any(marks.iterdir())):
        time.sleep(0.01)
    os.kill(pids[0], signal.SIGKILL)  # the nanny starts a new worker; its tasks run again
    thread.join(timeout=300)
    (got,) = result["s"]  # type: ignore[misc]
    assert pids[0] not in client.run(os.getpid).values()  # the worker really was replaced
    assert FeatureSet(got.path).attrs["complete"] and FeatureSet(got.path).verify() == []
    assert _chunks(got.path) == _chunks(ref.path)


def test_streamed_seg_head_on_every_patch_and_probe_on_the_cluster(tmp_path, tiny_dinov3, client):
    from typer.testing import CliRunner

    from featstore.probing.evaluation import probe_set
    from featstore.probing.options import ProbeOptions
    from featstore.probing.streaming import blocks
    from pipelines.cli import app

    mpath = write_manifest(tmp_path, synth_entry("d", "seg2d", n=24), f"['{tiny_dinov3}']", "[64]")
    (s,) = extract.run(load_manifest(mpath), Options(progress=False), baseline=False, echo=print)
    ds = load_manifest(mpath).datasets[0]
    # a bound of 16 MB streams 24 items of 8x8x32 tokens in one block; 0.01 MB item by item
    assert len(list(blocks(24, 8 * 8 * 32, 0.01))) == 24
    streamed = probe_set(s.path, ds, ProbeOptions(memory_mb=0.01)).rows
    linear = [r for r in streamed if r.probe == "seg-linear" and r.metric == "dice"]
    assert linear and linear[0].param_name == "alpha" and linear[0].value > 0.2
    address = client.scheduler.address
    out = tmp_path / "results"
    args = ["probe", "--manifest", str(mpath), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--scheduler", address, "--memory-mb", "16"])
    assert result.exit_code == 0, result.output
    assert "dask dashboard" in result.output and (out / "results.csv").is_file()


@pytest.fixture
def two_threads():
    """An in-process dask cluster of two one-thread workers, with featstore's plugin:
    a test can replace the unit task (tasks are serialized: they talk through files)."""
    from distributed import Client

    from featstore.extraction.cluster import EncoderCache

    with Client(processes=False, n_workers=2, threads_per_worker=1, dashboard_address=":0") as c:
        c.register_plugin(EncoderCache(1))
        yield c


def _unit_1_fails_while_unit_0_runs(tmp_path, client, monkeypatch, name, unit_0) -> Path:  # type: ignore[no-untyped-def]
    """Extract a 3-unit set on `client` where unit 1 fails once unit 0 has started and
    unit 0 then runs `unit_0(job, log)`; the run must raise unit 1's error. Returns the
    folder the units leave their marks in (started-0, and what `unit_0` writes)."""
    from featstore.errors import BadInputError
    from featstore.extraction import cluster

    log = tmp_path / "log"
    log.mkdir()

    def unit_task(prep, job, spec, device, memo, unit):  # type: ignore[no-untyped-def]
        if unit == 1:  # fails once unit 0 is running
            deadline = time.time() + 30
            while not (log / "started-0").exists() and time.time() < deadline:
                time.sleep(0.01)
            raise BadInputError("d/img1.png: not an image")
        (log / f"started-{unit}").touch()
        unit_0(job, log / f"wrote-{unit}")
        return Encoded(items=4, mbytes=0.1)

    monkeypatch.setattr(cluster, "_unit_task", unit_task)
    mpath = write_manifest(
        tmp_path, synth_entry(name, "seg2d", n=12), "['pixels']", extra=UNITS_OF_4
    )
    with pytest.raises(BadInputError, match="not an image"):
        on_cluster(load_manifest(mpath), client, Options(progress=False), baseline=False)
    assert (log / "started-0").exists()
    return log


def test_a_failed_unit_waits_for_running_units_before_the_claim_is_released(
    tmp_path, two_threads, monkeypatch
):
    """Unit 1 fails while unit 0 is mid-unit. A cancel does not stop a running task, so
    the client must not leave the set (and release its claim) until unit 0 has written:
    every write happens under the claim. Before the fix unit 0 wrote after it."""
    from featstore.store import claims

    def unit_0(job, wrote: Path) -> None:  # type: ignore[no-untyped-def]
        time.sleep(1.0)  # encoding...
        held = any(claims.claims_dir(job.fs.path).glob("*.json"))
        wrote.write_text("under the claim" if held else "after the claim")

    log = _unit_1_fails_while_unit_0_runs(tmp_path, two_threads, monkeypatch, "d", unit_0)
    assert (log / "wrote-0").exists()  # returned only after the running unit ended
    time.sleep(1.5)  # nothing is written later either
    wrote = {f.name: f.read_text() for f in log.glob("wrote-*")}
    assert set(wrote.values()) == {"under the claim"}, wrote
    assert not list((tmp_path / "cache").glob(".*.claims/*.json"))  # released at the end


def test_a_hung_unit_is_named_and_not_waited_on_past_the_deadline(
    tmp_path, two_threads, monkeypatch, capsys
):
    """Unit 1 fails while unit 0 hangs. Past the deadline the client stops waiting,
    names the hung unit and its worker, and the error that ended the set is raised."""
    from featstore.extraction import cluster

    def unit_0(job, wrote: Path) -> None:  # type: ignore[no-untyped-def]
        time.sleep(4.0)  # hung, as far as a 0.3 s deadline is concerned
        wrote.touch()

    monkeypatch.setattr(cluster, "SETTLE_DEADLINE", 0.3)
    log = _unit_1_fails_while_unit_0_runs(tmp_path, two_threads, monkeypatch, "hung", unit_0)
    assert not (log / "wrote-0").exists()  # returned without waiting for the hung unit
    err = capsys.readouterr().err
    assert "stopped waiting after 0.3s for cancelled units still running" in err, err
    workers = list(two_threads.scheduler_info()["workers"])
    assert any(f"(unit 0 on {w})" in err for w in workers), err


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again: nothing listens there


def _connect(*args, **kwargs) -> None:
    from featstore.extraction.cluster import client_for

    with client_for(*args, **kwargs):
        pass


def test_client_for_refuses_bad_specs_and_unreachable_schedulers_clearly():
    from featstore.errors import ManifestError, SchedulerUnreachableError

    for spec in ("local:0", "local:x", "remote:2", "local:257"):
        with pytest.raises(ManifestError, match=rf"--cluster '{spec}': expected local:N"):
            _connect(spec, None)
    for both in ((None, None), ("local:2", "tcp://127.0.0.1:8786")):
        with pytest.raises(ManifestError, match="exactly one of --cluster"):
            _connect(*both)
    with pytest.raises(ManifestError, match=r"'nope://x' is not a scheduler address.*tcp://"):
        _connect(None, "nope://x")
    address = f"tcp://127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    with pytest.raises(SchedulerUnreachableError) as caught:
        _connect(None, address, timeout=1.0)
    assert time.monotonic() - t0 < 10
    message = str(caught.value)
    assert address in message and "within 1 s" in message
    assert "dask scheduler" in message and "--cluster local:N" in message


def _cli_extract(mpath, *args: str):
    from typer.testing import CliRunner

    from pipelines.cli import app

    cmd = ["extract", "--manifest", str(mpath), "--no-baseline", "--device", "cpu", *args]
    return CliRunner().invoke(app, cmd)


def test_cli_extract_on_a_local_cluster_and_on_a_scheduler(tmp_path, client):
    """`featstore extract --cluster local:2` and `--scheduler ADDRESS` write the bytes of
    a single-process extract; bad cluster options are one line and exit 2."""
    entry = synth_entry("d", "seg2d", n=12)
    mpath = write_manifest(tmp_path, entry, "['pixels']", extra=UNITS_OF_4)
    (ref,) = extract.run(load_manifest(mpath), Options(progress=False), baseline=False)
    runs = {"--cluster": "local:2", "--scheduler": client.scheduler.address}
    for flag, value in runs.items():
        cache = tmp_path / flag.strip("-")
        result = _cli_extract(mpath, flag, value, "--cache", str(cache))
        assert result.exit_code == 0, result.output
        assert "dask dashboard" in result.output and "done: 1 new" in result.output
        (path,) = cache.glob("*.zarr")
        assert path.name == ref.path.name and FeatureSet(path).verify() == []
        assert _chunks(path) == _chunks(ref.path)
    result = _cli_extract(mpath, "--cluster", "local:0")
    assert result.exit_code == 2 and "expected local:N" in result.output
    result = _cli_extract(mpath, "--cluster", "local:2", "--scheduler", "tcp://x:1")
    assert result.exit_code == 2 and "exactly one of --cluster" in result.output
    import dask

    address = f"tcp://127.0.0.1:{_closed_port()}"
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        result = _cli_extract(mpath, "--scheduler", address)
    assert result.exit_code == 2, result.output  # an error line, not a traceback
    assert f"--scheduler {address}: no dask scheduler answered" in result.output


def test_probe_on_an_unreachable_scheduler_is_one_error_line(tmp_path):
    """`featstore probe --scheduler` connects like extract does (and without torch)."""
    import subprocess
    import sys

    import dask
    from typer.testing import CliRunner

    from pipelines.cli import app

    mpath = write_manifest(tmp_path, synth_entry("d", "seg2d", n=12), "['pixels']")
    address = f"tcp://127.0.0.1:{_closed_port()}"
    args = ["probe", "--manifest", str(mpath), "--scheduler", address]
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert f"--scheduler {address}: no dask scheduler answered within 1 s" in result.output
    code = "import sys, featstore.extraction.cluster; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
