"""Claims of live extracts, and leftovers of dead ones.

A claim file per live process (host, pid, start time, last beat) makes an extract
visible to others, so `--overwrite` never deletes a set someone is writing; the
temporary skeletons and sets renamed aside by processes that died are removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from featstore.errors import StoreBusyError
from featstore.store.arrays import LOCAL_BUILD
from featstore.store.location import Place, Remote, glob, place


def claims_dir(path: Place) -> Place:
    """Where live extracts of the set at `path` leave their claim files."""
    return path.parent / f".{path.name}.claims"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# A live extract rewrites its claim every CLAIM_BEAT seconds. A claim from another
# host (a cluster node, another machine on shared storage) whose last beat is older
# than CLAIM_STALE is a process that died there: its pid cannot be checked from here.
CLAIM_BEAT = 60.0
CLAIM_STALE = 600.0


def live_claims(path: Place) -> list[dict[str, Any]]:
    """Claims of other live processes on this set; stale ones (a dead pid on this host,
    no beat for CLAIM_STALE seconds from another host) are removed."""
    here = socket.gethostname()
    out = []
    folder = claims_dir(path)
    for f in glob(folder, "*.json") if folder.is_dir() else []:
        try:
            info = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # half-written by a process that is starting: not a claim yet
        if info.get("host") == here and info.get("pid") == os.getpid():
            continue
        mine = info.get("host") == here
        beat = float(info.get("beat", info.get("started", 0)))
        if (mine and not _alive(int(info.get("pid", -1)))) or (
            not mine and time.time() - beat > CLAIM_STALE
        ):
            f.unlink(missing_ok=True)
            continue
        out.append({**info, "file": str(f)})
    return out


@contextlib.contextmanager
def claim(path: Place) -> Iterator[None]:
    """Mark this process as extracting the set at `path` for the duration; the claim
    is rewritten every CLAIM_BEAT seconds so that other hosts can tell it is alive."""
    folder = claims_dir(path)
    folder.mkdir(parents=True, exist_ok=True)
    me = folder / f"{socket.gethostname()}-{os.getpid()}.json"
    started = time.time()

    def write() -> None:
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": started}
        me.write_text(json.dumps({**info, "beat": time.time()}))

    write()
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(CLAIM_BEAT):
            with contextlib.suppress(Exception):  # best effort: a missed beat is harmless
                write()

    beating = threading.Thread(target=beat, name="featstore-claim", daemon=True)
    beating.start()
    try:
        yield
    finally:
        stop.set()
        beating.join()
        # Best effort: a cache that stopped answering must not hide the error that
        # ended the extract (a claim left behind is taken over by the next run here).
        with contextlib.suppress(Exception):
            me.unlink(missing_ok=True)
        with contextlib.suppress(Exception):
            folder.rmdir()  # only when no other claim is left


def refuse_if_busy(path: Place, action: str) -> None:
    """Raise `StoreBusyError` when another live process works on the set at `path`."""
    for c in live_claims(path):
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(c.get("started", 0))))
        raise StoreBusyError(
            f"{path}: pid {c.get('pid')} on {c.get('host')} (since {started}) is extracting "
            f"this set; {action} would destroy its work. Wait for it or stop it; if that "
            f"process is gone, delete {c['file']} (a claim from another host expires "
            f"{CLAIM_STALE / 60:.0f} minutes after its last beat)"
        )


def clean_leftovers(cache: Place | str) -> list[Path]:
    """Remove temporary skeletons and sets renamed aside by processes that died here
    (for a remote cache: the local folders its skeletons were built in)."""
    removed: list[Path] = []
    cache = place(cache)
    if isinstance(cache, Remote):
        for p in sorted(Path(tempfile.gettempdir()).glob(f"{LOCAL_BUILD}*")):
            pid = p.name.removeprefix(LOCAL_BUILD).split("-")[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        return removed
    for p in sorted(cache.glob(".*.zarr.*")):
        tag = p.name.rsplit(".", 1)[-1]
        pid = tag[3:]
        if tag[:3] in ("tmp", "old") and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed
