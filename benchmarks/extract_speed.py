"""Bare forward passes vs the full extract pipeline, same encoder and images, one process.

    python benchmarks/extract_speed.py [--resolution 224] [--n 128] [--workers 1]

Prints items/s for (a) a loop of forward passes on ready, preprocessed tensors and
(b) `featstore.extraction.extract_one` (read PNG, preprocess in a worker, forward,
write Zarr in a background thread, from allocation to `complete`), and their ratio.
The two alternate for --rounds rounds and the medians are compared, so that drift in
the machine's speed hits both alike. Target: ratio >= 0.9.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from featstore import readers
from featstore.encoders import load_encoder
from featstore.extraction import Options, extract_one
from featstore.identity import requested
from featstore.manifest import Dataset, Manifest, Synthetic
from featstore.preprocess import preprocess


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoder", default="dinov3-vits16")
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--n", type=int, default=768)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        ds = Dataset(
            name="bench",
            format="synthetic",
            path=Path(tmp) / "data",
            synthetic=Synthetic(kind="cls2d", n=args.n, size=96),
            task="classification",
            dims=2,
        )
        manifest = Manifest(
            cache=Path(tmp) / "cache",
            datasets=(ds,),
            encoders=(args.encoder,),
            resolutions=(args.resolution,),
            batch_size=args.batch_size,
        )
        prep = readers.prepare(ds)
        encoder = load_encoder(args.encoder, "cpu")
        ident = requested(ds, manifest, prep.fingerprint, args.encoder, args.resolution)
        pre = ident.with_weights(encoder.info).preprocess()
        ready = torch.from_numpy(
            np.concatenate(
                [preprocess(readers.load(ds, s).image, None, pre)[0] for s in prep.samples]
            )
        )
        encoder.encode(ready[:4])  # warm-up (allocator, kernels)

        bare, full = [], []
        for r in range(args.rounds):
            t0 = time.perf_counter()
            for i in range(0, len(ready), args.batch_size):
                encoder.encode(ready[i : i + args.batch_size])
            bare.append(len(ready) / (time.perf_counter() - t0))
            run = manifest.model_copy(update={"cache": Path(tmp) / f"cache{r}"})
            t0 = time.perf_counter()
            opts = Options(num_workers=args.workers, progress=False)
            summary = extract_one(prep, encoder, args.encoder, args.resolution, run, opts)
            full.append(summary.items / (time.perf_counter() - t0))
            print(f"round {r}: bare {bare[-1]:.2f} items/s, pipeline {full[-1]:.2f} items/s")
        bare_rate, full_rate = float(np.median(bare)), float(np.median(full))

    print(
        f"encoder {encoder.info.name} (random_init={encoder.info.random_init}), "
        f"{args.resolution}px, {args.n} images, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"bare forward loop  : {bare_rate:7.2f} items/s (median of {args.rounds})")
    print(f"extract pipeline   : {full_rate:7.2f} items/s (median of {args.rounds})")
    print(f"ratio pipeline/bare: {full_rate / bare_rate:.3f}  (target >= 0.9)")


if __name__ == "__main__":
    main()
