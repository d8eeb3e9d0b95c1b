"""Extraction: datasets x encoders x resolutions -> complete feature sets.

Wires readers, preprocessing (in DataLoader workers), the encoder (main process)
and the store (a background writer thread) together. One call per feature set:
cached sets are skipped, interrupted ones resumed, new ones allocated.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from featstore import integrity, store
from featstore.batches import Batches, UnitQueue, plan_batches, quiet_worker
from featstore.encoders import Encoder, load_encoder
from featstore.errors import (
    BadInputError,
    FeatstoreError,
    Interrupted,
    StopRequested,
    StoreCorruptError,
)
from featstore.fingerprint import memo_for
from featstore.identity import SetIdentity, requested
from featstore.manifest import Manifest
from featstore.readers import Prepared, prepare

Status = Literal["cached", "new", "resumed", "repaired"]


@dataclass(frozen=True)
class Options:
    """How to run an extract (not what to compute: that is the identity)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    overwrite: bool = False  # replace an existing set of this identity
    repair: bool = False  # verify every chunk of existing sets; recompute damaged units
    skip_bad: bool = False  # record unreadable samples and go on
    shard: tuple[int, int] = (0, 1)  # work on units u with u % n == i
    num_workers: int | None = None  # decode workers (None: 1 on CPU, up to 4 on GPU)
    progress: bool = True


@dataclass(frozen=True)
class Summary:
    """What one extract did to one feature set."""

    dataset: str
    encoder: str
    resolution: int
    status: Status
    items: int
    seconds: float
    mbytes: float
    path: Path
    skipped: int = 0

    def line(self) -> str:
        """One line for the console: status, cell, items, rate, MB written, path."""
        rate = self.items / self.seconds if self.seconds > 0 else float("inf")
        skip = f", {self.skipped} skipped" if self.skipped else ""
        return (
            f"{self.status:>7}  {self.dataset} / {self.encoder} @ {self.resolution}px: "
            f"{self.items} items in {self.seconds:.1f}s ({rate:.1f} items/s), "
            f"{self.mbytes:.1f} MB written{skip} -> {self.path}"
        )


def items_of(prep: Prepared) -> store.Items:
    """Per-item coordinates and labels of a prepared dataset, in item order."""
    idx = prep.index
    labels = None
    if prep.ds.task != "segmentation":
        rows = np.asarray([prep.samples[i].label for i, _ in idx], dtype=np.int64)
        labels = rows if prep.ds.task == "multilabel" else rows[:, 0]
    return store.Items(
        sample=[prep.samples[i].id for i, _ in idx],
        slice=[k for _, k in idx],
        split=[prep.samples[i].split for i, _ in idx],
        labels=labels,
        metadata={
            name: [dict(prep.samples[i].meta)[name] for i, _ in idx]
            for name in prep.ds.metadata.values()
        },
    )


def _describe(prep: Prepared) -> dict[str, object]:
    ds = prep.ds
    return dict(
        name=ds.name, format=ds.format, path=str(ds.path), modality=ds.modality, classes=ds.classes
    )


def _open_or_allocate(
    path: Path, ident: SetIdentity, layout: store.Layout, prep: Prepared, opts: Options
) -> Status:
    """Find the set at `path` (cached / resumed / repaired) or allocate it (new)."""
    if path.exists() and (opts.overwrite or not (path / "zarr.json").is_file()):
        # A folder without its root zarr.json is what a kill during a delete left.
        integrity.refuse_if_busy(path, "replacing it")
        store.replace_aside(path)
    if path.exists():
        complete = bool(store.read_attrs(path).get("complete"))
        store.check_matches(path, ident, None if complete else layout)
        if opts.repair and _repair(path, prep):
            return "repaired"
        if complete:
            store.add_request(path, ident.request())
            return "cached"
        return "resumed"
    if store.create(path, ident, layout, items_of(prep), _describe(prep)):
        return "new"
    store.check_matches(path, ident, layout)  # a concurrent shard allocated it
    return "resumed"


