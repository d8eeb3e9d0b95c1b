"""Feeding the encoder: batches decoded in DataLoader workers, units assembled for writing.

A unit is one storage chunk made of whole batches. `Batches` decodes and preprocesses
one batch per call (in a worker process); `UnitQueue` collects a unit's batches and
writes the whole unit on a background thread, so the forward pass never waits on I/O.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import numpy as np
import torch

from featstore import readers, store
from featstore.errors import BadInputError
from featstore.preprocess import Preprocess, preprocess
from featstore.readers import Prepared


class Batches(torch.utils.data.Dataset):
    """Decodes and preprocesses one batch of items per call, in a worker.

    Batches never straddle units and always cover the same items, so a resumed run
    forwards exactly the batches an uninterrupted one would (byte-identical output).
    """

    def __init__(
        self,
        prep: Prepared,
        pre: Preprocess,
        layout: store.Layout,
        batches: list[tuple[int, int, int]],
    ):
        self.prep, self.pre, self.layout, self.batches = prep, pre, layout, batches
        self.index = prep.index
        self._last: tuple[int, object] | None = None  # volumes span batches: keep the last

    def __len__(self) -> int:
        return len(self.batches)

    def _sample(self, i: int):
        if self._last is None or self._last[0] != i:
            sample = self.prep.samples[i]
            try:
                loaded = readers.load(self.prep.ds, sample)
                value: object = preprocess(loaded.image, loaded.mask, self.pre)
                if value[0].shape[0] != sample.n_items:
                    raise BadInputError(
                        f"{sample.image}: {value[0].shape[0]} slices, the index "
                        f"listed {sample.n_items}; the file changed during the run"
                    )
            except BadInputError as exc:
                value = str(exc)
            self._last = (i, value)
        return self._last[1]

    def __getitem__(self, k: int):
        unit, start, stop = self.batches[k]
        n, r = stop - start, self.pre.resolution
        pixels = np.zeros((n, 3, r, r), np.float32)
        masks = np.zeros((n, r, r), np.uint8) if self.layout.mask_size else None
        errors: dict[str, str] = {}
        for j, item in enumerate(range(start, stop)):
            i, k_slice = self.index[item]
            got = self._sample(i)
            if isinstance(got, str):
                errors[self.prep.samples[i].id] = got
                continue
            pixels[j] = got[0][k_slice]
            if masks is not None:
                masks[j] = got[1][k_slice]
        return unit, start, torch.from_numpy(pixels), masks, errors


def plan_batches(
    layout: store.Layout, units: list[int], batch_size: int
) -> list[tuple[int, int, int]]:
    """(unit, first item, end item) of every batch of `units`, in order."""
    out = []
    for u in units:
        region = layout.unit_slice(u)
        out += [
            (u, s, min(s + batch_size, region.stop))
            for s in range(region.start, region.stop, batch_size)
        ]
    return out


def quiet_worker(_: int) -> None:
    torch.set_num_threads(1)  # the main process owns the cores for the forward pass


class UnitQueue:
    """Assembles batches into units and writes each whole unit on a background thread,
    so the next forward pass overlaps the I/O."""

    def __init__(self, path: Path, layout: store.Layout):
        self.layout = layout
        self.units = store.UnitWriter(path, layout)
        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.nbytes = 0
        self.parts: dict[int, list] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.q.get()) is not None:
            if self.error is None:
                try:
                    self.nbytes += self.units.write(*job)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                    self.error = exc

    def put(self, unit: int, cls, patch, mask) -> None:
        """Add one batch; queue the unit for writing once all its items are in."""
        if self.error is not None:
            raise self.error
        parts = self.parts.setdefault(unit, [])
        parts.append((cls, patch, mask))
        region = self.layout.unit_slice(unit)
        if sum(len(c) for c, _, _ in parts) == region.stop - region.start:
            del self.parts[unit]
            joined = [
                None if parts[0][j] is None else np.concatenate([p[j] for p in parts])
                for j in range(3)
            ]
            self.q.put((unit, *joined))

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
