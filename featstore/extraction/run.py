"""Extraction: datasets x encoders x resolutions -> complete feature sets.

Wires readers, preprocessing (in DataLoader workers), the encoder (main process)
and the store (a pool of writer threads, `writer.UnitQueue`) together. One call per
feature set: cached sets are skipped, interrupted ones resumed, new ones allocated;
the set itself is handled only through `store.sets.FeatureSet`.

torch is imported only where units are computed (`encode_units`: the DataLoader,
`batches`, `writer`, the model): a fully cached extract finds every set from the
encoders' config files and weight hashes and never loads it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from featstore.data.fingerprint import memo_for
from featstore.data.manifest import Manifest
from featstore.data.medmnist import release_npz
from featstore.data.readers import Prepared, prepare
from featstore.encode import devprep
from featstore.encode.encoders import Encoder, load_encoder
from featstore.errors import BadInputError, StopRequested
from featstore.extraction import guard, recorded
from featstore.identity import EncoderInfo, SetIdentity, requested
from featstore.store import claims, schema
from featstore.store.location import Place, place, reachable
from featstore.store.sets import FeatureSet, Status


@dataclass(frozen=True)
class Options:
    """How to run an extract (not what to compute: that is the identity)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    # where intensity mapping, resize and mean/std run: the CPU workers, or (device)
    # the encoder's device on the stored integers; auto: device on CUDA only
    preprocess_on: devprep.Setting = "auto"
    overwrite: bool = False  # replace an existing set of this identity
    repair: bool = False  # verify every chunk of existing sets; recompute damaged units
    skip_bad: bool = False  # record unreadable samples and go on
    shard: tuple[int, int] = (0, 1)  # work on units u with u % n == i
    num_workers: int | None = None  # decode workers (None: 1 on CPU, up to 4 on GPU)
    writers: int = 2  # writer threads: units compressed and written at once
    threads: int | None = None  # torch threads for a CPU forward pass (None: free cores)
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
    path: Place  # of the feature set
    # every sample the set leaves out, id -> reason: at listing (a slide without
    # tissue) and at decode (--skip-bad, by this run or an earlier one or shard)
    skipped: dict[str, str] = field(default_factory=dict)
    set_mb: float = 0.0  # the whole set, uncompressed (what its layout costs)

    def line(self) -> str:
        """One line for the console: status, cell, items, rate, MB written, set size, path."""
        rate = self.items / self.seconds if self.seconds > 0 else float("inf")
        skip = f", {len(self.skipped)} samples left out" if self.skipped else ""
        return (
            f"{self.status:>8}  {self.dataset} / {self.encoder} @ {self.resolution}px: "
            f"{self.items} items in {self.seconds:.1f}s ({rate:.1f} items/s), "
            f"{self.mbytes:.1f} MB written{skip} (set: {self.set_mb:.0f} MB uncompressed)"
            f" -> {self.path}"
        )


def free_cores(window: float = 0.3) -> int:
    """Cores of this process's affinity not busy with other work right now (>= 1).

    OpenMP threads that outnumber the free cores wait on each other: with one busy
    competing process on 2 cores, a 2-thread forward pass ran at 115 items/s and a
    1-thread one at 174 (benchmarks/contention.py). Measured from /proc/stat over
    `window` seconds before the encoder starts; all cores where that is unavailable.
    """
    cores = len(os.sched_getaffinity(0))

    def busy_idle() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields) - idle, idle

    try:
        b0, i0 = busy_idle()
        time.sleep(window)
        b1, i1 = busy_idle()
    except (OSError, ValueError, IndexError):
        return cores
    total = (b1 - b0) + (i1 - i0)
    busy = (b1 - b0) / total * (os.cpu_count() or cores) if total > 0 else 0.0
    return max(1, min(cores, round(cores - busy)))


