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
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from featstore.errors import StoreBusyError, is_read_only
from featstore.places import Place, Remote, glob, place
from featstore.store.arrays import LOCAL_BUILD
from featstore.store.location import LEFTOVER, this_host


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
    here = this_host()
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
            with contextlib.suppress(OSError):  # a read-only cache keeps it
                f.unlink(missing_ok=True)
            continue
        out.append({**info, "file": str(f)})
    return out


class Claim:
    """This process's claim on a set; `replacing` while an --overwrite deletes it."""

    def __init__(self, path: Place, replacing: bool) -> None:
        self.file = claims_dir(path) / f"{this_host()}-{os.getpid()}.json"
        self.started = time.time()
        self.replacing = replacing

    def write(self) -> None:
        info = {"host": this_host(), "pid": os.getpid(), "started": self.started}
        self.file.write_text(json.dumps({**info, "replacing": self.replacing, "beat": time.time()}))

    def replaced(self) -> None:
        """The old set is gone: other processes may now join the new one."""
        if self.replacing:
            self.replacing = False
            self.write()


@contextlib.contextmanager
def claim(path: Place, replacing: bool = False) -> Iterator[Claim | None]:
    """Mark this process as extracting the set at `path` for the duration; the claim
    is rewritten every CLAIM_BEAT seconds so that other hosts can tell it is alive.

    `replacing` (an --overwrite): other processes refuse to start on the set until
    `Claim.replaced` is called. Every process writes its claim first and looks at the
    others' after, so of two that start at once, at least one sees the other.
    Yields None (no claim) on a cache this process may not write.
    """
    me = Claim(path, replacing)
    try:
        me.file.parent.mkdir(parents=True, exist_ok=True)
        me.write()
    except OSError as exc:
        if not is_read_only(exc):
            raise
        # A cache this process may not write needs no claim: it cannot write the set
        # either (a write that follows fails, and the extract says so plainly).
        yield None
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(CLAIM_BEAT):
            with contextlib.suppress(Exception):  # best effort: a missed beat is harmless
                me.write()

    beating = threading.Thread(target=beat, name="featstore-claim", daemon=True)
    beating.start()
    try:
        yield me
    finally:
        stop.set()
        beating.join()
        # Best effort: a cache that stopped answering must not hide the error that
        # ended the extract (a claim left behind is taken over by the next run here).
        with contextlib.suppress(Exception):
            me.file.unlink(missing_ok=True)
        with contextlib.suppress(Exception):
            me.file.parent.rmdir()  # only when no other claim is left


def refuse_if_replacing(path: Place) -> None:
    """Raise `StoreBusyError` when another live process is replacing the set (--overwrite)."""
    for c in live_claims(path):
        if c.get("replacing"):
            raise StoreBusyError(
                f"{path}: pid {c.get('pid')} on {c.get('host')} is replacing this set "
                "(extract --overwrite); rerun this command once it has started writing the "
                f"new set (if that process is gone, delete {c['file']})"
            )


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
    here = this_host()
    for p in sorted(cache.glob(".*.zarr.*")):
        m = LEFTOVER.match(p.name)
        # Only the host that made a leftover can tell whether its process is alive (a
        # pid means nothing on another node of a shared file system); older featstores
        # named no host: theirs are judged here, as they always were.
        if m is None or (m["host"] or here) != here or _alive(int(m["pid"])):
            continue
        shutil.rmtree(p, ignore_errors=True)  # a read-only cache keeps them
        if not p.exists():
            removed.append(p)
    return removed