def _repair(path: Path, prep: Prepared) -> bool:
    """Forget the units whose chunks are damaged (they are recomputed) and rewrite
    damaged coordinates; True when anything was damaged."""
    problems = integrity.verify(path, require_complete=False, values=False)
    fatal = [
        p
        for p in problems
        if p.startswith(("attributes:", "metadata: ")) and "consolidated" not in p
    ]
    if fatal:
        raise StoreCorruptError(
            f"{path} cannot be repaired:\n  "
            + "\n  ".join(fatal)
            + "\nre-extract it with --overwrite"
        )
    damage = integrity.scan_chunks(path, store.read_attrs(path))
    units = sorted({d.unit for d in damage if d.array in (*integrity.ITEM_DATA, store.MARKS)})
    coords = sorted({d.array for d in damage} - {*integrity.ITEM_DATA, store.MARKS})
    if coords:
        integrity.rewrite_items(path, items_of(prep), coords)
    if units or coords or problems:
        integrity.reset_units(path, units)  # also unmarks `complete`: finish re-checks all
        return True
    return False


def _checked(arr: np.ndarray, bad: np.ndarray, ids: np.ndarray, what: str) -> np.ndarray:
    """NaN for skipped items; any other NaN/Inf is an error (float16 overflow)."""
    if not np.isfinite(arr[~bad]).all():
        rows = np.flatnonzero(~np.isfinite(arr.reshape(len(arr), -1)).all(1) & ~bad)
        raise FloatingPointError(
            f"the encoder gave NaN/Inf {what} features for {sorted(set(ids[rows]))[:5]}; "
            "with float16 storage this is an overflow: set `dtype: float32` in the manifest"
        )
    arr[bad] = np.nan
    return arr


def _encode_units(
    prep: Prepared,
    encoder: Encoder,
    ident: SetIdentity,
    path: Path,
    layout: store.Layout,
    units: list[int],
    batch_size: int,
    opts: Options,
) -> tuple[int, float, dict[str, str]]:
    """Forward every batch of `units` and write them. Returns (items, MB, skipped)."""
    r = ident.recipe
    batches = plan_batches(layout, units, batch_size)
    cuda = encoder.device.type == "cuda"
    workers = opts.num_workers
    if workers is None:
        workers = min(4, os.cpu_count() or 1) if cuda else 1
    loader = DataLoader(
        Batches(prep, ident.preprocess(), layout, batches),
        batch_size=None,
        num_workers=workers,
        pin_memory=cuda,
        worker_init_fn=quiet_worker if workers else None,
        prefetch_factor=2 if workers else None,
    )
    ids_all = np.asarray([prep.samples[i].id for i, _ in prep.index])
    writer = UnitQueue(path, layout)
    skipped: dict[str, str] = {}
    n_items = sum(stop - start for _, start, stop in batches)
    desc = f"{prep.ds.name} / {encoder.info.label} @ {r.resolution}px"
    bar = tqdm(total=n_items, unit="item", desc=desc, disable=not opts.progress, mininterval=1.0)
    try:
        for batch in loader:
            if batch.errors and not opts.skip_bad:
                raise BadInputError(next(iter(batch.errors.values())))
            skipped.update(batch.errors)
            fb = encoder.encode(batch.pixels, r.layers)
            ids = ids_all[batch.start : batch.start + len(batch.pixels)]
            bad = np.isin(ids, list(batch.errors))
            cls = fb.cls.numpy().astype(r.dtype)
            patch = fb.patch.numpy().astype(r.dtype) if layout.rows else None
            writer.put(
                batch.unit,
                _checked(cls[:, 0] if layout.layers == 1 else cls, bad, ids, "cls"),
                None if patch is None else _checked(patch, bad, ids, "patch"),
                batch.masks,
            )
            bar.update(len(batch.pixels))
    finally:
        bar.close()
        writer.close()
    return n_items, writer.nbytes / 1e6, skipped


