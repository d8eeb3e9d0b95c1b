"""Trusting a feature set: typed problems of its metadata, attributes, marks and chunks.

Every chunk of every array carries a crc32c checksum (`schema.Checksum`), so a
flipped or truncated chunk fails to decode instead of reading as changed values.
The checks here return `Problem`s (kind, array, unit, reason); callers decide on the
kind, never on the text, which is for people. `FeatureSet` (`store.sets`) runs them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

import numpy as np
import zarr

from featstore.errors import ChunkChecksumError
from featstore.identity import FORMAT_VERSION, SetIdentity, canonical, folder_name, short
from featstore.places import Place
from featstore.store import arrays, schema
from featstore.store.location import ROOT_META
from featstore.store.mismatch import old_format
from featstore.store.schema import FLOAT_DATA, MARKS, MARKS_GROUP, UNIT_ARRAYS, Layout
from featstore.store.schema import layout_for as derive_layout

READ_WHOLE = ("cls", "sample")  # by `skipped_problems`
EDITED = "(the attributes were edited: re-extract with --overwrite)"


class Kind(StrEnum):
    """What is wrong, which decides what can be done about it."""

    METADATA = "metadata"  # a zarr.json unreadable or gone: re-extract
    FORMAT = "format"  # written by another featstore format: re-extract (or upgrade)
    CONSOLIDATED = "consolidated"  # the root's copy of array metadata disagrees: repairable
    ATTRIBUTES = "attributes"  # attributes disagree with the recorded identity: re-extract
    LAYOUT = "layout"  # the recorded layout is malformed: nothing can be read by it
    MARKS = "marks"  # not complete, or units not marked done: rerun the extract
    CHUNK = "chunk"  # a chunk of `array` at `unit` is missing or fails to decode
    VALUES = "values"  # NaN/Inf in `array` at `unit` outside skipped samples
    SKIPPED = "skipped"  # the `skipped` attribute disagrees with the features


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a set; `str(problem)` is the line shown to people."""

    kind: Kind
    reason: str
    array: str | None = None
    unit: int | None = None

    def __str__(self) -> str:
        if self.unit is not None:
            return f"{self.array} unit {self.unit}: {self.reason}"
        label = {
            Kind.CONSOLIDATED: "metadata",
            Kind.LAYOUT: "attributes",
            Kind.SKIPPED: "attributes",
        }
        return f"{label.get(self.kind, self.kind.value)}: {self.reason}"

    @property
    def blocks_reading(self) -> bool:
        """Nothing below the metadata can be read (no JSON, no usable layout)."""
        return self.kind in (Kind.METADATA, Kind.FORMAT, Kind.LAYOUT)

    @property
    def repairable(self) -> bool:
        """`extract --repair` mends it (recompute units, rewrite coordinates, re-consolidate)."""
        return self.kind in (Kind.CONSOLIDATED, Kind.MARKS, Kind.CHUNK, Kind.VALUES)


def lines(problems: Iterable[Problem]) -> str:
    """The problems as indented lines for an error message."""
    return "\n  ".join(str(p) for p in problems)


def header_problems(path: Place, present: set[str]) -> list[Problem]:
    """Problems of the set's metadata and attributes (no chunk is read).

    present: the set's listing (`location.files`); the set must exist.
    """
    problems = _json_problems(path, present)
    if problems:
        return problems
    attrs = arrays.read_attrs(path)
    if attrs.get("featstore_format") != FORMAT_VERSION:  # its own layout: nothing to judge
        return attribute_problems(path, attrs)
    absent = absent_arrays(attrs, present)
    named = {p.array for p in absent}  # one line per lost array, not one per copy of it
    problems = absent + [p for p in _consolidated_problems(path, present) if p.array not in named]
    return problems + attribute_problems(path, attrs)


