"""Memory of reading an HDF5 / Zarr volume in blocks (issue 30).

    python benchmarks/volume_blocks.py        # ~1-2 min on 2 cores, ~1.6 GB in /tmp

Writes a synthetic 2,048 x 2,048 x 200 uint8 volume (800 MiB: a smooth pattern plus
noise, so that Zarr's zstd has some work) to an HDF5 file (chunks 1 x 2048 x 2048) and
to a Zarr v3 group (chunks 8 x 512 x 512), slab by slab. Then, in a fresh process per
format and batch size, it reads the volume the way extraction does: `readers.load` of
each batch's slice run (8 or 32 slices; 32 is the default `batch_size`), `minmax` span
included, each run then preprocessed to 224 x 224 (`encode.preprocess`). It prints
the peak RSS above the interpreter after imports, against the volume's size.

The bound grows with the run, never with the depth of the volume: per run the stored
slices (batch x 4 MiB here), their float32 copy (4x that) and preprocess's float32
temporaries of the same size (its intensity mapping works on the whole run at once),
plus one block of the span scan (`volumes.BLOCK_BYTES`, 16 MiB). For 2,048 x 2,048
slices a batch of 32 is therefore larger than the 800 MiB volume itself: use a
smaller `batch_size` for such slices (8 slices: about a quarter of that).

Measured once (2 CPU cores shared with other engineers' jobs, load average ~1.2):

    format  batch  peak RSS above imports (MiB)  volume (MiB)
    hdf5        8                           413           800
    hdf5       32                          1581           800
    zarr        8                           546           800
    zarr       32                          1687           800

i.e. about 50 MiB (HDF5) to 65 MiB (Zarr) per slice of 4 Mi pixels in the batch; the
depth (200 here) does not enter (tests/test_volumes.py bounds a run of a 128 MB
volume with tracemalloc).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPE = (200, 2048, 2048)
BATCHES = (8, 32)
RAW = "volumes/raw"


def status_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def reset_peak() -> None:
    """Make VmHWM the current RSS (Linux >= 4.0): imports' own peak is left out."""
    Path("/proc/self/clear_refs").write_text("5")


def write(folder: Path) -> None:
    import h5py
    import zarr

    rng = np.random.default_rng(0)
    y, x = np.mgrid[: SHAPE[1], : SHAPE[2]]
    with h5py.File(folder / "v.h5", "w") as f:
        h5 = f.create_dataset(RAW, shape=SHAPE, dtype=np.uint8, chunks=(1, *SHAPE[1:]))
        h5.attrs["resolution"] = (40.0, 4.0, 4.0)
        group = zarr.open_group(folder / "v.zarr", mode="w", zarr_format=3)
        zr = group.create_array(RAW, shape=SHAPE, dtype=np.uint8, chunks=(8, 512, 512))
        zr.attrs["resolution"] = [40, 4, 4]
        for z in range(0, SHAPE[0], 8):  # 32 MiB at a time
            slab = np.stack(
                [((x + y + 7 * k) % 200 + rng.integers(0, 50, SHAPE[1:])) for k in range(z, z + 8)]
            ).astype(np.uint8)
            h5[z : z + 8] = slab
            zr[z : z + 8] = slab
    (folder / "index.csv").write_text("image,label,split\nv.h5,0,train\n")
    (folder / "zindex.csv").write_text("image,label,split\nv.zarr,0,train\n")


def read(folder: Path, fmt: str, batch: int) -> None:
    """Child process: decode every run as extraction would; print the peak RSS."""
    from featstore.data import readers
    from featstore.data.manifest import Dataset
    from featstore.data.settings import Intensity
    from featstore.encode.preprocess import preprocess
    from featstore.identity import Preprocess

    ds = Dataset.model_validate(
        dict(name="b", format=fmt, path=folder, index="index.csv" if fmt == "hdf5" else
             "zindex.csv", task="classification", dims=3, volume={"raw": RAW})
    )  # fmt: skip
    pre = Preprocess(224, Intensity(mode="minmax"), (0.5,) * 3, (0.25,) * 3, "resize", "bilinear")
    (s,) = readers.list_samples(ds)
    reset_peak()
    base = status_mib("VmRSS")
    start = time.perf_counter()
    for first in range(0, s.n_items, batch):
        got = readers.load(ds, s, items=range(first, min(first + batch, s.n_items)))
        preprocess(got.image, got.mask, pre, got.span)
        del got
    seconds = time.perf_counter() - start
    print(f"{fmt}\t{batch}\t{status_mib('VmHWM') - base:.0f}\t{seconds:.1f}")


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--read":
        read(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
        return 0
    size = int(np.prod(SHAPE)) / 2**20
    with tempfile.TemporaryDirectory(prefix="featstore-volumes-", dir="/tmp") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        write(folder)
        print(f"wrote {SHAPE[2]} x {SHAPE[1]} x {SHAPE[0]} uint8 ({size:.0f} MiB) to HDF5 and "
              f"Zarr v3 in {time.perf_counter() - start:.0f} s")  # fmt: skip
        print(f"{'format':8} {'batch':>5} {'peak RSS above imports (MiB)':>30} "
              f"{'volume (MiB)':>13} {'s':>6}")  # fmt: skip
        for fmt in ("hdf5", "zarr"):
            for batch in BATCHES:
                out = subprocess.run(
                    [sys.executable, __file__, "--read", str(folder), fmt, str(batch)],
                    capture_output=True, text=True, check=True,
                ).stdout.split()  # fmt: skip
                print(f"{out[0]:8} {out[1]:>5} {out[2]:>30} {size:13.0f} {out[3]:>6}")
    print("minmax span read in blocks; each row is its own process")
    return 0


if __name__ == "__main__":
    sys.exit(main())
