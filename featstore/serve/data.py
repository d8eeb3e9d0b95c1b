"""What `featstore serve` reads: the feature sets of one cache, results.csv and the kept
predictions of one results folder. Read-only, and only inside those two folders.

A set is named in a request by its short cache key (`identity.short`, the
`feature_set` column of results.csv), never by a path: a key is looked up among the
sets that a listing of the cache found, so no request can name a file. A set folder
that is a symlink out of the cache is refused like a missing one. Every refusal is a
`ServeError` with an HTTP status and a message that says what to do.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from featstore.errors import (
    ChunkChecksumError,
    FeatstoreError,
    StoreCorruptError,
    StoreIncompleteError,
    StoreMismatchError,
)
from featstore.identity import FORMAT_VERSION, labelled, short
from featstore.store.arrays import plain
from featstore.store.schema import EXAMPLE_ITEM, THUMBNAIL
from featstore.store.sets import FeatureSet

if TYPE_CHECKING:
    import pandas as pd
    import xarray as xr

    from featstore.probing.predictions import Predictions

KEY = re.compile(r"^[0-9a-f]{12}$")  # a short cache key, as results.csv records it


class ServeError(FeatstoreError):
    """A request the explorer refuses; `status` is its HTTP status (4xx)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def inside(root: Path, path: Path) -> bool:
    """Whether `path`, with every symlink resolved, lies in `root` (resolved)."""
    try:
        path.resolve(strict=True).relative_to(root.resolve(strict=True))
    except (OSError, ValueError):  # absent, a loop, or outside
        return False
    return True


@dataclass(frozen=True)
class SetInfo:
    """One feature set of the cache as the overview lists it.

    state: complete | partial | other-format | unreadable; note: why it cannot be opened.
    """

    key: str
    folder: Path
    dataset: str
    fingerprint: str
    encoder: str
    random_init: bool
    resolution: int
    items: int
    size_mb: float
    state: str
    note: str = ""

    @property
    def label(self) -> str:
        return f"{labelled(self.encoder, self.random_init)} @ {self.resolution}px"


def _info(folder: Path) -> SetInfo:
    fs = FeatureSet(folder)
    size = round(fs.size() / 1e6, 2)
    try:
        attrs = fs.attrs
    except StoreCorruptError as exc:
        return SetInfo(folder.name[:12], folder, "?", "", "?", False, 0, 0, size,
                       state="unreadable", note=str(exc))  # fmt: skip
    enc, pre, ds = attrs.get("encoder", {}), attrs.get("preprocess", {}), attrs.get("dataset", {})
    state, note = "complete", ""
    if attrs.get("featstore_format") != FORMAT_VERSION:
        from featstore.store.mismatch import old_format

        state, note = "other-format", str(old_format(folder, attrs))
    elif not attrs.get("complete"):
        done, total = fs.units_done()
        state = "partial"
        note = (
            f"{folder} is partial ({done} of {total} units written; an extract was "
            "interrupted or is running): rerun the same `featstore extract` to finish it"
        )
    return SetInfo(
        key=short(str(attrs.get("cache_key", folder.name))),
        folder=folder,
        dataset=str(ds.get("name", "?")),
        fingerprint=str(ds.get("fingerprint", "")),
        encoder=str(enc.get("name", "?")),
        random_init=bool(enc.get("random_init")),
        resolution=int(pre.get("resolution") or 0),
        items=int(attrs.get("layout", {}).get("n_items", 0)),
        size_mb=size,
        state=state,
        note=note,
    )


@dataclass
class OpenSet:
    """A complete set opened for serving: its coordinates in memory, data lazy."""

    info: SetInfo
    xs: xr.Dataset
    _thumbs: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if THUMBNAIL in self.xs and EXAMPLE_ITEM in self.xs:
            items = np.asarray(self.xs[EXAMPLE_ITEM].values)
            self._thumbs = {int(i): e for e, i in enumerate(items) if i >= 0}

    @property
    def n(self) -> int:
        return int(self.xs.sizes["item"])

    @cached_property
    def samples(self) -> np.ndarray:
        return plain(np.asarray(self.xs["sample"].values)).astype(str)

    @cached_property
    def splits(self) -> np.ndarray:
        return plain(np.asarray(self.xs["split"].values)).astype(str)

    @cached_property
    def labels(self) -> np.ndarray | None:
        """(n,) int class ids; a multi-label set's labels as a '0/1/...' string each;
        None for segmentation."""
        if "label" not in self.xs:
            return None
        lab = np.asarray(self.xs["label"].values)
        if lab.ndim == 2:
            return np.array(["".join(map(str, row)) for row in lab.astype(int)])
        return lab.astype(np.int64)

    def check(self, item: int) -> int:
        if not 0 <= item < self.n:
            raise ServeError(404, f"set {self.info.key} has items 0..{self.n - 1}, not {item}")
        return item

    def thumbnail(self, item: int) -> np.ndarray | None:
        """(t, t) uint8: the thumbnail extraction recorded for `item`, if any."""
        e = self._thumbs.get(self.check(item))
        return None if e is None else np.asarray(self.xs[THUMBNAIL][e].values)

    def read(self, name: str, item: int) -> np.ndarray:
        """One item's `name` array (float32 for features); a damaged chunk is a 422
        naming the item, never a crash."""
        if name not in self.xs:
            raise ServeError(404, f"set {self.info.key} has no '{name}' array")
        try:
            return np.asarray(self.xs[name][self.check(item)].values)
        except ChunkChecksumError as exc:
            raise ServeError(
                422,
                f"item {item} of {self.info.folder}: its '{name}' chunk is damaged ({exc}); "
                f"`featstore verify {self.info.folder}` lists every damaged unit",
            ) from None

    def cls_matrix(self) -> tuple[np.ndarray, np.ndarray]:
        """(n, D) float32 CLS (the last layer where several), read unit by unit, and
        (n,) bool of the items whose chunk read: a damaged unit leaves its items out."""
        cls = self.xs["cls"]
        if cls.ndim == 3:
            cls = cls[:, -1]
        step = int(self.info_chunk)
        out = np.zeros((self.n, cls.shape[-1]), np.float32)
        ok = np.ones(self.n, bool)
        for start in range(0, self.n, step):
            part = slice(start, min(start + step, self.n))
            try:
                out[part] = np.asarray(cls[part].values, np.float32)
            except ChunkChecksumError:
                ok[part] = False
        ok &= np.isfinite(out).all(1)  # skipped samples are NaN
        return out, ok

    @property
    def info_chunk(self) -> int:
        chunks = self.xs["cls"].chunks
        return int(chunks[0][0]) if chunks else self.n


