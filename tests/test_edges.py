"""Trust at the edges: read-only caches, full disks and signals in every phase.

Tests run as root here, and root ignores permission bits, so `chmod -R a-w` proves
nothing. A read-only cache is made two ways: a read-only bind mount (the real
thing; skipped where `mount` is not allowed), and a simulated one that needs no
privilege: an audit hook (`sys.addaudithook`) that makes every write under the cache
folder (open for writing, mkdir, rename, remove) fail with EROFS, as the kernel
would. The same hook fakes a full disk (ENOSPC) for chosen files only.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import synth_entry, write_manifest
from typer.testing import CliRunner

from featstore.api import open_features
from featstore.data.fingerprint import MEMO_NAME
from featstore.data.manifest import load_manifest
from featstore.errors import (
    BadInputError,
    CacheReadOnlyError,
    FeatstoreError,
    StoreBusyError,
)
from featstore.extraction.guard import TEST_SIGNAL
from featstore.extraction.run import Encoded, Options
from featstore.store import claims
from featstore.store.location import HOST_ENV, leftover
from featstore.store.sets import FeatureSet
from pipelines import extract
from pipelines.cli import app

runner = CliRunner()

# ------------------------------------------------------------ a fake file system

_FAULTS: list[tuple[int, Callable[[str], bool]]] = []
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_PATH_EVENTS = {"os.mkdir", "os.remove", "os.rmdir", "os.truncate", "os.chmod", "os.utime"}


def _audit(event: str, args: tuple[object, ...]) -> None:
    if not _FAULTS:
        return
    if event == "open":
        flags = args[2]
        paths = [args[0]] if isinstance(flags, int) and flags & _WRITE_FLAGS else []
    elif event in _PATH_EVENTS:
        paths = [args[0]]
    elif event == "os.rename":  # os.rename and os.replace
        paths = [args[0], args[1]]
    else:
        return
    for p in paths:
        if isinstance(p, (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(p))
            for code, hit in _FAULTS:
                if hit(path):
                    raise OSError(code, os.strerror(code), path)


sys.addaudithook(_audit)  # audit hooks cannot be removed: it acts only while _FAULTS is set


@contextlib.contextmanager
def failing(code: int, hit: Callable[[str], bool]) -> Iterator[None]:
    """Writes to paths for which `hit` is true fail with `code` (EROFS, ENOSPC)."""
    _FAULTS.append((code, hit))
    try:
        yield
    finally:
        _FAULTS.remove((code, hit))


def under(folder: Path) -> Callable[[str], bool]:
    root = os.path.abspath(folder)
    return lambda p: p == root or p.startswith(root + os.sep)


@contextlib.contextmanager
def read_only(folder: Path, how: str) -> Iterator[None]:
    """`folder` read-only: a read-only bind mount, or simulated (see the module doc)."""
    if how == "simulated":
        with failing(errno.EROFS, under(folder)):
            yield
        return
    bind = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
    if bind.returncode != 0:
        pytest.skip(
            "a read-only bind mount needs root with CAP_SYS_ADMIN (mount --bind); the "
            f"'simulated' variant covers the same code here: {bind.stderr.decode()[:200]}"
        )
    try:
        ro = subprocess.run(
            ["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True, check=True
        )
        assert ro.returncode == 0
        with pytest.raises(OSError) as exc:  # truly read-only, even for root
            (folder / "probe").write_text("x")
        assert exc.value.errno == errno.EROFS
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=False)


# ------------------------------------------------------------ a small cache

SPACED = "shared cache ü é"  # a path with spaces and non-ASCII characters


def _run(mpath: Path, **opts):
    m = load_manifest(mpath)
    return extract.run(m, Options(progress=False, **opts), baseline=False, echo=lambda *_: None)


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_dinov3):
    """A complete 2D segmentation set under a folder whose path has spaces and
    non-ASCII characters, and its manifest."""
    work = tmp_path_factory.mktemp("edges") / "data ü x"
    work.mkdir()
    extra = f"batch_size: 4\nunit_items: 4\ncache: '{work / SPACED}'\n"
    mpath = write_manifest(work, synth_entry("d", "seg2d", n=12), f"['{tiny_dinov3}']", extra=extra)
    mpath.write_text(mpath.read_text().replace("cache: cache\n", ""))
    (summary,) = _run(mpath)
    assert summary.status == "new" and " " in str(summary.path)
    return mpath, summary.path


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("how", ["simulated", "mount"])
def test_a_read_only_cache_is_read_and_an_extract_that_must_write_says_so(made, how, tmp_path):
    mpath, path = made
    cache = path.parent
    (cache / MEMO_NAME).unlink(missing_ok=True)  # fingerprinting would write a new memo
    before = _tree(cache)
    with read_only(cache, how):
        (again,) = _run(mpath)  # every set cached: nothing to write
        assert again.status == "cached"
        out = tmp_path / "results"
        probed = runner.invoke(app, ["probe", "-m", str(mpath), "--out", str(out)])
        assert probed.exit_code == 0 and "probed" in probed.output, probed.output
        xs = open_features(mpath, "d", load_manifest(mpath).encoders[0])
        assert xs.sizes["item"] == 12
        for args in (["ls", str(cache)], ["info", str(path)], ["verify", str(path)]):
            result = runner.invoke(app, args)
            assert result.exit_code == 0, (args, result.output)
        with pytest.raises(CacheReadOnlyError, match=rf"{cache} is read-only.*--cache DIR"):
            _run(mpath, overwrite=True)  # must write: said plainly
        new = runner.invoke(app, ["extract", "-m", str(mpath), "--no-baseline", "-r", "64"])
        assert new.exit_code == 2 and "is read-only" in new.output, new.output
        assert "Traceback" not in new.output
    assert _tree(cache) == before  # not one byte written


# ------------------------------------------------------------ full disks outside the loop


@pytest.fixture
def fresh(made, tmp_path):
    """The manifest of `made` with an empty cache of its own (memo already made)."""
    mpath, path = made
    cache = tmp_path / SPACED
    cache.mkdir()
    if (path.parent / MEMO_NAME).is_file():  # a read-only test above may have removed it
        shutil.copy(path.parent / MEMO_NAME, cache / MEMO_NAME)
    text = mpath.read_text().replace(str(path.parent), str(cache))
    (tmp_path / "m.yaml").write_text(text)
    return tmp_path / "m.yaml", cache


@pytest.mark.parametrize(
    "where",
    [
        "memo",  # the file-hash memo, written while fingerprinting
        "claim",  # the claim file beside the set
        "skeleton",  # the temporary skeleton of a new set
        "units",  # a chunk of unit 1, while computing (as a really full disk would:
        # tests/test_trust.py's tmpfs variant, where `mount` is allowed)
        "finish",  # the root zarr.json written when the set is marked complete
    ],
)
def test_a_full_disk_in_any_phase_is_the_disk_full_message(fresh, where):
    mpath, cache = fresh
    if where == "memo":
        (cache / MEMO_NAME).unlink(missing_ok=True)
    hits = {
        "memo": lambda p: MEMO_NAME in p,
        "claim": lambda p: ".claims" in p,
        "skeleton": lambda p: ".zarr.tmp" in p,
        "units": lambda p: f".zarr{os.sep}patch{os.sep}c{os.sep}1{os.sep}" in p,
        "finish": lambda p: p.endswith(".zarr" + os.sep + "zarr.json") and ".claims" not in p,
    }
    size = "" if where == "memo" else r".*the set needs about \d+ MB"  # no set yet: no size
    full = pytest.raises(FeatstoreError, match=rf"cache folder {cache} is full{size}")
    with failing(errno.ENOSPC, hits[where]), full:
        _run(mpath)
    if where == "units":  # stopped midway: what is marked done is written
        (path,) = cache.glob("*.zarr")
        assert 1 in FeatureSet(path).pending_units()
        assert FeatureSet(path).verify(require_complete=False) == []
    (summary,) = _run(mpath)  # space again: the same command finishes the set
    assert summary.status in ("new", "resumed") and FeatureSet(summary.path).verify() == []


# ------------------------------------------------------------ signals outside the loop


@pytest.mark.parametrize(
    ("phase", "sig", "doing"),
    [
        ("listing", signal.SIGINT, "listing and fingerprinting"),
        ("loading", signal.SIGTERM, "loading the encoder"),
        ("allocating", signal.SIGINT, "allocating"),
        ("computing", signal.SIGTERM, "computing units"),
        ("finishing", signal.SIGTERM, "finishing"),
    ],
)
def test_a_signal_in_any_phase_exits_cleanly(fresh, monkeypatch, phase, sig, doing):
    """The process sends itself the signal as it enters the phase (FEATSTORE_TEST_SIGNAL_AT):
    the CLI's own handler turns it into a clean stop, deterministically."""
    mpath, _ = fresh
    monkeypatch.setenv(TEST_SIGNAL, f"{phase}:{sig.name}")
    args = ["extract", "-m", str(mpath), "--no-baseline", "--workers", "0"]
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where pytest runs in a background job
    result = runner.invoke(app, args)
    assert result.exit_code == 128 + sig, result.output
    last = result.output.strip().splitlines()[-1]
    assert f"stopped by {sig.name} while {doing}" in last and "rerun" in last, result.output
    assert "Traceback" not in result.output
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    monkeypatch.delenv(TEST_SIGNAL)
    (summary,) = _run(mpath)
    assert FeatureSet(summary.path).verify() == []


