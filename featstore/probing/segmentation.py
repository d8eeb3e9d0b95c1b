"""Segmentation probes of one feature set: the linear head and the dense decoder,
each fitted on the train items and scored per image (2D) or re-stacked volume (3D)
and class (no torch here: the decoder's torch lives in `featstore.probing.heads`,
imported when it runs).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import xarray as xr

from featstore.data.manifest import Dataset
from featstore.errors import ProbeError
from featstore.probing import bootstrap, geometry, predictions, probes
from featstore.probing.instances import SCORED, instance_draws
from featstore.probing.items import item_str, patch_tokens, volume_items
from featstore.probing.options import ProbeOptions
from featstore.probing.rows import Fitted, Outcome
from featstore.probing.segscores import (
    Examples,
    Read,
    Scored,
    block_items,
    per_volume,
    volume_draws,
)
from featstore.probing.streaming import StreamedHead, fit_streaming

if TYPE_CHECKING:
    from featstore.probing.heads import DenseHead  # torch: imported where a decoder is fitted


@dataclass(frozen=True)
class SegSet:
    """What the segmentation heads read of one open set.

    idx: item indices of each split ("train" may be a subset: `with_train`);
    test_vols: each test volume's item indices in slice order, test_ids their ids;
    size: the mask side (pixels); per_item: patch tokens per item.
    """

    xs: xr.Dataset
    ds: Dataset
    idx: dict[str, np.ndarray]
    sample: np.ndarray
    n_classes: int
    names: list[str]
    size: int
    per_item: int
    test_vols: list[np.ndarray]
    test_ids: list[str]
    spacing: Mapping[str, geometry.Spacing] | None

    def with_train(self, train: np.ndarray) -> SegSet:
        """The same set with only the train items `train` (sorted item indices)."""
        return replace(self, idx={**self.idx, "train": train})

    def read(self, last_only: bool) -> Read:
        """Items -> (their patch tokens, their masks (m, H, W) uint8)."""
        return lambda items: (
            patch_tokens(self.xs, items, last_only),
            np.asarray(self.xs.mask[items].values),
        )

    def test_patients(self) -> np.ndarray | None:
        """The patient of each test volume (image), None where the set has none."""
        if "patient" not in self.xs.coords:
            return None
        pat = item_str(self.xs.patient)
        return np.array([pat[v[0]] for v in self.test_vols])

    @property
    def resampled(self) -> bootstrap.Resampled:
        """What the intervals resample: patients where known, else volumes (images)."""
        return bootstrap.resampled("patient" in self.xs.coords, self.ds.dims, False)

    def volumes(self, split: str) -> int:
        """The number of volumes (2D: images) in `split`."""
        return len(np.unique(self.sample[self.idx[split]]))


def seg_set(xs: xr.Dataset, ds: Dataset, spacing: Mapping[str, geometry.Spacing] | None) -> SegSet:
    """The `SegSet` of an open segmentation set (spacing per volume id; None: pixels)."""
    split, sample = item_str(xs.split), item_str(xs.sample)
    idx = {s: np.flatnonzero(split == s) for s in ("train", "val", "test")}
    if len(idx["test"]) == 0:
        raise ProbeError("the test split is empty")
    n_classes = len(ds.classes) if ds.classes else int(xs.mask.max().values) + 1
    names = list(ds.classes[1:]) if ds.classes else [str(c) for c in range(1, n_classes)]
    # Test items volume by volume, each in slice order (3D distances run across slices).
    test = idx["test"]
    test_vols = [test[v] for v in volume_items(sample[test], xs.slice.values[test])]
    return SegSet(
        xs=xs,
        ds=ds,
        idx=idx,
        sample=sample,
        n_classes=n_classes,
        names=names,
        size=xs.mask.shape[-1],
        per_item=max(1, xs.sizes["row"] * xs.sizes["col"]),
        test_vols=test_vols,
        test_ids=[str(sample[v[0]]) for v in test_vols],
        spacing=spacing,
    )


def fit_linear_head(s: SegSet, opts: ProbeOptions) -> probes.SegModel | StreamedHead:
    """The linear head on the train items' patch tokens (the deepest stored block).

    With `opts.memory_mb`, SGD on every training patch streamed in blocks of that
    many MB (`featstore.probing.streaming`); else a fixed sample of patches in memory.
    """
    xs, train, k = s.xs, s.idx["train"], s.n_classes
    if opts.memory_mb is not None:
        rows, cols = xs.sizes["row"], xs.sizes["col"]
        read = s.read(True)
        return fit_streaming(
            lambda a, b: read(train[a:b]),
            len(train),
            s.per_item * xs.sizes["channel"],
            lambda m: probes.patch_targets(m, rows, cols, k),
            k,
            opts.memory_mb,
            seed=opts.seed,
        )
    tr = train
    if len(tr) * s.per_item > 4 * probes.SEG_MAX_PATCHES:  # read only what the head will see
        rng = np.random.default_rng(opts.seed)
        tr = np.sort(rng.choice(tr, 4 * probes.SEG_MAX_PATCHES // s.per_item, replace=False))
    (ptr, mtr), (pva, mva) = s.read(True)(tr), s.read(True)(s.idx["val"])
    return probes.seg_probe(
        ptr.astype(np.float32),
        mtr,
        pva.astype(np.float32),
        mva,
        s.sample[s.idx["val"]],
        k,
        seed=opts.seed,
    )


def fit_decoder_head(s: SegSet, seed: int) -> DenseHead:
    """The dense decoder fitted on (a budget-sized sample of) the train items."""
    from featstore.probing import heads

    cfg = heads.DecoderConfig()
    rng = np.random.default_rng(seed)
    train, dims = s.idx["train"], s.ds.dims
    budget = cfg.steps(dims) * (cfg.batch if dims == 2 else 1)  # what it can see
    vols: list[np.ndarray] = []
    if dims == 2:
        tr = train
        if len(tr) > budget:
            tr = np.sort(rng.choice(tr, budget, replace=False))
    else:
        train_vols = volume_items(s.sample[train], np.asarray(s.xs.slice.values)[train])
        if len(train_vols) > budget:
            pick = sorted(rng.choice(len(train_vols), budget, replace=False))
            train_vols = [train_vols[j] for j in pick]
        tr = np.concatenate([train[v] for v in train_vols])
        offsets = np.cumsum([0] + [len(v) for v in train_vols])
        vols = [np.arange(a, b) for a, b in itertools.pairwise(offsets)]
    patch, mask = s.read(False)(tr)
    return heads.fit_decoder(patch, mask, vols, s.n_classes, dims, seed, cfg)


SEG_HEADS = ("seg-linear", "seg-decoder")
TRAINED = ("seg-decoder",)  # the heads whose fit depends on the seed (`--seeds`)


def probe_segmentation(
    s: SegSet,
    opts: ProbeOptions,
    shown: Sequence[int] | None = None,
    *,
    heads: Sequence[str] = SEG_HEADS,
    boot_seed: int | None = None,
    key: Callable[[str], predictions.Key] | None = None,
) -> tuple[Outcome, Examples]:
    """The linear head and the dense decoder (or only `heads`), scored; a few of the
    linear head's test predictions: those of the items `shown` (positions in `s.xs`:
    the set's example items), or without it the slice with most foreground of the
    first 3 volumes (none without the linear head).

    Both heads are scored in blocks of whole test volumes (`per_volume`) that fit
    `opts.memory_mb` (without it, blocks of `SCORE_ITEMS` items). The decoder's
    training sample is capped by its step budget (`heads.DecoderConfig`), not by
    `memory_mb`. Heads are fitted with `opts.seed`, intervals drawn with `boot_seed`
    (default `opts.seed`), whole patients at a time where the set has them; `key`:
    keep each head's test predictions in the Outcome.

    For an instance dataset (`instances:`) both heads' boundary probabilities also
    become instances by its rule, scored per image (2D) or volume (3D): voi_split,
    voi_merge, voi and arand rows, their `rule` named (`featstore.probing.instances`).
    """
    if len(s.idx["train"]) == 0 or len(s.idx["val"]) == 0:
        raise ProbeError("segmentation needs train and val items")
    size, k, xs = s.size, s.n_classes, s.xs
    tokens = s.per_item * xs.sizes["channel"]
    depth = xs.sizes.get("patch_layer", 1)
    rule = s.ds.instances
    vols, ids = s.test_vols, s.test_ids
    unit = "mm" if s.spacing else "px"
    counts = dict(n_train=s.volumes("train"), n_val=s.volumes("val"), n_test=s.volumes("test"))
    runs: list[tuple[str, Scored, str, float, float]] = []
    none = np.zeros((0, 0, 0), np.uint8)
    examples = Examples(np.zeros(0, np.int64), none, none)
    if "seg-linear" in heads:
        head = fit_linear_head(s, opts)
        lin_items = block_items(opts.memory_mb, tokens, size * size, k)
        lin_map = head.predict if rule is None else head.boundary
        lin = per_volume(
            lambda p, _: lin_map(p, size),
            s.read(True),
            vols,
            ids,
            k,
            s.spacing,
            lin_items,
            shown,
            rule,
        )
        examples = lin.examples
        pname = "alpha" if opts.memory_mb is not None else "C"
        runs.append(("seg-linear", lin, pname, head.param, head.seconds))
    if "seg-decoder" in heads:
        dec = fit_decoder_head(s, opts.seed)
        dec_map = dec.predict if rule is None else dec.boundary

        def dec_predict(p: np.ndarray, lengths: list[int]) -> np.ndarray:
            if s.ds.dims == 2:
                return dec_map(p, size)
            cuts = np.cumsum(lengths)[:-1]
            return np.concatenate([dec_map(v, size) for v in np.split(p, cuts)])

        dec_items = block_items(opts.memory_mb, tokens * depth, size * size, k)
        dec_found = per_volume(
            dec_predict, s.read(False), vols, ids, k, s.spacing, dec_items, rule=rule
        )
        runs.append(("seg-decoder", dec_found, "lr", dec.param, dec.seconds))
    seed = opts.seed if boot_seed is None else boot_seed
    groups = s.test_patients()
    fitted, draws, per_unit, per_instance = [], {}, {}, {}
    for probe, found, pname, param, seconds in runs:
        draws[probe] = volume_draws(found.per, s.names, seed, groups)
        per_unit[probe] = found.per
        rules: dict[str, str] = {}
        if rule is not None and found.instances is not None:
            draws[probe] |= instance_draws(found.instances, seed, groups)
            per_instance[probe] = found.instances
            rules = dict.fromkeys(SCORED, rule.rule_name)
        scores = bootstrap.intervals(draws[probe])
        units = {m: unit for m in scores if m.startswith("hd95")}
        fitted.append(
            Fitted(
                probe,
                scores,
                pname,
                param,
                seconds,
                **counts,
                units=units,
                rules=rules,
                resampled=s.resampled,
            )
        )
    out = Outcome(fitted, draws, per_unit, per_instance)
    if key is not None:
        out = replace(out, predictions=tuple(seg_predictions(s, out, key)))
    return out, examples


def seg_predictions(
    s: SegSet, found: Outcome, key: Callable[[str], predictions.Key]
) -> list[predictions.Predictions]:
    """Each head's per-unit scores of the test volumes (images), keyed by `key(probe)`."""
    patient = s.test_patients()
    return [
        predictions.Predictions(
            key=key(probe),
            task="segmentation",
            sample=np.asarray(s.test_ids, str),
            patient=patient,
            per=per,
            classes=tuple(s.names),
            instances=found.per_instance.get(probe),
            unit=bootstrap.resampled(False, s.ds.dims, False),
        )
        for probe, per in found.per_unit.items()
    ]
