"""A folder or a URL: where feature sets, caches and memo files live, for every room.

A place given as `s3://bucket/prefix`, `gs://bucket/prefix` (or any fsspec protocol
with an async file system, which zarr needs) is a `Remote`; `file://` URLs and plain
paths are `Path`s, so local folders behave exactly as pathlib says. `Remote` offers the
small part of the pathlib API featstore uses. Credentials and endpoints come from the
usual places of each file system (for S3: `AWS_*` variables, `AWS_ENDPOINT_URL` for an
S3-compatible server, ~/.aws), or from fsspec's own configuration.

Also the two helpers every writer shares: `atomic_file` (a local file replaced in one
step) and `pause_point` (where a test lands a kill).
"""

from __future__ import annotations

import fnmatch
import os
import secrets
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import fsspec

from featstore.errors import CacheUnreachableError


class Remote:
    """A path in an fsspec file system, with the pathlib methods the store needs."""

    def __init__(self, url: str, fs: Any = None, path: str | None = None):
        if fs is None or path is None:
            try:
                # No listings cache: zarr and other processes (cluster workers, other
                # shards) write here through file-system instances of their own.
                fs, path = fsspec.core.url_to_fs(url, use_listings_cache=False)
            except ImportError as exc:  # fsspec names the package: "install s3fs ..."
                raise CacheUnreachableError(f"cache {url}: {exc}") from None
            except ValueError as exc:
                raise CacheUnreachableError(
                    f"cache {url}: {exc}; give a folder or a URL such as s3://bucket/prefix "
                    "or gs://bucket/prefix"
                ) from None
        self.fs = fs
        self.path = str(path).rstrip("/")
        protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
        self.protocol = str(protocol)

    def __reduce__(self) -> tuple[type[Remote], tuple[str]]:
        """Pickled as its URL (to cluster workers): each process opens its own file system."""
        return (Remote, (str(self),))

    def _at(self, path: str) -> Remote:
        return Remote(f"{self.protocol}://{path}", self.fs, path)

    def __str__(self) -> str:
        return str(self.fs.unstrip_protocol(self.path))

    def __repr__(self) -> str:
        return f"Remote({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Remote) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __lt__(self, other: Remote) -> bool:
        return str(self) < str(other)

    def __truediv__(self, name: str) -> Remote:
        return self._at(f"{self.path}/{name}")

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def parent(self) -> Remote:
        return self._at(self.path.rsplit("/", 1)[0])

    def with_name(self, name: str) -> Remote:
        return self.parent / name

    def exists(self) -> bool:
        return bool(self.fs.exists(self.path))

    def is_file(self) -> bool:
        return bool(self.fs.isfile(self.path))

    def is_dir(self) -> bool:
        return bool(self.fs.isdir(self.path))

    def read_bytes(self) -> bytes:
        return bytes(self.fs.cat_file(self.path))

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_text(self, text: str) -> None:
        self.fs.pipe_file(self.path, text.encode())

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        self.fs.makedirs(self.path, exist_ok=True)  # object stores have no folders

    def rmdir(self) -> None:
        """Object stores have no empty folders to remove; a local file system raises
        OSError when the folder is not empty, as `Path.rmdir` does."""
        if self.fs.ls(self.path, detail=False):
            raise OSError(f"{self} is not empty")

    def glob(self, pattern: str) -> Iterator[Remote]:
        """Direct children whose name matches `pattern` (the folder's own name is
        taken literally, brackets and all)."""
        try:
            children = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return
        for p in sorted(children):
            child = self._at(str(p).rstrip("/"))
            if fnmatch.fnmatchcase(child.name, pattern):
                yield child


Place = Path | Remote