# ------------------------------------------------------------ shared storage, --overwrite

DEAD = 2**22 + 17  # no such pid (pid_max is 2**22)


@pytest.fixture
def shared(made, tmp_path):
    """A private copy of the set of `made` and a manifest pointing at it."""
    mpath, path = made
    cache = tmp_path / SPACED
    shutil.copytree(path.parent, cache)
    (tmp_path / "m.yaml").write_text(mpath.read_text().replace(str(path.parent), str(cache)))
    return tmp_path / "m.yaml", cache / path.name


def _claim_of(path: Path, host: str, pid: int, **extra: object) -> Path:
    folder = claims.claims_dir(path)
    folder.mkdir(exist_ok=True)
    info = {"host": host, "pid": pid, "started": time.time(), "beat": time.time(), **extra}
    (folder / f"{host}-{pid}.json").write_text(json.dumps(info))
    return folder / f"{host}-{pid}.json"


def test_overwrite_refuses_beside_a_live_shard_and_the_start_up_race_is_safe(shared):
    mpath, path = shared
    before = _tree(path)
    other = _claim_of(path, "node-b", 4242)  # a live shard on another node
    with pytest.raises(StoreBusyError, match=r"pid 4242 on node-b .*is extracting"):
        _run(mpath, overwrite=True, shard=(0, 2))
    other.unlink()
    # An --overwrite that claimed the set but has not yet deleted it: a plain run (of
    # any shard) that starts now refuses instead of writing units that will be destroyed.
    _claim_of(path, "node-b", 4242, replacing=True)
    with pytest.raises(StoreBusyError, match=r"node-b is replacing this set"):
        _run(mpath, shard=(1, 2))
    assert _tree(path) == before