def items_of(prep: Prepared) -> schema.Items:
    """Per-item coordinates and labels of a prepared dataset, in item order."""
    idx = prep.index
    labels = None
    if prep.ds.task != "segmentation":
        rows = np.asarray([prep.samples[i].label for i, _ in idx], dtype=np.int64)
        labels = rows if prep.ds.task == "multilabel" else rows[:, 0]
    return schema.Items(
        sample=[prep.samples[i].id for i, _ in idx],
        slice=[k for _, k in idx],
        split=[prep.samples[i].split for i, _ in idx],
        labels=labels,
        metadata={
            name: [dict(prep.samples[i].meta)[name] for i, _ in idx]
            for name in prep.ds.metadata.values()
        },
        coords=prep.coords(),
    )


def _describe(prep: Prepared) -> dict[str, object]:
    ds = prep.ds
    return dict(
        name=ds.name,
        format=ds.format,
        path=str(ds.path),
        modality=ds.modality,
        classes=ds.classes,
        **({"skipped_samples": prep.skipped} if prep.skipped else {}),
        **({"pixel_size_notes": notes} if (notes := mpp_notes(prep)) else {}),
    )


@dataclass(frozen=True)
class SetJob:
    """What the units of one allocated set are computed from (pickled to cluster workers)."""

    ident: SetIdentity  # with the encoder's weights
    fs: FeatureSet
    layout: schema.Layout
    batch_size: int
    opts: Options


def encode_units(
    prep: Prepared, encoder: Encoder, job: SetJob, units: list[int]
) -> tuple[int, float, dict[str, str]]:
    """Forward every batch of `units` and write them. Returns (items, MB, skipped)."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from featstore.extraction.batches import Batches, plan_batches, quiet_worker
    from featstore.extraction.writer import UnitQueue, nan_checker, pooled

    r, layout, opts = job.ident.recipe, job.layout, job.opts
    batches = plan_batches(layout, units, job.batch_size)
    cuda = encoder.device.type == "cuda"
    workers = opts.num_workers
    if workers is None:
        workers = min(4, os.cpu_count() or 1) if cuda else 1
    pre = job.ident.preprocess()
    placement = devprep.resolve(opts.preprocess_on, encoder.device.type)
    loader = DataLoader(
        Batches(prep, pre, layout, batches, placement),
        batch_size=None,
        num_workers=workers,
        pin_memory=cuda,
        worker_init_fn=quiet_worker if workers else None,
        prefetch_factor=2 if workers else None,
    )
    ids_all = np.asarray([prep.samples[i].id for i, _ in prep.index])
    check = nan_checker(ids_all, layout)
    writer = UnitQueue(job.fs.writer(), layout, check, opts.writers, encoder.device)
    skipped: dict[str, str] = {}
    n_items = sum(stop - start for _, start, stop in batches)
    desc = f"{prep.ds.name} / {encoder.info.label} @ {r.resolution}px"
    bar = tqdm(total=n_items, unit="item", desc=desc, disable=not opts.progress, mininterval=1.0)
    try:
        for batch in loader:
            if batch.errors and not opts.skip_bad:
                raise BadInputError(next(iter(batch.errors.values())))
            skipped.update(batch.errors)
            pixels = devprep.to_input(batch.pixels, pre, encoder.device)
            fb = encoder.encode(pixels, r.layers, r.patch_layers)
            ids = ids_all[batch.start : batch.start + len(batch.pixels)]
            cls = fb.cls[:, 0] if layout.layers == 1 else fb.cls
            patch = None
            if layout.rows:
                patch = pooled(fb.patch, r.patch_pool)
                patch = patch[:, 0] if layout.patch_layers == 1 else patch
            writer.put(batch.unit, cls, patch, batch.masks, np.isin(ids, list(batch.errors)))
            bar.update(len(batch.pixels))
            StopRequested.check()  # a signal whose exception a finalizer swallowed
    finally:
        bar.close()
        writer.close()
    return n_items, writer.nbytes / 1e6, skipped


# Encodes and writes the given units of an allocated set: (items, MB written, skipped).
UnitRunner = Callable[[SetJob, list[int]], tuple[int, float, dict[str, str]]]


class CpuThreads:
    """torch's thread count for CPU forward passes: set when an encoder computes its
    first unit (`threads`, else the free cores), put back by `restore`. Nothing is
    imported or changed when every set is cached."""

    def __init__(self, threads: int | None) -> None:
        self.threads = threads
        self.saved: int | None = None  # the count before the first change
        self.set_for = ""  # the spec it was last set for

    def before_compute(self, encoder: Encoder, spec: str) -> None:
        """Set the count for `encoder` (once per spec) when it runs on the CPU."""
        if encoder.device.type != "cpu" or self.set_for == spec:
            return
        import torch

        if self.saved is None:
            self.saved = torch.get_num_threads()
        torch.set_num_threads(self.threads or free_cores())
        self.set_for = spec

    def restore(self) -> None:
        """Put back the count that was there before the first change."""
        if self.saved is not None:
            import torch

            torch.set_num_threads(self.saved)
            self.saved, self.set_for = None, ""


def extract_one(
    prep: Prepared,
    encoder: Encoder,
    spec: str,
    resolution: int,
    manifest: Manifest,
    opts: Options = Options(),
    threads: CpuThreads | None = None,
) -> Summary:
    """Make (or find, or finish) one feature set in this process; return what was done.
    `threads` sets torch's thread count before the first unit is computed."""

    def run(job: SetJob, units: list[int]) -> tuple[int, float, dict[str, str]]:
        if threads is not None:
            threads.before_compute(encoder, spec)
        return encode_units(prep, encoder, job, units)

    return extract_set(
        prep, encoder.info, spec, resolution, manifest, opts, run, lambda: encoder.device.type
    )


