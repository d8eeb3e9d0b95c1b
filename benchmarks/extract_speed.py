"""Bare forward passes vs the whole extract pipeline, same encoder and inputs, one process.

    python benchmarks/extract_speed.py --case vits-224      # ViT-S/16, 224 px PNGs (slow forward)
    python benchmarks/extract_speed.py --case vitb0-224     # ViT-B shapes, 0 blocks (cheap forward)
    python benchmarks/extract_speed.py --case vits-32-3d    # ViT-S/16 at 32 px, 260 28^3 volumes
    python benchmarks/extract_speed.py --case timm-vits-224 # timm ViT-S/16, 224 px
    python benchmarks/extract_speed.py --case vits-224 --preprocess-on cpu,device --n 192

Prints items/s for (a) a loop of `encoder.encode` on ready, preprocessed tensors
(tokens left on the device, as a bare loop would) and (b) `extract_with` (the
driver's `extract_set`) from
allocation to `complete` (decode and preprocess in DataLoader workers, forward,
cast/check/write in the writer pool), and their ratio. The two alternate for --rounds
rounds and medians are compared, so that drift in the machine's speed hits both; the
ratio of each round's two sides (run back to back) and their median are printed too,
since this machine's speed moves by 20% or more within a minute.
Targets: vits-224 and timm-vits-224 >= 0.95, vitb0-224 >= 0.8, vits-32-3d >= 0.9.

`--preprocess-on cpu,device` runs (b) once per placement in every round (alternating)
and, for each, times the loader alone: a worker's seconds per batch (`Batches`, in
this process) and the bytes it ships, and the seconds `devprep.to_input` then takes
in the main process (on a CPU; on a GPU see gpu_extract.py).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from featstore.data import readers
from featstore.data.manifest import Dataset, Manifest
from featstore.data.settings import Synthetic
from featstore.encode.devprep import RawPixels, to_input
from featstore.encode.encoders import load_encoder
from featstore.encode.preprocess import preprocess
from featstore.extraction.batches import Batches, plan_batches
from featstore.extraction.local import extract_with
from featstore.extraction.run import Options
from featstore.identity import Preprocess, requested
from featstore.store.schema import layout_for

CASES = {  # encoder, resolution, images, batch
    "vits-224": ("dinov3-vits16", 224, 768, 32),
    "vitb0-224": ("vitb0", 224, 1536, 64),
    "vits-32-3d": ("dinov3-vits16", 32, 260, 256),
    # timm's ViT-S/16 (random init: no weights here), bicubic as its pretrained_cfg says
    "timm-vits-224": ("timm:vit_small_patch16_224.augreg_in21k_ft_in1k:random", 224, 768, 32),
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


def _loader(
    prep, pre: Preprocess, layout, batch: int, placement: str
) -> tuple[float, float, float]:
    """(worker s/batch, MB shipped per batch, to_input s/batch) over every batch."""
    plan = plan_batches(layout, list(range(layout.n_units)), batch)
    feed = Batches(prep, pre, layout, plan, placement)  # type: ignore[arg-type]
    work = prep_s = 0.0
    nbytes = 0
    for k in range(len(plan)):
        t0 = time.perf_counter()
        b = feed[k]
        work += time.perf_counter() - t0
        if isinstance(b.pixels, RawPixels):
            nbytes += b.pixels.nbytes
            t0 = time.perf_counter()
            to_input(b.pixels, pre, torch.device("cpu"))
            prep_s += time.perf_counter() - t0
        else:
            nbytes += b.pixels.numel() * b.pixels.element_size()
    n = len(plan)
    return work / n, nbytes / n / 1e6, prep_s / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", choices=sorted(CASES), default="vits-224")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--preprocess-on", default="auto", help="auto, cpu, device or cpu,device")
    ap.add_argument("--n", type=int, default=None, help="items (default: the case's)")
    args = ap.parse_args()
    spec, resolution, n, batch = CASES[args.case]
    n = args.n or n
    places = args.preprocess_on.split(",")
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
        opts = {
            p: Options(
                num_workers=args.workers,
                writers=args.writers,
                threads=args.threads,
                progress=False,
                preprocess_on=p,  # type: ignore[arg-type]
            )
            for p in places
        }
        layout = layout_for(ident.with_weights(encoder.info), len(ready), "single", batch, batch)
        bare: list[float] = []
        full: dict[str, list[float]] = {p: [] for p in places}
        feed: dict[str, list[tuple[float, float, float]]] = {p: [] for p in places}
        for r in range(args.rounds):
            t0 = time.perf_counter()
            for i in range(0, len(ready), batch):
                encoder.encode(ready[i : i + batch])
            bare.append(len(ready) / (time.perf_counter() - t0))
            line = f"round {r}: bare {bare[-1]:.1f} items/s"
            for p in places if r % 2 == 0 else places[::-1]:  # alternate which side goes first
                run = manifest.model_copy(update={"cache": tmp / f"cache{r}{p}"})
                t0 = time.perf_counter()
                summary = extract_with(encoder, spec, prep, resolution, run, opts[p])
                full[p].append(summary.items / (time.perf_counter() - t0))
                line += f", pipeline[{p}] {full[p][-1]:.1f} items/s"
                if len(places) > 1:
                    feed[p].append(_loader(prep, pre, layout, batch, p))
            print(line)
        bare_rate = float(np.median(bare))
        full_rate = float(np.median(full[places[0]]))
    print(
        f"case {args.case}: {encoder.info.name} (random_init={encoder.info.random_init}), "
        f"{resolution}px, {len(ready)} items, batch {batch}, {torch.get_num_threads()} "
        f"torch threads, workers {args.workers}, writers {args.writers}"
    )
    print(f"bare forward loop  : {bare_rate:8.1f} items/s (median of {args.rounds})")
    if len(places) == 1:
        paired = np.asarray(full[places[0]]) / np.asarray(bare)
        print(f"extract pipeline   : {full_rate:8.1f} items/s (median of {args.rounds})")
        print(f"ratio pipeline/bare: {full_rate / bare_rate:.3f} (of the medians)")
        print(
            f"per round          : {' '.join(f'{r:.3f}' for r in paired)}; median "
            f"{np.median(paired):.3f} (each round's two sides ran back to back)"
        )
        return
    for p in places:
        rate = float(np.median(full[p]))
        work, mb, prep_s = (float(np.median([f[i] for f in feed[p]])) for i in range(3))
        print(
            f"preprocess on {p:<6}: pipeline {rate:7.1f} items/s (ratio {rate / bare_rate:.3f}); "
            f"loader {1e3 * work:6.1f} ms/batch, {mb:6.3f} MB/batch shipped; "
            f"to_input {1e3 * prep_s:5.1f} ms/batch (medians of {args.rounds})"
        )


if __name__ == "__main__":
    main()
