"""Finding feature sets in a cache (a folder or a URL): by request, by key, all of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from featstore.errors import FeatstoreError, StoreCorruptError
from featstore.identity import FORMAT_VERSION, canonical, without_data
from featstore.places import Place, glob, place, reachable
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


@dataclass(frozen=True)
class Found:
    """The set a probe cell uses, and what was compared to find it.

    path: None when no set answers. checked: the data's fingerprint was compared.
    stale: recorded fingerprints of complete sets of this dataset name and request
    made from other data (a set that the data's current content no longer answers).
    """

    path: Place | None
    checked: bool
    stale: tuple[str, ...] = ()


def find_cell(cache: Place | str, request: dict[str, Any], name: str, checked: bool) -> Found:
    """The newest complete set under `cache` that answers `request` for dataset `name`.

    checked: the request's fingerprint is that of the data on this machine, and must
    match. Otherwise (the data folder is absent) sets are found by everything else
    the request records, among sets made for a dataset of this `name`.
    """
    want, loose = canonical(request), without_data(canonical(request))
    exact: list[tuple[str, Place]] = []
    near: list[tuple[str, Place]] = []
    fingerprints: set[str] = set()
    for fs in _sets(cache):
        path, attrs = fs.path, fs.attrs
        if not attrs.get("complete"):
            continue
        recorded = attrs.get("requests", [])
        stamp = (str(attrs.get("completed", "")), path)
        if want in recorded:
            exact.append(stamp)
        elif attrs.get("dataset", {}).get("name") == name and any(
            without_data(r) == loose for r in recorded
        ):
            near.append(stamp)
            fingerprints.add(str(attrs["dataset"].get("fingerprint", "")))
    if checked:
        return Found(max(exact)[1] if exact else None, True, tuple(sorted(fingerprints)))
    hits = exact + near
    return Found(max(hits)[1] if hits else None, False)


def unchecked_note(name: str, data: object) -> str:
    """The line said once per dataset whose data (folder or file `data`) is absent."""
    return (
        f"{name}: data folder {data} is absent; its feature sets are found by their "
        "recorded identity and the data's fingerprint is not checked"
    )


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
