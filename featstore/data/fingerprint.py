"""Content hashes of files and datasets, memoised by (size, mtime) in a JSON file.

The memo is only a cache: its location is chosen by the caller (the pipelines keep
it beside the feature sets, `<cache>/.file-sha256.json`, or for a cache on an object
store in `$FEATSTORE_HOME`, by default `~/.cache/featstore`, since it describes this
machine's files), a damaged memo is rebuilt, and `memo=None` hashes every file afresh.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeGuard

from featstore.errors import is_read_only
from featstore.places import is_url

MEMO_NAME = ".file-sha256.json"


def memo_for(cache: Path | str) -> Path:
    """The memo file that belongs to a cache folder (a URL: a local folder of this user)."""
    if is_url(cache):
        xdg = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return Path(os.environ.get("FEATSTORE_HOME") or xdg / "featstore") / MEMO_NAME
    return Path(cache) / MEMO_NAME


def _valid(hit: object) -> TypeGuard[dict[str, Any]]:
    """Whether a memo entry has the shape this module writes (a memo edited or written
    by something else is only a cache: its entries of another shape are hashed again)."""
    if not isinstance(hit, dict):
        return False
    sha = hit.get("sha256")
    return (
        type(hit.get("size")) is int
        and type(hit.get("mtime_ns")) is int
        and isinstance(sha, str)
        and len(sha) == 64
        and all(c in "0123456789abcdef" for c in sha)
    )


def _file_sha256(path: Path, memo: dict[str, Any]) -> str:
    st = path.stat()
    key = str(path.resolve())
    hit = memo.get(key)
    if _valid(hit) and (hit["size"], hit["mtime_ns"]) == (st.st_size, st.st_mtime_ns):
        return str(hit["sha256"])
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    memo[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}
    return h.hexdigest()


def files_sha256(paths: Iterable[Path], memo_file: Path | None = None) -> dict[str, str]:
    """sha256 of each file (keyed by str(path)), memoised in `memo_file` when given."""
    memo: dict[str, Any] = {}
    if memo_file is not None and memo_file.is_file():
        try:
            memo = json.loads(memo_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            memo = {}  # a damaged memo is only a cache: rebuild it
        if not isinstance(memo, dict):  # valid JSON of another shape: likewise
            memo = {}
    before = dict(memo)
    out = {str(p): _file_sha256(p, memo) for p in paths}
    if memo_file is not None and memo != before:
        save_memo(memo_file, memo)
    return out


def save_memo(memo_file: Path, memo: dict[str, Any]) -> None:
    """Write the memo; skipped where its folder is read-only (a shared cache is read
    without write access: the hashes are then only not remembered)."""
    tmp = memo_file.with_name(f"{memo_file.name}.{os.getpid()}.tmp")
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(memo))
        tmp.replace(memo_file)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if not is_read_only(exc):
            raise  # a full disk: the caller says so (see extraction.guard)


def fingerprint(
    files: Iterable[Path],
    table: Sequence[tuple[Any, ...]],
    root: Path,
    memo_file: Path | None = None,
) -> str:
    """Hash of a dataset's file contents, labels and split assignment.

    Args:
        files: every file the dataset reads (images, masks, index CSV).
        table: one row per sample, e.g. (id, split, label, n_items); its order matters.
        root: file names are hashed relative to it, so a moved dataset keeps its hash.
        memo_file: where file hashes are memoised (None: no memo).
    """
    h = hashlib.sha256()
    for p, digest in sorted(files_sha256(sorted(set(files)), memo_file).items()):
        h.update(f"{os.path.relpath(p, root)}\0{digest}\n".encode())
    h.update(json.dumps([list(map(str, row)) for row in table]).encode())
    return h.hexdigest()