def test_leftovers_and_claims_are_judged_only_by_their_own_host(shared, monkeypatch):
    """Two hosts (FEATSTORE_HOST) share one folder: a pid is only meaningful on its host."""
    _, path = shared
    cache = path.parent
    monkeypatch.setenv(HOST_ENV, "node-a")
    assert leftover(path, "tmp").name == f".{path.name}.tmp{os.getpid()}@node-a"
    names = [f".{path.name}.{k}{DEAD}@{h}" for k in ("tmp", "old") for h in ("node-a", "b.lab")]
    for n in names:
        (cache / n).mkdir()
    claim = _claim_of(path, "node-a", DEAD)
    removed = claims.clean_leftovers(cache)
    assert sorted(p.name for p in removed) == sorted(n for n in names if "node-a" in n)
    monkeypatch.setenv(HOST_ENV, "b.lab")  # node-a's dead pid cannot be judged here
    assert [c["host"] for c in claims.live_claims(path)] == ["node-a"]
    monkeypatch.setenv(HOST_ENV, "node-a")  # but it can there
    assert claims.live_claims(path) == [] and not claim.exists()
    monkeypatch.setenv(HOST_ENV, "b.lab")
    assert {p.name for p in claims.clean_leftovers(cache)} == {n for n in names if "b.lab" in n}


