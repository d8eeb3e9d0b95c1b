"""Feeding the encoder: batches decoded in DataLoader workers, units assembled for writing.

A unit is one storage chunk made of whole batches. `Batches` decodes and preprocesses
one batch per call (in a worker process); `writer.UnitQueue` collects a unit's batches
and hands whole units to a pool of writer threads, so the forward pass never waits on
I/O.
With placement "device" a worker only decodes, and its batch carries the stored
integers for `devprep.to_input` to preprocess on the encoder's device.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from featstore.data import readers
from featstore.data.readers import Prepared
from featstore.encode.devprep import Part, Placement, RawPixels, RawSample, pack, raw_sample
from featstore.encode.preprocess import fit_mask, inputs_per_item, preprocess
from featstore.errors import BadInputError
from featstore.identity import Preprocess
from featstore.store import schema


@dataclass(frozen=True)
class Decoded:
    """One sample ready for the encoder, or the reason it could not be read.

    pixels: (D, 3G, R, R) float32 normalised (placement "cpu"; G: `inputs_per_item`);
    raw: the decoded sample for the device (placement "device"); mask: (D, R, R) uint8
    or None.
    """

    pixels: np.ndarray | None = None
    mask: np.ndarray | None = None
    error: str | None = None
    raw: RawSample | None = None

    @property
    def slices(self) -> int:
        """Slices decoded (0 when unreadable)."""
        if self.raw is not None:
            return len(self.raw.image)
        return 0 if self.pixels is None else len(self.pixels)


@dataclass(frozen=True)
class Batch:
    """One batch of consecutive items of one unit.

    pixels: (B, 3G, R, R) float32 normalised (G: `inputs_per_item`), or (placement
    "device") the decoded integers that `devprep.to_input` turns into it; masks:
    (B, R, R) uint8 or None; errors: sample id -> reason for each unreadable sample
    in the batch (its rows are zeros).
    """

    unit: int
    start: int
    pixels: torch.Tensor | RawPixels
    masks: np.ndarray | None
    errors: dict[str, str]

    def pin_memory(self) -> Batch:
        """DataLoader(pin_memory=True) calls this: page-locked pixels copy to a GPU faster."""
        return replace(self, pixels=self.pixels.pin_memory())


class Batches(torch.utils.data.Dataset[Batch]):
    """Decodes and preprocesses one batch of items per call, in a worker.

    Batches never straddle units and always cover the same items, so a resumed run
    forwards exactly the batches an uninterrupted one would (byte-identical output).
    """

    def __init__(
        self,
        prep: Prepared,
        pre: Preprocess,
        layout: schema.Layout,
        batches: list[tuple[int, int, int]],
        placement: Placement = "cpu",
    ):
        self.prep, self.pre, self.layout, self.batches = prep, pre, layout, batches
        self.placement = placement
        self.index = prep.index
        self._last: tuple[int, Decoded] | None = None  # volumes span batches: keep the last
        self.tiled = readers.tiled(prep.ds)

    def __len__(self) -> int:
        return len(self.batches)

    def _decode(self, i: int, items: range | None = None) -> Decoded:
        """Decode sample i (a tiled sample: only `items`, the rows of this batch)."""
        sample = self.prep.samples[i]
        device = self.placement == "device"
        try:
            loaded = readers.load(self.prep.ds, sample, as_read=device, items=items)
            if device:
                got = Decoded(
                    mask=fit_mask(loaded.mask, self.pre),
                    raw=raw_sample(loaded.image, self.pre.intensity, loaded.span),
                )
            else:
                got = Decoded(*preprocess(loaded.image, loaded.mask, self.pre, loaded.span))
        except BadInputError as exc:
            return Decoded(error=str(exc))
        expected = sample.n_items if items is None else len(items)
        if got.slices != expected:
            return Decoded(
                error=f"{sample.image}: {got.slices} slices, the index listed "
                f"{sample.n_items}; the file changed during the run"
            )
        return got

    def _sample(self, i: int, first: int, run: int) -> tuple[Decoded, int]:
        """Items first..first+run of sample i, and the row of `first` in the result.
        Slides and HDF5/Zarr volumes are decoded run by run; other samples whole and
        kept, since a volume's slices span batches."""
        if self.tiled:
            return self._decode(i, range(first, first + run)), 0
        if self._last is None or self._last[0] != i:
            self._last = (i, self._decode(i))
        return self._last[1], first

    def __getitem__(self, k: int) -> Batch:
        unit, start, stop = self.batches[k]
        n, r = stop - start, self.pre.resolution
        device = self.placement == "device"
        g = inputs_per_item(self.pre)  # encoder inputs per item (per-channel: one a channel)
        pixels = None if device else np.empty((n, 3 * g, r, r), np.float32)  # rows set below
        parts: list[Part] = []  # device: what each run of rows holds
        masks = np.zeros((n, r, r), np.uint8) if self.layout.mask_size else None
        errors: dict[str, str] = {}
        j = 0
        while j < n:  # one copy per run of slices of one sample, not one per item
            i, first = self.index[start + j]
            run = min(n - j, self.prep.samples[i].n_items - first)
            got, at = self._sample(i, first, run)
            if got.error is not None:
                errors[self.prep.samples[i].id] = got.error
                if pixels is not None:
                    pixels[j : j + run] = 0
                if masks is not None:
                    masks[j : j + run] = 0
            else:
                if got.raw is not None:
                    parts.append(Part(j, got.raw, at, run))
                elif pixels is not None and got.pixels is not None:
                    pixels[j : j + run] = got.pixels[at : at + run]
                if masks is not None:
                    masks[j : j + run] = 0 if got.mask is None else got.mask[at : at + run]
            j += run
        out = pack(n, parts) if pixels is None else torch.from_numpy(pixels)
        return Batch(unit, start, out, masks, errors)


def plan_batches(
    layout: schema.Layout, units: list[int], batch_size: int
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
