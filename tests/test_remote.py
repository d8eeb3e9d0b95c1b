"""A cache on an object store: extract, probe, ls, info, verify and repair against a
local S3-compatible server (moto in server mode on 127.0.0.1), byte-identical to a
cache on a local disk."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import on_cluster
from typer.testing import CliRunner

from featstore import places
from featstore.data.manifest import load_manifest
from featstore.probing.options import ProbeOptions
from featstore.store import arrays, catalog, claims, location, sets
from featstore.store.sets import FeatureSet
from pipelines import extract
from pipelines.cli import app
from pipelines.probe import run as probe_run
from tests.conftest import synth_entry, write_manifest

pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e '.[dev]')")
pytest.importorskip("moto", reason="moto is not installed (pip install -e '.[dev]')")

BUCKET = "featstore-test"


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on a free port of 127.0.0.1; skipped when it cannot start."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.skip("the moto S3 server did not start on 127.0.0.1")
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def s3(s3_server, monkeypatch, request):
    """An empty bucket prefix on the server, reachable by this process and children."""
    for k, v in {
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(k, v)
    import s3fs

    fs = s3fs.S3FileSystem()  # the same server (and env) for the whole module
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    return f"s3://{BUCKET}/{request.node.name}/cache"


def _manifest(tmp: Path, kind: str, cache: str, encoder: Path) -> Path:
    # several units, each a shard of several chunks (2D: 2 units of 2; 3D: 3 of 8)
    extra = f"cache: {cache}\nbatch_size: 4\nunit_items: 4\nmax_units: 3\n"
    return write_manifest(tmp, synth_entry("d", kind, n=16), f"['{encoder}']", extra=extra)


def _extract(mpath: Path, **opts):
    return extract.run(
        load_manifest(mpath),
        extract.Options(progress=False, num_workers=0, **opts),
        baseline=False,
        echo=lambda *_: None,
    )


def _objects(where: places.Place) -> dict[str, bytes]:
    """Every chunk of a set, by its path in the set (metadata excluded)."""
    return {
        rel: (where / rel).read_bytes()
        for rel in sorted(places.files(where))
        if "/c/" in f"/{rel}" and not rel.endswith(".json")
    }


def test_place_parses_urls_and_paths(tmp_path):
    assert places.place(f"file://{tmp_path}") == tmp_path
    assert places.place(f"file://localhost{tmp_path}") == tmp_path
    assert places.place("cache/x") == Path("cache/x")
    remote = places.place("memory://bucket/prefix")
    assert isinstance(remote, places.Remote)
    assert str(remote / "a.zarr").startswith("memory://")
    assert str(remote / "a.zarr").endswith("bucket/prefix/a.zarr")
    assert places.place(str(remote / "a.zarr")) == remote / "a.zarr"  # round trip
    assert (remote / "a.zarr").parent == remote and (remote / "a.zarr").name == "a.zarr"


@pytest.mark.parametrize("kind", ["seg2d"])
def test_s3_cache_extract_probe_verify_repair(tmp_path, tiny_dinov3, s3, kind):
    (tmp_path / "local").mkdir()
    local = _manifest(tmp_path / "local", kind, "cache", tiny_dinov3)
    (ref,) = _extract(local)
    remote = _manifest(tmp_path, kind, s3, tiny_dinov3)
    (made,) = _extract(remote)
    assert made.status == "new" and isinstance(made.path, places.Remote)
    assert str(made.path).startswith(s3) and made.path.name == ref.path.name
    assert _objects(made.path) == _objects(ref.path)  # byte-identical to a local cache
    assert FeatureSet(made.path).verify() == []
    (again,) = _extract(remote)
    assert again.status == "cached"

    # probe reads it back (dask over fsspec) and scores it like the local set
    quiet = ProbeOptions(baseline=False)
    df_s3 = probe_run(load_manifest(remote), tmp_path / "res-s3", quiet, echo=lambda *_: None)
    df_local = probe_run(load_manifest(local), tmp_path / "res-local", quiet, echo=lambda *_: None)
    cols = ["probe", "metric", "value"]
    assert len(df_s3) and df_s3[cols].equals(df_local[cols])

    # ls / info / verify take the URL
    cli = CliRunner()
    out = cli.invoke(app, ["ls", s3])
    assert out.exit_code == 0 and made.path.name[:12] in out.output
    assert made.path.name.startswith(catalog.list_sets(s3)[0]["key"])
    out = cli.invoke(app, ["info", str(made.path)])
    assert out.exit_code == 0 and '"complete": true' in out.output
    out = cli.invoke(app, ["verify", str(made.path)])
    assert out.exit_code == 0, out.output

    # a flipped byte in a patch chunk: verify names it, a probe refuses, --repair mends it
    victim = made.path / "patch" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.fs.pipe_file(victim.path, bytes(data))
    out = cli.invoke(app, ["verify", str(made.path)])
    assert out.exit_code == 1 and "FAIL patch unit 0: checksum mismatch" in out.output
    (mended,) = _extract(remote, repair=True)
    assert mended.status == "repaired"
    assert _objects(made.path) == _objects(ref.path)

    # a lost chunk: the plain extract refuses to call it cached
    (made.path / "cls" / "c" / "0" / "0").unlink()
    with pytest.raises(Exception, match="lost chunks"):
        _extract(remote)

    # --overwrite replaces it whole
    (fresh,) = _extract(remote, overwrite=True)
    assert fresh.status == "new" and _objects(made.path) == _objects(ref.path)


def test_s3_cache_cli_and_resume(tmp_path, tiny_dinov3, s3):
    """The CLI takes --cache URL; a set whose units were lost resumes to the same bytes."""
    (tmp_path / "local").mkdir()
    (ref,) = _extract(_manifest(tmp_path / "local", "cls3d", "cache", tiny_dinov3))
    mpath = _manifest(tmp_path, "cls3d", "cache", tiny_dinov3)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [str(Path(sys.executable).parent / "featstore"), "extract", "--manifest", str(mpath)]
    cmd += ["--no-baseline", "--workers", "0", "--cache", s3]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    path = FeatureSet.at(s3, ref.path.name.removesuffix(".zarr")).path
    assert _objects(path) == _objects(ref.path)
    assert not (tmp_path / "cache").exists()  # nothing went to the manifest's folder

    # forget two units as a killed run would have left them; the rerun recomputes them
    arrays.reset_units(path, [0, 2])
    assert FeatureSet(path).pending_units() == [0, 2]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "resumed" in done.stdout, done.stdout + done.stderr
    assert _objects(path) == _objects(ref.path) and FeatureSet(path).verify() == []


@pytest.mark.slow
def test_s3_cache_on_a_local_cluster(tmp_path, tiny_dinov3, s3):
    """Workers write their units straight to the object store; same bytes as one process."""
    pytest.importorskip("distributed")
    from featstore.extraction.cluster import client_for

    (tmp_path / "local").mkdir()
    opts = extract.Options(threads=1, progress=False, num_workers=0)
    local = load_manifest(_manifest(tmp_path / "local", "seg3d", "cache", tiny_dinov3))
    (ref,) = extract.run(local, opts, baseline=False, echo=lambda *_: None)
    remote = load_manifest(_manifest(tmp_path, "seg3d", s3, tiny_dinov3))
    with client_for("local:2", None, threads=1) as client:  # workers inherit AWS_* here
        (got,) = on_cluster(remote, client, opts, baseline=False, echo=lambda *_: None)
    assert got.status == "new" and isinstance(got.path, places.Remote)
    assert FeatureSet(got.path).verify() == [] and _objects(got.path) == _objects(ref.path)


def test_s3_cache_on_two_dask_workers(tmp_path, s3):
    """The cluster path against the object store, small enough for every run (the slow
    test above does it with worker processes and a ViT): two in-process workers write
    their units of a pixel-baseline set straight to S3; same bytes as one process."""
    distributed = pytest.importorskip("distributed")
    from featstore.extraction.cluster import EncoderCache

    (tmp_path / "local").mkdir()
    opts = extract.Options(threads=1, progress=False, num_workers=0)
    local = load_manifest(_manifest(tmp_path / "local", "seg2d", "cache", "pixels:8"))
    (ref,) = extract.run(local, opts, baseline=False, echo=lambda *_: None)
    remote = load_manifest(_manifest(tmp_path, "seg2d", s3, "pixels:8"))
    with distributed.Client(
        processes=False, n_workers=2, threads_per_worker=1, dashboard_address=":0"
    ) as client:
        client.register_plugin(EncoderCache(1))
        with distributed.get_task_stream(client) as stream:
            (got,) = on_cluster(remote, client, opts, baseline=False, echo=print)
    ran = sorted(t["key"].rsplit("-", 1)[-1] for t in stream.data if "-unit-" in t["key"])
    assert ran == ["0", "1"]  # each unit was a task on a worker
    assert got.status == "new" and isinstance(got.path, places.Remote)
    assert str(got.path).startswith(s3) and got.path.name == ref.path.name
    assert FeatureSet(got.path).verify() == [] and _objects(got.path) == _objects(ref.path)


def test_bad_cache_urls_are_clear_errors(tmp_path, tiny_dinov3, s3):
    import featstore
    from featstore.errors import CacheUnreachableError

    with pytest.raises(CacheUnreachableError, match="Protocol not known: nope"):
        places.place("nope://bucket/x")
    missing = "s3://no-such-bucket-here/cache"
    with pytest.raises(CacheUnreachableError, match=r"no-such-bucket-here.*does not exist"):
        _extract(_manifest(tmp_path, "cls2d", missing, tiny_dinov3))
    with pytest.raises(CacheUnreachableError, match=r"cannot write to .*no-such-bucket-here"):
        featstore.extract(  # the Python API checks the cache as the command does
            _manifest(tmp_path, "cls2d", missing, tiny_dinov3), baseline=False, progress=False
        )
    out = CliRunner().invoke(app, ["ls", "nope://x"])
    assert out.exit_code == 2 and "Protocol not known" in out.output
    out = CliRunner().invoke(app, ["ls", missing])
    assert out.exit_code == 2 and "'no-such-bucket-here' does not exist" in out.output
    out = CliRunner().invoke(app, ["ls", f"{s3}-empty-prefix"])
    assert out.exit_code == 0 and "no feature sets" in out.output
    assert load_manifest(_manifest(tmp_path, "cls2d", s3, tiny_dinov3)).cache == s3


def test_s3_two_shards_allocating_at_once_one_wins(tmp_path, s3, monkeypatch):
    """Both shards saw no set; the later root upload loses (If-None-Match) instead of
    overwriting the first skeleton's root zarr.json."""
    dest = places.place(s3) / "x.zarr"
    for tag in ("first", "second"):
        built = tmp_path / tag / "x.zarr"
        (built / "cls").mkdir(parents=True)
        (built / "cls" / "zarr.json").write_text("{}")
        (built / "zarr.json").write_text(tag)
    assert location.publish(tmp_path / "first" / "x.zarr", dest)
    monkeypatch.setattr(places.Remote, "exists", lambda self: False)  # looked too early
    assert not location.publish(tmp_path / "second" / "x.zarr", dest)
    assert dest.fs.cat_file(f"{dest.path}/zarr.json") == b"first"
    assert not (tmp_path / "second" / "x.zarr").exists()


