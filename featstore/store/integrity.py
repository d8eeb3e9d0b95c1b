"""Trusting a feature set: verify every chunk, repair bad units, claims of live extracts.

Every chunk of every array carries a crc32c checksum (zarr's `crc32c` codec), so a
flipped or truncated chunk fails to decode instead of reading as changed values.
`verify` decodes every chunk of every array and coordinate and reports each bad one
as `<array> unit <u>: <reason>`; `reset_units` and `rewrite_items` let an extract
recompute just those. A claim file per live process (host, pid, start time) makes an
extract visible to others, so `--overwrite` never deletes a set someone is writing.
`check_compute` keeps units computed on another device, or with preprocessing placed
elsewhere, out of a set.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.array_spec import ArrayConfigParams

from featstore.errors import StoreBusyError, StoreCorruptError, StoreMismatchError
from featstore.store import schema, sets
from featstore.store.location import Place, Remote, files, glob, place

ITEM_DATA = schema.ITEM_DATA  # written per unit by the encoder loop
FULL: ArrayConfigParams = {"write_empty_chunks": True}


@dataclass(frozen=True)
class Damage:
    """One chunk that cannot be trusted; `unit` is its index along `item`."""

    array: str
    unit: int
    reason: str

    def line(self) -> str:
        return f"{self.array} unit {self.unit}: {self.reason}"


def _json_problems(path: Place, present: set[str]) -> list[str]:
    out = []
    for rel in sorted(present):
        if rel.rsplit("/", 1)[-1] != "zarr.json":
            continue
        meta = path / rel
        try:
            json.loads(meta.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            out.append(f"metadata: {meta} is not valid JSON ({exc}); re-extract with --overwrite")
    return out


def _consolidated_problems(path: Place) -> list[str]:
    """Consolidated metadata (a copy in the root zarr.json) must equal each array's own."""
    root = json.loads((path / "zarr.json").read_text())
    copies = (root.get("consolidated_metadata") or {}).get("metadata") or {}
    out = []
    for name, copy in sorted(copies.items()):
        own_file = path / name / "zarr.json"
        if not own_file.is_file():
            out.append(f"metadata: consolidated metadata lists '{name}', which is absent")
            continue
        own = json.loads(own_file.read_text())
        keys = ("shape", "data_type", "chunk_grid", "codecs", "fill_value", "node_type")
        diff = [k for k in keys if own.get(k) != copy.get(k)]
        if diff:
            out.append(
                f"metadata: consolidated metadata of '{name}' disagrees with {own_file} "
                f"({', '.join(diff)}); featstore reads the arrays' own metadata"
            )
    return out


def _decode_reason(exc: BaseException) -> str:
    text = str(exc)
    if "checksum" in text.lower():
        return "checksum mismatch (the chunk's bytes changed after it was written)"
    return f"cannot decode ({type(exc).__name__}: {text[:120]})"


def scan_chunks(
    path: Place, attrs: dict[str, Any], values: bool = True, decode: bool = True
) -> list[Damage]:
    """Decode every chunk of every array; NaN/Inf in cls/patch (outside skipped samples).

    Marks (`_featstore/done`) may lack chunks: that is a pending unit, not damage, and
    the data chunks of pending units are not checked (the resume rewrites them).
    """
    pending = set(sets.pending_units(path))
    layout = schema.Layout.from_attrs(attrs["layout"])
    root = zarr.open_group(str(path), mode="r", use_consolidated=False)
    present = files(path)
    skipped = set(attrs.get("skipped", {}))
    samples = None
    out: list[Damage] = []
    for name, arr in sets.arrays(root):
        marks = name == schema.MARKS
        step = 1 if marks else layout.chunk_items
        expected = layout.n_units if marks else layout.n_items
        if name in schema.EXAMPLES:  # a few items' thumbnails: one chunk, "unit 0"
            step = expected = layout.examples
        if arr.shape[0] != expected or arr.chunks[0] != step:
            out.append(
                Damage(
                    name,
                    0,
                    f"shape {arr.shape} / chunks {arr.chunks} disagree "
                    f"with the layout ({expected} items in chunks of {step})",
                )
            )
            continue
        for unit in range(1 if name in schema.EXAMPLES else layout.n_units):
            if name in ITEM_DATA and unit in pending:
                continue  # not written yet (or half-written): the resume rewrites it
            if sets.chunk_key(name, arr, unit) not in present:
                if not marks:
                    out.append(Damage(name, unit, "chunk file missing"))
                continue
            if not decode:
                continue  # the chunk is there: a listing is all that was asked
            try:
                block = np.asarray(arr[unit * step : (unit + 1) * step])
            except Exception as exc:  # noqa: BLE001 - any decoder failure is damage to report
                out.append(Damage(name, unit, _decode_reason(exc)))
                continue
            if values and name in ("cls", "patch", "patch_scale"):
                bad = ~np.isfinite(block.reshape(len(block), -1).astype(np.float32)).all(1)
                if skipped and bad.any():
                    if samples is None:
                        samples = sets.plain(np.asarray(arr_of(root, "sample")[:]))
                    bad &= ~np.isin(samples[layout.unit_slice(unit)], list(skipped))
                if bad.any():
                    first = unit * step + int(np.flatnonzero(bad)[0])
                    out.append(
                        Damage(name, unit, f"{int(bad.sum())} items NaN/Inf (first item {first})")
                    )
    return out


