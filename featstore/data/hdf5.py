"""HDF5 volumes (`format: hdf5`, h5py): raw and label datasets by internal path.

One `.h5`/`.hdf5` file per sample; `featstore.data.volumes` reads it slice run by
slice run (h5py reads only the chunks a slice touches). A file that HDF5 cannot
open (truncated, or another format under an .h5 name), a missing internal path, or a
group where a dataset is expected is a `BadInputError` naming the file and the path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from featstore.data.volumes import Array, Lookup, Volumes, named
from featstore.errors import BadInputError

if TYPE_CHECKING:
    import h5py


class Hdf5(Volumes):
    """`format: hdf5` (dims 3): one HDF5 file per volume, arrays named by `volume:`."""

    folder = False
    kind = "HDF5"
    read_errors = (OSError, ValueError, RuntimeError)  # h5py's for a damaged chunk

    @contextmanager
    def open(self, path: Path, wanted: str) -> Iterator[Lookup]:
        import h5py  # 0.1 s to import: only when an HDF5 file is read

        try:
            f = h5py.File(path, "r")
        except OSError as exc:  # h5py's for truncated, foreign and unreadable files
            raise BadInputError(
                f"{named(path, wanted)}: not a readable HDF5 file ({exc}); it is truncated, "
                "corrupt or of another format: replace it or remove its row"
            ) from None

        def lookup(inner: str) -> Array:
            try:
                node = f.get(inner)
            except (OSError, KeyError, ValueError) as exc:  # a damaged object header
                raise BadInputError(f"{named(path, inner)}: cannot open ({exc})") from None
            if node is None:
                raise BadInputError(
                    f"{named(path, inner)}: no such dataset; the file holds "
                    f"{_names(f)}; fix the path in the dataset's `volume:` block"
                )
            if not isinstance(node, h5py.Dataset):
                raise BadInputError(
                    f"{named(path, inner)}: is a {type(node).__name__.lower()}, not a "
                    f"dataset; it holds {sorted(node)[:8]}; name an array in `volume:`"
                )
            return node

        with f:
            yield lookup


def _names(group: h5py.Group) -> list[str]:
    """Up to 12 internal paths of the datasets in an open file, for messages."""
    import h5py

    out: list[str] = []

    def visit(name: str, node: object) -> None:
        if isinstance(node, h5py.Dataset) and len(out) < 12:
            out.append(name)

    group.visititems(visit)
    return out
