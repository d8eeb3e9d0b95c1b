"""The extract stage: datasets x encoders x resolutions -> complete feature sets.

Wires readers, preprocessing (in DataLoader workers), the encoder (main process)
and the store (a background writer thread) together. One call per feature set:
cached sets are skipped, interrupted ones resumed, new ones allocated.

    python -m pipelines.extract --manifest data_manifest.yaml   (= featstore extract)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import featstore
from featstore import store
from featstore.batches import Batches, UnitQueue, plan_batches, quiet_worker
from featstore.encoders import Encoder, load_encoder
from featstore.errors import BadInputError
from featstore.manifest import Dataset, Manifest, request
from featstore.preprocess import Preprocess
from featstore.readers import Prepared, prepare


@dataclass(frozen=True)
class Summary:
    dataset: str
    encoder: str
    resolution: int
    status: Literal["cached", "new", "resumed"]
    items: int
    seconds: float
    mbytes: float
    path: Path
    skipped: int = 0

    def line(self) -> str:
        rate = self.items / self.seconds if self.seconds > 0 else float("inf")
        skip = f", {self.skipped} skipped" if self.skipped else ""
        return (
            f"{self.status:>7}  {self.dataset} / {self.encoder} @ {self.resolution}px: "
            f"{self.items} items in {self.seconds:.1f}s ({rate:.1f} items/s), "
            f"{self.mbytes:.1f} MB written{skip} -> {self.path}"
        )


def preprocess_config(
    ds: Dataset, encoder: Encoder, resolution: int, manifest: Manifest
) -> Preprocess:
    p = encoder.patch_size
    if resolution % p:
        raise BadInputError(
            f"resolution {resolution} is not a multiple of the patch size {p} "
            f"of '{encoder.info.name}'; use e.g. {resolution // p * p or p}"
        )
    return Preprocess(
        resolution=resolution,
        intensity=ds.intensity,
        mean=encoder.info.mean,
        std=encoder.info.std,
        fit=manifest.fit_for(ds),
    )


def set_config(prep: Prepared, encoder: Encoder, pre: Preprocess, manifest: Manifest) -> dict:
    """Everything that determines a feature set's bytes; its hash is the cache key."""
    e = encoder.info
    return {
        "format": store.FORMAT_VERSION,
        "dataset": {
            "fingerprint": prep.fingerprint,
            "task": prep.ds.task,
            "dims": prep.ds.dims,
            "slice_axis": prep.ds.slice_axis,
            "fill_outlines": prep.ds.fill_outlines,
            "mask_map": {str(k): v for k, v in prep.ds.mask_map.items()},
            "metadata": prep.ds.metadata,
        },
        "encoder": {
            "model_type": e.model_type,
            "weights_sha256": e.weights_sha256,
            "random_init": e.random_init,
        },
        "preprocess": pre.to_dict(),
        "layers": manifest.layers,
        "patch": manifest.patch,
        "dtype": manifest.dtype,
    }


UNIT_BYTES = 64 << 20  # cap on a unit's patch chunk


