"""The Python API for notebooks: open a feature set as xarray, extract, probe.

    import featstore
    xs = featstore.open_features("data_manifest.yaml", "synth-nodules-3d", "dinov3-vits16")
    volumes = xs.cls.groupby("sample").mean()          # (sample, channel), lazy

`extract` and `probe` run the same code as `featstore extract|probe` and return the
per-set summaries and the result rows that the commands print and write. Heavy
modules are imported inside the functions: `import featstore` loads no torch.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from featstore.data.manifest import Manifest, load_manifest
from featstore.errors import DataAbsentWarning, ManifestError, StoreIncompleteError

if TYPE_CHECKING:
    import pandas as pd
    import xarray as xr

    from featstore.extraction.run import Summary

ManifestLike = Manifest | str | os.PathLike[str]


def _manifest(
    manifest: ManifestLike, cache: str | os.PathLike[str] | None = None, need_data: bool = True
) -> Manifest:
    if isinstance(manifest, Manifest):
        return manifest if cache is None else manifest.model_copy(update={"cache": Path(cache)})
    return load_manifest(manifest, cache, need_data=need_data)


def open_features(
    manifest: ManifestLike,
    dataset: str,
    encoder: str,
    resolution: int | None = None,
    *,
    cache: str | os.PathLike[str] | None = None,
) -> xr.Dataset:
    """The feature set of one cell, opened lazily (dask-backed) as an xarray Dataset.

    Args:
        manifest: a manifest file or a loaded `Manifest`.
        dataset: a dataset name of the manifest.
        encoder: as in the manifest (preset, folder, hub id, `pixels`).
        resolution: input size; may be left out when the dataset has only one.
    Returns:
        cls (item, channel) or (item, layer, channel); patch (item, row, col, channel);
        mask (item, y, x) for segmentation; label (item) or (item, class); coordinates
        sample, slice, split on item. Skipped samples are still in it (NaN features).
    Where the dataset's data folder is absent the set is found by its recorded
    identity, and a `DataAbsentWarning` says that the data's fingerprint was not checked.

    Raises:
        StoreIncompleteError: the set was never extracted, or its extract did not finish.
    """
    from featstore.data.native import data_check
    from featstore.identity import requested
    from featstore.store import catalog
    from featstore.store.sets import FeatureSet

    m = _manifest(manifest, cache, need_data=False)
    ds = m.dataset(dataset)
    sizes = m.resolutions_for(ds)
    if resolution is None:
        if len(sizes) != 1:
            raise ManifestError(
                f"dataset '{dataset}' has several resolutions {list(sizes)}: pass one"
            )
        resolution = sizes[0]
    fp = data_check(m.cache)(ds)
    if fp is None:
        warnings.warn(catalog.unchecked_note(ds.name, ds.path), DataAbsentWarning, stacklevel=2)
    request = requested(ds, m, fp or "", encoder, resolution).request()
    found = catalog.find_cell(m.cache, request, ds.name, checked=fp is not None)
    if found.path is None:
        changed = (
            f"the data in {ds.path} changed since its feature set was extracted; re-extract: "
            if found.stale
            else f"no complete feature set for {dataset} / {encoder} @ {resolution}px in "
            f"{m.cache}; make it with "
        )
        raise StoreIncompleteError(
            f"{changed}featstore.extract(..., datasets=['{dataset}'], encoders=['{encoder}'], "
            f"resolutions=[{resolution}]) or `featstore extract`"
        )
    return FeatureSet(found.path).open()


def extract(
    manifest: ManifestLike,
    *,
    datasets: Sequence[str] = (),
    encoders: Sequence[str] = (),
    resolutions: Sequence[int] = (),
    cache: str | os.PathLike[str] | None = None,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    preprocess_on: Literal["auto", "cpu", "device"] = "auto",
    overwrite: bool = False,
    repair: bool = False,
    skip_bad: bool = False,
    shard: tuple[int, int] = (0, 1),
    cluster: str | None = None,
    scheduler: str | None = None,
    baseline: bool = True,
    progress: bool = True,
    echo: Callable[[str], object] = print,
) -> list[Summary]:
    """Extract every selected cell (as `featstore extract`, through the same driver);
    one `Summary` per feature set. `echo` gets the lines the command prints (a line
    per set, random-init notes, the closing tally). `cluster` ("local:N") or
    `scheduler` (an address) run the units as dask tasks.

    Raises `CacheUnreachableError` before any work when the cache cannot be written.
    """
    from featstore.extraction.run import Options, extract_manifest, runner_for

    m = _manifest(manifest, cache).select(datasets, encoders, resolutions)
    opts = Options(
        device=device,
        preprocess_on=preprocess_on,
        overwrite=overwrite,
        repair=repair,
        skip_bad=skip_bad,
        shard=shard,
        progress=progress,
    )
    runner = runner_for(opts, cluster, scheduler)
    return extract_manifest(m, opts, runner, baseline=baseline, echo=echo)


def probe(
    manifest: ManifestLike,
    *,
    datasets: Sequence[str] = (),
    encoders: Sequence[str] = (),
    resolutions: Sequence[int] = (),
    cache: str | os.PathLike[str] | None = None,
    pool: str = "mean",
    seed: int = 0,
    memory_mb: float | None = None,
    baseline: bool = True,
    fractions: Sequence[float] = (),
    shots: Sequence[int] = (),
    repeats: int | None = None,
    seeds: Sequence[int] = (),
) -> pd.DataFrame:
    """Probe every selected cell (as `featstore probe`, without writing files).

    Returns one row per dataset, encoder, resolution, probe and metric (the columns
    of results.csv, `featstore.probing.rows.COLUMNS`). `fractions`/`shots` add
    label-efficiency points (`repeats` draws each): per-repeat rows and, with
    `repeat == -1`, each point's mean. `seeds` refits the trainable probes with each
    seed (`featstore probe --seeds`): rows per `seed` and, with `seed == -1`, their
    mean. Raises `ProbeError` for a bad option or when no
    cell could be probed; cells that could not be probed while others were are listed
    in `df.attrs["problems"]`, points that could not be drawn in `df.attrs["skipped"]`,
    and datasets whose data folder is absent (found by identity) in `df.attrs["notes"]`.
    """
    from featstore.data.native import data_check
    from featstore.errors import ProbeError
    from featstore.probing.evaluation import probe_manifest
    from featstore.probing.options import ProbeOptions, curve_options
    from featstore.probing.rows import frame

    m = _manifest(manifest, cache, need_data=False).select(datasets, encoders, resolutions)
    opts = ProbeOptions(
        pool=pool,  # type: ignore[arg-type]  # checked by ProbeOptions
        seed=seed,
        protocol=m.protocol,
        memory_mb=memory_mb,
        baseline=baseline,
        curve=curve_options(fractions, shots, repeats),
        seeds=tuple(seeds),
    )
    found = probe_manifest(m, opts, data_check=data_check(m.cache))
    if not found.rows:
        raise ProbeError("no cell could be probed:\n  " + "\n  ".join(found.problems))
    df = frame(found.rows)
    df.attrs["problems"] = found.problems
    df.attrs["notes"] = found.notes
    df.attrs["skipped"] = found.skipped
    return df


def compare(
    out: str | os.PathLike[str], reference: str | None = None, all_pairs: bool = False
) -> pd.DataFrame:
    """Is A better than B? The comparison table of a results folder's kept predictions
    (`featstore.probing.compare`; Holm-adjusted), as `featstore compare` writes it."""
    from featstore.probing import compare as cmp
    from featstore.probing.seed_pairs import kept_with_seeds

    preds, _, seeds = kept_with_seeds(Path(out))
    return cmp.compare(preds, reference, all_pairs=all_pairs, seeds=seeds)


def scale_steps(out: str | os.PathLike[str]) -> pd.DataFrame:
    """Does scale help? The paired steps between successive sizes of a model family
    and successive resolutions (`featstore.probing.steps`; Holm-adjusted over the
    steps), as `featstore compare` writes them to OUT/steps.csv."""
    from featstore.encode.presets import preset_family
    from featstore.probing.seed_pairs import kept_with_seeds
    from featstore.probing.steps import steps

    preds, _, seeds = kept_with_seeds(Path(out))
    return steps(preds, preset_family, seeds=seeds)


def predictions(
    out: str | os.PathLike[str],
    dataset: str | None = None,
    encoder: str | None = None,
    probe: str | None = None,
) -> pd.DataFrame:
    """The kept test predictions of a results folder's ordinary probes, one row per
    test unit, with the key columns (dataset, encoder, probe, ...) in front."""
    from pathlib import Path as _Path

    import pandas as pd

    from featstore.probing.predictions import kept
    from featstore.probing.results_file import RESULTS, read_results

    folder = _Path(out)
    rows = read_results(folder / RESULTS)
    for col, want in (("dataset", dataset), ("encoder", encoder), ("probe", probe)):
        if want is not None:
            rows = rows[rows[col] == want]
    frames = []
    for p in kept(folder, rows)[0]:
        df = p.frame()
        cols = dict(vars(p.key))
        if not cols["test_dataset"]:  # internal: tested on its own dataset and set, as rows
            cols.update(test_dataset=p.key.dataset, test_feature_set=p.key.feature_set)
        for name, value in reversed(list(cols.items())):
            df.insert(0, name, value)
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
