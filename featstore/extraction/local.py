"""The local runner: units of work computed in this process.

Decoding and preprocessing run in DataLoader workers, the encoder in this process, the
writes in a pool of writer threads (`writer.UnitQueue`). torch is imported only where
units are computed (`encode_units`): a fully cached extract resolves every encoder from
its config files and weight hashes and never builds a model.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from featstore.data.manifest import Manifest
from featstore.data.readers import Prepared
from featstore.encode import devprep
from featstore.encode.encoders import Encoder, load_encoder
from featstore.encode.multichannel import encode_inputs
from featstore.errors import BadInputError, StopRequested
from featstore.extraction.run import Encoded, Options, SetJob, Summary, extract_set
from featstore.identity import EncoderInfo


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


def encode_units(prep: Prepared, encoder: Encoder, job: SetJob, units: list[int]) -> Encoded:
    """Forward every batch of `units` and write them."""
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
    placement = devprep.resolve(opts.preprocess_on, encoder.device.type, pre.channels is not None)
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
            fb = encode_inputs(encoder, pixels, r.layers, r.patch_layers, r.channels)
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
    return Encoded(items=n_items, mbytes=writer.nbytes / 1e6, skipped=skipped)


class LocalRunner:
    """Units computed in this process (see `run.Runner`), one loaded encoder per spec.

    torch's thread count for a CPU forward pass is set when an encoder computes its
    first unit (`Options.threads`, else the free cores) and put back by `close`;
    nothing is imported or changed when every set is cached.
    """

    def __init__(
        self, opts: Options, encoders: dict[str, Encoder] | None = None, threads: bool = True
    ) -> None:
        """`encoders`: specs already loaded (a benchmark's stand-in model), kept as
        given; `threads` False leaves torch's thread count as the caller set it."""
        self.opts = opts
        self.encoders: dict[str, Encoder] = dict(encoders or {})
        self.set_threads = threads
        self.saved_threads: int | None = None  # torch's count before the first change
        self.threads_for = ""  # the spec it was last set for

    def start(self) -> list[str]:
        return []

    def info(self, spec: str, memo: Path | None) -> EncoderInfo:
        if spec not in self.encoders:
            self.encoders[spec] = load_encoder(spec, self.opts.device, memo)
        return self.encoders[spec].info

    def device(self, spec: str) -> str:
        return self.encoders[spec].device.type

    def run_units(self, prep: Prepared, spec: str, job: SetJob, units: list[int]) -> Encoded:
        encoder = self.encoders[spec]
        self._set_threads(encoder, spec)
        return encode_units(prep, encoder, job, units)

    def _set_threads(self, encoder: Encoder, spec: str) -> None:
        if not self.set_threads or encoder.device.type != "cpu" or self.threads_for == spec:
            return
        import torch

        if self.saved_threads is None:
            self.saved_threads = torch.get_num_threads()
        torch.set_num_threads(self.opts.threads or free_cores())
        self.threads_for = spec

    def close(self) -> None:
        if self.saved_threads is not None:
            import torch

            torch.set_num_threads(self.saved_threads)
            self.saved_threads, self.threads_for = None, ""


def extract_with(
    encoder: Encoder, spec: str, prep: Prepared, resolution: int, manifest: Manifest, opts: Options
) -> Summary:
    """The set of one cell made by `encoder`, already loaded for `spec`, in this process,
    torch's thread count as the caller set it: what the benchmarks time against a bare
    loop (and the stand-in models they use)."""
    runner = LocalRunner(opts, {spec: encoder}, threads=False)
    try:
        return extract_set(prep, encoder.info, spec, resolution, manifest, opts, runner)
    finally:
        runner.close()
