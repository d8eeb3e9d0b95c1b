"""Compression ratio and speed of candidate Zarr codecs on stored patch tokens.

    python benchmarks/codecs.py [FEATURE_SET]   (default: the largest set in cache/features)

Writes the set's `patch` array (float16) with each `codec` choice of the manifest
(plus the crc32c checksum every chunk carries) into a temporary store and reads it
back; prints ratio (raw / stored bytes), write MB/s and read MB/s, alternating the
codecs for --rounds rounds and reporting medians. The default `codec` was chosen
from this table. The last row, `int8 (lz4)`, is `quantize: int8`: quantisation (in
the write time) to int8 plus a float32 scale per item and channel, both lz4; its
MB/s count the float16 tokens it stores, so that every row compares the same work.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from featstore.store.codec import quantize_int8
from featstore.store.schema import CHECKSUM, CODECS

# The manifest's `codec` choices, each followed by the crc32c checksum every chunk carries.
CANDIDATES = {name: [*codecs, CHECKSUM] for name, codecs in CODECS.items()}


INT8 = "int8 (lz4)"


def _int8(data: np.ndarray, chunks: tuple[int, ...], target: Path) -> tuple[float, float, float]:
    """`quantize: int8` with lz4: (write MB/s, read MB/s of dequantized float32, ratio)."""
    codecs = [*CODECS["lz4"], CHECKSUM]
    q_arr = zarr.create_array(
        target / "q", shape=data.shape, chunks=chunks, dtype="int8", compressors=codecs
    )
    s_arr = zarr.create_array(
        target / "s",
        shape=(data.shape[0], data.shape[-1]),
        chunks=(chunks[0], data.shape[-1]),
        dtype="float32",
        compressors=codecs,
    )
    step = chunks[0]
    t0 = time.perf_counter()
    for a in range(0, len(data), step):  # unit by unit, as the writer does
        got = quantize_int8(data[a : a + step])
        q_arr[a : a + step] = got.values
        s_arr[a : a + step] = got.scale
    write = data.nbytes / 1e6 / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    back = q_arr[:].astype(np.float32) * s_arr[:][:, None, None, :]
    read = data.nbytes / 1e6 / (time.perf_counter() - t0)
    err = float(np.abs(back - data.astype(np.float32)).max())
    assert err <= float(np.abs(data).max()) / 127, err  # within half a step of the scale
    stored = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    return write, read, data.nbytes / stored


def main() -> None:
    if len(sys.argv) > 1:
        path = Path(sys.argv[1])
    else:
        sets = sorted(
            Path("cache/features").glob("*.zarr"),
            key=lambda p: sum(f.stat().st_size for f in p.rglob("*")),
        )
        if not sets:
            sys.exit("no feature sets: run `make extract` first or pass a path")
        path = sets[-1]
    xs = xr.open_zarr(path)
    data = np.asarray(xs.patch.values)
    chunks = xs.patch.encoding.get("chunks") or xs.patch.data.chunksize
    enc = xs.attrs["encoder"]
    print(
        f"{path}: patch {data.shape} {data.dtype}, {data.nbytes / 1e6:.1f} MB raw; encoder "
        f"{enc['name']} random_init={enc['random_init']}"
    )
    rounds = 3
    names = [*CANDIDATES, INT8]
    writes: dict[str, list[float]] = {n: [] for n in names}
    reads: dict[str, list[float]] = {n: [] for n in names}
    ratio: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for name, codecs in CANDIDATES.items():
                target = Path(tmp) / f"{name}-{r}"
                arr = zarr.create_array(
                    target, shape=data.shape, chunks=chunks, dtype=data.dtype, compressors=codecs
                )
                t0 = time.perf_counter()
                arr[:] = data
                writes[name].append(data.nbytes / 1e6 / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                back = arr[:]
                reads[name].append(data.nbytes / 1e6 / (time.perf_counter() - t0))
                assert np.array_equal(back.view(np.uint16), data.view(np.uint16))
                stored = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
                ratio[name] = data.nbytes / stored
            w, rd, ratio[INT8] = _int8(data, chunks, Path(tmp) / f"int8-{r}")
            writes[INT8].append(w)
            reads[INT8].append(rd)
    print(f"{'codec (+crc32c)':<18} {'ratio':>6} {'write MB/s':>11} {'read MB/s':>10}  (medians)")
    for name in names:
        w, rd = float(np.median(writes[name])), float(np.median(reads[name]))
        print(f"{name:<18} {ratio[name]:6.2f} {w:11.0f} {rd:10.0f}")


if __name__ == "__main__":
    main()
