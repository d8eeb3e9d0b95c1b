"""External test sets: a probe fitted on one dataset and scored on another equals the
same fit made by hand with scikit-learn; classes are matched by name; rows, kept
predictions and the report name both datasets."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from conftest import write_manifest
from sklearn import metrics as skm
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler
from typer.testing import CliRunner

from featstore.data.manifest import load_manifest
from featstore.errors import ManifestError
from featstore.probing.predictions import EXTERNAL, FOLDER, read_predictions, row_key
from featstore.probing.results_file import read_results
from featstore.probing.rows import external, internal
from pipelines.cli import app

runner = CliRunner()

ENTRY = """\
  - name: {name}
    format: synthetic
    synthetic: {{kind: {kind}, n: {n}, size: 32, slices: 6, seed: {seed}}}
    path: data/{name}
    task: classification
    dims: {dims}
    {extra}
"""


def entry(name: str, seed: int, classes: str = "", kind: str = "cls2d", n: int = 30) -> str:
    dims = 3 if kind.endswith("3d") else 2
    extra = [f"classes: {classes}"] if classes else []
    if dims == 3:
        extra.append("splits: {ratios: [0.5, 0.25, 0.25], seed: 0}")
    return ENTRY.format(name=name, kind=kind, n=n, seed=seed, dims=dims, extra="\n    ".join(extra))


def manifest(tmp_path, datasets: str, evaluations: str, encoders: str = "[]"):
    return write_manifest(tmp_path, datasets, encoders, extra=f"evaluations:\n{evaluations}")


CLASSES_A = "[disc, star, ring]"
CLASSES_B = "[ring, disc, halo]"  # another order, and 'star' named 'halo'
MAPPED = "  - {name: a-to-b, train: a, test: b, classes: {star: halo}}\n"


# ---- the manifest boundary ------------------------------------------------------------


@pytest.mark.parametrize(
    ("evaluation", "words"),
    [
        ("  - {name: x, train: a, test: nope}\n", ["evaluations[0] 'x'", "'test'", "nope"]),
        ("  - {name: x, train: a, test: a}\n", ["field 'test'", "also the train dataset"]),
        ("  - {name: x, train: a, test: seg}\n", ["'a' is classification, 2D", "segmentation"]),
        (
            "  - {name: x, train: a, test: b}\n",  # star vs halo, unmapped
            ["field 'classes'", "'a'", "'b'", "only in 'a': ['star']", "only in 'b': ['halo']"],
        ),
        ("  - {name: x, train: a, test: b, classes: {moon: halo}}\n", ["moon", "not classes"]),
        (MAPPED + MAPPED.replace("a-to-b", "again"), ["evaluated already by 'a-to-b'"]),
        ("  - {name: x, train: a, test: b, split: some}\n", ["split"]),
    ],
)
def test_bad_evaluations_are_manifest_errors_naming_the_field(tmp_path, evaluation, words):
    seg = "  - {name: seg, format: synthetic, synthetic: {kind: seg2d}, path: s, task: "
    seg += "segmentation, dims: 2}\n"
    datasets = entry("a", 0, CLASSES_A) + entry("b", 1, CLASSES_B) + seg
    with pytest.raises(ManifestError) as err:
        load_manifest(manifest(tmp_path, datasets, evaluation))
    for w in words:
        assert w in str(err.value)


def test_named_classes_on_one_side_only_is_an_error(tmp_path):
    datasets = entry("a", 0, CLASSES_A) + entry("b", 1)
    with pytest.raises(ManifestError, match="'b' does not"):
        load_manifest(manifest(tmp_path, datasets, "  - {name: x, train: a, test: b}\n"))


def test_selecting_one_dataset_drops_its_evaluations(tmp_path):
    datasets = entry("a", 0, CLASSES_A) + entry("b", 1, CLASSES_B)
    m = load_manifest(manifest(tmp_path, datasets, MAPPED))
    assert [e.name for e in m.evaluations] == ["a-to-b"]
    assert m.select(datasets=["a"]).evaluations == ()


# ---- external evaluation == a fit made by hand ---------------------------------------------


@pytest.fixture(scope="module")
def probed(tmp_path_factory, tiny_dinov3):
    """Two synthetic 2D sets (other seeds, classes in another order, one renamed),
    extracted once, probed with an external evaluation a -> b on all of b."""
    work = tmp_path_factory.mktemp("external")
    datasets = entry("a", 0, CLASSES_A) + entry("b", 1, CLASSES_B, n=24)
    mpath = manifest(
        work, datasets, MAPPED.replace("}\n", ", split: all}\n"), encoders=f"['{tiny_dinov3}']"
    )
    args = ["--manifest", str(mpath)]
    ex = runner.invoke(app, ["extract", *args])
    assert ex.exit_code == 0, ex.output
    pr = runner.invoke(app, ["probe", *args, "--out", str(work / "r")])
    assert pr.exit_code == 0, pr.output
    return work, args, pr.output, read_results(work / "r" / "results.csv")


def _arrays(path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xs = xr.open_zarr(path)
    x = np.asarray(xs.cls.values, np.float64).reshape(xs.sizes["item"], -1)
    return x, np.asarray(xs.label.values), np.array([str(v) for v in xs.split.values])


def _set_path(work, key: str):
    from featstore.store.catalog import find_by_key

    path = find_by_key(work / "cache", key)
    assert path is not None
    return path


def test_rows_name_both_datasets_and_internal_rows_are_their_own(probed):
    _, _, output, df = probed
    ext = external(df)
    assert len(ext) and set(ext.dataset) == {"a"} and set(ext.test_dataset) == {"b"}
    assert set(ext.probe) == {"linear", "knn"}
    assert (ext.test_feature_set != ext.feature_set).all()
    own = internal(df)
    assert (own.test_dataset == own.dataset).all()
    assert (own.test_feature_set == own.feature_set).all()
    assert set(own.dataset) == {"a", "b"}
    assert "a -> b" in output
    assert set(ext.n_test) == {24}  # split: all: every item of b


def close(value: float):
    """results.csv keeps 6 significant digits; the kept predictions are exact below."""
    return pytest.approx(value, rel=1e-5, abs=1e-6)


def test_external_scores_equal_a_hand_made_sklearn_fit(probed):
    work, _, _, df = probed
    ext = external(df)
    ext = ext[~ext.encoder.str.startswith("pixels")]
    xa, ya, sa = _arrays(_set_path(work, ext.feature_set.iloc[0]))
    xb, yb, _ = _arrays(_set_path(work, ext.test_feature_set.iloc[0]))
    # b's classes [ring, disc, halo] are a's [ring, disc, star]: ids 2, 0, 1 of a
    yb = np.array([2, 0, 1])[yb]
    tr, va = sa == "train", sa == "val"
    scaler = StandardScaler().fit(xa[tr])
    lin = ext[ext.probe == "linear"].set_index("metric")
    c = lin.loc["accuracy", "param"]
    model = LogisticRegression(C=c, max_iter=1000, random_state=0).fit(
        scaler.transform(xa[tr]), ya[tr]
    )
    proba = model.predict_proba(scaler.transform(xb))
    assert lin.loc["accuracy", "value"] == close(skm.accuracy_score(yb, proba.argmax(1)))
    assert lin.loc["auroc", "value"] == close(
        skm.roc_auc_score(yb, proba, multi_class="ovr", labels=[0, 1, 2])
    )
    knn = ext[ext.probe == "knn"].set_index("metric")
    unit = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in (xa, xb)]

    def knn_fit(k):
        return KNeighborsClassifier(int(k), algorithm="brute").fit(unit[0][tr], ya[tr])

    k = knn.loc["accuracy", "param"]  # chosen on a's val split, as the probe chooses
    val = {kk: (knn_fit(kk).predict(unit[0][va]) == ya[va]).mean() for kk in (1, 3, 5, 10)}
    assert val[int(k)] == max(val.values())
    pred = knn_fit(k).predict_proba(unit[1])
    assert knn.loc["accuracy", "value"] == close(skm.accuracy_score(yb, pred.argmax(1)))
    assert knn.loc["f1", "value"] == close(skm.f1_score(yb, pred.argmax(1), average="macro"))
    # the kept predictions of the external rows are b's items, in a's class ids
    (row,) = [r for r in ext[(ext.probe == "linear") & (ext.metric == "auroc")].itertuples()]
    key = row_key(row)
    assert key.file_name.startswith(f"{EXTERNAL}/")
    kept = read_predictions(work / "r" / FOLDER / key.file_name, key)
    assert np.array_equal(kept.truth, yb)
    np.testing.assert_array_equal(kept.scores, proba)  # the same fit, bit for bit


def test_rerun_replaces_the_external_rows(probed):
    work, args, _, df = probed
    pr = runner.invoke(app, ["probe", *args, "--out", str(work / "r")])
    assert pr.exit_code == 0, pr.output
    again = read_results(work / "r" / "results.csv")
    assert len(again) == len(df)
    pd.testing.assert_series_equal(again.value, df.value)


def test_report_shows_internal_and_external_side_by_side(probed):
    work, _, _, _ = probed
    out = runner.invoke(app, ["report", "--out", str(work / "r")])
    assert out.exit_code == 0, out.output
    md = (work / "r" / "report.md").read_text()
    assert "## External test sets" in md
    assert "a -> b" in md and "unpaired" in md


# ---- pieces: the drop's interval, relabelling, row keys, file names ------------------------


def _preds(y: np.ndarray, p1: np.ndarray, name: str):
    from featstore.probing.predictions import Key, Predictions

    key = Key("a", "e", False, 224, "", "default", "linear", "k" * 12, test_dataset=name)
    scores = np.stack([1 - p1, p1], 1)
    return Predictions(
        key, "classification", np.array([f"s{i}" for i in range(len(y))]), None, y, scores
    )


def test_drop_is_an_unpaired_bootstrap_of_two_independent_resamplings():
    from featstore.probing.bootstrap import N_BOOT
    from featstore.probing.drop import drop

    rng = np.random.default_rng(5)
    ya, yb = rng.integers(0, 2, 20), rng.integers(0, 2, 17)
    pa = np.clip(ya * 0.6 + rng.uniform(0, 0.5, 20), 0, 1)  # better on its own units
    pb = rng.uniform(0, 1, 17)
    d = drop(_preds(ya, pa, ""), _preds(yb, pb, "b"), seed=3)["auroc"]
    assert d.internal == pytest.approx(skm.roc_auc_score(ya, pa))
    assert d.external == pytest.approx(skm.roc_auc_score(yb, pb))
    assert d.drop == pytest.approx(d.internal - d.external)
    ra, rb = np.random.default_rng(3), np.random.default_rng(4)  # seed, seed + 1

    def auc(y, p, idx):
        return skm.roc_auc_score(y[idx], p[idx]) if len(set(y[idx])) == 2 else np.nan

    diffs = np.array(
        [
            auc(ya, pa, ra.integers(0, 20, 20)) - auc(yb, pb, rb.integers(0, 17, 17))
            for _ in range(N_BOOT)
        ]
    )
    lo, hi = np.percentile(diffs[np.isfinite(diffs)], [2.5, 97.5])
    assert (d.ci_low, d.ci_high) == (pytest.approx(lo), pytest.approx(hi))
    assert d.n_internal == 20 and d.n_external == 17


def test_relabel_carries_ids_and_multi_hot_columns():
    from featstore.probing.external import relabel

    assert relabel(np.array([0, 1, 2, 2]), (2, 0, 1)).tolist() == [2, 0, 1, 1]
    multi = np.array([[1, 0, 0], [0, 1, 1]])
    assert relabel(multi, (2, 0, 1)).tolist() == [[0, 0, 1], [1, 1, 0]]
    assert relabel(multi, None) is multi


def _row(test: str, test_set: str, value: float):
    from featstore.probing.rows import ResultRow

    return ResultRow(
        dataset="a",
        encoder="e",
        random_init=False,
        resolution=224,
        feature_set="f" * 12,
        probe="linear",
        metric="auroc",
        value=value,
        test_dataset=test,
        test_feature_set=test_set,
    )


def test_external_rows_have_their_own_key_and_move_aside_when_their_test_set_changes():
    from featstore.probing.rows import frame, key_strings, upsert

    old = frame([_row("a", "f" * 12, 0.9), _row("b", "1" * 12, 0.7)])
    assert len(set(key_strings(old))) == 2  # one cell, tested on two datasets
    assert old.test_dataset.tolist() == ["a", "b"]
    # b re-extracted (another set): its external rows move aside, a's own stay
    merged, stale = upsert(old, frame([_row("b", "2" * 12, 0.6)]))
    assert stale.value.tolist() == [0.7]
    assert sorted(merged.value.tolist()) == [0.6, 0.9]


def test_rows_of_an_older_results_file_read_as_internal_rows(tmp_path):
    from featstore.probing.results_file import read_results

    csv = tmp_path / "results.csv"
    head = "dataset,encoder,random_init,resolution,feature_set,probe,metric,value,task\n"
    csv.write_text(head + "d,e,false,224,abc,linear,auroc,0.8,classification\n")
    (row,) = read_results(csv).itertuples()
    assert (row.test_dataset, row.test_feature_set) == ("d", "abc")
    assert row_key(row).file_name == "d-abc-linear.parquet"  # the name it was kept under


def test_external_prediction_files_cannot_take_an_internal_name():
    from featstore.probing.predictions import Key

    own = Key("a", "e", False, 224, "", "default", "linear", "f" * 12)
    ext = Key(
        "a",
        "e",
        False,
        224,
        "",
        "default",
        "linear",
        "f" * 12,
        test_dataset="b",
        test_feature_set="1" * 12,
    )
    assert own.file_name == f"a-{'f' * 12}-linear.parquet"
    assert ext.file_name == f"{EXTERNAL}/a-{'f' * 12}-b-{'1' * 12}-linear.parquet"
    assert not own.same(ext)


def test_slide_bags_and_volumes_run_with_abmil(tmp_path, tiny_dinov3):
    """3D volumes (ids without class names, matched as they are), pooled by ABMIL."""
    datasets = entry("a", 0, kind="cls3d", n=16) + entry("b", 1, kind="cls3d", n=12)
    mpath = manifest(
        tmp_path, datasets, "  - {name: ab, train: a, test: b}\n", f"['{tiny_dinov3}']"
    )
    args = ["--manifest", str(mpath), "--encoder", str(tiny_dinov3)]
    assert runner.invoke(app, ["extract", *args]).exit_code == 0
    pr = runner.invoke(app, ["probe", *args, "--pool", "abmil", "--out", str(tmp_path / "r")])
    assert pr.exit_code == 0, pr.output
    df = read_results(tmp_path / "r" / "results.csv")
    ext, own_b = external(df), internal(df)[lambda d: d.dataset == "b"]
    assert set(ext.probe) == {"linear", "knn", "abmil"} and set(ext.pool) == {"abmil"}
    assert set(ext.test_dataset) == {"b"}
    assert set(ext.n_test) == set(own_b.n_test)  # b's test volumes, as b's own rows
    assert set(ext.n_train) == set(internal(df)[lambda d: d.dataset == "a"].n_train)
    files = list((tmp_path / "r" / FOLDER / EXTERNAL).glob("*.parquet"))
    assert len(files) == 3 * 2  # the encoder and the pixel baseline, 3 probes each


def test_the_example_manifest_reads_and_maps_its_classes():
    from conftest import REPO

    from featstore.data.evaluations import label_map

    m = load_manifest(REPO / "manifests" / "external.yaml", need_data=False)
    (ev,) = m.evaluations
    assert label_map(m.dataset(ev.train), m.dataset(ev.test), ev) == (0, 1, 2)


def test_compare_pairs_encoders_on_the_external_test_set_apart_from_the_internal(probed):
    work, _, _, _ = probed
    out = runner.invoke(app, ["compare", "--out", str(work / "r")])
    assert out.exit_code == 0, out.output
    df = pd.read_csv(work / "r" / "comparisons.csv", keep_default_na=False)
    assert set(df.test_dataset) == {"", "b"}
    ext = df[df.test_dataset == "b"]
    assert set(ext.dataset) == {"a"} and set(ext.n_units.astype(int)) == {24}
    assert "a->b" in out.output


def _multilabel_npz(path, seed: int, n: int, order: list[int]) -> None:
    """A MedMNIST-like .npz: 28 x 28 images with a bright square in each quadrant whose
    label is on; `order` gives the file's label columns as quadrants."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, m in (("train", n), ("val", n // 2), ("test", n // 2)):
        on = rng.integers(0, 2, (m, 3))
        img = rng.integers(0, 60, (m, 28, 28)).astype(np.uint8)
        for q in range(3):
            y, x = divmod(q, 2)
            img[on[:, q] == 1, 14 * y + 3 : 14 * y + 11, 14 * x + 3 : 14 * x + 11] = 230
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = img, on[:, order]
    np.savez(path, **arrays)


