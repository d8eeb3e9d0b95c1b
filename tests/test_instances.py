"""Neuron instances (EM): boundary maps to instances, VOI and adapted Rand error scored
as scikit-image scores them, the manifest's `instances:` block, and a probe of a real
membrane-mask image set end to end."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from skimage.metrics import adapted_rand_error, variation_of_information
from typer.testing import CliRunner

from featstore.data.manifest import Dataset
from featstore.data.samples import finish_mask, id_boundaries
from featstore.data.settings import Instances
from featstore.errors import BadInputError
from featstore.probing.instances import (
    instance_scorer,
    instance_scores,
    predicted_instances,
    truth_instances,
    unit_scores,
)
from pipelines.cli import app

runner = CliRunner()


def _cells(seed: int, size: int = 32, width: int = 2) -> np.ndarray:
    """A membrane mask (1, size, size) uint8: class 1 on a jittered grid of lines
    `width` px wide, so the interior falls apart into nine cells."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((1, size, size), np.uint8)
    for at in (size // 3, 2 * size // 3):
        y, x = at + int(rng.integers(-3, 4)), at + int(rng.integers(-3, 4))
        mask[0, y : y + width, :] = 1
        mask[0, :, x : x + width] = 1
    return mask


def _entropy(sizes: np.ndarray) -> float:
    p = sizes / sizes.sum()
    return float(-(p * np.log2(p)).sum())


def test_scores_equal_scikit_image_on_the_same_arrays():
    rng = np.random.default_rng(0)
    for _ in range(5):
        truth = rng.integers(0, 6, (2, 20, 24))
        pred = rng.integers(0, 4, (2, 20, 24))
        split, merge, arand = instance_scores(pred, truth)
        sk_split, sk_merge = variation_of_information(truth, pred, ignore_labels=(0,))
        sk_arand, _, _ = adapted_rand_error(truth, pred, ignore_labels=(0,))
        assert (split, merge, arand) == (sk_split, sk_merge, sk_arand)
        assert split > 0 and merge > 0 and 0 < arand < 1


def test_perfect_prediction_scores_zero():
    mask = _cells(1)
    truth = truth_instances(mask)
    assert truth.max() == 9 and (truth[mask == 1] == 0).all()
    # zero up to float rounding in scikit-image's entropies (1e-17)
    np.testing.assert_allclose(instance_scores(truth, truth), 0, atol=1e-12)
    relabelled = np.where(truth > 0, 100 - truth, 0)  # the ids themselves do not matter
    np.testing.assert_allclose(instance_scores(relabelled, truth), 0, atol=1e-12)
    # the mask itself as the boundary probability: the rule gives the truth back
    for rule in (Instances(), Instances(rule="watershed")):
        got = unit_scores(mask.astype(np.float32), mask, rule)
        np.testing.assert_allclose(got, 0, atol=1e-12)


def test_merging_everything_scores_the_truths_entropy():
    mask = _cells(2)
    truth = truth_instances(mask)
    sizes = np.bincount(truth[truth > 0])[1:].astype(np.float64)
    n, sq = sizes.sum(), (sizes**2).sum()
    split, merge, arand = instance_scores(np.ones_like(truth), truth)
    assert split == pytest.approx(0.0, abs=1e-12)  # nothing is split ...
    assert merge == pytest.approx(_entropy(sizes))  # ... everything is merged: H(truth)
    # adapted Rand: 1 - F of the pair counts; all pairs of a cell agree, so recall is 1
    # and precision is (sum s_i^2 - n) / (n^2 - n)
    precision = (sq - n) / (n * n - n)
    assert arand == pytest.approx(1 - 2 * precision / (precision + 1))
    # one neuron split into pixels is the mirror: merge 0, split = log2 of its size
    one = np.ones((1, 4, 4), np.int32)
    split, merge, _ = instance_scores(np.arange(1, 17).reshape(1, 4, 4), one)
    assert (split, merge) == (pytest.approx(4.0), pytest.approx(0.0, abs=1e-12))


def test_the_rule_on_a_constructed_boundary_map():
    prob = np.zeros((1, 12, 12), np.float32)
    prob[0, 6, :] = 0.9  # a strong line splits top from bottom
    prob[0, :6, 6] = 0.4  # a weak one splits the top in two, at thresholds under 0.4
    got = predicted_instances(prob, Instances(threshold=0.5))
    assert got.max() == 2 and (got[prob >= 0.5] == 0).all()
    assert len(np.unique(got[0, :6])) == 1 and got[0, 0, 0] != got[0, 11, 0]
    low = predicted_instances(prob, Instances(threshold=0.3))
    assert low.max() == 3 and low[0, 0, 0] != low[0, 0, 11]
    shed = predicted_instances(prob, Instances(rule="watershed", threshold=0.3))
    assert shed.min() == 1 and shed.max() == 3  # every pixel belongs to a neuron
    np.testing.assert_array_equal(shed[low > 0], low[low > 0])  # the seeds are kept
    # in a volume, components never join across sections (EM is anisotropic), for
    # the prediction and the truth alike
    vol = np.concatenate([prob, prob])
    for rule in (Instances(), Instances(rule="watershed")):
        two = predicted_instances(vol, rule)
        assert two.max() == 4 and not set(np.unique(two[0])) & set(np.unique(two[1])) - {0}
    truth = truth_instances(np.concatenate([_cells(1), _cells(1)]))
    assert truth.max() == 18 and truth[1].min() == 0 and truth[1][truth[1] > 0].min() == 10
    assert Instances(threshold=0.3).rule_name == "components@0.3"


def test_scorer_means_units_and_voi_is_split_plus_merge():
    per = np.array([[0.5, 1.0, 0.2], [np.nan] * 3, [1.5, 0.0, 0.4]])
    out = instance_scorer(per)(np.arange(3))
    assert out == pytest.approx({"voi_split": 1.0, "voi_merge": 0.5, "voi": 1.5, "arand": 0.3})
    nothing = instance_scores(np.ones((1, 3, 3), int), np.zeros((1, 3, 3), int))
    assert np.isnan(nothing).all()


def _ds(**kw) -> Dataset:
    base = dict(name="em", format="images", path="/d", index="i.csv", task="segmentation", dims=2)
    return Dataset.model_validate({**base, "classes": ["interior", "membrane"], **kw})


def test_manifest_block_and_identity():
    from conftest import a_recipe

    from featstore.data.manifest import Manifest
    from featstore.identity import Recipe

    assert _ds(instances=True).instances == Instances()
    assert _ds(instances=False).instances is None
    assert _ds(instances={"labels": "ids", "rule": "watershed"}).instances.rule == "watershed"
    for bad, words in (
        (dict(task="classification"), "task: segmentation"),
        (dict(classes=["a", "b", "c"]), "two classes"),
        (dict(instances={"labels": "ids"}, mask_map={255: 1}), "mask_map"),
        (dict(instances={"threshold": 1.5}), "threshold"),
    ):
        with pytest.raises(ValueError, match=words):
            _ds(**{"instances": True, **bad})
    m = Manifest(datasets=(_ds(),))
    plain = Recipe.of(_ds(), m, "f" * 64, 32)
    membrane = Recipe.of(_ds(instances=True), m, "f" * 64, 32)
    ids = Recipe.of(_ds(instances={"labels": "ids"}), m, "f" * 64, 32)
    assert "instances" not in plain.to_dict()  # keys of sets without instances unchanged
    assert membrane.to_dict()["instances"] == "membrane" and ids.instances == "ids"
    assert len({str(r.to_dict()) for r in (plain, membrane, ids)}) == 3
    assert Recipe.from_dict(ids.to_dict()) == ids
    assert a_recipe().instances is None
    # the rule is probe-side: not in the identity
    shed = Recipe.of(_ds(instances={"rule": "watershed"}), m, "f" * 64, 32)
    assert shed == membrane


def test_neuron_ids_become_their_boundaries():
    ids = np.full((1, 6, 6), 70000, np.uint64)  # ids past 255 are fine here
    ids[0, :, 3:] = 12
    ids[0, 4:, :] = 2**40
    edge = id_boundaries(ids)
    expect = np.zeros((1, 6, 6), np.uint8)
    expect[0, :4, 2:4] = 1  # both sides of the vertical change
    expect[0, 3:5, :] = 1  # both sides of the horizontal one
    np.testing.assert_array_equal(edge, expect)
    ds = _ds(instances={"labels": "ids"})
    np.testing.assert_array_equal(finish_mask(ds, ids, "m.h5", "i.h5", (1, 6, 6)), expect)
    with pytest.raises(BadInputError, match=r"class ids in 0\.\.255"):
        finish_mask(_ds(), ids, "m.h5", "i.h5", (1, 6, 6))  # without instances: refused
    with pytest.raises(BadInputError, match="integers"):
        finish_mask(ds, ids.astype(np.float64) + 0.5, "m.h5", "i.h5", (1, 6, 6))


def _membrane_images(root, n: int = 16, size: int = 64) -> None:
    """Real PNGs of cells: bright interiors, dark membranes (10 px, so that whole
    patches of the 8-px tiny encoder are membrane), noise; masks as ISBI 2012 ships
    them (0 membrane, 255 interior)."""
    (root / "image").mkdir(parents=True)
    (root / "label").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        mask = _cells(i, size, width=10)[0]
        img = np.where(mask == 1, 60.0, 190.0) + rng.normal(0, 12, mask.shape)
        name = f"{i:02d}.png"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "image" / name)
        Image.fromarray(np.where(mask == 1, 0, 255).astype(np.uint8)).save(root / "label" / name)


