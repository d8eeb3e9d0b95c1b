"""Neighbour queries through `featstore serve` against a bare top-k over the same matrix.

    python benchmarks/serve_neighbours.py [--sizes 20000,100000] [--rounds 30] [--k 8]
        [--dir DIR]

Data: per size, a real feature set written through the store (`FeatureSet.open_or_create`,
`UnitWriter`, `finish`: the same calls an extract makes), CLS only, 384 channels
(ViT-S) float16, whose 10 classes are noisy cluster centres. The app is
`build_app(OUT, CACHE)` driven by Starlette's `TestClient`, so a query pays the whole
stack: routing, the set lookup in the cache listing, the index, the JSON of the
neighbours with their samples, splits and labels.

For each size: the first query (it builds the index: the CLS matrix read once,
normalised to float32) is timed alone, with the process's resident memory before and
after and its peak, beside the CLS matrix's float32 size. Then `--rounds` rounds, each
with a fresh random query item, alternate three sides in a rotating order:

- app: GET /api/sets/KEY/neighbours/ITEM?k=K through the app
- numpy: the same cosine top-k on a float32 matrix normalised once (matrix-vector
  product, argpartition, sort of the k): the floor for an exact query
- sklearn: `NearestNeighbors(metric="cosine", algorithm="brute").kneighbors` of the
  item's row (k + 1, itself dropped), fitted once

and prints each side's median and the app's ratio to each. The neighbours of the app
and of numpy are checked to be the same items. BLAS runs on one thread for all three
(as `featstore probe` runs it), and the machine's load average is printed: on a shared
machine the figures are indicative only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

D, CLASSES, NOISE = 384, 10, 8.0  # noise per channel around centres of norm ~20


def _rss_mb(field: str = "VmRSS") -> float:
    """The process's resident (VmRSS) or peak resident (VmHWM) memory, MB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1e3
    return float("nan")


def write_set(cache: Path, n: int) -> str:
    """A complete n-item CLS-only feature set in `cache`; returns its short key."""
    from featstore.data.settings import Intensity
    from featstore.identity import EncoderInfo, Recipe, SetIdentity
    from featstore.store import schema
    from featstore.store.sets import FeatureSet

    recipe = Recipe(
        dataset=f"{n:064x}", task="classification", dims=2, slice_axis="axial",
        fill_outlines=False, mask_map=(), metadata=(), resolution=224,
        intensity=Intensity(), fit="resize", layers=1, dtype="float16", patch=False,
    )  # fmt: skip
    weights = EncoderInfo(
        "bench-vits", "benchmark", "2" * 64, "t", 16, 0, D, (0, 0, 0), (1, 1, 1), False
    )
    ident = SetIdentity(recipe, "bench-vits", weights)
    rng = np.random.default_rng(n)
    labels = rng.integers(0, CLASSES, n)
    items = schema.Items(
        sample=[f"s{i:06d}" for i in range(n)],
        slice=[0] * n,
        split=rng.choice(["train", "val", "test"], n, p=[0.7, 0.1, 0.2]).tolist(),
        labels=labels,
        metadata={},
    )
    layout = schema.layout_for(ident, n, "single", 1024, 8192)
    fs = FeatureSet.at(cache, ident.key())
    fs.open_or_create(ident, layout, lambda: items, {"name": f"bench{n}"}, lambda: {})
    centres = rng.normal(size=(CLASSES, D))
    writer = fs.writer()
    for unit in fs.pending_units():
        part = layout.unit_slice(unit)
        noise = NOISE * rng.normal(size=(part.stop - part.start, D))
        writer.write(unit, (centres[labels[part]] + noise).astype(np.float16), None, None)
    fs.finish()
    return ident.key()[:12]


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def bench(root: Path, n: int, rounds: int, k: int) -> dict[str, float]:
    from sklearn.neighbors import NearestNeighbors
    from starlette.testclient import TestClient

    from featstore.serve.app import build_app
    from featstore.store.sets import open_set

    cache, out = root / f"cache{n}", root / f"out{n}"
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    key = write_set(cache, n)
    folder = next(cache.glob(f"{key}*.zarr"))
    print(f"\n{n} items x {D} (float16, {folder.name[:12]}): written in "
          f"{time.perf_counter() - t0:.1f} s")  # fmt: skip

    client = TestClient(build_app(out, cache))
    url = f"/api/sets/{key}/neighbours/{{}}?k={k}"
    rss0, t0 = _rss_mb(), time.perf_counter()
    first = client.get(url.format(0))
    build = time.perf_counter() - t0
    if first.status_code != 200:
        raise SystemExit(f"the app refused the first query: {first.text}")
    cls_mb = n * D * 4 / 1e6
    print(f"first query (index build): {build * 1e3:.0f} ms; resident memory "
          f"+{_rss_mb() - rss0:.0f} MB (now {_rss_mb():.0f} MB, peak {_rss_mb('VmHWM'):.0f} "
          f"MB) for a float32 CLS matrix of {cls_mb:.0f} MB")  # fmt: skip

    cls = np.asarray(open_set(folder).cls.values, np.float32)
    unit = cls / np.linalg.norm(cls, axis=1, keepdims=True)
    nn = NearestNeighbors(metric="cosine", algorithm="brute").fit(cls)

    def app_side(q: int) -> list[int]:
        r = client.get(url.format(q))
        return [x["item"] for x in r.json()["neighbours"]]

    def numpy_side(q: int) -> list[int]:
        sim = unit @ unit[q]
        sim[q] = -np.inf
        top = np.argpartition(-sim, k - 1)[:k]
        return top[np.lexsort((top, -sim[top]))].tolist()

    def sklearn_side(q: int) -> list[int]:
        _, idx = nn.kneighbors(cls[q : q + 1], k + 1)
        return [int(i) for i in idx[0] if i != q][:k]

    sides: dict[str, Callable[[int], list[int]]] = {
        "app": app_side, "numpy": numpy_side, "sklearn": sklearn_side,
    }  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in sides}
    rng = np.random.default_rng(1)
    names = list(sides)
    for r in range(rounds):
        q = int(rng.integers(n))
        got = {}
        for name in names[r % 3 :] + names[: r % 3]:  # rotate who goes first
            t0 = time.perf_counter()
            got[name] = sides[name](q)
            times[name].append(time.perf_counter() - t0)
        if got["app"] != got["numpy"]:
            raise SystemExit(f"item {q}: the app's neighbours {got['app']} != {got['numpy']}")
    med = {name: _median_ms(t) for name, t in times.items()}
    for name in names:
        print(f"  {name:8s} median {med[name]:7.2f} ms  (min {min(times[name]) * 1e3:.2f}, "
              f"max {max(times[name]) * 1e3:.2f}; {rounds} rounds)")  # fmt: skip
    print(f"  app / numpy = {med['app'] / med['numpy']:.2f}x, "
          f"app / sklearn = {med['app'] / med['sklearn']:.2f}x")  # fmt: skip
    return {"n": n, "build_ms": build * 1e3, **{f"{s}_ms": v for s, v in med.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="20000,100000")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp one)")
    args = ap.parse_args()
    from threadpoolctl import threadpool_limits

    print(f"load average {_load()}, {os.cpu_count()} CPUs; BLAS on one thread")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp, threadpool_limits(limits=1):
        for n in (int(s) for s in args.sizes.split(",")):
            bench(Path(tmp), n, args.rounds, args.k)
    print(f"load average {_load()}")


if __name__ == "__main__":
    main()