def test_multilabel_columns_are_matched_by_name_and_knn_equals_sklearn(tmp_path, tiny_dinov3):
    _multilabel_npz(tmp_path / "a.npz", 0, 40, [0, 1, 2])
    _multilabel_npz(tmp_path / "b.npz", 1, 30, [2, 0, 1])  # columns: q2, q0, q1
    row = "  - {{name: {n}, format: medmnist, path: {n}.npz, task: multilabel, dims: 2, "
    row += "classes: {c}}}\n"
    datasets = row.format(n="a", c="[q0, q1, q2]") + row.format(n="b", c="[q2, q0, q1]")
    mpath = manifest(
        tmp_path, datasets, "  - {name: ab, train: a, test: b}\n", f"['{tiny_dinov3}']"
    )
    args = ["--manifest", str(mpath)]
    assert runner.invoke(app, ["extract", *args]).exit_code == 0
    pr = runner.invoke(app, ["probe", *args, "--out", str(tmp_path / "r")])
    assert pr.exit_code == 0, pr.output
    df = read_results(tmp_path / "r" / "results.csv")
    ext = external(df)
    ext = ext[~ext.encoder.str.startswith("pixels") & (ext.metric == "auroc")]
    (knn,) = ext[ext.probe == "knn"].itertuples()
    xa, ya, sa = _arrays(_set_path(tmp_path, knn.feature_set))
    xb, yb, sb = _arrays(_set_path(tmp_path, knn.test_feature_set))
    yb = yb[:, [1, 2, 0]]  # b's columns q2, q0, q1 as a's q0, q1, q2
    unit = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in (xa, xb)]
    model = KNeighborsClassifier(int(knn.param), algorithm="brute").fit(
        unit[0][sa == "train"], ya[sa == "train"]
    )
    proba = np.stack([p[:, -1] for p in model.predict_proba(unit[1][sb == "test"])], 1)
    kept = read_predictions(tmp_path / "r" / FOLDER / row_key(knn).file_name, row_key(knn))
    assert np.array_equal(kept.truth, yb[sb == "test"])
    np.testing.assert_array_equal(kept.scores, proba)
    assert knn.value == close(skm.roc_auc_score(yb[sb == "test"], proba, average="macro"))


