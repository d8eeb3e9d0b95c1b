"""One feature set, one handle: find, create, resume, write, repair, finish, verify, open.

`FeatureSet(where)` names a set by its folder or URL (`location.Place`). Extraction,
the cluster runner, `featstore ls|info|verify` and the Python API go through its
public methods, never through the set's files. It caches the root attributes and
one listing of the set's files, and forgets both whenever it writes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

from featstore.errors import ChunkChecksumError, StoreCorruptError, StoreIncompleteError
from featstore.identity import FORMAT_VERSION, SetIdentity, folder_name, labelled, short
from featstore.places import Place, Remote, files, place, size
from featstore.store import arrays, claims, integrity, mismatch
from featstore.store.arrays import UnitWriter, plain
from featstore.store.codec import dequantized
from featstore.store.integrity import Kind, Problem
from featstore.store.location import has_set, remove
from featstore.store.schema import UNIT_ARRAYS, Items, Layout

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["FeatureSet", "Problem", "Status", "UnitWriter", "corrupt", "open_set", "plain"]

# in the order the closing tally counts them
Status = Literal["new", "resumed", "repaired", "cached"]


class FeatureSet:
    """The feature set at a folder or URL, whether it exists yet or not."""

    def __init__(self, where: Place | str) -> None:
        self.path: Place = place(where)
        self._attrs: dict[str, Any] | None = None
        self._files: set[str] | None = None

    @classmethod
    def at(cls, cache: Place | str, key: str) -> FeatureSet:
        """The set with cache key `key` under `cache` (a folder or a URL)."""
        return cls(place(cache) / folder_name(key))

    def __reduce__(self) -> tuple[type[FeatureSet], tuple[Place]]:
        """Pickled as its path (to cluster workers), without the caches."""
        return (FeatureSet, (self.path,))

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"FeatureSet({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FeatureSet) and str(self.path) == str(other.path)

    def __hash__(self) -> int:
        return hash(str(self.path))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def remote(self) -> bool:
        """Whether the set lives on an object store (its failures are the network's)."""
        return isinstance(self.path, Remote)

    # ------------------------------------------------------------ reading

    def exists(self) -> bool:
        """Whether a set is here (its root zarr.json is; the one test of it)."""
        return has_set(self.path)

    @property
    def attrs(self) -> dict[str, Any]:
        """The root attributes (read once). StoreIncompleteError when there is no set;
        StoreCorruptError when its zarr.json is not valid JSON."""
        if self._attrs is None:
            if not self.exists():
                raise StoreIncompleteError(
                    f"{self.path}: no feature set here (no zarr.json); run `featstore extract`"
                )
            self._attrs = arrays.read_attrs(self.path)
        return self._attrs

    def files(self) -> set[str]:
        """Every file of the set, '/'-joined and relative to it (listed once)."""
        if self._files is None:
            self._files = files(self.path)
        return self._files

    def _forget(self) -> None:
        self._attrs = self._files = None

    @property
    def layout(self) -> Layout:
        """The recorded shapes (ValueError when the attribute was edited)."""
        return Layout.from_attrs(self.attrs.get("layout"))

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    def pending_units(self, shard: tuple[int, int] = (0, 1)) -> list[int]:
        """Units not yet marked done (those u with u % n == i for shard (i, n)), in order."""
        i, n = shard
        return [u for u in arrays.pending_units(self.path) if u % n == i]

    def units_done(self) -> tuple[int, int]:
        """(units marked done, units in all)."""
        total = self.layout.n_units
        return total - len(self.pending_units()), total

    def size(self) -> int:
        """Bytes on disk (or in the bucket)."""
        return size(self.path)

    def summary(self) -> dict[str, Any]:
        """One row for `featstore ls`: dataset, encoder, resolution, items, size, ..."""
        attrs = self.attrs
        enc, pre = attrs.get("encoder", {}), attrs.get("preprocess", {})
        return {
            "dataset": attrs.get("dataset", {}).get("name"),
            "encoder": labelled(str(enc.get("name")), bool(enc.get("random_init"))),
            "resolution": pre.get("resolution"),
            "items": attrs.get("layout", {}).get("n_items"),
            "size_mb": round(self.size() / 1e6, 1),
            "complete": self.complete,
            "format": attrs.get("featstore_format"),
            "key": short(attrs.get("cache_key", "")),
            "path": str(self.path),
        }

    def open(self) -> xr.Dataset:
        """Open a complete, trusted set: data lazy (dask), coordinates in memory.

        Checked here (cheaply, on every open): the format, that the attributes agree
        with the recorded identity, that every recorded array's metadata and every
        chunk is on disk. Every chunk read later checks its own crc32c. Consolidated
        metadata is not used: reads go by each array's own metadata.
        """
        self._forget()
        attrs = self.attrs
        if attrs.get("featstore_format") != FORMAT_VERSION:
            raise mismatch.old_format(self.path, attrs)
        if not attrs.get("complete"):
            raise StoreIncompleteError(
                f"{self.path} is incomplete (an extract was interrupted); rerun "
                "the same `featstore extract` to resume it"
            )
        present = self.files()
        problems = integrity.absent_arrays(attrs, present)
        problems += integrity.attribute_problems(self.path, attrs)
        if not any(p.blocks_reading for p in problems):
            problems += integrity.scan_chunks(self.path, attrs, present, set(), decode=False)
        if problems:
            raise StoreCorruptError(
                f"{self.path} cannot be trusted:\n  {integrity.lines(problems[:10])}\n"
                f"run `featstore verify {self.path}` for every problem, then "
                "`featstore extract --repair` (or --overwrite) with the same options"
            )
        import xarray as xr  # not for a cached extract, which only reads attributes

        try:
            xs = xr.open_zarr(str(self.path), consolidated=False)
            # Coordinates are small: in memory (plain '<U' strings, not zarr's StringDType,
            # which pandas and xarray's groupby reject), `groupby("sample")` just works.
            loaded = {name: (xs[name].dims, plain(xs[name].values)) for name in xs.coords}
        except ChunkChecksumError as exc:  # a coordinate chunk failed its checksum
            raise corrupt(self.path, exc) from None
        xs = xs.assign_coords(loaded)
        return dequantized(xs)

    # ------------------------------------------------------------ checking

    def verify(
        self, require_complete: bool = True, values: bool = True, decode: bool = True
    ) -> list[Problem]:
        """Everything wrong with the set (empty when it is sound).

        decode False: chunks are checked by a listing, not read (values then unchecked).
        A complete set has no pending units: there a lost or damaged mark is damage.
        """
        self._forget()
        if not self.exists():
            return [Problem(Kind.METADATA, f"{self.path} is not a feature set (no zarr.json)")]
        present = self.files()
        problems = integrity.header_problems(self.path, present)
        if any(p.blocks_reading for p in problems):
            return problems  # no JSON, no array metadata or no layout: nothing below reads
        attrs = self.attrs
        marked = self.pending_units()
        pending = [] if attrs.get("complete") else marked
        problems += integrity.marks_problems(attrs, marked, require_complete)
        checked = values and decode
        problems += integrity.scan_chunks(self.path, attrs, present, set(pending), checked, decode)
        if checked and integrity.reads_skipped(problems):
            problems += integrity.skipped_problems(self.path, attrs, pending)
        return problems

    # ------------------------------------------------------------ writing

    def open_or_create(
        self,
        ident: SetIdentity,
        layout: Layout,
        items: Callable[[], Items],
        describe: dict[str, Any],
        compute: Callable[[], dict[str, str]],
        *,
        overwrite: bool = False,
        repair: bool = False,
    ) -> Status:
        """Find the set (cached / resumed / repaired) or allocate it (new).

        `items` makes the items: called only when the set is created or repaired
        (recording the raw data's facts reads every header). `compute` gives how units
        are computed: called only when units may be added (resolving the device
        imports torch, which a cached extract never needs).

        `describe`: readable facts about the dataset; `compute` (device,
        preprocess_on) is recorded in a new set, and units are added to an existing
        one only when it was made the same way (`mismatch.check_compute`).
        overwrite: replace it (refused while another live process works on it);
        repair: decode every chunk and forget the damaged units (`repair`).
        """
        self._forget()
        if not overwrite:  # claimed first: an --overwrite starting now sees this one
            claims.refuse_if_replacing(self.path)
        self._clear(overwrite)
        if self.exists():
            return self._reuse(ident, layout, items, compute, repair)
        how = compute()
        created = arrays.create(self.path, ident, layout, items(), describe, how)
        self._forget()
        if created:
            return "new"
        mismatch.check_identity(self.path, self.attrs, ident, layout)  # a concurrent shard made it
        mismatch.check_compute(self.path, self.attrs.get("compute"), how)
        return "resumed"

    def _clear(self, overwrite: bool) -> None:
        """Remove the set (overwrite) or what a kill during a delete left of it."""
        if not self.path.exists() or (self.exists() and not overwrite):
            return
        # A folder without its root zarr.json is what a kill during a delete left; on an
        # object store it may also be a skeleton that a live shard is uploading, which
        # `arrays.create` then races fairly (see `location.publish`).
        uploading = isinstance(self.path, Remote) and not self.exists()
        if not (uploading and claims.live_claims(self.path)):
            claims.refuse_if_busy(self.path, "replacing it")
            remove(self.path)
        self._forget()

    def _reuse(
        self,
        ident: SetIdentity,
        layout: Layout,
        items: Callable[[], Items],
        compute: Callable[[], dict[str, str]],
        repair: bool,
    ) -> Status:
        complete = self.complete
        mismatch.check_identity(self.path, self.attrs, ident, None if complete else layout)
        if not complete or repair:
            mismatch.check_compute(self.path, self.attrs.get("compute"), compute())
        if repair and self.repair(items()):
            return "repaired"
        absent = integrity.absent_arrays(self.attrs, self.files())
        if absent:  # zarr would skip these arrays: nothing can be added to the set
            raise StoreCorruptError(
                f"{self.path} cannot be reused:\n  {integrity.lines(absent)}\n"
                "re-extract it with --overwrite"
            )
        if not complete:
            return "resumed"
        lost = integrity.scan_chunks(self.path, self.attrs, self.files(), set(), decode=False)
        if lost:  # cheap: file names, not contents
            raise StoreCorruptError(
                f"{self.path} is marked complete but has lost chunks ({lost[0]}, "
                f"{len(lost)} in all); rerun with --repair to recompute them"
            )
        arrays.add_request(self.path, ident.request())
        self._forget()
        return "cached"

    def repair(self, items: Items) -> bool:
        """Forget the units whose chunks (data or marks) are damaged, so that they are
        recomputed, and rewrite damaged coordinates from `items`; True when anything
        was damaged. StoreCorruptError when the damage is beyond repair."""
        self._forget()
        problems = integrity.header_problems(self.path, self.files())
        fatal = [p for p in problems if not p.repairable]
        if fatal:
            raise StoreCorruptError(
                f"{self.path} cannot be repaired:\n  {integrity.lines(fatal)}\n"
                "re-extract it with --overwrite"
            )
        complete = self.complete
        marked = set(self.pending_units())
        damage = integrity.scan_chunks(
            self.path, self.attrs, self.files(), set() if complete else marked
        )  # one pass over every chunk
        units = {p.unit for p in damage if p.array in UNIT_ARRAYS and p.unit is not None}
        units |= marked if complete else set()  # a complete set whose marks were lost
        coords = sorted({p.array for p in damage if p.array and p.array not in UNIT_ARRAYS})
        if coords:
            arrays.rewrite_items(self.path, items, coords)
        if units or coords or problems:
            arrays.reset_units(self.path, sorted(units))  # unmarks `complete`: finish re-checks
            self._forget()
            return True
        return False

    def writer(self) -> UnitWriter:
        """Writes whole units (data first, then the unit's mark)."""
        return UnitWriter(self.path, self.layout)

    def discard_partials(self, units: Sequence[int]) -> int:
        """Delete half-written chunk files of `units` (a killed writer's temporaries)."""
        if isinstance(self.path, Remote):
            return 0  # an object is written by one PUT: an object store has no temporaries
        return arrays.discard_partials(self.path, self.files(), units)

    def skipped(self) -> dict[str, str]:
        """The samples recorded as skipped at decode (--skip-bad), id -> reason, by any
        run or shard of this set."""
        return {str(k): str(v) for k, v in self.attrs.get("skipped", {}).items()}

    def record_skipped(self, skipped: dict[str, str]) -> None:
        """Add unreadable samples (id -> reason) to the `skipped` attribute."""
        arrays.record_skipped(self.path, skipped)
        self._forget()

    def finish(self) -> None:
        """Check the metadata and attributes, that every unit is marked and every chunk
        is there, then mark the set complete.

        Chunks are not read back: each was written whole (zarr writes a chunk file by a
        rename, an object store by one PUT) from values checked for NaN/Inf before, and
        its crc32c is checked on every later read; re-reading a multi-TB set at the end
        of its extract would cost as much as writing it. `verify` decodes them all.
        A sample recorded as skipped is made skipped in all its items first (a slide
        can fail part-way, after some of its tiles were written: `blank_samples`).
        """
        self._forget()  # another shard or the cluster's client may have recorded some
        skipped = list(self.attrs.get("skipped", {}))
        if skipped:
            arrays.blank_samples(self.path, self.layout, skipped)
            self._forget()
        problems = self.verify(require_complete=False, values=False, decode=False)
        if problems:
            raise StoreCorruptError(
                f"{self.path} failed verification:\n  {integrity.lines(problems)}"
            )
        arrays.mark_complete(self.path)
        self._forget()

    @contextlib.contextmanager
    def claim(self, replacing: bool = False) -> Iterator[claims.Claim | None]:
        """This process works on the set for the duration (see `store.claims`); None
        on a cache it may not write. replacing: it will delete the set (--overwrite)."""
        with claims.claim(self.path, replacing) as mine:
            yield mine


def open_set(where: Place | str) -> xr.Dataset:
    """`FeatureSet(where).open()`: a complete, trusted set as a lazy xarray Dataset."""
    return FeatureSet(where).open()


def corrupt(path: Place | FeatureSet, exc: BaseException) -> StoreCorruptError:
    """The error for a chunk of `path` that failed to decode while being read."""
    return StoreCorruptError(
        f"{path}: a chunk failed to decode ({exc}); run `featstore verify {path}` to "
        "list the bad units, then `featstore extract --repair` with the same options"
    )
