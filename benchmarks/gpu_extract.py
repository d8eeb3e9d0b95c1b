"""Extraction on a GPU: bare forward vs the whole pipeline, DINOv3 ViT-S/B/L shapes.

    python benchmarks/gpu_extract.py [--models vits16,vitb16,vitl16] [--sizes 224,512]
        [--preprocess-on cpu,device] [--source-size 512]

For each model (the preset architecture, random init: the speed is the same as with
real weights), input size and preprocessing placement: bare images/s (bf16 autocast
forward on ready device tensors), pipeline images/s (`extract_one`: PNG decode in
DataLoader workers, preprocessing there (`cpu`: float32 tensors shipped) or on the
GPU (`device`: uint8 pixels shipped), pinned non-blocking copies, cast and check on
the device, writer pool), their ratio, peak GPU memory and MB/s written. The PNGs
are --source-size px (default: the input size, so nothing is resized); another size
adds the resize to what each placement does. Without a CUDA device it says so and
exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from featstore.data import readers
from featstore.data.manifest import Dataset, Manifest, Synthetic
from featstore.encode.encoders import load_encoder
from featstore.encode.preprocess import preprocess
from featstore.extraction.run import Options, extract_one
from featstore.identity import requested


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="vits16,vitb16,vitl16")
    ap.add_argument("--sizes", default="224,512")
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--preprocess-on", default="cpu,device", help="cpu, device or cpu,device")
    ap.add_argument("--source-size", type=int, default=None, help="PNG size (default: input)")
    args = ap.parse_args()
    places = args.preprocess_on.split(",")
    if not set(places) <= {"cpu", "device"}:
        ap.error("--preprocess-on takes cpu, device or cpu,device")
    if not torch.cuda.is_available():
        print("no CUDA device: gpu_extract.py measures nothing here (skipped)")
        sys.exit(0)
    print(f"device: {torch.cuda.get_device_name()}, {os.cpu_count()} CPU cores")
    print(f"{'model':<8} {'px':>4} {'src':>4} {'prep':>6} {'bare img/s':>11} {'pipe img/s':>11} "
          f"{'ratio':>6} {'GPU GB':>7} {'MB/s':>7}")  # fmt: skip
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        for size in map(int, args.sizes.split(",")):
            src = args.source_size or size
            ds = Dataset(
                name=f"png{src}", format="synthetic", path=tmp / f"data{src}",
                synthetic=Synthetic(kind="cls2d", n=args.n, size=src),
                task="classification", dims=2,
            )  # fmt: skip
            prep = readers.prepare(ds)
            for model in args.models.split(","):
                spec = f"dinov3-{model}:random"
                enc = load_encoder(spec, "cuda")
                m = Manifest(
                    cache=tmp / f"cache-{model}-{size}", datasets=(ds,), encoders=(spec,),
                    resolutions=(size,), batch_size=args.batch_size,
                )  # fmt: skip
                ident = requested(ds, m, prep.fingerprint, spec, size).with_weights(enc.info)
                pre = ident.preprocess()
                x = torch.from_numpy(
                    np.concatenate(
                        [preprocess(readers.load(ds, s).image, None, pre)[0]
                         for s in prep.samples[: args.batch_size]]
                    )
                ).cuda()  # fmt: skip
                enc.encode(x)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                steps = max(1, args.n // args.batch_size)
                for _ in range(steps):
                    enc.encode(x)
                torch.cuda.synchronize()
                bare = steps * len(x) / (time.perf_counter() - t0)
                bare_gb = torch.cuda.max_memory_allocated() / 1e9
                for place in places:
                    run = m.model_copy(update={"cache": tmp / f"cache-{model}-{size}-{place}"})
                    opts = Options(num_workers=args.workers, progress=False,
                                   preprocess_on=place)  # type: ignore[arg-type]  # fmt: skip
                    torch.cuda.reset_peak_memory_stats()
                    t0 = time.perf_counter()
                    s = extract_one(prep, enc, spec, size, run, opts)
                    secs = time.perf_counter() - t0
                    gb = max(bare_gb, torch.cuda.max_memory_allocated() / 1e9)
                    print(f"{model:<8} {size:>4} {src:>4} {place:>6} {bare:11.0f} "
                          f"{s.items / secs:11.0f} {s.items / secs / bare:6.3f} {gb:7.2f} "
                          f"{s.mbytes / secs:7.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
