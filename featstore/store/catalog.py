"""Finding feature sets in a cache (a folder or a URL): by request, by key, all of them."""

from __future__ import annotations

from typing import Any

from featstore.errors import FeatstoreError, StoreCorruptError
from featstore.identity import FORMAT_VERSION, canonical
from featstore.store.location import Place, glob, place, reachable
from featstore.store.sets import FeatureSet


def _sets(cache: Place | str) -> list[FeatureSet]:
    """Every readable feature set of this format under `cache`."""
    out = []
    for path in glob(place(cache), "*.zarr"):
        fs = FeatureSet(path)
        if not fs.exists():
            continue
        try:
            if fs.attrs.get("featstore_format") == FORMAT_VERSION:
                out.append(fs)
        except StoreCorruptError:  # its zarr.json is not JSON: `ls` and `verify` say so
            continue
    return out


def find_set(cache: Place | str, request: dict[str, Any]) -> Place | None:
    """The newest complete feature set under `cache` that answers `request`."""
    want = canonical(request)
    hits = [
        (fs.attrs.get("completed", ""), fs.path)
        for fs in _sets(cache)
        if fs.complete and want in fs.attrs.get("requests", [])
    ]
    return max(hits)[1] if hits else None


def find_by_key(cache: Place | str, key: str) -> Place | None:
    """The feature set whose cache key starts with `key` (results record 12 characters)."""
    hits = [fs.path for fs in _sets(cache) if str(fs.attrs.get("cache_key", "")).startswith(key)]
    return hits[0] if hits else None


def list_sets(cache: Place | str) -> list[dict[str, Any]]:
    """One summary row per feature set under `cache` (for `featstore ls`); an unreadable
    one is a row of its path and the error."""
    rows: list[dict[str, Any]] = []
    reachable(place(cache))
    for path in glob(place(cache), "*.zarr"):
        fs = FeatureSet(path)
        try:
            rows.append(fs.summary())
        except (FeatstoreError, FileNotFoundError, ValueError, KeyError) as exc:
            rows.append({"path": str(path), "error": str(exc)})
    return rows
