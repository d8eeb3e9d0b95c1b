"""Label-efficiency curves: subsets with known answers, the 100% point, rows, CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import synth_entry, write_manifest
from typer.testing import CliRunner

import featstore
from featstore.errors import ProbeError
from featstore.probing.knn import knn_blockwise, knn_from_distances, squared_distances
from featstore.probing.options import curve_options
from featstore.probing.probes import l2_normalise
from featstore.probing.rows import KEY, MEAN_OF_REPEATS
from featstore.probing.subsets import Point, SkippedPoint, draw, group_order, strata
from pipelines.cli import app

COUNTS = {0: 40, 1: 20, 2: 10}  # training units per class


def _labels(rng: np.random.Generator) -> np.ndarray:
    y = np.concatenate([np.full(n, c) for c, n in COUNTS.items()])
    return y[rng.permutation(len(y))]


def _rounded(f: float, n: int) -> int:
    return max(1, int(np.floor(f * n + 0.5)))


@pytest.mark.parametrize("repeat", [0, 3])
def test_subsets_are_stratified_and_nested(repeat):
    """One unit per group: each class keeps round(f * n) units (at least one), k per
    class for shots; every larger point contains the smaller ones of its repeat."""
    y = _labels(np.random.default_rng(7))
    order = group_order(strata(y, len(y)), np.arange(len(y)).astype(str), repeat)
    previous = np.zeros(0, np.int64)
    for f in (0.01, 0.05, 0.1, 0.25, 0.5, 1.0):
        got = draw(order, Point(fraction=f))
        want = {c: _rounded(f, n) for c, n in COUNTS.items()}
        assert {c: int((y[got] == c).sum()) for c in COUNTS} == want, f
        assert np.isin(previous, got).all() and len(np.unique(got)) == len(got)
        previous = got
    assert len(previous) == len(y)  # fraction 1 is the whole train split
    shots = [draw(order, Point(shots=k)) for k in (1, 5, 10)]
    for k, got in zip((1, 5, 10), shots, strict=True):
        assert np.bincount(y[got]).tolist() == [k, k, k]
    assert np.isin(shots[0], shots[1]).all() and np.isin(shots[1], shots[2]).all()


def test_subsets_keep_patients_whole_and_vary_with_the_seed():
    """Two units per patient, both of one class: a fraction takes whole patients
    until round(f * n) units are in, so each class gets that count rounded up to even."""
    rng = np.random.default_rng(1)
    y_patients = _labels(rng)[::2]  # 35 patients: 20 / 10 / 5 of classes 0 / 1 / 2
    y = np.repeat(y_patients, 2)
    patient = np.repeat([f"p{i:02d}" for i in range(len(y_patients))], 2)
    subsets = []
    for repeat in range(3):
        order = group_order(strata(y, len(y)), patient, repeat)
        got = draw(order, Point(fraction=0.1))
        for c, n in COUNTS.items():
            assert (y[got] == c).sum() == 2 * -(-_rounded(0.1, n) // 2)
        inside = set(patient[got])
        assert all((patient == p).sum() == (patient[got] == p).sum() for p in inside)
        assert np.isin(got, draw(order, Point(fraction=0.5))).all()
        subsets.append(tuple(got))
    assert len(set(subsets)) == 3  # seed r for repeat r
    again = draw(group_order(strata(y, len(y)), patient, 2), Point(fraction=0.1))
    assert tuple(again) == subsets[2]


def test_bad_points_are_clear_errors_or_skipped():
    y = _labels(np.random.default_rng(0))
    order = group_order(strata(y, len(y)), np.arange(len(y)).astype(str), 0)
    with pytest.raises(SkippedPoint, match="class 2 has only 10 training units"):
        draw(order, Point(shots=11))
    for bad in ([0.0], [1.5], [-0.1]):
        with pytest.raises(ProbeError, match=r"fractions .* in \(0, 1\]"):
            curve_options(fractions=bad)
    with pytest.raises(ProbeError, match="shots"):
        curve_options(shots=[0])
    with pytest.raises(ProbeError, match="repeats go with fractions"):
        curve_options(repeats=3)
    with pytest.raises(ProbeError, match="fraction in"):
        Point(fraction=2.0)


def test_shared_distances_give_blockwise_knn_on_every_subset():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(90, 8))
    y = rng.integers(0, 3, 90)
    tr, va, te = np.arange(60), np.arange(60, 75), np.arange(75, 90)
    unit = l2_normalise(x)
    dva, dte = squared_distances(unit[va], unit[tr]), squared_distances(unit[te], unit[tr])
    for sub in (np.arange(60), np.arange(0, 60, 3), np.array([1, 4, 9, 30, 31, 58])):
        want = knn_blockwise(x[sub], y[sub], x[va], y[va], x[te], 3, memory_mb=0.01)
        got = knn_from_distances(dva[:, sub], dte[:, sub], y[sub], y[va], 3)
        np.testing.assert_allclose(got.proba, want.proba)
        assert got.param == want.param


@pytest.fixture(scope="module")
def cls_set(tmp_path_factory, tiny_dinov3):
    tmp = tmp_path_factory.mktemp("curve")
    mpath = write_manifest(tmp, synth_entry("d", "cls2d", n=48, size=24), f"['{tiny_dinov3}']")
    featstore.extract(mpath, progress=False, echo=lambda *_: None)
    return mpath, featstore.probe(mpath)


def test_the_full_point_is_the_ordinary_probe_and_counts_are_the_draws(cls_set, tiny_dinov3):
    mpath, plain = cls_set
    df = featstore.probe(mpath, fractions=[0.25, 0.5, 1], shots=[2, 99], repeats=2)
    full = df[(df.train_fraction == 1.0) & (df.repeat == 0)].reset_index(drop=True)
    pd.testing.assert_frame_equal(
        full.drop(columns="fit_seconds"), plain.drop(columns="fit_seconds")
    )
    means = df[df.repeat == MEAN_OF_REPEATS]
    at_full = means[means.train_fraction == 1.0].set_index(["encoder", "probe", "metric"])
    ordinary = plain.set_index(["encoder", "probe", "metric"])
    for col in ("value", "ci_low", "ci_high"):
        np.testing.assert_array_equal(at_full[col], ordinary.loc[at_full.index, col])
    assert (at_full["std"] == 0).all()
    # per-repeat train_n: the draws, from the set's own labels
    xs = featstore.open_features(mpath, "d", str(tiny_dinov3))
    split = np.asarray(xs.split.values).astype(str)
    y = np.asarray(xs.label.values)[split == "train"]
    units = np.asarray(xs.sample.values).astype(str)[split == "train"]
    for r in (0, 1):
        order = group_order(strata(y, len(y)), units, r)
        for point, rows in (
            (Point(fraction=0.25), df.train_fraction == 0.25),
            (Point(shots=2), df.shots == 2),
        ):
            got = df[rows & (df.repeat == r)]
            assert set(got.n_train) == {len(draw(order, point))}, (point, r)
    # a point's mean row is the mean of its repeats, std their spread
    lin = df[(df.train_fraction == 0.5) & (df.probe == "linear") & (df.metric == "auroc")]
    lin = lin[~lin.encoder.str.startswith("pixels")]
    each = lin[lin.repeat >= 0].value.to_numpy()
    mean = lin[lin.repeat == MEAN_OF_REPEATS].iloc[0]
    assert mean.value == pytest.approx(each.mean()) and mean["std"] == pytest.approx(each.std())
    assert not df.duplicated(list(KEY)).any()
    assert any("99-shot" in s and "use at most" in s for s in df.attrs["skipped"])
    assert not (df.shots == 99).any()


def test_cli_curve_rerun_replaces_rows_and_report_plots_it(cls_set, tmp_path):
    mpath, _ = cls_set
    runner = CliRunner()
    out = tmp_path / "r"
    args = ["probe", "--manifest", str(mpath), "--out", str(out), "--fractions", "0.5,1"]
    first = runner.invoke(app, [*args, "--repeats", "2"])
    assert first.exit_code == 0, first.output
    before = pd.read_csv(out / "results.csv")
    again = runner.invoke(app, [*args, "--repeats", "2"])
    assert again.exit_code == 0, again.output
    after = pd.read_csv(out / "results.csv")
    cols = [*KEY, "value", "ci_low", "ci_high", "n_train"]
    pd.testing.assert_frame_equal(before[cols], after[cols])
    assert len(after) == len(before) and not after.duplicated(list(KEY)).any()
    rep = runner.invoke(app, ["report", "--out", str(out)])
    assert rep.exit_code == 0, rep.output
    text = (out / "report.md").read_text()
    assert "## Label efficiency" in text and (out / "plots" / "label_efficiency.png").is_file()
    bad = runner.invoke(
        app, ["probe", "--manifest", str(mpath), "--out", str(out), "--fractions", "0,0.5"]
    )
    assert bad.exit_code == 2 and "(0, 1]" in bad.output, bad.output


def test_segmentation_and_abmil_curves_draw_whole_volumes_and_patients(tmp_path, tiny_dinov3):
    """Both segmentation heads and ABMIL at every point; 3D units are volumes, drawn
    two per patient (the synthetic volumes' `patient` column, kept as a coordinate)."""
    from featstore.probing.classification import class_arrays
    from featstore.probing.options import ProbeOptions

    cls3d = synth_entry("vols", "cls3d", n=16) + "    metadata: {patient: patient}\n"
    entries = synth_entry("seg", "seg2d", n=16) + cls3d
    mpath = write_manifest(tmp_path, entries, f"['{tiny_dinov3}']")
    featstore.extract(mpath, baseline=False, progress=False, echo=lambda *_: None)
    df = featstore.probe(mpath, pool="abmil", fractions=[0.5], repeats=2, baseline=False)
    half = df[(df.train_fraction == 0.5) & (df.repeat >= 0)]
    assert set(half.probe) == {"seg-linear", "seg-decoder", "linear", "knn", "abmil"}
    # the train volumes of each repeat, drawn by patient, as the probe drew them
    xs = featstore.open_features(mpath, "vols", str(tiny_dinov3))
    a = class_arrays(xs, load_ds(mpath, "vols"), ProbeOptions(pool="abmil"))
    train = a.part("train")
    assert len(set(a.group[train])) < len(train)  # patients hold several volumes
    for r in (0, 1):
        got = draw(group_order(strata(a.y[train], len(train)), a.group[train], r), Point(0.5))
        inside = set(a.group[train][got])
        assert sum(g in inside for g in a.group[train]) == len(got)  # whole patients
        rows = half[(half.dataset == "vols") & (half.repeat == r)]
        assert set(rows.n_train) == {len(got)}
    seg = half[half.dataset == "seg"]
    n_images = int(
        (
            np.asarray(featstore.open_features(mpath, "seg", str(tiny_dinov3)).split.values).astype(
                str
            )
            == "train"
        ).sum()
    )
    assert set(seg.n_train) == {max(1, int(np.floor(0.5 * n_images + 0.5)))}


def load_ds(mpath, name):
    from featstore.data.manifest import load_manifest

    return load_manifest(mpath).dataset(name)
