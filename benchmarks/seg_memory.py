"""Segmentation head on more patch tokens than memory: peak RSS against the bound.

    python benchmarks/seg_memory.py [--gb 2] [--bound-mb 512] [--score]

Writes a feature-set-shaped Zarr group of synthetic float16 patch tokens (ViT-S/16
at 224 px: 14x14x384 per item; --gb of tokens in all) with masks whose classes
follow the tokens, then, in a fresh process, fits `featstore.probing.streaming.fit_streaming`
over every training patch with --bound-mb of float32 tokens per block, and prints
that process's peak RSS beside the bound and the tokens' size, and items/s.
--score also scores every item as a test image, in another fresh process
(`segmentation.score_volumes` in blocks that fit --bound-mb: prediction, Dice, IoU,
precision, recall, HD95, bootstrap intervals), with a head fitted on the first 32.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

R, D, CHUNK = 14, 384, 256


def _write(path: Path, n: int) -> None:
    root = zarr.open_group(path, mode="w")
    patch = root.create_array("patch", shape=(n, R, R, D), chunks=(CHUNK, R, R, D), dtype="float16")
    mask = root.create_array("mask", shape=(n, 224, 224), chunks=(CHUNK, 224, 224), dtype="uint8")
    rng = np.random.default_rng(0)
    for s in range(0, n, CHUNK):
        e = min(s + CHUNK, n)
        x = rng.normal(size=(e - s, R, R, D)).astype(np.float16)
        patch[s:e] = x
        cls = (x[..., 0] > 0).astype(np.uint8)  # class 1 where channel 0 is positive
        mask[s:e] = np.repeat(np.repeat(cls, 16, 1), 16, 2)


def _fit(path: str, bound_mb: float) -> None:
    from featstore.probing.probes import patch_targets
    from featstore.probing.streaming import fit_streaming

    root = zarr.open_group(path, mode="r")
    patch, mask = root["patch"], root["mask"]
    n = patch.shape[0]
    np.asarray(patch[:1])  # zarr's codec pipeline, loaded before the baseline is taken
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    t0 = time.perf_counter()
    head = fit_streaming(
        lambda s, e: (np.asarray(patch[s:e]), np.asarray(mask[s:e])),
        n, R * R * D, lambda m: patch_targets(m, R, R, 2), 2, bound_mb, epochs=1,
    )  # fmt: skip
    secs = time.perf_counter() - t0
    x = np.asarray(patch[:64])
    acc = float((head.logits(x).argmax(-1) == (x[..., 0] > 0)).mean())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    print(json.dumps({"peak_mb": peak, "base_mb": base, "items_s": n / secs, "accuracy": acc}))


def _rss_mb() -> float:
    """Resident memory now (Linux), so that an import's passing peak is not the baseline."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1e3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def _score(path: str, bound_mb: float) -> None:
    from featstore.probing.probes import patch_targets
    from featstore.probing.segscores import block_items, score_volumes
    from featstore.probing.streaming import fit_streaming

    root = zarr.open_group(path, mode="r")
    patch, mask = root["patch"], root["mask"]
    n = patch.shape[0]
    p0, m0 = np.asarray(patch[:32]), np.asarray(mask[:32])
    head = fit_streaming(
        lambda s, e: (p0[s:e], m0[s:e]),
        len(p0), R * R * D, lambda m: patch_targets(m, R, R, 2), 2, 16, epochs=1,
    )  # fmt: skip
    p0 = m0 = np.empty(0)  # the 32 items' tokens are not part of scoring's memory
    base = _rss_mb()
    items = block_items(bound_mb, R * R * D, 224 * 224, 2)
    t0 = time.perf_counter()
    scores, _ = score_volumes(
        lambda p, _: head.predict(p, 224),
        lambda it: (np.asarray(patch[it[0] : it[-1] + 1]), np.asarray(mask[it[0] : it[-1] + 1])),
        [np.array([i]) for i in range(n)], [str(i) for i in range(n)], ["fg"], None, 0, items,
    )  # fmt: skip
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    out = {"peak_mb": peak, "base_mb": base, "items_s": n / secs, "items": items}
    print(json.dumps({**out, "dice": scores["dice"][0]}))


def _child(flag: str, path: Path, bound_mb: float) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, flag, str(path), "--bound-mb", str(bound_mb)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--bound-mb", type=float, default=512)
    ap.add_argument("--score", action="store_true")
    ap.add_argument("--fit", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--score-set", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fit:
        _fit(args.fit, args.bound_mb)
        return
    if args.score_set:
        _score(args.score_set, args.bound_mb)
        return
    n = int(args.gb * 1e9 // (R * R * D * 2))
    with tempfile.TemporaryDirectory(dir="." if Path("cache").is_dir() else None) as tmp:
        path = Path(tmp) / "tokens.zarr"
        _write(path, n)
        got = _child("--fit", path, args.bound_mb)
        scored = _child("--score-set", path, args.bound_mb) if args.score else None
    print(f"patch tokens: {n} items, {args.gb:.1f} GB float16 ({2 * args.gb:.1f} GB as float32)")
    print(f"bound: {args.bound_mb:.0f} MB for the block being fitted")
    print(
        f"peak RSS of the fitting process: {got['peak_mb']:.0f} MB = {got['base_mb']:.0f} MB "
        f"before fitting (Python, numpy, zarr, scikit-learn) + "
        f"{got['peak_mb'] - got['base_mb']:.0f} MB while fitting"
    )
    print(f"throughput: {got['items_s']:.0f} items/s; train accuracy {got['accuracy']:.3f}")
    if scored is not None:
        print(
            f"scoring every item ({scored['items']} a block): peak RSS {scored['peak_mb']:.0f} MB "
            f"= {scored['base_mb']:.0f} MB resident before scoring + "
            f"{scored['peak_mb'] - scored['base_mb']:.0f} MB while scoring; "
            f"{scored['items_s']:.0f} items/s; Dice {scored['dice']:.3f}"
        )


if __name__ == "__main__":
    main()