def _job(
    prep: Prepared, info: EncoderInfo, spec: str, resolution: int, manifest: Manifest, opts: Options
) -> tuple[SetJob, schema.Items]:
    """The set of one cell (identity, handle, layout) and its items."""
    p = info.patch_size
    if resolution % p:
        raise BadInputError(
            f"resolution {resolution} is not a multiple of the patch size {p} "
            f"of '{info.name}'; use e.g. {resolution // p * p or p}"
        )
    ident = requested(prep.ds, manifest, prep.fingerprint, spec, resolution).with_weights(info)
    items = items_of(prep)
    n_classes = (
        -1 if items.labels is None else (items.labels.shape[1] if items.labels.ndim == 2 else 0)
    )
    layout = schema.layout_for(
        ident,
        len(items.sample),
        n_classes,
        manifest.batch_size,
        manifest.unit_items,
        manifest.codec,
        len(recorded.example_samples(prep)),
    )
    fs = FeatureSet.at(manifest.cache, ident.key())
    return SetJob(ident, fs, layout, manifest.batch_size, opts), items


def _compute(device: str | Callable[[], str], opts: Options) -> dict[str, str]:
    """How units are computed (recorded in a new set): device and preprocessing place."""
    where = device if isinstance(device, str) else device()
    return {"device": where, "preprocess_on": devprep.resolve(opts.preprocess_on, where)}