def test_a_missing_test_set_is_a_problem_and_a_cell_outside_the_grid_a_note(tmp_path):
    """Pixel-baseline sets only (no encoder): b extracted at 64 px only, a at 32 px."""
    b = entry("b", 1, CLASSES_B).replace("dims: 2\n", "dims: 2\n    resolutions: [64]\n", 1)
    c = entry("c", 2, CLASSES_B)
    evs = MAPPED + "  - {name: a-to-c, train: a, test: c, classes: {star: halo}}\n"
    mpath = manifest(tmp_path, entry("a", 0, CLASSES_A) + b + c, evs)
    args = ["--manifest", str(mpath)]
    assert runner.invoke(app, ["extract", *args, "--dataset", "a"]).exit_code == 0
    assert runner.invoke(app, ["extract", *args, "--dataset", "b"]).exit_code == 0
    pr = runner.invoke(app, ["probe", *args, "--out", str(tmp_path / "r")])
    assert pr.exit_code == 0, pr.output
    assert "note: a-to-b: a -> b / pixels:8 @ 32px: not run, b is not probed" in pr.output
    assert "problem: a-to-c: a -> c / pixels:8 @ 32px: no set of c to test on" in pr.output
    assert external(read_results(tmp_path / "r" / "results.csv")).empty


