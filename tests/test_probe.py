"""Probe stage: correct against scikit-learn, beats chance, never loads torch."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import REPO
from sklearn import metrics as skm
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler
from typer.testing import CliRunner

from featstore.probing import probes
from featstore.probing.items import volume_items
from featstore.probing.metrics import classification_scores, dice_iou, with_intervals
from featstore.probing.options import ProbeOptions
from pipelines.cli import app

runner = CliRunner()


@pytest.fixture(scope="session")
def shipped(tmp_path_factory, tiny_dinov3):
    """The shipped manifest, run end to end through the CLI with the tiny encoder at 32 px."""
    work = tmp_path_factory.mktemp("shipped")
    shutil.copy(REPO / "data_manifest.yaml", work / "data_manifest.yaml")
    args = [
        "--manifest",
        str(work / "data_manifest.yaml"),
        "--encoder",
        str(tiny_dinov3),
        "--resolution",
        "64",
    ]
    ex = runner.invoke(app, ["extract", *args])
    assert ex.exit_code == 0, ex.output
    pr = runner.invoke(app, ["probe", *args, "--out", str(work / "results")])
    assert pr.exit_code == 0, pr.output
    return work, args, pr.output, pd.read_csv(work / "results" / "results.csv")


def test_end_to_end_table_and_rows(shipped):
    _, _, output, df = shipped
    assert "synth-organs-3d" in output and "seg-linear" in output and "[" in output
    assert set(df.dataset) == {
        "synth-lesions-2d",
        "synth-structures-2d",
        "synth-nodules-3d",
        "synth-organs-3d",
        "synth-slides",
    }
    assert set(df.encoder) == {"pixels", shipped[1][3].rstrip("/").split("/")[-1]}
    assert not df.duplicated(
        ["dataset", "encoder", "random_init", "resolution", "probe", "metric"]
    ).any()


def test_each_probe_beats_chance(shipped):
    df = shipped[3]
    df = df[df.encoder != "pixels"]  # the baseline may sit at chance: that is its job
    cls = df[df.metric == "balanced_accuracy"]
    chance = cls.dataset.map(
        {"synth-lesions-2d": 1 / 3, "synth-nodules-3d": 1 / 2, "synth-slides": 1 / 2}
    )
    assert len(cls) == 6 and (cls.value > chance).all(), cls[["dataset", "probe", "value"]]
    assert (df[df.metric == "auroc"].value > 0.5).all()
    dice = df[df.metric == "dice"]  # predicting background everywhere scores 0
    assert len(dice) == 4 and (dice.value > 0.2).all(), dice[["dataset", "probe", "value"]]
    assert set(dice.probe) == {"seg-linear", "seg-decoder"}


def test_seed_protocol_metrics_in_results(shipped):
    """Precision/recall beside AUROC/F1; HD95, precision, recall for segmentation, HD95
    in mm where the spacing is known (NIfTI header) and in pixels where it is not."""
    df = shipped[3]
    cls = df[df.dataset == "synth-lesions-2d"]
    assert {"auroc", "accuracy", "f1", "precision", "recall"} <= set(cls.metric)
    seg = df[df.dataset.str.startswith("synth-") & df.metric.str.startswith("hd95")]
    for name, unit in (("synth-organs-3d", "mm"), ("synth-structures-2d", "px")):
        rows = seg[seg.dataset == name]
        assert set(rows.unit) == {unit} and {"hd95", "hd95:organ-a"} & set(rows.metric)
        assert (rows.value.dropna() >= 0).all()
    for metric in ("precision", "recall"):
        assert len(df[(df.metric == metric) & (df.probe == "seg-decoder")]) == 4


def test_segmentation_scores_match_sklearn(shipped):
    """The 2D linear head's Dice, precision and recall rows equal scikit-learn's on the
    same head's test predictions."""
    from conftest import refit_linear_seg_head, sklearn_seg_scores

    import featstore
    from featstore.data.manifest import load_manifest

    work, args, _, df = shipped
    mpath = work / "data_manifest.yaml"
    ds = load_manifest(mpath).dataset("synth-structures-2d")
    xs = featstore.open_features(mpath, ds.name, args[3], int(args[5]))
    want = sklearn_seg_scores(*refit_linear_seg_head(xs, ds))
    rows = df[(df.dataset == ds.name) & (df.probe == "seg-linear") & (df.encoder != "pixels")]
    got = rows.set_index("metric").value
    for metric, value in want.items():
        assert got[metric] == pytest.approx(value, abs=1e-5), metric


