"""Failures of an extract turned into errors that say what was kept and what to do.

Every phase of an extract (listing and fingerprinting the data, loading the encoder,
allocating a set, computing its units, finishing it) runs inside `phase(...)`: a
SIGINT/SIGTERM there ends in `Interrupted` (exit 130/143, how to resume), a full disk
in the disk-full message, a read-only cache in `CacheReadOnlyError`, never a traceback.

`FEATSTORE_TEST_SIGNAL_AT=<phase>:<SIGNAL>` makes the process send itself the signal
when it enters that phase: the tests' deterministic way of stopping it there.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

from featstore.errors import (
    CacheReadOnlyError,
    CacheUnreachableError,
    FeatstoreError,
    Interrupted,
    StopRequested,
    is_read_only,
)
from featstore.store.sets import FeatureSet

PHASES = {
    "listing": "listing and fingerprinting the data",
    "loading": "loading the encoder",
    "allocating": "allocating the feature set",
    "computing": "computing units",
    "finishing": "finishing the feature set",
}
TEST_SIGNAL = "FEATSTORE_TEST_SIGNAL_AT"


def checkpoint(name: str) -> None:
    """Send this process the signal that `FEATSTORE_TEST_SIGNAL_AT` asks for at `name`."""
    at, _, sig = os.environ.get(TEST_SIGNAL, "").partition(":")
    if at == name:
        signal.raise_signal(signal.Signals[sig or "SIGINT"])


@contextlib.contextmanager
def phase(
    name: str, cache: Path | str, fs: FeatureSet | None = None, set_mb: float | None = None
) -> Iterator[None]:
    """Run one phase of an extract (`PHASES`) on the set `fs` (of `set_mb` MB
    uncompressed); its failures become featstore errors."""
    try:
        checkpoint(name)
        yield
        StopRequested.check()  # a signal whose exception a finalizer swallowed
    except (KeyboardInterrupt, StopRequested) as exc:
        raise interrupted(exc, PHASES[name], fs) from None
    except FeatstoreError:
        raise
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise disk_full(cache, fs, set_mb) from None
        if is_read_only(exc) and not (fs is not None and fs.remote):
            raise read_only(cache, exc) from None
        if fs is not None and fs.remote and name == "computing":
            raise lost(fs, exc) from exc
        raise
    except Exception as exc:
        if fs is not None and fs.remote and name == "computing":
            raise lost(fs, exc) from exc
        raise


def interrupted(exc: BaseException, doing: str, fs: FeatureSet | None) -> Interrupted:
    """The error for a SIGINT/SIGTERM: what was kept, and how to resume."""
    signum = exc.signum if isinstance(exc, StopRequested) else signal.SIGINT
    kept = "nothing was written yet"
    if fs is not None and fs.exists():
        try:
            done, total = fs.units_done()
            kept = f"{done} of {total} units of {fs.name} are written and kept"
        except (OSError, ValueError, FeatstoreError):
            kept = f"what {fs.name} holds is kept"
    return Interrupted(
        f"stopped by {signal.Signals(signum).name} while {doing}: {kept}; "
        "rerun the same command to resume",
        int(signum),
    )


def lost(fs: FeatureSet, exc: BaseException) -> CacheUnreachableError:
    """The error for a remote cache that failed while units were being written."""
    return CacheUnreachableError(
        f"lost the cache while writing {fs} ({type(exc).__name__}: {str(exc)[:200]}); "
        "the units written so far are kept: rerun the same command to resume once the "
        "store answers again"
    )


def read_only(cache: Path | str, exc: OSError) -> CacheReadOnlyError:
    """The error for an extract that must write to a cache it may only read."""
    return CacheReadOnlyError(
        f"the cache folder {cache} is read-only ({exc.strerror}: {exc.filename}); this "
        "extract must write to it (a new, unfinished or damaged feature set). Cached sets "
        "are read without writing: to make new ones, pass --cache DIR on a writable disk "
        "or make the folder writable, then rerun the same command"
    )


def disk_full(cache: Path | str, fs: FeatureSet | None, set_mb: float | None) -> FeatstoreError:
    """The error for ENOSPC: names the cache folder, the set's size and free space."""
    need = "" if set_mb is None else f"; the set needs about {set_mb:.0f} MB uncompressed"
    what = f" while writing {fs.name}" if fs is not None else ""
    if not isinstance(cache, Path):  # a full local disk: temporary files, not the bucket
        return FeatstoreError(
            f"no space left on the local disk{what} to {cache}; free space in the "
            "temporary folder ($TMPDIR) and the memo folder ($FEATSTORE_HOME), then rerun "
            "the same command"
        )
    free = shutil.disk_usage(cache).free / 1e6 if cache.exists() else 0.0
    return FeatstoreError(
        f"the cache folder {cache} is full (no space left on device){what}{need}, "
        f"{free:.0f} MB are free. Free space or pass --cache DIR on a "
        "larger disk, then rerun the same command: units already written are kept"
    )
