"""The probe stage: cached feature sets -> scores with intervals (CPU; never torch).

For each dataset x encoder x resolution of the manifest (plus the raw-pixel
baseline) it finds the feature set, fits the probes that fit the task, scores the
test split with bootstrap intervals and upserts rows into results.csv/.jsonl.

    python -m pipelines.probe --manifest data_manifest.yaml --out results
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from featstore import probes, store
from featstore.errors import FeatstoreError, ProbeError
from featstore.manifest import Dataset, Manifest, request
from featstore.metrics import classification_scores, with_intervals
from featstore.readers import prepare

KEY = ["dataset", "encoder", "random_init", "resolution", "protocol", "probe", "metric"]
MAIN_METRIC = {"classification": "auroc", "multilabel": "auroc", "segmentation": "dice"}


def _str(var) -> np.ndarray:
    """A string coordinate as a plain '<U' array (zarr may hand back StringDType)."""
    return np.array(np.asarray(var.values).tolist(), dtype=str)


def _split_arrays(x: np.ndarray, y: np.ndarray, split: np.ndarray):
    return [(x[split == s], y[split == s]) for s in ("train", "val", "test")]


def _classification(xs, ds: Dataset, pool: str, seed: int, knn_metric: str, knn_k):
    """Rows (without the set's identity) for linear and kNN probes."""
    cls = np.asarray(xs.cls.values, np.float64).reshape(xs.sizes["item"], -1)
    label = np.asarray(xs.label.values)
    split = _str(xs.split)
    if ds.dims == 3:
        sample = _str(xs.sample)
        patch_mean = (
            np.asarray(xs.patch.mean(("row", "col")).values, np.float64)
            if pool == "cls+patch"
            else None
        )
        ids, cls = probes.pool_volumes(cls, sample, pool, patch_mean)
        first = {s: i for i, s in reversed(list(enumerate(sample)))}
        label = label[[first[v] for v in ids]]
        split = split[[first[v] for v in ids]]
    if not np.isfinite(cls).all():
        raise ProbeError("features contain NaN/Inf; run `featstore verify` on the set")
    (xtr, ytr), (xva, yva), (xte, yte) = _split_arrays(cls, label, split)
    if len(yte) == 0:
        raise ProbeError("the test split is empty")
    n_classes = label.shape[1] if label.ndim == 2 else int(label.max()) + 1
    runs = {
        "linear": ("C", probes.linear_probe(xtr, ytr, xva, yva, xte, n_classes, seed=seed)),
        "knn": (
            "k",
            probes.knn_probe(
                xtr,
                ytr,
                xva,
                yva,
                xte,
                n_classes,
                metric=knn_metric,
                grid=knn_k,
            ),
        ),
    }
    for name, (pname, pred) in runs.items():
        scores = with_intervals(
            lambda i, p=pred: classification_scores(yte[i], p.proba[i]), len(yte), seed
        )
        for metric, (v, lo, hi) in scores.items():
            yield dict(
                probe=name,
                metric=metric,
                value=v,
                ci_low=lo,
                ci_high=hi,
                n_train=len(ytr),
                n_val=len(yva),
                n_test=len(yte),
                param_name=pname,
                param=pred.param,
                fit_seconds=round(pred.seconds, 3),
            )


def _segmentation(xs, ds: Dataset, seed: int, keep: dict[str, np.ndarray]):
    """Rows for the linear segmentation head; a few test predictions go into `keep`."""
    split = _str(xs.split)
    sample = _str(xs.sample)
    idx = {s: np.flatnonzero(split == s) for s in ("train", "val", "test")}
    rows, cols = xs.sizes["row"], xs.sizes["col"]
    per_item = max(1, rows * cols)
    rng = np.random.default_rng(seed)
    tr = idx["train"]
    if len(tr) * per_item > 4 * probes.SEG_MAX_PATCHES:  # read only what the head will see
        tr = np.sort(rng.choice(tr, 4 * probes.SEG_MAX_PATCHES // per_item, replace=False))
    mask = xs.mask
    n_classes = len(ds.classes) if ds.classes else int(mask.max().values) + 1
    patch_tr = np.asarray(xs.patch[tr].values, np.float32)
    patch_va = np.asarray(xs.patch[idx["val"]].values, np.float32)
    mask_va = np.asarray(mask[idx["val"]].values)
    head = probes.seg_probe(
        patch_tr,
        np.asarray(mask[tr].values),
        patch_va,
        mask_va,
        sample[idx["val"]],
        n_classes,
        seed=seed,
    )
    te = idx["test"]
    if len(te) == 0:
        raise ProbeError("the test split is empty")
    pred = np.concatenate(
        [
            head.predict(np.asarray(xs.patch[te[s : s + 256]].values), mask.shape[-1])
            for s in range(0, len(te), 256)
        ]
    )
    truth = np.asarray(mask[te].values)
    dice, iou = probes.per_volume_scores(pred, truth, sample[te], n_classes)
    # Examples for the report: per test volume (first 3), its slice with most foreground.
    shown = [
        int(np.flatnonzero(sample[te] == v)[np.argmax((truth[sample[te] == v] > 0).sum((1, 2)))])
        for v in list(dict.fromkeys(sample[te]))[:3]
    ]
    keep.update(item=te[shown], pred=pred[shown], truth=truth[shown])
    names = list(ds.classes[1:]) if ds.classes else [str(c) for c in range(1, n_classes)]

    def scores(i: np.ndarray) -> dict[str, float]:
        with np.errstate(all="ignore"):
            out = {
                "dice": float(np.nanmean(np.nanmean(dice[i], 1))),
                "iou": float(np.nanmean(np.nanmean(iou[i], 1))),
            }
            for c, name in enumerate(names):
                out[f"dice:{name}"] = float(np.nanmean(dice[i, c]))
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN resamples of a rare class
        result = with_intervals(scores, len(dice), seed)
    n_vol = {s: len(np.unique(sample[idx[s]])) for s in idx}
    for metric, (v, lo, hi) in result.items():
        yield dict(
            probe="seg-linear",
            metric=metric,
            value=v,
            ci_low=lo,
            ci_high=hi,
            n_train=n_vol["train"],
            n_val=n_vol["val"],
            n_test=n_vol["test"],
            param_name="C",
            param=head.param,
            fit_seconds=round(head.seconds, 3),
        )


def probe_set(
    path: Path,
    ds: Dataset,
    pool: str = "mean",
    seed: int = 0,
    protocol: str = "default",
    examples: Path | None = None,
) -> list[dict[str, Any]]:
    """Every probe that fits `ds.task`, on the feature set at `path`: result rows.

    protocol "medmnist+" scores kNN as MedMNIST+ does (k=11, Euclidean, majority vote).
    Segmentation writes a few test predictions to `examples/<set>.npz` for the report.
    """
    xs = store.open_set(path)
    skipped = list(xs.attrs.get("skipped", {}))
    if skipped:
        xs = xs.isel(item=~np.isin(_str(xs.sample), skipped))
    enc = xs.attrs["encoder"]
    ident = dict(
        dataset=ds.name,
        encoder=enc["name"],
        random_init=bool(enc["random_init"]),
        resolution=int(xs.attrs["preprocess"]["resolution"]),
        feature_set=xs.attrs["cache_key"][:12],
        pool=pool if ds.dims == 3 else "",
        protocol=protocol,
    )
    if ds.task == "segmentation":
        keep: dict[str, np.ndarray] = {}
        found = list(_segmentation(xs, ds, seed, keep))
        if examples is not None:
            examples.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(examples / f"{xs.attrs['cache_key'][:12]}.npz", **keep)
    else:
        knn = ("euclidean", (11,)) if protocol == "medmnist+" else ("cosine", probes.K_GRID)
        found = _classification(xs, ds, pool, seed, *knn)
    return [{**ident, **row} for row in found]


def write_results(out: Path, rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Upsert rows (keyed by dataset/encoder/random_init/resolution/probe/metric)."""
    out.mkdir(parents=True, exist_ok=True)
    csv = out / "results.csv"
    new = pd.DataFrame(rows, columns=rows[0].keys() if rows else KEY)
    if csv.is_file():
        old = pd.read_csv(csv)
        if "protocol" not in old:  # results written before protocols existed
            old["protocol"] = "default"
        keys = set(map(tuple, new[KEY].astype(str).values))
        old = old[[tuple(r) not in keys for r in old[KEY].astype(str).values]]
        new = pd.concat([old, new], ignore_index=True) if len(new) else old
    if len(new):
        new = new.sort_values(KEY, kind="stable").reset_index(drop=True)
    new.to_csv(csv, index=False, float_format="%.6g")
    with (out / "results.jsonl").open("w") as f:
        for rec in new.to_dict("records"):
            f.write(json.dumps(rec, default=str) + "\n")
    return new


def table(df: pd.DataFrame, datasets: list[Dataset]) -> str:
    """One line per dataset/encoder/resolution/probe with its main metric and interval."""
    lines = [
        f"{'dataset':<24} {'encoder':<30} {'res':>4} {'probe':<10} {'metric':<8} "
        f"{'value':>6}  95% CI"
    ]
    for ds in datasets:
        metric = MAIN_METRIC[ds.task]
        sub = df[(df.dataset == ds.name) & (df.metric == metric)]
        for r in sub.itertuples():
            enc = r.encoder + (" [random_init]" if r.random_init else "")
            lines.append(
                f"{ds.name:<24} {enc:<30} {r.resolution:>4} {r.probe:<10} "
                f"{metric:<8} {r.value:6.3f}  [{r.ci_low:.3f}, {r.ci_high:.3f}]"
            )
    return "\n".join(lines)


def run(
    manifest: Manifest,
    out: Path,
    *,
    pool: str = "mean",
    seed: int = 0,
    baseline: bool = True,
    echo=print,
) -> pd.DataFrame:
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    prepared: dict[str, Any] = {}
    for ds, spec, res in manifest.cells(baseline):
        where = f"{ds.name} / {spec} @ {res}px"
        if ds.name not in prepared:
            try:
                prepared[ds.name] = prepare(ds)
            except FeatstoreError as exc:
                prepared[ds.name] = None
                problems.append(f"{ds.name}: {exc}")
        if prepared[ds.name] is None:
            continue
        req = request(ds, prepared[ds.name].fingerprint, spec, res, manifest)
        path = store.find_set(manifest.cache, req)
        if path is None:
            src = f" --manifest {manifest.source}" if manifest.source else ""
            problems.append(
                f"{where}: no feature set in {manifest.cache}; make it with "
                f"`featstore extract{src} --cache {manifest.cache} --dataset {ds.name} "
                f"--encoder {spec} --resolution {res}`"
            )
            continue
        try:
            got = probe_set(path, ds, pool, seed, manifest.protocol, out / "examples")
        except FeatstoreError as exc:
            problems.append(f"{where}: {exc}")
            continue
        rows += got
        echo(f"probed {where}: {len(got)} scores")
    df = write_results(out, rows)
    (out / "run-config.json").write_text(
        json.dumps(
            {"manifest": manifest.model_dump(mode="json"), "pool": pool, "seed": seed}, indent=2
        )
    )
    if len(df):
        echo(table(df, list(manifest.datasets)))
    for p in problems:
        echo(f"problem: {p}")
    if problems and not rows:
        raise ProbeError("no dataset could be probed:\n  " + "\n  ".join(problems))
    echo(f"results: {out / 'results.csv'} ({len(rows)} rows written)")
    return df


if __name__ == "__main__":
    from featstore.cli import app

    app(["probe", *__import__("sys").argv[1:]], prog_name="pipelines.probe")