def test_s3_shard_meeting_a_skeleton_in_upload_allocates_too(tmp_path, tiny_dinov3, s3):
    """Objects without a root zarr.json and a live claim: another shard is uploading
    its skeleton. This one races it fairly instead of failing (busy, or no group)."""
    mpath = _manifest(tmp_path, "cls2d", s3, tiny_dinov3)
    (ref,) = _extract(mpath)
    path, before = ref.path, _objects(ref.path)
    half = (path / "cls" / "zarr.json").read_bytes()
    location.remove(path)
    path.fs.pipe_file(f"{path.path}/cls/zarr.json", half)  # an upload under way
    host = socket.gethostname()
    other = {"host": host, "pid": os.getppid(), "started": time.time()}  # alive
    (claims.claims_dir(path) / f"{host}-{os.getppid()}.json").write_text(json.dumps(other))
    (got,) = _extract(mpath)
    assert got.status == "new" and FeatureSet(path).verify() == [] and _objects(path) == before


def test_a_lost_server_is_one_error_saying_units_are_kept(tmp_path, tiny_dinov3, s3, monkeypatch):
    """The store stops answering mid-extract: a CacheUnreachableError that says how to
    resume (not a driver traceback), and the rerun finishes the set."""
    from featstore.errors import CacheUnreachableError

    class EndpointGone(Exception):  # like botocore's errors: not an OSError
        pass

    mpath = _manifest(tmp_path, "cls3d", s3, tiny_dinov3)
    real_write = sets.UnitWriter.write
    calls = {"n": 0}

    def flaky(self, unit, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise EndpointGone("the endpoint stopped answering")
        return real_write(self, unit, *args, **kwargs)

    monkeypatch.setattr(sets.UnitWriter, "write", flaky)
    with pytest.raises(CacheUnreachableError, match="units written so far are kept"):
        _extract(mpath, writers=1)
    monkeypatch.setattr(sets.UnitWriter, "write", real_write)
    (done,) = _extract(mpath)
    assert done.status == "resumed" and FeatureSet(done.path).verify() == []


def test_dead_local_builds_of_remote_skeletons_are_removed(tmp_path, s3, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True).stdout.strip()  # fmt: skip
    left = tmp_path / f"{arrays.LOCAL_BUILD}{dead}-abc" / "x.zarr"
    left.mkdir(parents=True)
    mine = tmp_path / f"{arrays.LOCAL_BUILD}{os.getpid()}-abc"
    mine.mkdir()
    assert claims.clean_leftovers(s3) == [left.parent]
    assert not left.parent.exists() and mine.exists()