def _json_problems(path: Place, present: set[str]) -> list[Problem]:
    out = []
    for rel in sorted(r for r in present if r.rsplit("/", 1)[-1] == ROOT_META):
        meta = path / rel
        try:
            json.loads(meta.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            out.append(
                Problem(
                    Kind.METADATA, f"{meta} is not valid JSON ({exc}); re-extract with --overwrite"
                )
            )
    return out


def expected_arrays(attrs: dict[str, Any]) -> list[str]:
    """Every array the set's attributes say it holds: the layout's, and the metadata
    coordinates its identity records. ValueError/KeyError/TypeError when malformed."""
    names = Layout.from_attrs(attrs.get("layout")).arrays()
    recipe = SetIdentity.from_attrs(attrs["identity"]).recipe
    return sorted({*names, *(coord for _, coord in recipe.metadata)})


def absent_arrays(attrs: dict[str, Any], present: set[str]) -> list[Problem]:
    """Each recorded array (and the marks group) whose zarr.json is gone: zarr would
    skip it, xarray drop it, and a re-consolidation would drop it for good."""
    try:
        names = expected_arrays(attrs)
    except (KeyError, TypeError, ValueError):
        return []  # malformed attributes are an `attribute_problems` line
    out = [
        Problem(
            Kind.METADATA,
            f"array '{name}' is missing (no {name}/zarr.json); re-extract with --overwrite",
            name,
        )
        for name in names
        if f"{name}/{ROOT_META}" not in present
    ]
    if f"{MARKS_GROUP}/{ROOT_META}" not in present:
        out.append(
            Problem(
                Kind.METADATA,
                f"group '{MARKS_GROUP}' is missing (no {MARKS_GROUP}/zarr.json); "
                "re-extract with --overwrite",
                MARKS_GROUP,
            )
        )
    return out


def _consolidated_problems(path: Place, present: set[str]) -> list[Problem]:
    """Consolidated metadata (a copy in the root zarr.json) must equal each array's own."""
    root = json.loads((path / ROOT_META).read_text())
    copies = (root.get("consolidated_metadata") or {}).get("metadata") or {}
    out = []
    keys = ("shape", "data_type", "chunk_grid", "codecs", "fill_value", "node_type")
    for name, copy in sorted(copies.items()):
        if f"{name}/{ROOT_META}" not in present:
            out.append(
                Problem(
                    Kind.METADATA,
                    f"'{name}' is listed in the consolidated metadata but its {name}/zarr.json "
                    "is gone; re-extract with --overwrite",
                    name,
                )
            )
            continue
        own = json.loads((path / name / ROOT_META).read_text())
        diff = [k for k in keys if own.get(k) != copy.get(k)]
        if diff:
            out.append(
                Problem(
                    Kind.CONSOLIDATED,
                    f"consolidated metadata of '{name}' disagrees with {name}/zarr.json "
                    f"({', '.join(diff)}); featstore reads the arrays' own metadata",
                    name,
                )
            )
    return out


def attribute_problems(path: Place, attrs: dict[str, Any]) -> list[Problem]:
    """Root attributes that disagree with the recorded identity or the folder name."""
    if attrs.get("featstore_format") != FORMAT_VERSION:
        return [Problem(Kind.FORMAT, str(old_format(path, attrs)))]
    try:
        ident = SetIdentity.from_attrs(attrs["identity"])
        key = ident.key()
    except (KeyError, TypeError, ValueError) as exc:
        reason = f"the recorded identity is missing or malformed ({exc!r})"
        return [Problem(Kind.ATTRIBUTES, reason)]
    out = []
    if attrs.get("cache_key") != key or path.name != folder_name(key):
        out.append(
            f"the recorded identity hashes to {short(key)}, but cache_key is "
            f"{short(str(attrs.get('cache_key')))} and the folder {path.name} {EDITED}"
        )
    assert ident.weights is not None  # from_attrs always sets it
    copies = {"encoder": ident.weights.to_dict(), "preprocess": ident.preprocess().to_dict()}
    out += [
        f"'{name}' disagrees with the recorded identity {EDITED}"
        for name, value in copies.items()
        if attrs.get(name) != canonical(value)
    ]
    mine = {k: v for k, v in ident.request().items() if k != "encoder"}
    if any(
        {k: v for k, v in r.items() if k != "encoder"} != mine for r in attrs.get("requests", [])
    ):
        out.append(f"a recorded request asks for other content {EDITED}")
    problems = [Problem(Kind.ATTRIBUTES, reason) for reason in out]
    try:  # the shapes follow from the identity; only the counts and chunking are free
        rec = Layout.from_attrs(attrs.get("layout"))
    except (TypeError, ValueError) as exc:
        return [*problems, Problem(Kind.LAYOUT, f"'layout' is malformed ({exc}) {EDITED}")]
    n, c = rec.n_items, rec.chunk_items
    derived = derive_layout(
        ident, n, rec.labels, c, c, rec.codec, rec.examples, label_width=rec.label_width
    )  # the shard size follows the manifest's `max_units`: free, as the chunk size
    derived = replace(derived, shard_chunks=rec.shard_chunks)
    if derived != rec:
        problems.append(Problem(Kind.ATTRIBUTES, f"'layout' disagrees with the identity {EDITED}"))
    return problems


def marks_problems(
    attrs: dict[str, Any], pending: list[int], require_complete: bool
) -> list[Problem]:
    """A set not marked complete, or with units not marked done."""
    out = []
    if require_complete and not attrs.get("complete"):
        out.append(Problem(Kind.MARKS, "not marked complete; rerun the same extract to finish it"))
    if pending and (require_complete or attrs.get("complete")):
        reason = f"{len(pending)} units not marked done (first: {pending[:5]})"
        out.append(Problem(Kind.MARKS, reason))
    return out


def scan_chunks(
    path: Place,
    attrs: dict[str, Any],
    present: set[str],
    pending: set[int],
    values: bool = True,
    decode: bool = True,
) -> list[Problem]:
    """Every chunk of every array: on disk, decodable (decode), finite (values: cls,
    patch, patch_scale outside skipped samples).

    pending: units not written yet, whose data and marks are not checked (the resume
    rewrites them); a complete set has none, so there a lost mark is damage.
    """
    layout = Layout.from_attrs(attrs["layout"])
    root = arrays.group(path)
    skipped = list(attrs.get("skipped", {}))
    sample = arrays.plain(np.asarray(arrays.array(root, "sample")[:])) if skipped else None
    out: list[Problem] = []
    for name, arr in arrays.arrays(root):
        # what a unit is in this array: (items, chunk items, shard items or None)
        step, chunk = layout.unit_items, layout.chunk_items
        shard: int | None = layout.unit_items
        expected, units = layout.n_items, layout.n_units
        if name == MARKS:  # one small chunk per unit, unsharded: writers never share one
            step, chunk, shard, expected = 1, 1, None, layout.n_units
        if name in schema.ON_EXAMPLE:  # a few samples' thumbnails: one chunk, "unit 0"
            step = chunk = expected = layout.examples
            shard, units = None, 1
        shards = None if arr.shards is None else arr.shards[0]
        if arr.shape[0] != expected or arr.chunks[0] != chunk or shards != shard:
            reason = (
                f"shape {arr.shape} / chunks {arr.chunks} / shards {arr.shards} disagree "
                f"with the layout ({expected} items in chunks of {chunk}, shards of {shard})"
            )
            out.append(Problem(Kind.CHUNK, reason, name, 0))
            continue
        for unit in range(units):
            if name in UNIT_ARRAYS and unit in pending:
                continue  # not written yet (or half-written): the resume rewrites it
            if arrays.chunk_key(name, arr, unit) not in present:
                # the unit's object: its shard, or its chunk where unsharded (zarr's
                # "chunk" of the array's grid either way)
                out.append(Problem(Kind.CHUNK, "chunk file missing", name, unit))
            elif decode:
                out += _chunk_problems(name, arr, unit, step, values, sample, skipped)
    return out


def _chunk_problems(
    name: str,
    arr: zarr.Array[Any],
    unit: int,
    step: int,
    values: bool,
    sample: np.ndarray | None,
    skipped: list[str],
) -> list[Problem]:
    region = slice(unit * step, (unit + 1) * step)
    try:
        block = np.asarray(arr[region])
    except ChunkChecksumError:
        return [
            Problem(
                Kind.CHUNK,
                "checksum mismatch (the chunk's bytes changed after it was written)",
                name,
                unit,
            )
        ]
    except Exception as exc:  # noqa: BLE001 - any decoder failure is damage to report
        return [
            Problem(
                Kind.CHUNK, f"cannot decode ({type(exc).__name__}: {str(exc)[:120]})", name, unit
            )
        ]
    if not values or name not in FLOAT_DATA:
        return []
    bad = np.asarray(~np.isfinite(block.reshape(len(block), -1).astype(np.float32)).all(1))
    if sample is not None and bad.any():
        bad &= ~np.isin(sample[region][: len(bad)], skipped)
    if not bad.any():
        return []
    first = unit * step + int(np.flatnonzero(bad)[0])
    return [
        Problem(Kind.VALUES, f"{int(bad.sum())} items NaN/Inf (first item {first})", name, unit)
    ]


def skipped_problems(path: Place, attrs: dict[str, Any], pending: list[int]) -> list[Problem]:
    """`skipped` must name exactly the samples whose items hold NaN features."""
    root = arrays.group(path)
    cls = np.asarray(arrays.array(root, "cls")[:], np.float32)
    nan = ~np.isfinite(cls.reshape(len(cls), -1)).all(1)
    sample = arrays.plain(np.asarray(arrays.array(root, "sample")[:]))
    listed = np.isin(sample, list(attrs.get("skipped", {})))
    written = np.ones(len(sample), bool)
    layout = Layout.from_attrs(attrs["layout"])
    for unit in pending:  # not written yet: NaN fill, not a skipped sample
        written[layout.unit_slice(unit)] = False
    disagree = (nan != listed) & written
    if not disagree.any():
        return []
    wrong = sorted({str(v) for v in sample[disagree]})[:5]
    reason = (
        f"'skipped' disagrees with the features of samples {wrong} (NaN items belong to "
        "skipped samples only; the attributes were edited: re-extract with --overwrite)"
    )
    return [Problem(Kind.SKIPPED, reason)]


def reads_skipped(problems: list[Problem]) -> bool:
    """Whether `skipped_problems` can run: it reads `cls` and `sample` whole."""
    return not any(p.kind in (Kind.CHUNK, Kind.VALUES) and p.array in READ_WHOLE for p in problems)