# ------------------------------------------------------------ the cluster


@pytest.fixture(scope="module")
def threads_client():
    """An in-process dask cluster (one worker thread), so that a test can replace the
    unit task by a function that fails as it wants."""
    from distributed import Client

    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=":0") as c:
        yield c


def _fake_job(name: str) -> SimpleNamespace:
    return SimpleNamespace(
        fs=SimpleNamespace(name=name),  # task keys are per set: one name per run
        ident=SimpleNamespace(weights=None, recipe=SimpleNamespace(resolution=32)),
        opts=SimpleNamespace(progress=False),
    )


def test_a_unit_that_fails_once_is_rerun_and_bad_input_is_not(
    threads_client, monkeypatch, tmp_path
):
    from featstore.extraction import cluster

    log = tmp_path / "calls"  # tasks are serialized even in-process: count in a file
    log.touch()

    def calls() -> list[int]:
        return [int(v) for v in log.read_text().split()]

    def flaky(*args: object) -> Encoded:
        unit = int(args[-1])  # type: ignore[call-overload]
        first = unit not in calls()
        with log.open("a") as f:
            f.write(f"{unit}\n")
        if unit == 1 and first:
            raise ConnectionError("the store did not answer (once)")
        return Encoded(items=4, mbytes=0.5)

    prep = SimpleNamespace(ds=SimpleNamespace(name="d"))  # what the runner scatters
    monkeypatch.setattr(cluster, "_unit_task", flaky)
    runner = cluster.ClusterRunner.on(threads_client, Options(progress=False))
    got = runner.run_units(prep, "enc", _fake_job("flaky.zarr"), [0, 1, 2])
    assert got == Encoded(items=12, mbytes=1.5)
    assert sorted(calls()) == [0, 1, 1, 2]  # unit 1 twice: failed once, then succeeded

    def bad(*args: object) -> Encoded:
        with log.open("a") as f:
            f.write(f"{args[-1]}\n")
        if args[-1] == 0:
            raise BadInputError("d/img0.png: not an image")
        time.sleep(0.5)
        return Encoded(items=4, mbytes=0.5)

    log.write_text("")
    monkeypatch.setattr(cluster, "_unit_task", bad)
    with pytest.raises(BadInputError, match="not an image"):
        runner.run_units(prep, "enc", _fake_job("bad.zarr"), [0, 1, 2, 3, 4, 5])
    time.sleep(1.5)  # cancelled units do not start
    assert calls().count(0) == 1 and len(calls()) <= 3, calls()  # not retried; rest cancelled


def test_device_auto_resolves_on_the_workers(threads_client):
    import torch

    from featstore.extraction.cluster import resolve_device

    assert resolve_device(threads_client, "auto") == (
        "cuda" if torch.cuda.is_available() else "cpu"
    )
    assert resolve_device(threads_client, "cpu") == "cpu"


def test_local_workers_spread_over_the_gpus():
    """Each worker of `--cluster local:N --device cuda` sees one GPU of its own. No GPU
    is needed to check the environment the workers get (GPU ids given to the code)."""
    from featstore.extraction.cluster import client_for, worker_envs

    assert worker_envs(3, ["0", "1"]) == [
        {"CUDA_VISIBLE_DEVICES": "0"},
        {"CUDA_VISIBLE_DEVICES": "1"},
        {"CUDA_VISIBLE_DEVICES": "0"},
    ]
    assert worker_envs(2, []) == [{}, {}]
    with client_for("local:2", None, device="cuda", gpus=["0", "1"]) as client:
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))  # in the worker
    assert sorted(seen.values()) == ["0", "1"]