def test_tested_on_a_copy_of_itself_an_evaluation_gives_the_internal_rows(tmp_path):
    """b holds a's data (same seed and classes): a -> b on b's test split scores the very
    units a's own rows do, so every external value equals the internal one."""
    datasets = entry("a", 0, CLASSES_A) + entry("b", 0, CLASSES_A)
    mpath = manifest(tmp_path, datasets, "  - {name: ab, train: a, test: b}\n")
    args = ["--manifest", str(mpath)]
    assert runner.invoke(app, ["extract", *args]).exit_code == 0
    pr = runner.invoke(app, ["probe", *args, "--out", str(tmp_path / "r")])
    assert pr.exit_code == 0, pr.output
    df = read_results(tmp_path / "r" / "results.csv")
    cols = ["probe", "metric", "value", "ci_low", "ci_high", "param", "n_train", "n_test"]
    ext = external(df).sort_values(["probe", "metric"])[cols].reset_index(drop=True)
    own = internal(df)[lambda d: d.dataset == "a"].sort_values(["probe", "metric"])
    assert len(ext) == 12
    pd.testing.assert_frame_equal(ext, own[cols].reset_index(drop=True))


SEG = """\
  - name: {name}
    format: synthetic
    synthetic: {{kind: seg2d, n: 12, size: 32, seed: 0}}
    path: data/{name}
    task: segmentation
    dims: 2
    classes: {classes}
"""


