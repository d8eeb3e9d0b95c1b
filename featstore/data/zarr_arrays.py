"""Zarr volumes (`format: zarr`, zarr-python 3): raw and label arrays by internal path.

One `.zarr` folder per sample, a group of Zarr format 2 or 3 (detected from its
metadata: `.zgroup`/`.zarray` or `zarr.json`); `featstore.data.volumes` reads it slice
run by slice run (zarr decodes only the chunks a slice touches). A chunk file that
is absent reads as the array's fill value, as the Zarr specification defines; a
truncated or corrupt chunk is a `BadInputError` naming the folder, the array and the
slices.

N5 is not read: zarr-python 3 dropped the N5 store of zarr 2, and featstore adds no
other dependency for it. An N5 container is refused with that fix: convert it to
Zarr first (e.g. zarr-python 2's `N5Store` copied into a `zarr.DirectoryStore`, or
tensorstore).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from featstore.data.volumes import Array, Lookup, Volumes, named
from featstore.errors import BadInputError

if TYPE_CHECKING:
    import zarr

NO_N5 = (
    "N5 is not supported (zarr-python 3 has no N5 store); convert it to Zarr first, e.g. "
    "with zarr-python 2's N5Store and zarr.copy_store, or tensorstore"
)
OPEN_ERRORS = (OSError, ValueError, KeyError, TypeError)  # zarr's for missing or bad metadata


def is_n5(path: Path) -> bool:
    """Whether `path` is an N5 container (its name, or N5's root attributes.json only)."""
    zarr_meta = any((path / m).is_file() for m in ("zarr.json", ".zgroup", ".zarray"))
    return path.suffix.lower() == ".n5" or ((path / "attributes.json").is_file() and not zarr_meta)


class ZarrArrays(Volumes):
    """`format: zarr` (dims 3): one Zarr v2/v3 group per volume, arrays named by `volume:`."""

    folder = True
    kind = "Zarr"
    read_errors = (OSError, ValueError, RuntimeError)  # codecs' errors for a damaged chunk

    @contextmanager
    def open(self, path: Path, wanted: str) -> Iterator[Lookup]:
        import zarr

        if is_n5(path):
            raise BadInputError(f"{named(path, wanted)}: an N5 container; {NO_N5}")
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