def layout_for(
    prep: Prepared, encoder: Encoder, pre: Preprocess, manifest: Manifest
) -> store.Layout:
    """Shapes of the set; a unit (= one chunk) is a whole number of batches."""
    grid = pre.resolution // encoder.patch_size
    per_item = (
        (grid * grid if manifest.patch else 1)
        * encoder.info.hidden_size
        * (2 if manifest.dtype == "float16" else 4)
    )
    bs = manifest.batch_size
    batches = max(1, min(-(-manifest.unit_items // bs), UNIT_BYTES // (bs * per_item)))
    chunk_items = bs * batches
    task = prep.ds.task
    n_classes = (
        -1
        if task == "segmentation"
        else (len(prep.samples[0].label) if task == "multilabel" else 0)
    )
    channels = encoder.info.hidden_size
    return store.Layout(
        n_items=sum(s.n_items for s in prep.samples),
        chunk_items=chunk_items,
        channels=channels,
        layers=manifest.layers,
        rows=grid if manifest.patch else 0,
        cols=grid if manifest.patch else 0,
        mask_size=pre.resolution if task == "segmentation" else 0,
        n_classes=n_classes,
        dtype=manifest.dtype,
    )


def _allocate(
    path: Path,
    prep: Prepared,
    encoder: Encoder,
    pre: Preprocess,
    config: dict,
    layout: store.Layout,
    req: dict,
    manifest: Manifest,
) -> bool:
    idx = prep.index
    attrs = {
        "dataset": {
            "name": prep.ds.name,
            "format": prep.ds.format,
            "path": str(prep.ds.path),
            "modality": prep.ds.modality,
            "classes": prep.ds.classes,
            **config["dataset"],
        },
        "encoder": encoder.info.to_dict(),
        "preprocess": pre.to_dict(),
        "storage": {
            "dtype": manifest.dtype,
            "codec": store.CODEC.to_dict(),
            "chunk_items": layout.chunk_items,
        },
        "versions": _versions(),
        "requests": [req],
    }
    metadata = {
        name: [dict(prep.samples[i].meta)[name] for i, _ in idx]
        for name in prep.ds.metadata.values()
    }
    return store.create(
        path,
        layout,
        [prep.samples[i].id for i, _ in idx],
        [k for _, k in idx],
        [prep.samples[i].split for i, _ in idx],
        _labels(prep, layout),
        config,
        attrs,
        metadata,
    )


def _checked(arr: np.ndarray | None, bad: np.ndarray, ids: np.ndarray, what: str):
    """NaN for skipped items; any other NaN/Inf is an error (float16 overflow)."""
    if arr is None:
        return None
    if not np.isfinite(arr[~bad]).all():
        rows = np.flatnonzero(~np.isfinite(arr.reshape(len(arr), -1)).all(1) & ~bad)
        raise FloatingPointError(
            f"the encoder gave NaN/Inf {what} features for {sorted(set(ids[rows]))[:5]}; "
            "with float16 storage this is an overflow: set `dtype: float32` in the manifest"
        )
    arr[bad] = np.nan
    return arr


def extract_one(
    prep: Prepared,
    encoder: Encoder,
    spec: str,
    resolution: int,
    manifest: Manifest,
    *,
    overwrite: bool = False,
    skip_bad: bool = False,
    num_workers: int | None = None,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> Summary:
    """Make (or find, or finish) one feature set and return what was done."""
    t0 = time.perf_counter()
    pre = preprocess_config(prep.ds, encoder, resolution, manifest)
    config = set_config(prep, encoder, pre, manifest)
    path = store.store_path(manifest.cache, store.cache_key(config))
    layout = layout_for(prep, encoder, pre, manifest)
    req = request(prep.ds, prep.fingerprint, spec, resolution, manifest)
    name = prep.ds.name, encoder.info.name + (" (random_init)" if encoder.info.random_init else "")
    status = "new"
    if path.exists() and overwrite:
        store.remove(path)
    elif path.exists():
        attrs = store.read_attrs(path)
        if attrs.get("complete"):
            store.check_matches(path, config, store.Layout(**attrs["layout"]))
            store.add_request(path, req)
            return Summary(*name, resolution, "cached", 0, time.perf_counter() - t0, 0.0, path)
        store.check_matches(path, config, layout)
        status = "resumed"
    if not path.exists() and not _allocate(path, prep, encoder, pre, config, layout, req, manifest):
        store.check_matches(path, config, layout)  # a concurrent shard allocated it
        status = "resumed"
    units = [u for u in store.pending_units(path) if u % shard[1] == shard[0]]
    store.discard_partials(path, units)
    batches = plan_batches(layout, units, manifest.batch_size)
    cuda = encoder.device.type == "cuda"
    if num_workers is None:
        num_workers = min(4, os.cpu_count() or 1) if cuda else 1
    loader = DataLoader(
        Batches(prep, pre, layout, batches),
        batch_size=None,
        num_workers=num_workers,
        pin_memory=cuda,
        worker_init_fn=quiet_worker if num_workers else None,
        prefetch_factor=2 if num_workers else None,
    )
    writer = UnitQueue(path, layout)
    skipped: dict[str, str] = {}
    n_items = sum(b[2] - b[1] for b in batches)
    bar = tqdm(
        total=n_items,
        unit="item",
        desc=f"{name[0]} / {name[1]} @ {resolution}px",
        disable=not progress,
        mininterval=1.0,
    )
    try:
        for unit, start, pixels, masks, errors in loader:
            if errors and not skip_bad:
                raise BadInputError(next(iter(errors.values())))
            skipped.update(errors)
            fb = encoder.encode(pixels, manifest.layers)
            cls = fb.cls.numpy().astype(manifest.dtype)
            cls = cls[:, 0] if layout.layers == 1 else cls
            patch = fb.patch.numpy().astype(manifest.dtype) if layout.rows else None
            index = prep.index[start : start + len(pixels)]
            ids = np.asarray([prep.samples[i].id for i, _ in index])
            bad = np.isin(ids, list(errors))
            writer.put(
                unit,
                _checked(cls, bad, ids, "cls"),
                _checked(patch, bad, ids, "patch"),
                None if masks is None else masks.numpy(),
            )
            bar.update(len(pixels))
    finally:
        bar.close()
        writer.close()
    if skipped:
        _record_skipped(path, skipped)
    if not store.pending_units(path):
        store.finish(path)
    return Summary(
        *name,
        resolution,
        status,
        n_items,
        time.perf_counter() - t0,
        writer.nbytes / 1e6,
        path,
        len(skipped),
    )


def _labels(prep: Prepared, layout: store.Layout) -> np.ndarray | None:
    if layout.n_classes < 0:
        return None
    rows = [s.label for s in prep.samples for _ in range(s.n_items)]
    arr = np.asarray(rows, dtype=np.int64)
    return arr[:, 0] if layout.n_classes == 0 else arr


def _record_skipped(path: Path, skipped: dict[str, str]) -> None:
    import zarr

    root = zarr.open_group(path, mode="r+", use_consolidated=False)
    root.attrs["skipped"] = {**root.attrs.get("skipped", {}), **skipped}


def _versions() -> dict[str, str]:
    import transformers
    import xarray
    import zarr

    return {
        "featstore": featstore.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "zarr": zarr.__version__,
        "xarray": xarray.__version__,
        "numpy": np.__version__,
    }


def run(
    manifest: Manifest,
    *,
    device: str = "auto",
    overwrite: bool = False,
    skip_bad: bool = False,
    shard: tuple[int, int] = (0, 1),
    num_workers: int | None = None,
    baseline: bool = True,
    progress: bool = True,
    echo=print,
) -> list[Summary]:
    """Extract every cell (dataset x encoder x resolution) of `manifest`, baseline included."""
    cells = manifest.cells(baseline)
    prepared = {}
    for ds, _, _ in cells:
        if ds.name not in prepared:
            prepared[ds.name] = prepare(ds)
    summaries = []
    for spec in dict.fromkeys(enc for _, enc, _ in cells):
        encoder = load_encoder(spec, device)  # type: ignore[arg-type]
        if encoder.info.random_init:
            echo(
                f"note: '{spec}' is a fixed-seed RANDOM INIT of its architecture (no local "
                "weights found); its feature sets and results are marked random_init"
            )
        if encoder.device.type == "cpu":
            torch.set_num_threads(os.cpu_count() or 1)
        for ds, _, res in (c for c in cells if c[1] == spec):
            s = extract_one(
                prepared[ds.name],
                encoder,
                spec,
                res,
                manifest,
                overwrite=overwrite,
                skip_bad=skip_bad,
                shard=shard,
                num_workers=num_workers,
                progress=progress,
            )
            echo(s.line())
            summaries.append(s)
    return summaries


if __name__ == "__main__":
    from featstore.cli import app

    app(["extract", *__import__("sys").argv[1:]], prog_name="pipelines.extract")