def test_segmentation_on_a_renamed_copy_gives_the_internal_rows(tmp_path):
    """Both heads (linear, decoder) fitted on a and scored on b, a copy of a whose
    classes are named otherwise (mapped back): the masks pass through the class map and
    every score equals a's own."""
    datasets = SEG.format(name="a", classes="[background, disc, ellipse, bar]")
    datasets += SEG.format(name="b", classes="[background, round, ellipse, bar]")
    ev = "  - {name: ab, train: a, test: b, classes: {disc: round}}\n"
    mpath = manifest(tmp_path, datasets, ev)
    args = ["--manifest", str(mpath)]
    assert runner.invoke(app, ["extract", *args]).exit_code == 0
    pr = runner.invoke(app, ["probe", *args, "--out", str(tmp_path / "r")])
    assert pr.exit_code == 0, pr.output
    df = read_results(tmp_path / "r" / "results.csv")
    cols = ["encoder", "probe", "metric", "value", "ci_low", "ci_high", "n_train", "n_test"]
    order = ["encoder", "probe", "metric"]
    ext = external(df).sort_values(order)[cols].reset_index(drop=True)
    own = internal(df)[lambda d: d.dataset == "a"].sort_values(order)[cols]
    assert set(ext.probe) == {"seg-linear", "seg-decoder"}
    pd.testing.assert_frame_equal(ext, own.reset_index(drop=True))
    md = runner.invoke(app, ["report", "--out", str(tmp_path / "r")])
    assert md.exit_code == 0, md.output
    assert (
        "| a -> b | pixels:8 @ 32px | seg-linear | dice |"
        in (tmp_path / "r" / "report.md").read_text()
    )


