"""N5 containers (`format: zarr` on an N5 folder), read through tensorstore's N5 driver.

zarr-python 3 dropped zarr 2's `N5Store`; tensorstore (Google's, on PyPI, the
`featstore[n5]` extra) reads N5 as its specification defines it: each array is a
folder with an `attributes.json` (`dimensions`, `blockSize`, `dataType`,
`compression`: raw, gzip, bzip2, xz, blosc or zstd) and one block file per grid cell.
featstore only opens a container and looks arrays up here; `featstore.data.volumes`
reads them slice run by slice run, so only the blocks a run touches are decoded.

Axis order: N5 lists `dimensions` fastest-varying first, (x, y, z), as its Java
reference implementation writes them, and tensorstore keeps that order; this module
presents each array reversed, (z, y, x), as zarr 2's `N5Store` did, so that items are
z sections as in an HDF5 or Zarr volume. An array's other attributes (the `volume:`
block's `resolution`, a `unit`) are read from its `attributes.json` as written: give
the resolution in (z, y, x) order. A block file that is absent reads as zeros (N5's
fill value); a damaged one is a `BadInputError` naming the folder, the array and the
slices.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from featstore.data.volumes import Array, Lookup, named
from featstore.errors import BadInputError

ATTRIBUTES = "attributes.json"
INSTALL = "install tensorstore to read N5 (`pip install featstore[n5]`), or convert it to Zarr"


class N5Array:
    """One N5 array as `volumes.Array`: (z, y, x) shape and slices, its attributes."""

    def __init__(self, store: Any, attrs: Mapping[str, Any]) -> None:
        self._t = store.T  # tensorstore's (x, y, z) view, reversed
        self._attrs = attrs

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self._t.shape)

    @property
    def dtype(self) -> np.dtype[Any]:
        return np.dtype(self._t.dtype.numpy_dtype)

    @property
    def attrs(self) -> Mapping[str, Any]:
        return self._attrs

    def __getitem__(self, key: slice) -> np.ndarray:
        return np.asarray(self._t[key].read().result())


def _attributes(path: Path, inner: str) -> dict[str, Any]:
    """The array's `attributes.json` as a dict; a BadInputError when it is not one."""
    file = path / inner / ATTRIBUTES
    try:
        found = json.loads(file.read_text())
    except FileNotFoundError:
        if (path / inner).is_dir():  # N5 groups need no attributes.json
            return {}
        raise BadInputError(
            f"{named(path, inner)}: no such array (no {file}); the container holds "
            f"{arrays(path)}; fix the path in the dataset's `volume:` block"
        ) from None
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{named(path, inner)}: unreadable {ATTRIBUTES} ({exc})") from None
    if not isinstance(found, dict):
        raise BadInputError(f"{named(path, inner)}: {ATTRIBUTES} is not a JSON object")
    return found


def arrays(path: Path) -> list[str]:
    """Up to 12 internal paths of the arrays in an N5 container, for messages."""
    out = []
    for file in sorted(path.rglob(ATTRIBUTES)):
        try:
            is_array = "dimensions" in json.loads(file.read_text())
        except (OSError, ValueError, TypeError):
            continue
        if is_array:
            out.append(file.parent.relative_to(path).as_posix())
    return out[:12]


@contextmanager
def open_n5(path: Path, wanted: str) -> Iterator[Lookup]:
    """An N5 container as a lookup of arrays by internal path (`Volumes.open`)."""
    try:
        import tensorstore as ts  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise BadInputError(f"{named(path, wanted)}: an N5 container; {INSTALL}") from None

    def lookup(inner: str) -> Array:
        attrs = _attributes(path, inner)
        if "dimensions" not in attrs:
            raise BadInputError(
                f"{named(path, inner)}: is a group, not an array (its {ATTRIBUTES} has no "
                f"`dimensions`); the container holds {arrays(path)}"
            )
        spec = {"driver": "n5", "kvstore": {"driver": "file", "path": str(path / inner)}}
        try:
            store = ts.open(spec, read=True).result()
        except ValueError as exc:  # tensorstore's error for metadata it cannot use
            raise BadInputError(
                f"{named(path, inner)}: not a readable N5 array ({exc}); give a container "
                "written by an N5 library (dimensions, blockSize, dataType, compression)"
            ) from None
        return N5Array(store, attrs)

    yield lookup
