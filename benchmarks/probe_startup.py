"""Probe start-up with and without the data folder, side by side.

    python benchmarks/probe_startup.py [--items 20000] [--repeats 5]

Writes `--items` small grey PNGs (16 x 16) with an index CSV into a temporary folder,
extracts them once with the raw-pixel baseline (`pixels:8` at 16 px: no model, so
20,000 items take about a minute), then times what a probe does before its first fit:
find the cell's feature set and open it (`featstore.open_features`). With the data
folder there, that lists the dataset and checks its fingerprint (one stat per file;
the file hashes are memoised, as on every probe after the first); with the folder
moved away, the set is found by the identity recorded in it. Prints the median and
the spread of `--repeats` runs of each, alternating, and their ratio.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

import featstore
from featstore.data.manifest import load_manifest
from featstore.errors import DataAbsentWarning

SPLITS = ("train", "val", "test")


def write_dataset(folder: Path, n: int) -> None:
    """n 16 x 16 PNGs with labels and splits (70/10/20), and their index CSV."""
    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True)
    rows = ["image,label,split"]
    for i in range(n):
        label = i % 2
        pixels = rng.integers(0, 200, (16, 16), dtype=np.uint8) + 40 * label
        Image.fromarray(pixels.astype(np.uint8)).save(folder / "img" / f"{i:06d}.png")
        split = SPLITS[0 if i % 10 < 7 else 1 if i % 10 < 8 else 2]
        rows.append(f"img/{i:06d}.png,{label},{split}")
    (folder / "index.csv").write_text("\n".join(rows) + "\n")


MANIFEST = """\
cache: cache
encoders: ['pixels:8']
resolutions: [16]
baseline: null
unit_items: 4096
datasets:
  - name: many
    format: images
    path: data
    index: index.csv
    task: classification
    dims: 2
"""


def startup(manifest: Path) -> float:
    """Seconds to find and open the cell's feature set, as a probe starts."""
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataAbsentWarning)
        xs = featstore.open_features(manifest, "many", "pixels:8")
    seconds = time.perf_counter() - t0
    assert xs.sizes["item"] > 0
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        write_dataset(root / "data", args.items)
        written = time.perf_counter() - t0
        (root / "manifest.yaml").write_text(MANIFEST)
        t0 = time.perf_counter()
        featstore.extract(
            load_manifest(root / "manifest.yaml"), progress=False, echo=lambda _: None
        )
        extracted = time.perf_counter() - t0
        first = startup(root / "manifest.yaml")  # hashes every file once (memo cold)
        here, away = [], []
        for _ in range(args.repeats):
            here.append(startup(root / "manifest.yaml"))
            shutil.move(root / "data", root / "away")
            try:
                away.append(startup(root / "manifest.yaml"))
            finally:
                shutil.move(root / "away", root / "data")
    print(f"{args.items} items (PNGs written in {written:.1f}s, extracted in {extracted:.1f}s)")
    print(f"first start-up with the data (file hashes not yet memoised): {first:.2f}s")
    print(f"{'probe start-up':<28} {'median s':>9} {'min s':>7} {'max s':>7}")
    for name, runs in (("with the data folder", here), ("data folder absent", away)):
        med = statistics.median(runs)
        print(f"{name:<28} {med:9.3f} {min(runs):7.3f} {max(runs):7.3f}")
    print(f"ratio (with / without): {statistics.median(here) / statistics.median(away):.1f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
