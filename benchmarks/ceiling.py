"""The pipeline's ceiling: extract with a zero-cost forward pass vs numpy.save, same disk.

    python benchmarks/ceiling.py [--n 1536] [--rounds 3] [--codec lz4] [--writers 2]

A stand-in for a very fast GPU: the "encoder" returns ready float16 tokens of
DINOv3 ViT-B/16 shapes at 224 px (CLS 768, 14x14x768 patch tokens; 301 KB per image)
at zero cost, as a GPU that casts on the device would hand them over. Everything
else is the real `extract_with` (the driver's `extract_set`): PNG decode and
preprocessing in DataLoader workers,
units assembled, checked and written by the writer pool, marks, `complete`.
numpy.save writes the same number of bytes into the same folder. Both sides end with
os.sync(), so both are measured to the disk, not the page cache. The two alternate
for --rounds rounds; medians are compared. Target: pipeline >= 0.8 of numpy.save.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from featstore.data import readers
from featstore.data.manifest import Dataset, Manifest
from featstore.data.settings import Synthetic
from featstore.encode.encoders import Encoder, FeatureBatch
from featstore.encode.pixels import Pixels
from featstore.encode.protocol import Resolved
from featstore.extraction.local import extract_with
from featstore.extraction.run import Options
from featstore.identity import EncoderInfo

HIDDEN, PATCH = 768, 16


class ZeroCost(Encoder):
    """Returns the same ready tokens for every batch: no forward pass at all."""

    def __init__(self, resolution: int, batch: int) -> None:
        info = EncoderInfo(
            "zero-cost-vitb16", "benchmark", "0" * 64, "none", PATCH, 0, HIDDEN,
            (0.5,) * 3, (0.25,) * 3, True,
        )  # fmt: skip
        super().__init__(Resolved(info, lambda: Pixels(PATCH)), "cpu")  # never built
        g = resolution // PATCH
        gen = torch.Generator().manual_seed(0)
        self.cls = torch.randn(batch, 1, HIDDEN, generator=gen).half()
        self.patch = torch.randn(batch, 1, g, g, HIDDEN, generator=gen).half()

    def encode(
        self, pixels: torch.Tensor, layers: int = 1, patch_layers: tuple[int, ...] = (-1,)
    ) -> FeatureBatch:
        b = len(pixels)
        return FeatureBatch(cls=self.cls[:b], patch=self.patch[:b])


def _save_rate(folder: Path, nbytes: int, batch_bytes: np.ndarray) -> float:
    """MB/s of numpy.save writing `nbytes` as files of `batch_bytes` each."""
    folder.mkdir()
    t0 = time.perf_counter()
    for i in range(nbytes // batch_bytes.nbytes):
        np.save(folder / f"{i}.npy", batch_bytes)
    os.sync()  # to the disk, not just the page cache (both sides)
    return nbytes / 1e6 / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1536)
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--codec", default="lz4")
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--dir", default=None, help="folder on the disk to measure (default: tmp)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        ds = Dataset(
            name="ceiling",
            format="synthetic",
            path=Path(tmp) / "data",
            synthetic=Synthetic(kind="cls2d", n=args.n, size=args.resolution),
            task="classification",
            dims=2,
        )
        manifest = Manifest(
            cache=Path(tmp) / "cache",
            datasets=(ds,),
            batch_size=args.batch_size,
            codec=args.codec,
        )
        prep = readers.prepare(ds)
        encoder = ZeroCost(args.resolution, args.batch_size)
        opts = Options(num_workers=args.workers, writers=args.writers, progress=False)
        per_item = (encoder.patch[0].numel() + HIDDEN) * 2
        nbytes = per_item * args.n
        one_batch = np.concatenate(
            [encoder.cls.numpy().reshape(-1), encoder.patch.numpy().reshape(-1)]
        )
        pipe, save = [], []
        for r in range(args.rounds):
            run = manifest.model_copy(update={"cache": Path(tmp) / f"cache{r}"})
            t0 = time.perf_counter()
            s = extract_with(encoder, "zero-cost", prep, args.resolution, run, opts)
            os.sync()
            pipe.append(s.items * per_item / 1e6 / (time.perf_counter() - t0))
            shutil.rmtree(Path(tmp) / f"cache{r}")
            save.append(_save_rate(Path(tmp) / f"npy{r}", nbytes, one_batch))
            shutil.rmtree(Path(tmp) / f"npy{r}")
            print(f"round {r}: pipeline {pipe[-1]:.0f} MB/s, numpy.save {save[-1]:.0f} MB/s")
        p, sv = float(np.median(pipe)), float(np.median(save))
    print(
        f"{args.n} images {args.resolution}px, ViT-B/16 token shapes ({per_item / 1e3:.0f} KB "
        f"per item, float16), batch {args.batch_size}, codec {args.codec}+crc32c, "
        f"{args.workers} loader workers, {args.writers} writers, {os.cpu_count()} cores"
    )
    print(f"pipeline (zero-cost forward): {p:6.0f} MB/s = {p * 1e6 / per_item:6.0f} items/s")
    print(f"numpy.save, same bytes      : {sv:6.0f} MB/s")
    print(f"ratio pipeline/numpy.save   : {p / sv:.3f}  (target >= 0.8)")


if __name__ == "__main__":
    main()
