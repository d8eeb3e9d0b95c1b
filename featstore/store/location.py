"""How a feature set appears and vanishes in one step, in a folder or on an object store
(the place itself, `Path` or `Remote`, is `featstore.places`).

- `publish` makes a set appear in one step: locally by renaming a finished temporary
  folder; on an object store by uploading every object but the root `zarr.json`, and
  that one last, by an exclusive write where the store has one (S3's If-None-Match),
  so that of two shards allocating at once one wins (a set without its root
  `zarr.json` counts as absent);
- `remove` makes it vanish in one step: locally by renaming it aside first, on an
  object store by deleting its root `zarr.json` first;
- `leftover` names what a process leaves beside a set while it builds or deletes it.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
from pathlib import Path

from featstore.places import Place, files, pause_point

ROOT_META = "zarr.json"


HOST_ENV = "FEATSTORE_HOST"
# The leftovers of a process: a set's skeleton being built (tmp) or a set renamed
# aside to be deleted (old), named by pid and host (older featstores: pid only).
LEFTOVER = re.compile(r"^\.(?P<set>.+\.zarr)\.(?P<kind>tmp|old)(?P<pid>\d+)(?:@(?P<host>.+))?$")


def this_host() -> str:
    """This machine's name in claims and leftovers: $FEATSTORE_HOST, else its host name
    (set it where several machines or containers share one host name)."""
    return os.environ.get(HOST_ENV) or socket.gethostname()


def leftover(where: Path, kind: str) -> Path:
    """The sibling folder this process builds the set at `where` in ("tmp") or moves it
    aside to ("old"); see `LEFTOVER`."""
    return where.with_name(f".{where.name}.{kind}{os.getpid()}@{this_host()}")


def has_set(where: Place) -> bool:
    """Whether a feature set is at `where`: its root zarr.json is a file. A folder or
    prefix without it is no set (a kill during a delete, an upload in progress)."""
    return (where / ROOT_META).is_file()


def publish(built: Path, dest: Place) -> bool:
    """Move the finished set folder `built` (local) to `dest` in one visible step.

    Returns False, and deletes `built`, when `dest` already exists (another process
    published first: its set is kept). On an object store, `dest` exists once its
    root zarr.json does; another shard may be uploading the rest meanwhile.
    """
    if isinstance(dest, Path):
        pause_point("publishing")
        try:
            os.rename(built, dest)
        except OSError as exc:
            shutil.rmtree(built, ignore_errors=True)
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):  # another shard published
                return False
            raise  # a full disk, a read-only cache: not a race that someone won
        return True
    if has_set(dest):
        shutil.rmtree(built)
        return False
    # Everything but the root first, in one concurrent batch (a skeleton has a few
    # objects per unit); a shard racing us uploads the same bytes there.
    rels = sorted(files(built) - {ROOT_META})
    dest.fs.put([str(built / rel) for rel in rels], [f"{dest.path}/{rel}" for rel in rels])
    root = (built / ROOT_META).read_bytes()
    try:  # the root last, and only if no other shard's root landed since the check above
        dest.fs.pipe_file(f"{dest.path}/{ROOT_META}", root, mode="create")
    except FileExistsError:
        return False
    except (TypeError, NotImplementedError):  # a file system without exclusive writes
        dest.fs.pipe_file(f"{dest.path}/{ROOT_META}", root)
    finally:
        shutil.rmtree(built)
    return True


def remove(where: Place) -> None:
    """Delete a set so that a kill midway leaves either the whole set or no set."""
    if isinstance(where, Path):
        aside = leftover(where, "old")
        os.rename(where, aside)
        pause_point("removing")
        shutil.rmtree(aside)
        return
    (where / ROOT_META).unlink(missing_ok=True)  # from here on, the set is absent
    objects = [f"{where.path}/{rel}" for rel in sorted(files(where))]
    if any(c in where.path for c in "*?["):  # fsspec would read these as a glob pattern
        for obj in objects:
            where.fs.rm_file(obj)
    elif objects:
        where.fs.rm(objects)  # bulk deletes