class Explorer:
    """The sets of `cache` and the results in `out`, as the server reads them."""

    def __init__(self, out: Path, cache: Path) -> None:
        self.out, self.cache = out, cache
        self._open: dict[str, OpenSet] = {}

    # ------------------------------------------------------------ sets

    def sets(self) -> list[SetInfo]:
        """Every set folder of the cache (a symlink out of it left out), listed fresh."""
        if not self.cache.is_dir():
            return []
        found = []
        for folder in sorted(self.cache.glob("*.zarr")):
            if folder.name.startswith(".") or not inside(self.cache, folder):
                continue  # a leftover of a running extract, or a link out of the cache
            if FeatureSet(folder).exists():
                found.append(_info(folder))
        return found

    def info(self, key: str) -> SetInfo:
        if not KEY.match(key):
            raise ServeError(404, f"'{key}' is not a set key (12 hex digits, as `featstore ls`)")
        for folder in sorted(self.cache.glob(f"{key}*.zarr")):  # key: hex, no pattern
            if inside(self.cache, folder) and FeatureSet(folder).exists():
                found = _info(folder)
                if found.key == key:
                    return found
        raise ServeError(404, f"no feature set with key {key} in {self.cache}; `featstore ls`")

    def open(self, key: str) -> OpenSet:
        """The complete set `key`, opened once; partial or other-format sets are a 409."""
        if key in self._open:
            return self._open[key]
        info = self.info(key)
        if info.state != "complete":
            raise ServeError(409, info.note)
        try:
            xs = FeatureSet(info.folder).open()
        except (StoreIncompleteError, StoreMismatchError, StoreCorruptError) as exc:
            raise ServeError(409, str(exc)) from None
        self._open[key] = OpenSet(info, xs)
        return self._open[key]

    def partners(self, key: str) -> list[SetInfo]:
        """The other complete sets of the same dataset content and item count, whose
        items are the same items (neighbours can be set side by side)."""
        me = self.info(key)
        return [
            s
            for s in self.sets()
            if s.key != key
            and s.state == "complete"
            and s.fingerprint == me.fingerprint
            and s.items == me.items
        ]

    # ------------------------------------------------------------ results

    def results(self) -> pd.DataFrame | None:
        """The ordinary rows of OUT/results.csv (None when there is none)."""
        from featstore.probing.results_file import RESULTS, read_results

        path = self.out / RESULTS
        if not path.is_file() or not inside(self.out, path):
            return None
        df = read_results(path)
        return df[(df.train_fraction == 1.0) & (df.shots == 0) & (df.repeat == 0)]

    def predictions(self, key: str | None = None) -> list[Predictions]:
        """The kept predictions (OUT/predictions/*.parquet) of set `key`, or of all."""
        from featstore.probing.predictions import FOLDER, read_predictions

        folder = self.out / FOLDER
        if not folder.is_dir() or not inside(self.out, folder):
            return []
        found = []
        for path in sorted(folder.glob("*.parquet")):
            if not inside(self.out, path):
                continue
            try:
                p = read_predictions(path)
            except FeatstoreError:
                continue  # not a prediction file: the failure page lists what reads
            k = p.key
            ordinary = k.train_fraction == 1.0 and k.shots == 0 and k.repeat == 0
            if ordinary and (key is None or k.feature_set == key):
                found.append(p)
        return found

    def predicted(self, key: str, probe: str = "linear") -> dict[str, Any]:
        """sample -> predicted class of `probe`'s kept predictions of set `key`."""
        for p in self.predictions(key):
            if p.key.probe == probe and p.task == "classification" and p.scores is not None:
                return dict(zip(p.sample.tolist(), p.scores.argmax(1).tolist(), strict=True))
        return {}

    def result_file(self, rel: str) -> Path:
        """A file of the results folder (plots, tables) named by its relative path;
        a 403 for anything outside it, `..` and symlinks out included."""
        path = self.out / rel
        outside = ServeError(403, f"'{rel}' is not inside the results folder {self.out}")
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise outside
        if not os.path.lexists(path):
            raise ServeError(404, f"no file '{rel}' in the results folder {self.out}")
        if not inside(self.out, path):
            raise outside
        if not path.is_file():
            raise ServeError(404, f"'{rel}' in the results folder {self.out} is not a file")
        if path.suffix.lower() not in SERVED:
            raise ServeError(403, f"'{rel}': only {sorted(SERVED)} files are served")
        return path


SERVED = {".png": "image/png", ".svg": "image/svg+xml", ".csv": "text/csv", ".md": "text/plain"}
SERVED |= {".json": "application/json", ".html": "text/html"}