def header_problems(path: Place | str) -> list[str]:
    """Problems of the set's metadata and attributes (no chunk is read).

    `metadata:` lines for invalid JSON or consolidated metadata that disagrees with
    the arrays (the only ones a repair can fix), `attributes:` lines otherwise.
    """
    path = place(path)
    if not (path / "zarr.json").is_file():
        return [f"metadata: {path} is not a feature set (no zarr.json)"]
    present = files(path)  # one listing for the metadata checks
    problems = _json_problems(path, present)
    if problems:
        return problems
    attrs = sets.read_attrs(path)
    problems = sets.absent_arrays(path, attrs, present)
    return problems + _consolidated_problems(path) + sets.attribute_problems(path, attrs)


def verify(
    path: Place | str, require_complete: bool = True, values: bool = True, decode: bool = True
) -> list[str]:
    """Everything wrong with the set at `path` (empty when it is sound), one line each.

    Lines start with `metadata:`, `attributes:`, `marks:` or `<array> unit <u>:`.
    decode False: chunks are checked by a listing, not read (values then unchecked too).
    """
    path = place(path)
    problems = header_problems(path)
    fatal = ("metadata: ", "attributes: 'layout' is malformed")
    if any(p.startswith(fatal) and "consolidated" not in p for p in problems):
        return problems  # no JSON or no layout: nothing below can be read
    attrs = sets.read_attrs(path)
    if require_complete and not attrs.get("complete"):
        problems.append("marks: not marked complete; rerun the same extract to finish it")
    pending = sets.pending_units(path)
    if pending and (require_complete or attrs.get("complete")):
        problems.append(f"marks: {len(pending)} units not marked done (first: {pending[:5]})")
    problems += [d.line() for d in scan_chunks(path, attrs, values and decode, decode)]
    if values and decode and not any(p.startswith(("cls ", "sample ")) for p in problems):
        problems += sets.skipped_problems(path, attrs)
    return problems


def finish(path: Place) -> None:
    """Check the metadata and attributes, that every unit is marked and every chunk is
    there, then mark the set complete.

    Chunks are not read back: each was written whole (zarr writes a chunk file by a
    rename, an object store by one PUT) from values checked for NaN/Inf before, and
    its crc32c is checked on every later read; re-reading a multi-TB set at the end of
    its extract would cost as much as writing it. `featstore verify` decodes them all.
    """
    problems = verify(path, require_complete=False, values=False, decode=False)
    if problems:
        raise StoreCorruptError(f"{path} failed verification:\n  " + "\n  ".join(problems))
    sets.mark_complete(path)


def check_compute(path: Place, compute: dict[str, str]) -> None:
    """Refuse to add units to a set that was started on another kind of device or with
    preprocessing placed elsewhere (`compute`: device, preprocess_on).

    Such units differ only within float rounding, so the cache key ignores how a set
    was computed (a CPU study reuses a GPU-made set); but within one set every unit
    comes from one computation, so that a resumed or sharded run ends byte-identical
    to a clean one. Sets made before this was recorded are not checked.
    """
    stored = sets.read_attrs(path).get("compute")
    if stored is None or stored == compute:
        return

    def said(c: dict[str, str]) -> str:
        return f"--device {c.get('device')} --preprocess-on {c.get('preprocess_on')}"

    raise StoreMismatchError(
        f"{path} was started with {said(stored)}, this run uses {said(compute)}; the "
        "units of one set are all computed one way (they would differ within float "
        f"rounding). Finish it with {said(stored)}, or pass --overwrite to start it again"
    )


def arr_of(root: zarr.Group, name: str) -> zarr.Array:
    """The array `name` of `root` (a path like '_featstore/done' allowed)."""
    node = root[name]
    if not isinstance(node, zarr.Array):
        raise StoreCorruptError(f"'{name}' in {root.store} is a group, expected an array")
    return node


def reset_units(path: Place, units: list[int]) -> None:
    """Forget `units`: delete their data chunks and marks, and unmark the set complete."""
    root = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    for name in (*ITEM_DATA, schema.MARKS):
        if name not in root:
            continue
        arr = arr_of(root, name)
        for unit in units:
            (path / sets.chunk_key(name, arr, unit)).unlink(missing_ok=True)
    root.attrs["complete"] = False


def rewrite_items(path: Place, items: schema.Items, names: list[str]) -> None:
    """Rewrite coordinate/label arrays `names` whole from `items` (allocation-time data)."""
    root = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    fresh = schema.item_arrays(items)
    for name in names:
        if name not in fresh:
            raise StoreCorruptError(f"{path}: cannot rebuild '{name}'; re-extract with --overwrite")
        arr = arr_of(root, name).with_config(FULL)
        arr[...] = fresh[name]


# ------------------------------------------------------------------- claims


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
        for p in sorted(Path(tempfile.gettempdir()).glob(f"{sets.LOCAL_BUILD}*")):
            pid = p.name.removeprefix(sets.LOCAL_BUILD).split("-")[0]
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
