"""Bare forward passes vs the whole extract pipeline, same encoder and inputs, one process.

    python benchmarks/extract_speed.py --case vits-224      # ViT-S/16, 224 px PNGs (slow forward)
    python benchmarks/extract_speed.py --case vitb0-224     # ViT-B shapes, 0 blocks (cheap forward)
    python benchmarks/extract_speed.py --case vits-32-3d    # ViT-S/16 at 32 px, 260 28^3 volumes

Prints items/s for (a) a loop of `encoder.encode` on ready, preprocessed tensors
(tokens left on the device, as a bare loop would) and (b) `extract_one` from
allocation to `complete` (decode and preprocess in DataLoader workers, forward,
cast/check/write in the writer pool), and their ratio. The two alternate for --rounds
rounds and medians are compared, so that drift in the machine's speed hits both.
Targets: vits-224 >= 0.95, vitb0-224 >= 0.8, vits-32-3d >= 0.9.
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

CASES = {  # encoder, resolution, images, batch
    "vits-224": ("dinov3-vits16", 224, 768, 32),
    "vitb0-224": ("vitb0", 224, 1536, 64),
    "vits-32-3d": ("dinov3-vits16", 32, 260, 256),
}


def _vitb0(folder: Path) -> str:
    """DINOv3 ViT-B/16 token shapes with 0 transformer blocks: a near-free forward pass."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    cfg = DINOv3ViTConfig(
        hidden_size=768, num_attention_heads=12, intermediate_size=3072,
        num_hidden_layers=0, patch_size=16, num_register_tokens=4,
    )  # fmt: skip
    torch.manual_seed(0)
    DINOv3ViTModel(cfg).eval().save_pretrained(folder)
    return str(folder)


def _dataset(case: str, tmp: Path, n: int, resolution: int) -> Dataset:
    if case == "vits-32-3d":  # a MedMNIST-3D file: (N, 28, 28, 28) uint8 volumes
        rng = np.random.default_rng(0)
        arrays = {}
        for split, k in (("train", n - 80), ("val", 40), ("test", 40)):
            arrays[f"{split}_images"] = rng.integers(0, 255, (k, 28, 28, 28), dtype=np.uint8)
            arrays[f"{split}_labels"] = rng.integers(0, 2, (k, 1), dtype=np.uint8)
        np.savez(tmp / "vol3d.npz", **arrays)
        return Dataset(
            name="vol3d", format="medmnist", path=tmp / "vol3d.npz",
            task="classification", dims=3,
        )  # fmt: skip
    return Dataset(
        name="png", format="synthetic", path=tmp / "data",
        synthetic=Synthetic(kind="cls2d", n=n, size=resolution if case == "vitb0-224" else 96),
        task="classification", dims=2,
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", choices=sorted(CASES), default="vits-224")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    spec, resolution, n, batch = CASES[args.case]
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    with tempfile.TemporaryDirectory(dir="." if Path("cache").is_dir() else None) as t:
        tmp = Path(t)
        if spec == "vitb0":
            spec = _vitb0(tmp / "vitb0")
        ds = _dataset(args.case, tmp, n, resolution)
        manifest = Manifest(
            cache=tmp / "cache", datasets=(ds,), encoders=(spec,), resolutions=(resolution,),
            batch_size=batch,
        )  # fmt: skip
        prep = readers.prepare(ds)
        encoder = load_encoder(spec, "cpu")
        ident = requested(ds, manifest, prep.fingerprint, spec, resolution)
        pre = ident.with_weights(encoder.info).preprocess()
        ready = torch.from_numpy(
            np.concatenate(
                [preprocess(readers.load(ds, s).image, None, pre)[0] for s in prep.samples]
            )
        )
        encoder.encode(ready[:4])  # warm-up (allocator, kernels)
        opts = Options(
            num_workers=args.workers, writers=args.writers, threads=args.threads, progress=False
        )
        bare, full = [], []
        for r in range(args.rounds):
            t0 = time.perf_counter()
            for i in range(0, len(ready), batch):
                encoder.encode(ready[i : i + batch])
            bare.append(len(ready) / (time.perf_counter() - t0))
            run = manifest.model_copy(update={"cache": tmp / f"cache{r}"})
            t0 = time.perf_counter()
            summary = extract_one(prep, encoder, spec, resolution, run, opts)
            full.append(summary.items / (time.perf_counter() - t0))
            print(f"round {r}: bare {bare[-1]:.1f} items/s, pipeline {full[-1]:.1f} items/s")
        bare_rate, full_rate = float(np.median(bare)), float(np.median(full))
    print(
        f"case {args.case}: {encoder.info.name} (random_init={encoder.info.random_init}), "
        f"{resolution}px, {len(ready)} items, batch {batch}, {torch.get_num_threads()} "
        f"torch threads, workers {args.workers}, writers {args.writers}"
    )
    print(f"bare forward loop  : {bare_rate:8.1f} items/s (median of {args.rounds})")
    print(f"extract pipeline   : {full_rate:8.1f} items/s (median of {args.rounds})")
    print(f"ratio pipeline/bare: {full_rate / bare_rate:.3f}")


if __name__ == "__main__":
    main()