def test_intervals_contain_point_estimates(shipped):
    df = shipped[3].dropna(subset=["ci_low"])
    assert ((df.ci_low <= df.value + 1e-9) & (df.value <= df.ci_high + 1e-9)).all()


def test_rerun_is_deterministic_and_appends_nothing_twice(shipped):
    work, args, _, before = shipped
    again = runner.invoke(app, ["probe", *args, "--out", str(work / "results")])
    assert again.exit_code == 0, again.output
    after = pd.read_csv(work / "results" / "results.csv")
    cols = ["dataset", "encoder", "resolution", "probe", "metric", "value", "ci_low", "ci_high"]
    pd.testing.assert_frame_equal(before[cols], after[cols])


def test_probe_stage_loads_no_encoder_and_torch_only_for_heads(shipped):
    work, args, _, _ = shipped
    code = (
        "import sys; from typer.testing import CliRunner; from pipelines.cli import app; "
        "r = CliRunner().invoke(app, ['probe', *{args!r}, '--out', {out!r}]); "
        "assert r.exit_code == 0, r.output; "
        "bad = [m for m in ('transformers', 'featstore.encode.encoders') if m in sys.modules]; "
        "assert not bad, bad; "
        "assert ('torch' in sys.modules) == {heads}, sorted(sys.modules)"
    )
    classification = [*args, "--dataset", "synth-lesions-2d", "--dataset", "synth-nodules-3d"]
    segmentation = [*args, "--dataset", "synth-structures-2d"]
    for a, heads in ((classification, False), (segmentation, True)):
        run = code.format(args=a, out=str(work / "r2"), heads=heads)
        subprocess.run([sys.executable, "-c", run], cwd=REPO, check=True)
    # torch arrives with the trainable heads' module, and only there
    sklearn_only = (
        "import sys, featstore.probing.probes, featstore.probing.evaluation; "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", sklearn_only], cwd=REPO, check=True)


def test_missing_set_names_the_extract_command(shipped, tmp_path):
    _work, args, _, _ = shipped
    args = [*args[:-1], "48"]  # a resolution that was never extracted
    out = runner.invoke(app, ["probe", *args, "--out", str(tmp_path)])
    assert out.exit_code == 2
    assert "featstore extract --manifest" in out.output and "--resolution 48" in out.output


def _blobs(n: int, k: int, d: int, seed: int):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    return rng.normal(size=(n, d)) + 1.5 * np.eye(k, d)[y], y


def test_linear_and_knn_match_direct_sklearn():
    (xtr, ytr), (xva, yva), (xte, yte) = (
        _blobs(n, 3, 8, s) for n, s in ((90, 0), (30, 1), (40, 2))
    )
    lin = probes.linear_probe(xtr, ytr, xva, yva, xte, 3)
    sc = StandardScaler().fit(xtr)
    ref = LogisticRegression(C=lin.param, max_iter=1000, random_state=0).fit(sc.transform(xtr), ytr)
    np.testing.assert_allclose(lin.proba, ref.predict_proba(sc.transform(xte)), atol=1e-8)
    knn = probes.knn_probe(xtr, ytr, xva, yva, xte, 3)
    direct = KNeighborsClassifier(int(knn.param), metric="cosine", algorithm="brute").fit(xtr, ytr)
    np.testing.assert_allclose(knn.proba, direct.predict_proba(xte))
    s = classification_scores(yte, lin.proba)
    assert s["accuracy"] == pytest.approx(skm.accuracy_score(yte, lin.proba.argmax(1)))
    assert s["balanced_accuracy"] == pytest.approx(
        skm.balanced_accuracy_score(yte, lin.proba.argmax(1))
    )
    assert s["f1"] == pytest.approx(skm.f1_score(yte, lin.proba.argmax(1), average="macro"))
    assert s["auroc"] == pytest.approx(skm.roc_auc_score(yte, lin.proba, multi_class="ovr"))
    assert s["accuracy"] > 0.6


def test_multilabel_probe_scores_each_label():
    x, y = _blobs(200, 4, 8, 0)
    multi = np.stack([y == 0, y == 1, (y == 2) | (y == 3)], 1).astype(int)
    p = probes.linear_probe(x[:120], multi[:120], x[120:160], multi[120:160], x[160:], 3)
    assert p.proba.shape == (40, 3)
    s = classification_scores(multi[160:], p.proba)
    assert s["auroc"] == pytest.approx(skm.roc_auc_score(multi[160:], p.proba, average="macro"))


def test_dice_perfect_empty_and_intervals():
    truth = np.zeros((2, 8, 8), np.uint8)
    truth[0, 2:5, 2:5] = 1
    truth[1, 1:3, 1:6] = 2
    dice, iou = dice_iou(truth, truth, 3)
    assert np.all(dice == 1) and np.all(iou == 1)
    dice, iou = dice_iou(np.zeros_like(truth), truth, 3)
    assert np.all(dice == 0) and np.all(iou == 0)
    y = np.array([0, 1] * 20)
    proba = np.stack([1 - y * 0.7, y * 0.7], 1)
    for value, lo, hi in with_intervals(
        lambda i: classification_scores(y[i], proba[i]), len(y)
    ).values():
        assert lo <= value <= hi


def test_volume_items_and_pooling():
    """Volumes in order of first appearance, items by slice; pooled by hand."""
    sample = np.array(list("bbaacb"))
    slice_ = np.array([2, 0, 1, 0, 0, 1])
    vols = volume_items(sample, slice_)
    assert [v.tolist() for v in vols] == [[1, 5, 0], [3, 2], [4]]
    assert [v.tolist() for v in volume_items(sample)] == [[0, 1, 5], [2, 3], [4]]
    cls = np.arange(12, dtype=float).reshape(6, 2)
    mean = probes.pool_volumes(cls, vols, "mean")
    assert mean.shape == (3, 2) and np.allclose(mean[0], (cls[0] + cls[1] + cls[5]) / 3)
    mx = probes.pool_volumes(cls, vols, "max")
    assert np.allclose(mx[1], np.maximum(cls[2], cls[3])) and np.allclose(mx[2], cls[4])


def test_upsampling_matches_torch_bilinear():
    import torch
    import torch.nn.functional as F

    logits = np.random.default_rng(0).normal(size=(2, 4, 4, 3)).astype(np.float32)
    ref = (
        F.interpolate(
            torch.from_numpy(logits).permute(0, 3, 1, 2),
            size=(32, 32),
            mode="bilinear",
            align_corners=False,
        )
        .permute(0, 2, 3, 1)
        .numpy()
    )
    np.testing.assert_allclose(probes.upsample_logits(logits, 32), ref, atol=1e-5)


def test_bad_dataset_is_reported_and_others_still_probed(tmp_path, tiny_dinov3):
    from conftest import synth_entry, write_manifest

    good = synth_entry("good", "cls2d", n=12)
    one_class = synth_entry("oneclass", "cls2d", n=12).replace(
        "path: data/oneclass", "path: data/oneclass\n    index: one.csv"
    )
    mpath = write_manifest(tmp_path, good + one_class, f"['{tiny_dinov3}']")
    from featstore.data.manifest import load_manifest
    from featstore.data.synthetic import generate

    ds = load_manifest(mpath).dataset("oneclass")
    generate(ds.synthetic, ds.path)  # then relabel every training image as class 0
    rows = (ds.path / "index.csv").read_text().splitlines()
    relabelled = [rows[0]] + [
        ",".join(
            [r.split(",")[0], "0" if r.endswith("train") else r.split(",")[1], r.split(",")[2]]
        )
        for r in rows[1:]
    ]
    (ds.path / "one.csv").write_text("\n".join(relabelled) + "\n")
    args = ["--manifest", str(mpath)]
    assert runner.invoke(app, ["extract", *args]).exit_code == 0
    out = runner.invoke(app, ["probe", *args, "--out", str(tmp_path / "r")])
    assert out.exit_code == 0, out.output
    assert "problem: oneclass" in out.output and "single class" in out.output
    df = pd.read_csv(tmp_path / "r" / "results.csv")
    assert set(df.dataset) == {"good"}


def _protocol_run(tmp_path, tiny_dinov3, protocol: str) -> pd.DataFrame:
    """Extract and probe a small 2D classification set under `protocol`; the results."""
    from conftest import synth_entry, write_manifest

    mpath = write_manifest(
        tmp_path,
        synth_entry("d", "cls2d", n=24, size=24),
        f"['{tiny_dinov3}']",
        extra=f"protocol: {protocol}\n",
    )
    args = ["--manifest", str(mpath)]
    assert runner.invoke(app, ["extract", *args]).exit_code == 0
    out = runner.invoke(app, ["probe", *args, "--out", str(tmp_path / "r")])
    assert out.exit_code == 0, out.output
    return pd.read_csv(tmp_path / "r" / "results.csv")


def test_medmnist_plus_protocol_pads_and_uses_k11_euclidean(tmp_path, tiny_dinov3):
    df = _protocol_run(tmp_path, tiny_dinov3, "medmnist+")
    knn = df[df.probe == "knn"]
    assert set(knn.param) == {11} and set(df.protocol) == {"medmnist+"}
    import xarray as xr

    from featstore.store.catalog import list_sets

    (enc,) = [r for r in list_sets(tmp_path / "cache") if not r["encoder"].startswith("pixels")]
    assert xr.open_zarr(enc["path"]).attrs["preprocess"]["fit"] == "pad"


def test_seed_protocol_trains_the_papers_linear_layer(tmp_path, tiny_dinov3):
    import featstore
    from featstore.probing import heads

    df = _protocol_run(tmp_path, tiny_dinov3, "seed")
    lin = df[(df.probe == "linear") & ~df.encoder.str.startswith("pixels")]
    assert set(df.protocol) == {"seed"} and set(lin.param_name) == {"lr"}
    # The row's AUROC is scikit-learn's on `seed_linear`'s predictions of the same arrays.
    xs = featstore.open_features(tmp_path / "manifest.yaml", "d", str(tiny_dinov3))
    x, y = np.asarray(xs.cls.values, np.float64), np.asarray(xs.label.values)
    split = np.asarray(xs.split.values).astype(str)
    tr, te = split == "train", split == "test"
    proba = heads.seed_linear(x[tr], y[tr], x[te], int(y.max()) + 1)
    # one sigmoid per class (not a softmax): macro one-vs-rest AUROC, class by class
    classes = [1] if proba.shape[1] == 2 else np.unique(y[te])
    auroc = np.mean([skm.roc_auc_score(y[te] == c, proba[:, c]) for c in classes])
    assert lin.set_index("metric").value["auroc"] == pytest.approx(auroc, abs=1e-5)


def test_cls_plus_patch_pooling(shipped, tmp_path):
    _work, args, _, _ = shipped
    out = runner.invoke(
        app,
        [
            "probe",
            *args,
            "--dataset",
            "synth-nodules-3d",
            "--pool",
            "cls+patch",
            "--out",
            str(tmp_path),
        ],
    )
    assert out.exit_code == 0, out.output
    df = pd.read_csv(tmp_path / "results.csv")
    assert set(df.pool) == {"cls+patch"} and len(df) == 2 * 2 * 6  # encoders x probes x metrics


def test_abmil_pooling(shipped, tmp_path):
    from featstore.data.manifest import load_manifest
    from pipelines import probe as stage

    work, args, _, _ = shipped
    m = load_manifest(work / "data_manifest.yaml").select(
        ["synth-nodules-3d"], [args[3]], [int(args[5])]
    )
    df = stage.run(m, tmp_path, ProbeOptions(pool="abmil"), echo=lambda _: None)
    assert set(df.pool) == {"abmil"} and set(df.probe) == {"linear", "knn", "abmil"}
    enc = df[(df.encoder != "pixels") & (df.metric == "auroc")]
    assert (enc.value > 0.5).all(), enc[["probe", "value"]]


def test_memory_bound_runs_knn_blockwise_with_the_same_rows(shipped, tmp_path):
    """A memory bound runs kNN in blocks (`featstore.probing.knn`): the in-memory kNN's rows."""
    from featstore.data.manifest import load_manifest
    from pipelines import probe as stage

    work, args, _, full = shipped
    names = ["synth-lesions-2d", "synth-nodules-3d"]
    m = load_manifest(work / "data_manifest.yaml").select(names, [args[3]], [int(args[5])])
    stage.run(m, tmp_path, ProbeOptions(memory_mb=0.05), echo=lambda _: None)  # a few rows a block
    cols = ["dataset", "encoder", "metric", "value", "ci_low", "ci_high", "param"]

    def knn(df: pd.DataFrame) -> pd.DataFrame:
        df = df[(df.probe == "knn") & df.dataset.isin(names)][cols]
        return df.sort_values(cols[:3]).reset_index(drop=True)

    got = knn(pd.read_csv(tmp_path / "results.csv"))
    assert len(got) == 2 * 2 * 6  # datasets x (encoder, pixels) x metrics
    pd.testing.assert_frame_equal(got, knn(full))


def test_too_coarse_patch_grid_is_explained():
    from featstore.errors import ProbeError

    mask = np.zeros((4, 32, 32), np.uint8)
    mask[:, 3:6, 3:6] = 1  # far smaller than a 16-px patch
    patch = np.random.default_rng(0).normal(size=(4, 2, 2, 8)).astype(np.float32)
    with pytest.raises(ProbeError, match="2x2 patch grid every patch is background"):
        probes.seg_probe(patch, mask, patch, mask, np.arange(4).astype(str), 2)


@pytest.mark.parametrize("text", ["", "x\n1\n", "\xff\xfe"])
def test_a_results_file_that_is_not_ours_is_refused_not_overwritten(tmp_path, text):
    from featstore.errors import ProbeError
    from pipelines.probe import write_results

    csv = tmp_path / "results.csv"
    csv.write_bytes(text.encode("latin-1"))
    with pytest.raises(ProbeError, match=r"results.csv: not a featstore results file"):
        write_results(tmp_path, [])
    assert csv.read_bytes() == text.encode("latin-1")  # left as it was


def test_rows_of_a_cell_now_on_another_feature_set_move_aside(tmp_path):
    """A first run scored cell d/e@32 with a linear and a kNN probe on set A. The
    manifest changed, so the cell is now set B, and a second run scored only the linear
    probe: A's kNN row must not stay beside B's linear row as if both were one cell's.
    Both of A's rows move to results-superseded.csv; another cell's rows stay."""
    from featstore.probing.rows import ResultRow
    from pipelines.probe import SUPERSEDED, write_results

    def row(ds: str, probe: str, fset: str, value: float) -> ResultRow:
        return ResultRow(ds, "e", True, 32, fset, probe=probe, metric="auroc", value=value)

    first = [row("d", "linear", "A", 0.7), row("d", "knn", "A", 0.6), row("o", "knn", "C", 0.5)]
    df, stale = write_results(tmp_path, first)
    assert len(df) == 3 and stale.empty and not (tmp_path / SUPERSEDED).exists()

    df, stale = write_results(tmp_path, [row("d", "linear", "B", 0.8)])
    kept = pd.read_csv(tmp_path / "results.csv")
    assert sorted(zip(kept.dataset, kept.probe, kept.feature_set, strict=True)) == [
        ("d", "linear", "B"),
        ("o", "knn", "C"),
    ]
    moved = pd.read_csv(tmp_path / SUPERSEDED)
    assert sorted(zip(moved.probe, moved.feature_set, moved.value, strict=True)) == [
        ("knn", "A", 0.6),
        ("linear", "A", 0.7),  # replaced by B's linear row: moved too, not overwritten
    ]
    assert len(stale) == 2 and len(df) == 2
    # a rerun on the same set supersedes nothing; superseded rows accumulate, never lost
    write_results(tmp_path, [row("d", "linear", "B", 0.81)])
    assert len(pd.read_csv(tmp_path / SUPERSEDED)) == 2
    # a rerun of the same probe on a new set moves the old set's row too (same key)
    write_results(tmp_path, [row("o", "knn", "D", 0.4), row("o", "linear", "D", 0.4)])
    moved = pd.read_csv(tmp_path / SUPERSEDED, dtype=str)
    assert sorted(zip(moved.dataset, moved.feature_set, strict=True)) == [
        ("d", "A"),
        ("d", "A"),
        ("o", "C"),
    ]
    # a key of digits read back from the CSV is still the same key: nothing moves
    digits = tmp_path / "digits"
    write_results(digits, [row("007", "knn", "012345678901", 0.4)])
    df, stale = write_results(digits, [row("007", "knn", "012345678901", 0.5)])
    assert stale.empty and list(df.dataset) == ["007"] and list(df.value) == [0.5]
