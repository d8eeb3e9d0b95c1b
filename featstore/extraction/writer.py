"""Host side of the encoder loop: assemble batches into units, check, cast and write them.

The forward pass must never wait on the host. Per batch the main thread only hands
over what the encoder returned: on a GPU the tokens are cast to the storage dtype and
checked for NaN/Inf on the device and copied with non-blocking copies into reused,
page-locked unit buffers; on a CPU the float32 tokens are passed by reference and
cast in the writer threads (numpy's cast: the bytes of earlier versions). A pool of
writer threads writes several units at once, each unit into its own chunks, and
marks it done only after its data is written, so resume and `--shard` hold.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from featstore.errors import FeatureOverflowError
from featstore.store import schema
from featstore.store.codec import quantize_int8
from featstore.store.sets import UnitWriter

# check(array, bad_rows, unit, what) -> array to write; see UnitQueue.
Check = Callable[[np.ndarray, np.ndarray, int, str], np.ndarray]


def nan_checker(ids: np.ndarray, layout: schema.Layout) -> Check:
    """NaN rows for skipped items; any other NaN/Inf is an error (float16 overflow)."""

    def check(arr: np.ndarray, bad: np.ndarray, unit: int, what: str) -> np.ndarray:
        finite = np.isfinite(arr.reshape(len(arr), -1)).all(1)
        if not finite[~bad].all():
            names = ids[layout.unit_slice(unit)][~finite & ~bad]
            raise FeatureOverflowError(
                f"the encoder gave NaN/Inf {what} features for {sorted(set(names))[:5]}; "
                "with float16 storage this is an overflow: set `dtype: float32` in the manifest"
            )
        arr[bad] = np.nan
        return arr

    return check


def pooled(patch: torch.Tensor, k: int) -> torch.Tensor:
    """(B, P, rows, cols, D) -> (B, P, rows/k, cols/k, D), the mean of each k x k block."""
    if k == 1:
        return patch
    b, p, r, c, d = patch.shape
    return patch.reshape(b, p, r // k, k, c // k, k, d).mean((3, 5))


@dataclass
class _Unit:
    """One unit being assembled: per-batch parts (CPU) or a pinned buffer (GPU)."""

    unit: int
    n: int
    filled: int = 0
    parts: list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray]] = field(
        default_factory=list
    )
    buffers: _Buffers | None = None
    event: torch.cuda.Event | None = None


@dataclass
class _Buffers:
    """Page-locked host memory for one unit, reused unit after unit."""

    cls: torch.Tensor
    patch: torch.Tensor | None
    finite: torch.Tensor  # (n,) bool: every token of the item is finite
    mask: np.ndarray | None
    bad: np.ndarray  # (n,) bool: unreadable samples (NaN rows)


class UnitQueue:
    """Collects batches into units and writes whole units on a pool of threads.

    Args:
        units: the writer of the allocated feature set (`FeatureSet.writer()`).
        layout: its shapes; `layout.dtype` is the storage dtype.
        check: called as check(array, bad_rows, unit, what) on each unit's cls and patch in
            the storage dtype; returns the array to write (NaN rows for bad items) or
            raises for NaN/Inf elsewhere.
        threads: writer threads = units written at once (each compresses its own).
        device: where the tokens come from; "cuda" uses pinned buffers and events.
    """

    def __init__(
        self,
        units: UnitWriter,
        layout: schema.Layout,
        check: Check,
        threads: int = 2,
        device: torch.device | None = None,
    ) -> None:
        self.layout = layout
        self.check = check
        self.units = units
        self.cuda = device is not None and device.type == "cuda"
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="featstore-writer")
        # Units in flight (assembling + writing) are bounded: memory stays bounded and
        # the forward pass waits when the disk is the bottleneck.
        self.slots = threading.BoundedSemaphore(max(1, threads) + 1)
        self.free: list[_Buffers] = []  # pinned unit buffers (GPU), reused
        self.host: list[np.ndarray] = []  # unit buffers of the CPU path, reused
        self.lock = threading.Lock()
        self.open: dict[int, _Unit] = {}
        self.futures: list[Future[int]] = []
        self.nbytes = 0

    # ----------------------------------------------------------- main thread

    def put(
        self,
        unit: int,
        cls: torch.Tensor,
        patch: torch.Tensor | None,
        mask: np.ndarray | None,
        bad: np.ndarray,
    ) -> None:
        """Add one batch (consecutive items of `unit`, in order).

        Args:
            cls: (B, D) or (B, L, D) float tensor as the encoder returned it.
            patch: (B, rows, cols, D) float tensor, or None without patch tokens.
            mask: (B, R, R) uint8, or None without masks.
            bad: (B,) bool, items of unreadable samples (their rows become NaN).
        """
        self._raise_failed()
        u = self.open.get(unit)
        if u is None:
            self.slots.acquire()
            region = self.layout.unit_slice(unit)
            u = self.open[unit] = _Unit(unit, region.stop - region.start)
        b = len(cls)
        if self.cuda:
            self._put_device(u, cls, patch, mask, bad)
        else:
            host_patch = None if patch is None else patch.numpy()
            u.parts.append((cls.numpy(), host_patch, mask, bad))
        u.filled += b
        if u.filled == u.n:
            del self.open[unit]
            if u.buffers is not None:
                u.event = torch.cuda.Event()
                u.event.record()
            self.futures.append(self.pool.submit(self._write, u))

    def _put_device(
        self,
        u: _Unit,
        cls: torch.Tensor,
        patch: torch.Tensor | None,
        mask: np.ndarray | None,
        bad: np.ndarray,
    ) -> None:
        dtype = getattr(torch, self.layout.dtype)
        if u.buffers is None:
            u.buffers = self._buffers(u.n, cls, patch, mask is not None)
        s = slice(u.filled, u.filled + len(cls))
        c = cls.to(dtype)
        finite = torch.isfinite(c.flatten(1)).all(1)
        u.buffers.cls[s].copy_(c, non_blocking=True)
        if patch is not None and u.buffers.patch is not None:
            p = patch.to(dtype)
            finite &= torch.isfinite(p.flatten(1)).all(1)
            u.buffers.patch[s].copy_(p, non_blocking=True)
        u.buffers.finite[s].copy_(finite, non_blocking=True)
        if mask is not None and u.buffers.mask is not None:
            u.buffers.mask[s] = mask
        u.buffers.bad[s] = bad

    def _buffers(
        self, n: int, cls: torch.Tensor, patch: torch.Tensor | None, masks: bool
    ) -> _Buffers:
        with self.lock:  # writer threads hand buffers back while the main thread takes one
            while self.free:
                buf = self.free.pop()
                if len(buf.cls) == n:
                    return buf
        dtype = getattr(torch, self.layout.dtype)
        r = self.layout.mask_size
        return _Buffers(
            cls=torch.empty((n, *cls.shape[1:]), dtype=dtype, pin_memory=True),
            patch=None
            if patch is None
            else torch.empty((n, *patch.shape[1:]), dtype=dtype, pin_memory=True),
            finite=torch.empty(n, dtype=torch.bool, pin_memory=True),
            mask=np.zeros((n, r, r), np.uint8) if masks else None,
            bad=np.zeros(n, bool),
        )

    def _raise_failed(self) -> None:
        for f in [f for f in self.futures if f.done()]:
            self.futures.remove(f)
            self.nbytes += f.result()  # re-raises a writer's error here

    def close(self) -> None:
        """Wait for every complete unit to be written (incomplete ones are dropped, not
        marked); re-raise the first writer error here."""
        self.open.clear()
        try:
            for f in self.futures:
                self.nbytes += f.result()
        finally:
            self.futures.clear()
            self.pool.shutdown(wait=True, cancel_futures=True)

    # -------------------------------------------------------- writer threads

    def _write(self, u: _Unit) -> int:
        try:
            if u.buffers is not None:
                return self._write_device(u)
            cls = self._joined([p[0] for p in u.parts])
            bad = np.concatenate([p[3] for p in u.parts])
            patch = None
            if u.parts[0][1] is not None:
                patch = self._joined([p[1] for p in u.parts])  # type: ignore[misc]
            mask = None
            if u.parts[0][2] is not None:
                mask = np.concatenate([p[2] for p in u.parts])
            u.parts.clear()
            cls = self.check(cls, bad, u.unit, "cls")
            patch = None if patch is None else self.check(patch, bad, u.unit, "patch")
            try:
                return self._write_unit(u.unit, cls, patch, mask)
            finally:
                with self.lock:
                    self.host.extend(a for a in (cls, patch) if a is not None)
        finally:
            self.slots.release()

    def _joined(self, parts: list[np.ndarray]) -> np.ndarray:
        """Batches joined and cast to the storage dtype in one pass, into a reused buffer
        (fresh 100-MB buffers cost more in page faults than the copy itself)."""
        shape = (sum(len(p) for p in parts), *parts[0].shape[1:])
        out = None
        with self.lock:
            for i, buf in enumerate(self.host):
                if buf.shape == shape:
                    out = self.host.pop(i)
                    break
        if out is None:
            out = np.empty(shape, self.layout.dtype)
        return np.concatenate(parts, out=out, casting="same_kind")

    def _write_unit(
        self, unit: int, cls: np.ndarray, patch: np.ndarray | None, mask: np.ndarray | None
    ) -> int:
        if patch is not None and self.layout.quantize == "int8":
            q = quantize_int8(patch)
            return self.units.write(unit, cls, q.values, mask, q.scale)
        return self.units.write(unit, cls, patch, mask)

    def _write_device(self, u: _Unit) -> int:
        assert u.buffers is not None and u.event is not None
        u.event.synchronize()
        buf = u.buffers
        try:
            finite = buf.finite.numpy()
            cls = buf.cls.numpy()
            patch = None if buf.patch is None else buf.patch.numpy()
            if not finite[~buf.bad].all() or buf.bad.any():
                # rare: check copies (raises naming the items; NaN rows for bad ones)
                cls = self.check(cls.copy(), buf.bad, u.unit, "cls")
                if patch is not None:
                    patch = self.check(patch.copy(), buf.bad, u.unit, "patch")
            return self._write_unit(u.unit, cls, patch, buf.mask)
        finally:
            with self.lock:
                self.free.append(buf)