def place(where: str | os.PathLike[str] | Remote) -> Place:
    """A cache folder or set: `Remote` for URLs like s3://bucket/prefix, else a Path."""
    if isinstance(where, (Path, Remote)):
        return where
    text = os.fspath(where)
    if text.startswith("file://"):  # file:///abs, file://localhost/abs, file://rel
        rest = text.removeprefix("file://")
        return Path(
            "/" + rest.removeprefix("localhost/") if rest.startswith("localhost/") else rest
        )
    if "://" in text:
        return Remote(text)
    return Path(text)


def is_url(where: str | os.PathLike[str]) -> bool:
    """True for a remote URL (s3://, gs://, ...); file:// and plain paths are local."""
    return isinstance(place(where), Remote)


def reachable(where: Place, write: bool = False) -> None:
    """Raise `CacheUnreachableError` unless the cache at `where` can be listed (and,
    with `write`, written): a wrong endpoint, bucket or credential fails here, once,
    with a message, not in the middle of an extract. A local folder always passes."""
    if not isinstance(where, Remote):
        return
    try:
        if write:
            probe = where / f".featstore-write-test-{socket.gethostname()}-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        else:
            where.fs.ls(where.path, detail=False)
    except FileNotFoundError:  # an empty prefix reads as no sets; a missing bucket fails
        bucket = where.path.split("/")[0]
        if write or not where.fs.exists(bucket):
            raise CacheUnreachableError(
                f"cannot {'write to' if write else 'read'} the cache {where}: the bucket "
                f"'{bucket}' does not exist; create it or give another --cache"
            ) from None
    except Exception as exc:  # noqa: BLE001 - botocore, gcsfs, aiohttp errors differ by driver
        verb = "write to" if write else "read"
        raise CacheUnreachableError(
            f"cannot {verb} the cache {where} ({type(exc).__name__}: {str(exc)[:200]}); check "
            "the URL, the credentials and the endpoint (for S3: AWS_* variables, ~/.aws, "
            "AWS_ENDPOINT_URL)"
        ) from None


TEST_PAUSE = "FEATSTORE_TEST_PAUSE_AT"


def pause_point(name: str) -> None:
    """`FEATSTORE_TEST_PAUSE_AT=<name>:<file>`: at the point `name` ("removing": a set
    renamed aside, not yet deleted; "publishing": a skeleton built, not yet renamed into
    place; "results": a results, prediction or attention file written to its temporary
    name, not yet renamed into place), write this pid to `file` and wait there to be
    killed (at most 10 minutes). The tests' way of landing a kill exactly there."""
    at, _, file = os.environ.get(TEST_PAUSE, "").partition(":")
    if at == name and file:
        Path(file).write_text(str(os.getpid()))
        time.sleep(600)


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file to write `path`'s new bytes into; `path` changes in one step.

    The bytes go to `<name>.<random>.tmp` beside `path`, are fsynced, and the file is
    renamed over `path` (`os.replace`) when the block ends without an error: a kill
    or an error midway leaves the previous file whole (and, after a kill, that
    temporary file). Local folders only: results folders are (`--out` is a path).
    """
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with tmp.open("wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        pause_point("results")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def glob(where: Place, pattern: str) -> list[Place]:
    """The children of `where` whose names match `pattern`, sorted."""
    found: list[Place] = list(where.glob(pattern))
    return sorted(found, key=str)


def files(where: Place) -> set[str]:
    """Every file under `where`, as '/'-joined paths relative to it (one listing)."""
    if isinstance(where, Remote):
        found = where.fs.find(where.path) if where.fs.isdir(where.path) else []
        return {p[len(where.path) + 1 :] for p in found}
    out = set()
    for folder, _, names in os.walk(where):
        rel = os.path.relpath(folder, where)
        for n in names:
            out.add(n if rel == "." else f"{rel}/{n}".replace(os.sep, "/"))
    return out


def size(where: Place) -> int:
    """Bytes of every file under `where`."""
    if isinstance(where, Remote):
        return int(where.fs.du(where.path, total=True)) if where.fs.isdir(where.path) else 0
    return sum(f.stat().st_size for f in where.rglob("*") if f.is_file())
