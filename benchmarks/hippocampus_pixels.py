"""Why the raw-pixel baseline scores 0 Dice on MSD Hippocampus (issue 21).

Extracts the hippocampus at 112 px with the `pixels` baseline (16-px patches, a 7x7
grid) and `pixels:8` (a 14x14 grid), then asks three questions of the train and val
patches:

1. Are the structures smaller than a patch? The Dice that *perfect* patch-majority
   labels would reach, upsampled to the mask, is the ceiling of any patch classifier.
2. Can a linear model see them in the raw intensities of a patch? Logistic regression
   on the pixel tokens, on the patch's position alone, and on both.
3. Do finer pixel patches help? `featstore probe` on both sets (run separately:
   `featstore probe --manifest <the manifest this writes> --out ...`).

    python benchmarks/hippocampus_pixels.py --work /tmp/hip   # needs ../shared/data
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import numpy as np
import xarray as xr
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

import featstore
from featstore.probing.probes import patch_targets

DATA = Path(os.environ.get("FEATSTORE_DATA", Path(__file__).parents[2] / "shared" / "data"))
MANIFEST = """cache: {cache}
encoders: ["pixels:8"]
resolutions: [112]
baseline: pixels
datasets:
  - name: msd-hippocampus
    format: nifti
    path: {data}/msd_task04_hippocampus
    index: {{glob: "imagesTr/*.nii.gz", mask: "../labelsTr/{{name}}"}}
    task: segmentation
    dims: 3
    modality: MR
    intensity: {{mode: percentile, low: 0.5, high: 99.5}}
    splits: {{ratios: [0.6, 0.1, 0.3], seed: 0}}
    classes: [background, anterior, posterior]
"""


def _dice(pred: np.ndarray, truth: np.ndarray, k: int) -> float:
    both = (pred == k).sum() + (truth == k).sum()
    return float(2 * ((pred == k) & (truth == k)).sum() / max(both, 1))


def ceiling(ds: xr.Dataset) -> None:
    mask = ds.mask.values[ds.split.values == "train"]
    rows, cols = ds.sizes["row"], ds.sizes["col"]
    t = patch_targets(mask, rows, cols, 3)
    up = np.repeat(np.repeat(t, mask.shape[1] // rows, 1), mask.shape[2] // cols, 2)
    share = np.bincount(mask.ravel(), minlength=3) / mask.size
    print(
        f"  {rows}x{cols} grid: pixel share bg/anterior/posterior {np.round(share, 4)}; "
        f"Dice of perfect patch-majority labels: anterior {_dice(up, mask, 1):.3f}, "
        f"posterior {_dice(up, mask, 2):.3f}"
    )


def _patches(ds: xr.Dataset, split: str, limit: int):
    s = ds.split.values == split
    p = ds.patch.values[s].astype(np.float32)
    n, r, c, d = p.shape
    t = patch_targets(ds.mask.values[s], r, c, 3).reshape(-1)
    pos = np.tile(np.eye(r * c, dtype=np.float32), (n, 1))
    keep = np.random.default_rng(0).choice(len(t), min(limit, len(t)), replace=False)
    return p.reshape(-1, d)[keep], pos[keep], t[keep]


def linear(ds: xr.Dataset) -> None:
    xt, pt, yt = _patches(ds, "train", 60_000)
    xv, pv, yv = _patches(ds, "val", 20_000)
    for name, a, b in (
        ("pixels", xt, xv),
        ("position only", pt, pv),
        ("pixels + position", np.hstack([xt, pt]), np.hstack([xv, pv])),
    ):
        sc = StandardScaler().fit(a)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            pred = LogisticRegression(C=1.0, max_iter=300).fit(sc.transform(a), yt)
        pr = pred.predict(sc.transform(b))
        print(
            f"  {name:18s} val patches predicted foreground {np.mean(pr > 0):.4f} "
            f"(truth {np.mean(yv > 0):.4f}); patch Dice anterior {_dice(pr, yv, 1):.3f}, "
            f"posterior {_dice(pr, yv, 2):.3f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="folder for the cache")
    args = ap.parse_args()
    if not (DATA / "msd_task04_hippocampus").is_dir():
        raise SystemExit(f"MSD Hippocampus not found under {DATA} (set FEATSTORE_DATA)")
    args.work.mkdir(parents=True, exist_ok=True)
    manifest = args.work / "hippocampus.yaml"
    manifest.write_text(MANIFEST.format(cache=args.work / "cache", data=DATA))
    for made in featstore.extract(manifest, progress=False, echo=lambda *_: None):
        ds = xr.open_zarr(made.path)
        print(f"{made.path.name} ({ds.sizes['row']}x{ds.sizes['col']} patch grid):")
        ceiling(ds)
        if ds.sizes["row"] == 7:
            linear(ds)
    print(f"probe both with: featstore probe --manifest {manifest} --out {args.work / 'r'}")


if __name__ == "__main__":
    main()
