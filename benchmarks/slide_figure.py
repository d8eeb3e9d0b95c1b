"""The slide figure for a few slides of a manifest's slide dataset (PNG files).

    python benchmarks/slide_figure.py --manifest data_manifest.yaml --dataset synth-slides
        --out results/slides [--split test] [--slides 3] [--encoder dinov3-vits16]

For each chosen slide: the thumbnail, the tissue mask and tile grid exactly as the
tiling plan found them, and, when the set has train and test slides of two classes,
the attention of an ABMIL head (`featstore.probing.heads.fit_abmil`, as `--pool abmil`
fits it) trained on the train slides, over the thumbnail. The feature set must exist
(`featstore extract`). `featstore report` draws the same figure for the set's first
three test slides from what the set recorded (never the slides) and the attention that
`featstore probe --pool abmil` saved; this script reads the slides themselves, so it
can draw any slide of any split.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import xarray as xr

from featstore.data import readers, wsi
from featstore.data.manifest import load_manifest
from featstore.identity import requested
from featstore.report.slides import slide_figure
from featstore.store import catalog


def _attention(xs: xr.Dataset, ids: list[str], labels: np.ndarray, splits: list[str]) -> dict:
    from featstore.probing import heads

    sample = np.array([str(v) for v in xs.sample.values])
    cls = np.asarray(xs.cls.values, np.float32).reshape(len(sample), -1)
    bags = [cls[sample == i] for i in ids]
    train = np.array([s == "train" for s in splits])
    test = np.array([s == "test" for s in splits])
    if len(set(labels[train])) < 2 or not test.any():
        return {}
    mil = heads.fit_abmil(bags, labels, train, test, int(labels.max()) + 1, seed=0)
    return dict(zip(ids, mil.weights, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--slides", type=int, default=3)
    ap.add_argument("--encoder", default=None)
    args = ap.parse_args()
    manifest = load_manifest(args.manifest)
    ds = manifest.dataset(args.dataset)
    if ds.tiling is None:
        raise SystemExit(f"{ds.name} is not a slide dataset (it has no `tiling:`)")
    prep = readers.prepare(ds)
    encoder = args.encoder or manifest.encoders[0]
    res = manifest.resolutions_for(ds)[0]
    path = catalog.find_set(
        manifest.cache, requested(ds, manifest, prep.fingerprint, encoder, res).request()
    )
    attention: dict = {}
    if path is not None:
        xs = xr.open_zarr(str(path)).load()
        labels = np.array([s.label[0] for s in prep.samples])
        attention = _attention(
            xs, [s.id for s in prep.samples], labels, [s.split for s in prep.samples]
        )
    args.out.mkdir(parents=True, exist_ok=True)
    chosen = [s for s in prep.samples if s.split == args.split] or prep.samples
    for s in chosen[: args.slides]:
        assert s.tiles is not None
        thumb, mask, per_px = wsi.overview(Path(s.image), ds.tiling, s.tiles.mpp)
        foot = ds.tiling.tile_size * ds.tiling.tile_mpp / s.tiles.mpp
        title = (
            f"{s.id} (label {s.label[0]}, {s.split}; {s.tiles.mpp:g} um/px, {s.tiles.mpp_source})"
        )
        fig = slide_figure(thumb, mask, s.tiles.xy, foot, per_px, title, attention.get(s.id))
        fig.savefig(args.out / f"{s.id}.png", dpi=110)
        print(args.out / f"{s.id}.png")


if __name__ == "__main__":
    main()