def test_probe_scores_instances_and_keeps_them(tmp_path, tiny_dinov3):
    from conftest import write_manifest

    from featstore.data.manifest import load_manifest
    from featstore.probing.options import ProbeOptions
    from featstore.probing.predictions import read_predictions
    from featstore.probing.segmentation import fit_linear_head, seg_set
    from featstore.store import sets

    _membrane_images(tmp_path / "em")
    entry = """\
  - name: cells
    format: images
    path: em
    index: {glob: "image/*.png", mask: "../label/{name}"}
    task: segmentation
    dims: 2
    modality: EM
    mask_map: {0: 1, 255: 0}
    classes: [interior, membrane]
    splits: {ratios: [0.5, 0.25, 0.25], order: contiguous}
    instances: {rule: components, threshold: 0.5}
"""
    mpath = write_manifest(tmp_path, entry, f"['{tiny_dinov3}']", resolutions="[64]")
    args = ["--manifest", str(mpath)]
    ex = runner.invoke(app, ["extract", *args])
    assert ex.exit_code == 0, ex.output
    out = tmp_path / "r"
    pr = runner.invoke(app, ["probe", *args, "--out", str(out)])
    assert pr.exit_code == 0, pr.output
    df = pd.read_csv(out / "results.csv", dtype={"feature_set": str})
    inst = df[df.metric.isin(["voi_split", "voi_merge", "voi", "arand"])]
    assert len(inst) == 4 * 2 * 2  # metrics x heads x (encoder, pixels)
    assert set(inst.rule) == {"components@0.5"} and df[df.metric == "dice"].rule.isna().all()
    assert (inst.ci_low <= inst.value).all() and (inst.value <= inst.ci_high).all()
    assert (inst.n_test == 4).all()
    # the kept predictions hold each test image's scores; the row is their mean (to
    # results.csv's 6 digits), and
    # they are those of the linear head refitted here, its boundary map by the rule
    mine = inst[~inst.encoder.str.startswith("pixels") & (inst.probe == "seg-linear")]
    mine = mine.set_index("metric")
    key = mine.feature_set.iloc[0]
    kept = out / "predictions" / f"cells-{key}-seg-linear.parquet"
    pred = read_predictions(kept)
    frame = pd.read_parquet(kept)
    assert {"voi_split", "voi_merge", "arand", "dice_membrane"} <= set(frame.columns)
    assert pred.instances is not None and pred.instances.shape == (4, 3)
    assert mine.loc["voi", "value"] == pytest.approx(pred.instances[:, :2].sum(1).mean(), abs=1e-6)
    assert mine.loc["arand", "value"] == pytest.approx(pred.instances[:, 2].mean(), abs=1e-6)

    manifest = load_manifest(mpath)
    ds = manifest.dataset("cells")
    (path,) = (tmp_path / "cache").glob(f"{key}*.zarr")
    xs = sets.open_set(path)
    assert xs.attrs["identity"]["recipe"]["instances"] == "membrane"
    from threadpoolctl import threadpool_limits

    s = seg_set(xs, ds, None)
    with threadpool_limits(limits=1):
        head = fit_linear_head(s, ProbeOptions())
    order = {sid: i for i, sid in enumerate(pred.sample)}
    for vol, sid in zip(s.test_vols, s.test_ids, strict=True):
        patch, mask = s.read(True)(vol)
        prob = head.boundary(patch, s.size)
        assert ((prob > 0.5) == (head.predict(patch, s.size) == 1)).all()
        want = instance_scores(predicted_instances(prob, ds.instances), truth_instances(mask))
        np.testing.assert_allclose(pred.instances[order[sid]], want)


