"""A 2-worker `--cluster` extract on one GPU, checked byte-identical to one process.

    python benchmarks/gpu/cluster_check.py [--n 512] [--json PATH] [--stand-in]

Extracts the same synthetic dataset (cls2d PNGs at 224 px, DINOv3 ViT-S/16 random
init, bf16 on CUDA) twice into two caches: once in this process (`pipelines.extract`,
its DataLoader workers and writer pool), once as one task per unit on a dask
LocalCluster of 2 worker processes that share the GPU (each loads the encoder once).
Both must give the same set (same key), `verify` must find nothing, and every chunk
file must be byte-identical. Both runs preprocess on the device (`auto` on CUDA).
--stand-in runs it on the CPU with a tiny DINOv3 (benchmarks/gpu/run.sh --dry-run),
where both sides use 1 torch thread, as the cluster's workers do. Exit status 1 when
the sets differ.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from featstore.data.manifest import Dataset, Manifest
from featstore.data.settings import Synthetic
from featstore.extraction.run import Options
from featstore.store.sets import FeatureSet
from pipelines import extract


def chunks(path: Path) -> dict[str, bytes]:
    """Every chunk file of a set (`.../c/...`), by relative path."""
    return {
        str(f.relative_to(path)): f.read_bytes()
        for f in sorted(path.rglob("*"))
        if f.is_file() and "/c/" in f.as_posix()
    }


def stand_in(folder: Path) -> str:
    """A tiny DINOv3 (patch 16) saved like real weights; returns its folder as a spec."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    cfg = DINOv3ViTConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        patch_size=16, num_register_tokens=4, image_size=224,
    )  # fmt: skip
    DINOv3ViTModel(cfg).eval().save_pretrained(folder)
    return str(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=512, help="images (224 px PNGs)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--stand-in", action="store_true", help="tiny DINOv3 on the CPU")
    args = ap.parse_args()
    if not args.stand_in and not torch.cuda.is_available():
        print("no CUDA device: cluster_check.py checks nothing here (skipped)")
        sys.exit(0)
    device = "cpu" if args.stand_in else "cuda"
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        spec = stand_in(tmp / "model") if args.stand_in else "dinov3-vits16:random"
        ds = Dataset(
            name="cluster-check", format="synthetic", path=tmp / "data",
            synthetic=Synthetic(kind="cls2d", n=args.n, size=224), task="classification", dims=2,
        )  # fmt: skip
        made = {}
        seconds = {}
        opts = Options(device=device, threads=1, progress=False)
        for side in ("single", "cluster"):
            m = Manifest(
                cache=tmp / side, datasets=(ds,), encoders=(spec,), resolutions=(224,),
                batch_size=32, unit_items=64,
            )  # fmt: skip
            t0 = time.perf_counter()
            cluster = "local:2" if side == "cluster" else None  # as `--cluster local:2`
            (made[side],) = extract.run(m, opts, baseline=False, cluster=cluster, echo=print)
            seconds[side] = round(time.perf_counter() - t0, 1)
        a, b = (Path(str(made[s].path)) for s in ("single", "cluster"))
        ca, cb = chunks(a), chunks(b)
        differ = sorted(k for k in ca.keys() | cb.keys() if ca.get(k) != cb.get(k))
        result = dict(
            device=device, encoder=spec if not args.stand_in else "tiny DINOv3 (stand-in)",
            items=made["cluster"].items, same_key=a.name == b.name, chunks=len(ca),
            differing_chunks=differ[:10], problems=[str(p) for p in FeatureSet(b).verify()],
            seconds=seconds,
        )  # fmt: skip
    ok = result["same_key"] and not differ and not result["problems"] and result["chunks"] > 0
    result["byte_identical"] = ok
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print("cluster check: " + ("byte-identical" if ok else "DIFFERENT"))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
