"""Extraction: datasets x encoders x resolutions -> complete feature sets, one driver.

`extract_manifest(manifest, opts, runner)` is the one way a manifest becomes feature
sets, for the CLI, the API and the GPU check alike: it checks the cache can be
written, lists and fingerprints each dataset once, resolves each encoder once (saying
when it is a random init), and makes, resumes or finds each cell's set
(`extract_set`), handling the set only through `store.sets.FeatureSet`. A `Runner`
supplies where and how the pending units are computed: `local.LocalRunner` in this
process, `cluster.ClusterRunner` as dask.distributed tasks.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, get_args

import numpy as np

from featstore.data.fingerprint import memo_for
from featstore.data.manifest import Manifest
from featstore.data.medmnist import release_npz
from featstore.data.readers import Prepared, prepare
from featstore.encode import devprep
from featstore.errors import BadInputError, ManifestError
from featstore.extraction import guard, recorded
from featstore.identity import EncoderInfo, SetIdentity, requested
from featstore.places import Place, place, reachable
from featstore.store import claims, schema
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

    def __post_init__(self) -> None:
        i, n = self.shard
        if not 0 <= i < n:
            raise ManifestError(f"shard {i}/{n}: expected i/n with 0 <= i < n, e.g. 0/2")


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
        **({"pixel_size_notes": prep.pixel_size_notes} if prep.pixel_size_notes else {}),
    )


@dataclass(frozen=True)
class SetJob:
    """What the units of one allocated set are computed from (pickled to cluster workers)."""

    ident: SetIdentity  # with the encoder's weights
    fs: FeatureSet
    layout: schema.Layout
    batch_size: int
    opts: Options


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
    items = items_of(prep)
    examples = len(prep.example_samples(schema.N_EXAMPLES))
    ident = requested(prep.ds, manifest, prep.fingerprint, spec, resolution).with_weights(info)
    labels: schema.Labels = "none"
    if items.labels is not None:
        labels = "multi" if items.labels.ndim == 2 else "single"
    layout = schema.layout_for(
        ident,
        len(items.sample),
        labels,
        manifest.batch_size,
        manifest.unit_items,
        manifest.codec,
        examples,
        label_width=items.labels.shape[1] if labels == "multi" and items.labels is not None else 0,
        max_units=manifest.max_units,
    )
    fs = FeatureSet.at(manifest.cache, ident.key())
    return SetJob(ident, fs, layout, manifest.batch_size, opts), items


def _compute(where: str, opts: Options, channels: bool) -> dict[str, str]:
    """How units are computed (recorded in a new set): device and preprocessing place."""
    return {"device": where, "preprocess_on": devprep.resolve(opts.preprocess_on, where, channels)}


@dataclass(frozen=True)
class Encoded:
    """What computing some units of a set did: items forwarded, MB written, and the
    samples left out at decode (--skip-bad), id -> reason."""

    items: int
    mbytes: float
    skipped: dict[str, str] = field(default_factory=dict)


class Runner(Protocol):
    """Where and how the units of a set are computed (`local.LocalRunner`,
    `cluster.ClusterRunner`); `extract_manifest` drives it."""

    def start(self) -> list[str]:
        """Get ready (start a cluster), after the cache is known to be writable; the
        lines to print (a dashboard's address)."""
        ...

    def info(self, spec: str, memo: Path | None) -> EncoderInfo:
        """The encoder `spec` as its units will be computed (from its files; the model
        is not built). `memo`: the cache's file-hash memo."""
        ...

    def device(self, spec: str) -> str:
        """ "cpu" or "cuda" for `spec`'s units; asked only when units may be added
        (resolving it may import torch, which a cached extract never needs)."""
        ...

    def run_units(self, prep: Prepared, spec: str, job: SetJob, units: list[int]) -> Encoded:
        """Encode and write `units` of the allocated set `job`."""
        ...

    def close(self) -> None:
        """Release what `start` and the units took (a cluster, torch's thread count)."""
        ...


def extract_set(
    prep: Prepared,
    info: EncoderInfo,
    spec: str,
    resolution: int,
    manifest: Manifest,
    opts: Options,
    runner: Runner,
) -> Summary:
    """Allocate, resume or find the set of one cell (`spec`, as `runner.info` resolved
    it: `info`); compute the pending units of this shard with `runner`; then verify and
    finish."""
    t0 = time.perf_counter()
    describe = _describe(prep)
    job, items = _job(prep, info, spec, resolution, manifest, opts)
    fs, layout = job.fs, job.layout
    set_mb = layout.n_items * layout.item_bytes / 1e6
    cache = manifest.cache

    def summary(status: Status, encoded: Encoded) -> Summary:
        return Summary(
            dataset=prep.ds.name,
            encoder=info.label,
            resolution=resolution,
            status=status,
            items=encoded.items,
            seconds=time.perf_counter() - t0,
            mbytes=encoded.mbytes,
            path=fs.path,
            # what the listing left out, and what decoding skipped (any run or shard)
            skipped={**prep.skipped, **fs.skipped()},
            set_mb=set_mb,
        )

    with contextlib.ExitStack() as claimed:
        with guard.phase("allocating", cache, fs, set_mb):
            claims.clean_leftovers(cache)
            # none on a read-only cache: nothing can be written there
            mine = claimed.enter_context(fs.claim(replacing=opts.overwrite))
            status = fs.open_or_create(
                job.ident, layout,
                lambda: recorded.with_raw_facts(items, prep, job.ident.preprocess(), opts.skip_bad),
                describe, lambda: _compute(runner.device(spec), opts, prep.ds.channels is not None),
                overwrite=opts.overwrite, repair=opts.repair,
            )  # fmt: skip
            if mine is not None:
                mine.replaced()  # others may join the new set now
        if status == "cached":
            return summary(status, Encoded(0, 0.0))
        with guard.phase("computing", cache, fs, set_mb):
            units = fs.pending_units(opts.shard)
            fs.discard_partials(units)
            encoded = runner.run_units(prep, spec, job, units)
        with guard.phase("finishing", cache, fs, set_mb):
            fs.record_skipped(encoded.skipped)
            if not fs.pending_units():
                fs.finish()
    return summary(status, encoded)


def random_init_note(spec: str) -> str:
    """The line that says an encoder is a random init, printed once per encoder."""
    return (
        f"note: '{spec}' is a fixed-seed RANDOM INIT of its architecture (no local "
        "weights found); its feature sets and results are marked random_init"
    )


STATUSES: tuple[Status, ...] = get_args(Status)
SHOWN = 20  # samples left out named one per line; the rest are counted


def tally(summaries: list[Summary]) -> list[str]:
    """The closing lines: every sample left out (once per dataset, with its reason;
    past SHOWN, a count) and `done: ...` counting sets by status and those samples."""
    left: dict[tuple[str, str], str] = {}
    for s in summaries:
        for sample, reason in s.skipped.items():
            left.setdefault((s.dataset, sample), reason)
    lines = [f"left out {ds} / {sample}: {why}" for (ds, sample), why in list(left.items())]
    if len(lines) > SHOWN:
        lines = [*lines[:SHOWN], f"left out ... and {len(lines) - SHOWN} more"]
    counts = {k: sum(s.status == k for s in summaries) for k in STATUSES}
    done = ", ".join(f"{n} {k}" for k, n in counts.items())
    return [*lines, f"done: {done}, {len(left)} samples skipped"]


def runner_for(opts: Options, cluster: str | None = None, scheduler: str | None = None) -> Runner:
    """The runner of `opts`: this process, or dask tasks on a `cluster` ("local:N")
    or at a running `scheduler` (started by `extract_manifest`, after the cache check)."""
    if cluster is None and scheduler is None:
        from featstore.extraction.local import LocalRunner

        return LocalRunner(opts)
    from featstore.extraction.cluster import ClusterRunner

    return ClusterRunner(opts, cluster, scheduler)


def extract_manifest(
    manifest: Manifest,
    opts: Options,
    runner: Runner,
    *,
    baseline: bool = True,
    echo: Callable[[str], object] = print,
) -> list[Summary]:
    """Extract every cell (dataset x encoder x resolution) of `manifest`, baseline
    included, with `runner` computing the units; `echo` receives a line per feature
    set, a note per random-init encoder and the closing tally.

    A cache that cannot be written fails before anything starts (a cluster included).
    The runner is closed on return (torch's thread count restored, a cluster it
    started stopped), and no decoded source file is kept in memory after it.
    """
    cells = manifest.cells(baseline)
    memo = memo_for(manifest.cache)
    reachable(place(manifest.cache), write=True)  # a wrong bucket fails here, not midway
    summaries: list[Summary] = []
    try:
        for line in runner.start():
            echo(line)
        prepared: dict[str, Prepared] = {}
        with guard.phase("listing", manifest.cache):
            for cell in cells:
                ds = cell.dataset
                if ds.name not in prepared:
                    prepared[ds.name] = prepare(ds, memo)
                    for line in prepared[ds.name].notes():
                        echo(line)
        for spec in dict.fromkeys(c.encoder for c in cells):
            with guard.phase("loading", manifest.cache):
                info = runner.info(spec, memo)
            if info.random_init:
                echo(random_init_note(spec))
            for cell in (c for c in cells if c.encoder == spec):
                prep = prepared[cell.dataset.name]
                summary = extract_set(prep, info, spec, cell.resolution, manifest, opts, runner)
                echo(summary.line())
                summaries.append(summary)
    finally:
        runner.close()
        release_npz()
    for line in tally(summaries):
        echo(line)
    return summaries
