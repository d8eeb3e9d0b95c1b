"""Compression ratio and speed of candidate Zarr codecs on stored patch tokens.

    python benchmarks/codecs.py [FEATURE_SET]   (default: the largest set in cache/features)

Writes the set's `patch` array (float16) with each codec into a temporary store and
reads it back; prints ratio (raw / stored bytes), write MB/s and read MB/s. The
store's CODEC constant was chosen from this table.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

CANDIDATES = {
    "none": [],
    "zstd-0 (zarr default)": [ZstdCodec(level=0)],
    "zstd-3": [ZstdCodec(level=3)],
    "blosc-lz4 shuffle": [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
    "blosc-zstd-3 shuffle": [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")],
    "blosc-zstd-3 bitshuffle": [BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")],
    "blosc-zstd-5 bitshuffle": [BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle")],
}


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
    print(f"{'codec':<26} {'ratio':>6} {'write MB/s':>11} {'read MB/s':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, codecs in CANDIDATES.items():
            target = Path(tmp) / name.replace(" ", "_")
            arr = zarr.create_array(
                target, shape=data.shape, chunks=chunks, dtype=data.dtype, compressors=codecs
            )
            t0 = time.perf_counter()
            arr[:] = data
            write = data.nbytes / 1e6 / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            back = arr[:]
            read = data.nbytes / 1e6 / (time.perf_counter() - t0)
            assert np.array_equal(back.view(np.uint16), data.view(np.uint16))
            stored = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
            print(f"{name:<26} {data.nbytes / stored:6.2f} {write:11.0f} {read:10.0f}")


if __name__ == "__main__":
    main()
