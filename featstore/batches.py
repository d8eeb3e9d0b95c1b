"""Feeding the encoder: batches decoded in DataLoader workers, units assembled for writing.

A unit is one storage chunk made of whole batches. `Batches` decodes and preprocesses
one batch per call (in a worker process); `UnitQueue` collects a unit's batches and
writes the whole unit on a background thread, so the forward pass never waits on I/O.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from featstore import readers, store
from featstore.errors import BadInputError
from featstore.preprocess import Preprocess, preprocess
from featstore.readers import Prepared


@dataclass(frozen=True)
class Decoded:
    """One sample ready for the encoder, or the reason it could not be read.

    pixels: (D, 3, R, R) float32 normalised; mask: (D, R, R) uint8 or None.
    """

    pixels: np.ndarray | None = None
    mask: np.ndarray | None = None
    error: str | None = None


@dataclass(frozen=True)
class Batch:
    """One batch of consecutive items of one unit.

    pixels: (B, 3, R, R) float32; masks: (B, R, R) uint8 or None; errors: sample id ->
    reason for each unreadable sample in the batch (its rows are zeros).
    """

    unit: int
    start: int
    pixels: torch.Tensor
    masks: np.ndarray | None
    errors: dict[str, str]

    def pin_memory(self) -> Batch:
        """DataLoader(pin_memory=True) calls this: page-locked pixels copy to a GPU faster."""
        return replace(self, pixels=self.pixels.pin_memory())


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
        self._last: tuple[int, Decoded] | None = None  # volumes span batches: keep the last

    def __len__(self) -> int:
        return len(self.batches)

    def _decode(self, i: int) -> Decoded:
        sample = self.prep.samples[i]
        try:
            loaded = readers.load(self.prep.ds, sample)
            pixels, mask = preprocess(loaded.image, loaded.mask, self.pre)
        except BadInputError as exc:
            return Decoded(error=str(exc))
        if pixels.shape[0] != sample.n_items:
            return Decoded(
                error=f"{sample.image}: {pixels.shape[0]} slices, the index listed "
                f"{sample.n_items}; the file changed during the run"
            )
        return Decoded(pixels, mask)

    def _sample(self, i: int) -> Decoded:
        if self._last is None or self._last[0] != i:
            self._last = (i, self._decode(i))
        return self._last[1]

    def __getitem__(self, k: int) -> Batch:
        unit, start, stop = self.batches[k]
        n, r = stop - start, self.pre.resolution
        pixels = np.zeros((n, 3, r, r), np.float32)
        masks = np.zeros((n, r, r), np.uint8) if self.layout.mask_size else None
        errors: dict[str, str] = {}
        for j, item in enumerate(range(start, stop)):
            i, k_slice = self.index[item]
            got = self._sample(i)
            if got.pixels is None:
                errors[self.prep.samples[i].id] = str(got.error)
                continue
            pixels[j] = got.pixels[k_slice]
            if masks is not None and got.mask is not None:
                masks[j] = got.mask[k_slice]
        return Batch(unit, start, torch.from_numpy(pixels), masks, errors)


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
    """DataLoader `worker_init_fn`: one intra-op thread per decode worker."""
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

    def put(
        self, unit: int, cls: np.ndarray, patch: np.ndarray | None, mask: np.ndarray | None
    ) -> None:
        """Add one batch; queue the unit for writing once all its items are in.

        Args:
            unit: the unit the batch belongs to.
            cls: (B, D) or (B, L, D), in the set's dtype (float16 | float32).
            patch: (B, rows, cols, D) in the set's dtype, or None without patch tokens.
            mask: (B, R, R) uint8, or None without masks.
        """
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
        """Wait for every queued unit to be written; re-raise a writer error here."""
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
