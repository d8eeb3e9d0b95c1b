"""Extraction on a dask.distributed cluster: every unit of work is one task.

    featstore extract --cluster local:4          # a LocalCluster of 4 worker processes
    featstore extract --scheduler tcp://host:8786  # a running cluster (dask worker, Slurm, ...)

The client lists and fingerprints the data, allocates each feature set and, once
every unit is written, verifies it and marks it complete. A task encodes exactly the
batches of one unit (the batches a single process would forward) and writes only
that unit's chunks and mark, so no two writers ever touch one object, a lost
worker's units are simply run again elsewhere, and the store ends byte-identical to a
single-process run on the same kind of device and thread count. Each worker process
loads an encoder once (kept by a worker plugin) and reuses it for every task.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distributed import WorkerPlugin

from featstore.data.readers import Prepared
from featstore.errors import FeatstoreError, ManifestError, SchedulerUnreachableError
from featstore.identity import EncoderInfo, short

if TYPE_CHECKING:  # run and local import torch where units run: loaded lazily, so
    # that `connect` (used by `featstore probe --scheduler`) stays torch-free
    from featstore.extraction.run import Encoded, Options, SetJob

PLUGIN = "featstore-encoders"


class EncoderCache(WorkerPlugin):
    """Worker plugin: one loaded encoder per (spec, device) and worker process."""

    name = PLUGIN

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads
        self.encoders: dict[tuple[str, str], Any] = {}

    def setup(self, worker: Any) -> None:
        import torch

        torch.set_num_threads(self.threads)

    def get(self, spec: str, device: str, memo: Path | None) -> Any:
        """The encoder `spec` on `device`, loaded on first use in this process."""
        from featstore.encode.encoders import load_encoder

        key = (spec, device)
        if key not in self.encoders:
            self.encoders[key] = load_encoder(spec, device, memo)  # type: ignore[arg-type]
        return self.encoders[key]


def _cache() -> EncoderCache:
    from distributed import get_worker

    plugin = get_worker().plugins.get(PLUGIN)
    if not isinstance(plugin, EncoderCache):
        raise RuntimeError("the featstore worker plugin is not registered on this worker")
    return plugin


def _encoder_info(spec: str, device: str, memo: Path | None) -> EncoderInfo:
    info: EncoderInfo = _cache().get(spec, device, memo).info
    return info


def _unit_task(
    prep: Prepared, job: SetJob, spec: str, device: str, memo: Path | None, unit: int
) -> Encoded:
    """Encode and write one unit on a worker."""
    from featstore.errors import StoreMismatchError
    from featstore.extraction.local import encode_units

    encoder = _cache().get(spec, device, memo)
    if encoder.info != job.ident.weights:
        expected = short(job.ident.weights.weights_sha256) if job.ident.weights else "?"
        raise StoreMismatchError(
            f"worker {os.uname().nodename} resolves encoder '{spec}' to other weights "
            f"({short(encoder.info.weights_sha256)}, the client's set expects {expected}); "
            "give every worker the same model files"
        )
    one = replace(job.opts, num_workers=0, writers=1, progress=False)
    return encode_units(prep, encoder, replace(job, opts=one), [unit])


def parse_cluster(text: str) -> int:
    """`local:N` -> N worker processes."""
    kind, _, n = text.partition(":")
    if kind != "local" or not n.isdigit() or not 1 <= int(n) <= 256:
        raise ManifestError(f"--cluster {text!r}: expected local:N with 1 <= N <= 256")
    return int(n)


def gpu_ids() -> list[str]:
    """The GPUs this machine lets its processes see (CUDA_VISIBLE_DEVICES, else all)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [v.strip() for v in visible.split(",") if v.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def worker_envs(n: int, gpus: list[str]) -> list[dict[str, str]]:
    """The environment of each of `n` workers: worker i sees GPU i % len(gpus) alone
    (CUDA_VISIBLE_DEVICES), so that N workers spread over the GPUs instead of all
    loading their encoder onto GPU 0; nothing without GPUs."""
    return [{"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} if gpus else {} for i in range(n)]


@contextmanager
def client_for(
    cluster: str | None,
    scheduler: str | None,
    threads: int = 1,
    device: str = "cpu",
    gpus: list[str] | None = None,
    timeout: float | None = None,
) -> Iterator[Any]:
    """A dask.distributed Client on a new LocalCluster or a running scheduler, with the
    featstore plugin registered on every worker. A local cluster for `device` cuda or
    auto spreads its workers over `gpus` (default: `gpu_ids()`), one GPU each.
    `timeout`: seconds to reach the scheduler (see `connect`)."""
    from distributed import Client, Nanny, Scheduler, SpecCluster

    if (cluster is None) == (scheduler is None):
        raise ManifestError("give exactly one of --cluster local:N and --scheduler ADDRESS")
    local: Any = None
    if cluster is not None:
        n = parse_cluster(cluster)
        if gpus is None:
            gpus = gpu_ids() if device != "cpu" else []
        workers = {
            i: {"cls": Nanny, "options": {"nthreads": 1, "env": env}}
            for i, env in enumerate(worker_envs(n, gpus))
        }
        local = SpecCluster(
            workers=workers,
            scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0"}},
        )
        client = Client(local)
    else:
        client = connect(str(scheduler), timeout)
    try:
        client.register_plugin(EncoderCache(threads))
        yield client
    finally:
        client.close()
        if local is not None:
            local.close()


def connect(address: str, timeout: float | None = None) -> Any:
    """A Client of the running scheduler at `address`, reached within `timeout` seconds
    (default: dask's `distributed.comm.timeouts.connect`, 30 s unless configured);
    a malformed address is a `ManifestError`, no answer a `SchedulerUnreachableError`."""
    import dask
    from dask.utils import parse_timedelta
    from distributed import Client

    if timeout is None:
        timeout = parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), "s")
    try:
        return Client(address, timeout=timeout)
    except ValueError as exc:
        raise ManifestError(
            f"--scheduler {address!r} is not a scheduler address ({exc}); give the address "
            "`dask scheduler` prints, e.g. tcp://HOST:8786"
        ) from None
    except OSError as exc:  # refused, timed out, unknown host
        raise SchedulerUnreachableError(
            f"--scheduler {address}: no dask scheduler answered within {timeout:g} s "
            f"({exc}). Start one there (`dask scheduler`, then `dask worker {address}` on "
            "each machine), check the address, port and firewall, or run on this machine "
            "with --cluster local:N instead"
        ) from None


def _device_here(asked: str) -> str:
    """What `--device asked` means on this worker."""
    import torch

    if asked == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return asked


def resolve_device(client: Any, asked: str) -> str:
    """`--device` as the workers resolve it (auto: CUDA where they have GPUs); the
    workers must agree, since a set records the device its units were computed on."""
    found = set(client.run(_device_here, asked).values())
    if len(found) != 1:
        raise ManifestError(
            f"--device {asked}: the cluster's workers resolve it to "
            f"{', '.join(sorted(found)) or 'nothing (no workers)'}; give --device cpu or "
            "--device cuda, or a cluster of one kind of worker"
        )
    return found.pop()


# Reruns of a unit that failed for a reason that may pass (a lost worker, a network
# error). A featstore error (a corrupt image, mismatched weights) fails the same way
# every time: it is not rerun.
RETRIES = 2


# Worker-side states of a task that runs, or may still start, after its cancel: a
# cancelled task keeps running in its thread (state "cancelled") until it returns.
_SETTLED = frozenset({"memory", "error", "released", "forgotten", "rescheduled"})


def _unsettled(keys: list[str], dask_worker: Any = None) -> list[str]:
    """The tasks of `keys` this worker runs or may still start."""
    mine = set(keys)
    return [
        key
        for key, ts in list(dask_worker.state.tasks.items())
        if key in mine and ts.state not in _SETTLED
    ]


# How long a failed set waits for its running units: one unit's forward pass and write
# on a slow CPU worker, with room to spare. A worker hung longer is named, not waited on.
SETTLE_DEADLINE = 900.0


def settle(
    client: Any,
    keys: dict[str, int],
    progress: bool = False,
    poll: float = 0.1,
    deadline: float | None = None,
) -> None:
    """Return once no worker runs (or may still start) one of the tasks `keys` (task
    key -> unit number: this run's units, not another shard's on the same scheduler);
    call it after cancelling them. After `deadline` seconds (SETTLE_DEADLINE) it stops
    waiting and names the units still running and their workers on stderr. A second
    Ctrl-C stops the wait."""
    told = False
    limit = SETTLE_DEADLINE if deadline is None else deadline
    end = time.monotonic() + limit
    while running := {w: ks for w, ks in client.run(_unsettled, list(keys)).items() if ks}:
        if time.monotonic() >= end:
            where = "; ".join(
                f"unit {', '.join(map(str, sorted(keys[k] for k in ks)))} on {w}"
                for w, ks in sorted(running.items())
            )
            print(
                f"featstore: stopped waiting after {limit:g}s for cancelled units still "
                f"running ({where}); they may still write their own chunks: stop those "
                "workers before running this set again (resume or `--overwrite`)",
                file=sys.stderr,
            )
            return
        if progress and not told:
            n = sum(len(ks) for ks in running.values())
            print(f"waiting for {n} running unit(s) to finish writing", file=sys.stderr)
            told = True
        time.sleep(poll)


class ClusterRunner:
    """Units as dask.distributed tasks (see `run.Runner`), one task per unit.

    Either on a cluster it starts and stops itself (`cluster` "local:N", or a
    `scheduler` address), or on a `client` the caller keeps (`ClusterRunner.on`).
    """

    def __init__(
        self, opts: Options, cluster: str | None = None, scheduler: str | None = None
    ) -> None:
        self.opts = opts
        self.spec = (cluster, scheduler)
        self.client: Any = None
        self.stack = contextlib.ExitStack()
        self.where = ""  # the device every worker resolves --device to
        self.infos: dict[str, EncoderInfo] = {}
        self.memo: Path | None = None
        self.remote: dict[str, Any] = {}  # dataset name -> its Prepared, scattered

    @classmethod
    def on(cls, client: Any, opts: Options) -> ClusterRunner:
        """A runner on a client the caller owns (not closed by `close`)."""
        runner = cls(opts)
        runner.client = client
        return runner

    def start(self) -> list[str]:
        if self.client is None:
            cluster, scheduler = self.spec
            threads = self.opts.threads or 1
            self.client = self.stack.enter_context(
                client_for(cluster, scheduler, threads, self.opts.device)
            )
        self.where = resolve_device(self.client, self.opts.device)
        return [f"dask dashboard: {self.client.dashboard_link}"]

    def info(self, spec: str, memo: Path | None) -> EncoderInfo:
        self.memo = memo
        if spec not in self.infos:
            found = self.client.submit(_encoder_info, spec, self.where, memo, pure=False)
            self.infos[spec] = found.result()
        return self.infos[spec]

    def device(self, spec: str) -> str:
        return self.where

    def run_units(self, prep: Prepared, spec: str, job: SetJob, units: list[int]) -> Encoded:
        from distributed import as_completed
        from tqdm.auto import tqdm

        from featstore.extraction.run import Encoded

        name = prep.ds.name
        if name not in self.remote:
            self.remote[name] = self.client.scatter(prep, broadcast=True)
        unit_of = {
            self.client.submit(
                _unit_task, self.remote[name], job, spec, self.where, self.memo, u,
                pure=False, key=f"featstore-{job.fs.name}-unit-{u}",
            ): u
            for u in units
        }  # fmt: skip
        items, mbytes, skipped = 0, 0.0, {}
        label = job.ident.weights.label if job.ident.weights else spec
        desc = f"{name} / {label} @ {job.ident.recipe.resolution}px on the cluster"
        progress = job.opts.progress
        tries = dict.fromkeys(units, 0)
        done = as_completed(list(unit_of))
        try:
            with tqdm(total=len(units), unit="unit", desc=desc, disable=not progress) as bar:
                for fut in done:
                    if fut.status == "error":
                        u, exc = unit_of[fut], fut.exception()
                        if isinstance(exc, FeatstoreError) or tries[u] >= RETRIES:
                            fut.result()  # raises it, with the worker's traceback
                        tries[u] += 1
                        fut.retry()
                        done.add(fut)
                        continue
                    got: Encoded = fut.result()
                    items, mbytes = items + got.items, mbytes + got.mbytes
                    skipped.update(got.skipped)
                    bar.update(1)
        except BaseException:
            # The first failure ends the set: nothing more starts. A running task is not
            # stopped by a cancel: it writes its unit to the end, and the caller releases
            # its claim on the set as this returns, so wait for them. (A scheduler that
            # is gone answers neither: the error that ended the set is raised.)
            with contextlib.suppress(OSError):
                self.client.cancel(list(unit_of))
                settle(self.client, {f.key: u for f, u in unit_of.items()}, progress)
            raise
        return Encoded(items=items, mbytes=mbytes, skipped=skipped)

    def close(self) -> None:
        self.stack.close()  # the client and cluster it started, if any