def test_join_sets_carries_test_masks_to_train_class_ids():
    from featstore.probing.external import join_sets

    def one(split: list[str], mask: np.ndarray) -> xr.Dataset:
        n = len(split)
        return xr.Dataset(
            {
                "patch": (("item", "row", "col", "channel"), np.zeros((n, 1, 1, 2))),
                "mask": (("item", "y", "x"), mask.astype(np.uint8)),
            },
            coords={
                "sample": ("item", [f"s{i}" for i in range(n)]),
                "slice": ("item", np.zeros(n, int)),
                "split": ("item", split),
            },
        )

    a = one(["train", "val", "test"], np.zeros((3, 2, 2)))
    b = one(["train", "test"], np.array([[[0, 1], [2, 2]], [[1, 2], [0, 0]]]))
    xs = join_sets(a, b, "test", (0, 2, 1))  # b's 1 is a's 2 and b's 2 a's 1
    assert [str(v) for v in xs.split.values] == ["train", "val", "test"]
    assert xs.mask.values[-1].tolist() == [[2, 1], [0, 0]]
    every = join_sets(a, b, "all", None)
    assert every.sizes["item"] == 4 and every.mask.values[2].tolist() == [[0, 1], [2, 2]]


def test_3d_segmentation_on_every_volume_of_another_set(tmp_path):
    seg3d = """\
  - name: {name}
    format: synthetic
    synthetic: {{kind: seg3d, n: {n}, size: 32, slices: 6, seed: {seed}}}
    path: data/{name}
    task: segmentation
    dims: 3
    splits: {{ratios: [0.5, 0.25, 0.25], seed: 0}}
"""
    datasets = seg3d.format(name="a", n=8, seed=0) + seg3d.format(name="b", n=6, seed=1)
    mpath = manifest(tmp_path, datasets, "  - {name: ab, train: a, test: b, split: all}\n")
    args = ["--manifest", str(mpath)]
    assert runner.invoke(app, ["extract", *args]).exit_code == 0
    pr = runner.invoke(app, ["probe", *args, "--out", str(tmp_path / "r")])
    assert pr.exit_code == 0, pr.output
    df = read_results(tmp_path / "r" / "results.csv")
    ext, own_a = external(df), internal(df)[lambda d: d.dataset == "a"]
    assert set(ext.probe) == {"seg-linear", "seg-decoder"} and set(ext.n_test) == {6}
    assert set(ext.n_train) == set(own_a.n_train)
    assert set(ext.metric) == set(own_a.metric)
    assert np.isfinite(ext[ext.metric == "dice"].value).all()
    (kept,) = [
        read_predictions(tmp_path / "r" / FOLDER / row_key(r).file_name, row_key(r))
        for r in ext[(ext.metric == "dice") & (ext.probe == "seg-linear")].itertuples()
    ]
    assert kept.per is not None and kept.per.shape[0] == 6  # one row per volume of b


def test_a_whole_manifest_error_reads_without_an_empty_field_or_the_whole_input(tmp_path):
    datasets = entry("a", 0, CLASSES_A) + entry("b", 1, CLASSES_B)
    with pytest.raises(ManifestError) as err:
        load_manifest(manifest(tmp_path, datasets, "  - {name: x, train: a, test: b}\n"))
    assert "field ''" not in str(err.value) and "(got {" not in str(err.value)
