"""Refusing a set made for something else: another featstore format, another
identity or layout, or units computed another way (the errors say what differs and
the fix)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from featstore.errors import StoreMismatchError
from featstore.identity import FORMAT_VERSION, SetIdentity
from featstore.places import Place
from featstore.store.schema import Layout


def old_format(path: Place, attrs: dict[str, Any]) -> StoreMismatchError:
    """The error for a set written by another featstore format (older or newer)."""
    found = attrs.get("featstore_format")
    newer = isinstance(found, int) and found > FORMAT_VERSION
    return StoreMismatchError(
        f"{path} was written by another featstore format ({found!r}, this one reads "
        f"{FORMAT_VERSION}); "
        + ("it was made by a newer featstore: upgrade featstore to read it, or " if newer else "")
        + "re-extract it with `featstore extract` (a new set beside it; the old "
        "folder can then be deleted)"
    )


def check_identity(
    path: Place, attrs: dict[str, Any], ident: SetIdentity, layout: Layout | None
) -> None:
    """Raise `StoreMismatchError` when the set at `path` was made for something else.

    layout None: check the identity only (a complete set keeps its own chunking).
    """
    if attrs.get("featstore_format") != FORMAT_VERSION:
        raise old_format(path, attrs)
    diffs = _diff(SetIdentity.from_attrs(attrs["identity"]).content(), ident.content())
    if layout is not None:
        diffs |= _diff(attrs.get("layout", {}), asdict(layout), "layout.")
    if diffs:
        hint = (
            "the chunk size follows --batch-size: rerun with the stored one, or "
            if "layout.chunk_items" in diffs
            else "the shard size follows the manifest's max_units: rerun with the stored one, or "
            if "layout.shard_chunks" in diffs
            else ""
        )
        raise StoreMismatchError(
            f"{path} holds a feature set with another configuration:\n  "
            + "\n  ".join(f"{k}: stored {va!r}, requested {vb!r}" for k, (va, vb) in diffs.items())
            + f"\n{hint}pass --overwrite to replace it (its features will be deleted)"
        )


def _diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (stored, requested) for every leaf that differs."""
    out: dict[str, tuple[Any, Any]] = {}
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out |= _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out[f"{prefix}{k}"] = (va, vb)
    return out


def check_compute(path: Place, stored: dict[str, str] | None, compute: dict[str, str]) -> None:
    """Refuse to add units to a set that was started on another kind of device or with
    preprocessing placed elsewhere (`compute`: device, preprocess_on).

    Such units differ only within float rounding, so the cache key ignores how a set
    was computed (a CPU study reuses a GPU-made set); but within one set every unit
    comes from one computation, so that a resumed or sharded run ends byte-identical
    to a clean one. Sets made before this was recorded are not checked.
    """
    if stored is None or stored == compute:
        return

    def said(c: dict[str, str]) -> str:
        return f"--device {c.get('device')} --preprocess-on {c.get('preprocess_on')}"

    raise StoreMismatchError(
        f"{path} was started with {said(stored)}, this run uses {said(compute)}; the "
        "units of one set are all computed one way (they would differ within float "
        f"rounding). Finish it with {said(stored)}, or pass --overwrite to start it again"
    )