# ------------------------------------------------------------ smaller holes


def test_writer_buffers_are_taken_and_handed_back_under_the_lock(made):
    """The GPU path's pinned buffers are shared by the main thread (taking one) and the
    writer threads (handing it back): every use of the free list holds the lock. (A
    race cannot be provoked reliably; the list checks the lock on each call instead.
    No GPU here: a buffer of the right size is on the list, so none is allocated.)"""
    import numpy as np
    import torch

    from featstore.extraction.writer import UnitQueue, _Buffers

    _, path = made
    fs = FeatureSet(path)
    queue = UnitQueue(fs.writer(), fs.layout, lambda a, *_: a, 1)

    class Checked(list):  # type: ignore[type-arg]
        def pop(self, *args: object) -> object:
            assert queue.lock.locked(), "free list taken from without the lock"
            return super().pop(*args)

        def append(self, item: object) -> None:
            assert queue.lock.locked(), "free list handed back to without the lock"
            super().append(item)

    buf = _Buffers(
        torch.zeros(4, 8), None, torch.ones(4, dtype=torch.bool), None, np.zeros(4, bool)
    )
    queue.free = Checked()
    with queue.lock:
        queue.free.append(buf)
    got = queue._buffers(4, torch.zeros(4, 8), None, False)
    assert got is buf
    queue.close()


def test_the_make_it_with_hint_pastes_with_spaces_in_paths(made, tmp_path):
    import shlex

    mpath, _ = made
    empty = tmp_path / "no sets ü here"
    empty.mkdir()
    text = mpath.read_text()
    start = text.index("cache: '")
    end = text.index("'\n", start + 8)
    (tmp_path / "other m.yaml").write_text(text[:start] + f"cache: '{empty}'" + text[end + 1 :])
    out = runner.invoke(
        app, ["probe", "-m", str(tmp_path / "other m.yaml"), "--out", str(tmp_path)]
    )
    line = next(ln for ln in out.output.splitlines() if "make it with" in ln)
    cmd = shlex.split(line.split("make it with `")[1].split("`")[0])
    assert cmd[cmd.index("--cache") + 1] == str(empty)
    assert cmd[cmd.index("--manifest") + 1] == str(tmp_path / "other m.yaml")


def test_cpu_features_do_not_depend_on_the_thread_count(tiny_dinov3):
    """The default thread count follows the machine's load (`free_cores`), so a resumed
    run may use another count: its bytes must not depend on it (shown here for the
    production encoder path; benchmarks/thread_bytes.py shows it for ViT-S/16 @ 224)."""
    import numpy as np
    import torch

    from featstore.encode.encoders import load_encoder

    enc = load_encoder(str(tiny_dinov3), "cpu", None)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    try:
        out = []
        for t in (1, 3):
            torch.set_num_threads(t)
            fb = enc.encode(x, 1, (-1,))
            out.append((fb.cls.numpy().copy(), fb.patch.numpy().copy()))
    finally:
        torch.set_num_threads(before)
    assert all(np.array_equal(a, b) for a, b in zip(out[0], out[1], strict=True))


class _SignalsInItsFinalizer:
    """An object whose `__del__` receives SIGTERM, as nibabel's finalizers once did in
    a real run: the handler's exception is then swallowed ("Exception ignored")."""

    def __del__(self) -> None:
        signal.raise_signal(signal.SIGTERM)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # its point
def test_a_signal_swallowed_by_a_finalizer_still_stops_the_phase(tmp_path):
    from featstore.errors import Interrupted, StopRequested
    from featstore.extraction import guard
    from pipelines.cli import _stop_on_signals

    with _stop_on_signals():
        with pytest.raises(Interrupted) as stopped, guard.phase("computing", tmp_path):
            _SignalsInItsFinalizer()  # dropped at once: __del__ runs here, raise swallowed
            time.sleep(0.01)  # the phase's work goes on as if nothing happened
        assert stopped.value.signum == signal.SIGTERM
    assert StopRequested.pending is None  # the handler's state does not outlive the run