def extract_one(
    prep: Prepared,
    encoder: Encoder,
    spec: str,
    resolution: int,
    manifest: Manifest,
    opts: Options = Options(),
) -> Summary:
    """Make (or find, or finish) one feature set and return what was done."""
    t0 = time.perf_counter()
    p = encoder.patch_size
    if resolution % p:
        raise BadInputError(
            f"resolution {resolution} is not a multiple of the patch size {p} "
            f"of '{encoder.info.name}'; use e.g. {resolution // p * p or p}"
        )
    ident = requested(prep.ds, manifest, prep.fingerprint, spec, resolution)
    ident = ident.with_weights(encoder.info)
    items = items_of(prep)
    n_classes = (
        -1 if items.labels is None else (items.labels.shape[1] if items.labels.ndim == 2 else 0)
    )
    layout = store.layout_for(
        ident, len(items.sample), n_classes, manifest.batch_size, manifest.unit_items
    )
    path = store.store_path(manifest.cache, ident.key())
    integrity.clean_leftovers(manifest.cache)
    name = (prep.ds.name, encoder.info.label, resolution)
    with integrity.claim(path):
        status = _open_or_allocate(path, ident, layout, prep, opts)
        if status == "cached":
            return Summary(*name, "cached", 0, time.perf_counter() - t0, 0.0, path)
        i, n = opts.shard
        units = [u for u in store.pending_units(path) if u % n == i]
        store.discard_partials(path, units)
        try:
            n_items, mbytes, skipped = _encode_units(
                prep, encoder, ident, path, layout, units, manifest.batch_size, opts
            )
        except (KeyboardInterrupt, StopRequested) as exc:
            raise _interrupted(path, exc) from None
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise _disk_full(manifest.cache, path, layout) from None
            raise
        store.record_skipped(path, skipped)
        if not store.pending_units(path):
            integrity.finish(path)
    seconds = time.perf_counter() - t0
    return Summary(*name, status, n_items, seconds, mbytes, path, len(skipped))


def _interrupted(path: Path, exc: BaseException) -> Interrupted:
    signum = exc.signum if isinstance(exc, StopRequested) else signal.SIGINT
    left = len(store.pending_units(path))
    total = store.Layout(**store.read_attrs(path)["layout"]).n_units
    return Interrupted(
        f"stopped by {signal.Signals(signum).name}: {total - left} of {total} units of "
        f"{path.name} are written and kept; rerun the same command to resume",
        int(signum),
    )


def _disk_full(cache: Path, path: Path, layout: store.Layout) -> FeatstoreError:
    per_item = layout.channels * np.dtype(layout.dtype).itemsize * max(1, layout.rows * layout.cols)
    need = layout.n_items * (per_item + layout.mask_size**2) / 1e6
    free = shutil.disk_usage(cache).free / 1e6
    return FeatstoreError(
        f"the cache folder {cache} is full (no space left on device) while writing "
        f"{path.name}: the set needs about {need:.0f} MB uncompressed, {free:.0f} MB are "
        "free. Free space or pass --cache DIR on a larger disk, then rerun the same "
        "command: units already written are kept"
    )


def extract_manifest(
    manifest: Manifest,
    opts: Options = Options(),
    *,
    baseline: bool = True,
    echo: Callable[[str], object] = print,
) -> list[Summary]:
    """Extract every cell (dataset x encoder x resolution) of `manifest`, baseline included.

    `echo` receives a line per feature set (and a note per random-init encoder).
    """
    cells = manifest.cells(baseline)
    memo = memo_for(manifest.cache)
    prepared: dict[str, Prepared] = {}
    for ds, _, _ in cells:
        if ds.name not in prepared:
            prepared[ds.name] = prepare(ds, memo)
    summaries = []
    for spec in dict.fromkeys(enc for _, enc, _ in cells):
        encoder = load_encoder(spec, opts.device, memo)
        if encoder.info.random_init:
            echo(
                f"note: '{spec}' is a fixed-seed RANDOM INIT of its architecture (no local "
                "weights found); its feature sets and results are marked random_init"
            )
        if encoder.device.type == "cpu":
            torch.set_num_threads(os.cpu_count() or 1)
        for ds, _, res in (c for c in cells if c[1] == spec):
            summary = extract_one(prepared[ds.name], encoder, spec, res, manifest, opts)
            echo(summary.line())
            summaries.append(summary)
    return summaries