def test_cremi_rows_stand_beside_instance_datasets_as_another_dataset():
    from featstore.report import references
    from featstore.report.tables import published_table, task_table

    refs = references.for_dataset(_ds(instances=True))
    cremi = {r.model: r.value for r in refs if r.dataset == "cremi-a"}
    assert cremi == {"DINOv3-L, frozen": 1.78, "CAD (a classic EM method)": 0.57}
    assert all(r.metric == "voi" and "arXiv 2509.06467" in r.source for r in refs)
    assert references.for_dataset(_ds()) == []  # membrane Dice alone: not neurons
    rows = pd.DataFrame(
        [
            dict(dataset="em", encoder="dinov3-vits16", random_init=True, resolution=512,
                 protocol="default", probe=probe, metric=metric, value=v, ci_low=v - 0.1,
                 ci_high=v + 0.1, feature_set="abc", pool="", unit="", rule=rule)
            for probe in ("seg-linear", "seg-decoder")
            for metric, v, rule in (("dice", 0.5, ""), ("voi", 2.5, "components@0.5"),
                                    ("arand", 0.4, "components@0.5"), ("iou", 0.3, ""),
                                    ("hd95", 9.0, ""))
        ]
    )  # fmt: skip
    from featstore.probing.rows import typed

    pub = published_table(typed(rows), refs)
    assert list(pub.columns) == ["model", "resolution", "accuracy", "auroc", "voi"]
    models = list(pub.model)
    assert "DINOv3-L, frozen (on cremi-a, another dataset)" in models
    assert pub.voi.tolist()[:2] == ["1.780", "0.570"] and pub.voi.iloc[2].startswith("2.500")
    table = task_table(typed(rows), "segmentation")
    assert {"seg-decoder / voi", "seg-linear / arand"} <= set(table.columns)


def test_isbi_2012_neurons_in_the_real_manifest(shared_data):
    from conftest import REPO

    from featstore.data import readers
    from featstore.data.manifest import load_manifest

    m = load_manifest(REPO / "manifests" / "real.yaml")
    for name, dims in (("em-isbi2012-neurons", 2), ("em-isbi2012-neurons-3d", 3)):
        ds = m.dataset(name)
        assert ds.instances == Instances() and ds.dims == dims
    ds = m.dataset("em-isbi2012-neurons-3d")
    test = [s for s in readers.list_samples(ds) if s.split == "test"]
    assert len(test) == 1 and test[0].n_items == 6
    mask = readers.load(ds, test[0]).mask  # class 1: the membrane
    per_section = [truth_instances(m[None]).max() for m in mask]
    assert all(100 <= n <= 130 for n in per_section), per_section  # 103-124 neurons each
    assert truth_instances(mask).max() == sum(per_section)  # never joined across sections
