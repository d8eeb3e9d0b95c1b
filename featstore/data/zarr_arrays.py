"""Zarr volumes (`format: zarr`, zarr-python 3): raw and label arrays by internal path.

One `.zarr` folder per sample, a group of Zarr format 2 or 3 (detected from its
metadata: `.zgroup`/`.zarray` or `zarr.json`); `featstore.data.volumes` reads it slice
run by slice run (zarr decodes only the chunks a slice touches). A chunk file that
is absent reads as the array's fill value, as the Zarr specification defines; a
truncated or corrupt chunk is a `BadInputError` naming the folder, the array and the
slices.

An N5 container (a `.n5` folder, or one whose root holds only N5's
`attributes.json`) is read through `featstore.data.n5` (tensorstore's N5 driver,
the `featstore[n5]` extra): zarr-python 3 dropped zarr 2's N5 store. Without
tensorstore it is refused with that fix.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from featstore.data.n5 import open_n5
from featstore.data.volumes import Array, Lookup, Volumes, named
from featstore.errors import BadInputError

if TYPE_CHECKING:
    import zarr

OPEN_ERRORS = (OSError, ValueError, KeyError, TypeError)  # zarr's for missing or bad metadata


def is_n5(path: Path) -> bool:
    """Whether `path` is an N5 container (its name, or N5's root attributes.json only)."""
    zarr_meta = any((path / m).is_file() for m in ("zarr.json", ".zgroup", ".zarray"))
    return path.suffix.lower() == ".n5" or ((path / "attributes.json").is_file() and not zarr_meta)


class ZarrArrays(Volumes):
    """`format: zarr` (dims 3): one Zarr v2/v3 group (or N5 container) per volume,
    arrays named by `volume:`."""

    folder = True
    kind = "Zarr"
    read_errors = (OSError, ValueError, RuntimeError)  # codecs' errors for a damaged chunk

    @contextmanager
    def open(self, path: Path, wanted: str) -> Iterator[Lookup]:
        import zarr

        if is_n5(path):
            with open_n5(path, wanted) as n5_lookup:
                yield n5_lookup
            return
        try:
            group = zarr.open_group(path, mode="r")
        except OPEN_ERRORS as exc:
            raise BadInputError(
                f"{named(path, wanted)}: not a readable Zarr group ({type(exc).__name__}: "
                f"{exc}); give a "
                "folder written by zarr (format 2 or 3) holding the `volume:` arrays"
            ) from None

        def lookup(inner: str) -> Array:
            try:
                node = group[inner]
            except KeyError:
                raise BadInputError(
                    f"{named(path, inner)}: no such array; the group holds "
                    f"{_names(group)}; fix the path in the dataset's `volume:` block"
                ) from None
            except OPEN_ERRORS as exc:  # metadata that zarr cannot parse
                raise BadInputError(
                    f"{named(path, inner)}: unreadable metadata ({type(exc).__name__}: {exc})"
                ) from None
            if not isinstance(node, zarr.Array):
                raise BadInputError(
                    f"{named(path, inner)}: is a group, not an array; it holds "
                    f"{sorted(node.array_keys())[:8]}; name an array in `volume:`"
                )
            return node

        yield lookup


def _names(group: zarr.Group) -> list[str]:
    """Up to 12 internal paths of the arrays under an open zarr group, for messages."""
    out = [name for name, _ in group.arrays()]
    for name, sub in group.groups():
        out += [f"{name}/{n}" for n in _names(sub)]
    return out[:12]