def extract_set(
    prep: Prepared,
    info: EncoderInfo,
    spec: str,
    resolution: int,
    manifest: Manifest,
    opts: Options,
    run_units: UnitRunner,
    device: str | Callable[[], str],
) -> Summary:
    """Allocate, resume or find the set of one cell; `run_units` computes the pending
    units of this shard (here, or as tasks on a cluster) on `device` ("cpu", "cuda";
    or a function that resolves it, called only when units may be added); then verify
    and finish."""
    t0 = time.perf_counter()
    job, items = _job(prep, info, spec, resolution, manifest, opts)
    fs, layout = job.fs, job.layout
    set_mb = layout.n_items * layout.item_bytes / 1e6
    cache = manifest.cache
    name = (prep.ds.name, info.label, resolution)
    with contextlib.ExitStack() as claimed:
        with guard.phase("allocating", cache, fs, set_mb):
            claims.clean_leftovers(cache)
            # none on a read-only cache: nothing can be written there
            mine = claimed.enter_context(fs.claim(replacing=opts.overwrite))
            status = fs.open_or_create(
                job.ident, layout,
                lambda: recorded.with_raw_facts(items, prep, job.ident.preprocess(), opts.skip_bad),
                _describe(prep), lambda: _compute(device, opts),
                overwrite=opts.overwrite, repair=opts.repair,
            )  # fmt: skip
            if mine is not None:
                mine.replaced()  # others may join the new set now
        if status == "cached":
            seconds = time.perf_counter() - t0
            return Summary(*name, "cached", 0, seconds, 0.0, fs.path, left_out(prep, fs), set_mb)
        with guard.phase("computing", cache, fs, set_mb):
            units = fs.pending_units(opts.shard)
            fs.discard_partials(units)
            n_items, mbytes, skipped = run_units(job, units)
        with guard.phase("finishing", cache, fs, set_mb):
            fs.record_skipped(skipped)
            if not fs.pending_units():
                fs.finish()
    seconds = time.perf_counter() - t0
    return Summary(*name, status, n_items, seconds, mbytes, fs.path, left_out(prep, fs), set_mb)


def left_out(prep: Prepared, fs: FeatureSet) -> dict[str, str]:
    """Every sample of `prep` the set `fs` lacks, id -> reason: those its listing left
    out, and those recorded as skipped at decode (this run, an earlier one, a shard)."""
    recorded_skips = {str(k): str(v) for k, v in fs.attrs.get("skipped", {}).items()}
    return {**prep.skipped, **recorded_skips}


def random_init_note(spec: str) -> str:
    """The line that says an encoder is a random init, printed once per encoder by
    every extract (local and cluster) that uses it."""
    return (
        f"note: '{spec}' is a fixed-seed RANDOM INIT of its architecture (no local "
        "weights found); its feature sets and results are marked random_init"
    )


def mpp_notes(prep: Prepared) -> dict[str, str]:
    """Slide id -> which pixel size it uses, where its file and the index disagree
    (recorded in the set's `dataset.pixel_size_notes` and printed by `listing_notes`)."""
    return {s.id: s.tiles.mpp_note for s in prep.samples if s.tiles and s.tiles.mpp_note}


def listing_notes(prep: Prepared) -> list[str]:
    """What listing decided that the user should see before the sets are made."""
    return [f"note: {prep.ds.name} / {k}: {v}" for k, v in mpp_notes(prep).items()]


def extract_manifest(
    manifest: Manifest,
    opts: Options = Options(),
    *,
    baseline: bool = True,
    echo: Callable[[str], object] = print,
) -> list[Summary]:
    """Extract every cell (dataset x encoder x resolution) of `manifest`, baseline included.

    `echo` receives a line per feature set (and a note per random-init encoder). torch's
    thread count, set for a CPU forward pass, is restored on return, and no decoded
    source file is kept in memory after it.
    """
    reachable(place(manifest.cache), write=True)  # a wrong bucket fails here, not midway
    cells = manifest.cells(baseline)
    memo = memo_for(manifest.cache)
    prepared: dict[str, Prepared] = {}
    with guard.phase("listing", manifest.cache):
        for ds, _, _ in cells:
            if ds.name not in prepared:
                prepared[ds.name] = prepare(ds, memo)
                for line in listing_notes(prepared[ds.name]):
                    echo(line)
    summaries = []
    threads = CpuThreads(opts.threads)
    try:
        for spec in dict.fromkeys(enc for _, enc, _ in cells):
            with guard.phase("loading", manifest.cache):
                encoder = load_encoder(spec, opts.device, memo)
            if encoder.info.random_init:
                echo(random_init_note(spec))
            for ds, _, res in (c for c in cells if c[1] == spec):
                prep = prepared[ds.name]
                summary = extract_one(prep, encoder, spec, res, manifest, opts, threads)
                echo(summary.line())
                summaries.append(summary)
    finally:
        threads.restore()
        release_npz()
    return summaries
