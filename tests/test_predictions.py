"""Kept test predictions: written by every probe, opened by plain pandas, reproducing
the results' scores, refused when they are not of the rows asked for."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import synth_entry, write_manifest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from featstore.errors import ProbeError
from featstore.probing.predictions import (
    Key,
    Predictions,
    file_key,
    read_predictions,
    row_key,
    write_predictions,
)
from featstore.probing.results_file import read_results
from pipelines.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kept")
    datasets = synth_entry("c2", "cls2d", n=24) + synth_entry("s3", "seg3d", n=8, slices=4)
    mpath = write_manifest(tmp, datasets, "['pixels:4']")
    out = tmp / "out"
    for cmd in (["extract", "--manifest", str(mpath)], ["probe", "--manifest", str(mpath)]):
        extra = ["--out", str(out)] if cmd[0] == "probe" else []
        result = runner.invoke(app, [*cmd, *extra])
        assert result.exit_code == 0, result.output
    return out


def _row(df: pd.DataFrame, path) -> pd.Series:
    k = file_key(path)[0]
    hit = df[(df.dataset == k.dataset) & (df.feature_set == k.feature_set) & (df.probe == k.probe)]
    assert len(hit), path
    return hit


def test_every_probe_keeps_predictions_that_reproduce_its_scores(probed):
    rows = read_results(probed / "results.csv")
    files = sorted((probed / "predictions").glob("*.parquet"))
    sets_probes = {(r.dataset, r.feature_set, r.probe) for r in rows.itertuples()}
    keys = [file_key(f)[0] for f in files]
    assert {(k.dataset, k.feature_set, k.probe) for k in keys} == sets_probes
    assert [f.name for f in files] == [k.file_name for k in keys]
    for f in files:
        df = pd.read_parquet(f)  # plain pandas, no featstore
        hit = _row(rows, f)
        assert len(df) == int(hit.n_test.iloc[0])
        if "label" in df:
            score = df[[c for c in df if c.startswith("score_")]].to_numpy()
            want = float(hit[hit.metric == "auroc"].value.iloc[0])
            got = roc_auc_score(df.label, score, multi_class="ovr")
            assert got == pytest.approx(want, rel=1e-5)  # results.csv: 6 digits
            acc = float(hit[hit.metric == "accuracy"].value.iloc[0])
            assert (df.predicted == df.label).mean() == pytest.approx(acc, rel=1e-5)
        else:
            dice = df[[c for c in df if c.startswith("dice_")]].to_numpy()
            want = float(hit[hit.metric == "dice"].value.iloc[0])
            assert np.nanmean(np.nanmean(dice, 1)) == pytest.approx(
                want, rel=1e-5
            )  # results.csv: 6 digits
            assert {"iou_1", "hd95_1", "sample"} <= set(df.columns)


def test_rows_say_what_their_intervals_resampled(probed):
    """2D images and 3D volumes without a `patient` coordinate: each unit is resampled;
    the prediction files name their unit too."""
    rows = read_results(probed / "results.csv")
    assert dict(rows.groupby("dataset").resampled.agg(set)) == {"c2": {"image"}, "s3": {"volume"}}
    units = {read_predictions(f).key.dataset: read_predictions(f).unit for f in _files(probed)}
    assert units == {"c2": "image", "s3": "volume"}


def _files(out) -> list:
    return sorted((out / "predictions").glob("*.parquet"))


@pytest.fixture(scope="module")
def curve(tmp_path_factory):
    """A 2D set probed with a label-efficiency point of two repeats, twice."""
    tmp = tmp_path_factory.mktemp("curve")
    mpath = write_manifest(tmp, synth_entry("c", "cls2d", n=40), "['pixels:4']")
    out = tmp / "out"
    assert runner.invoke(app, ["extract", "--manifest", str(mpath)]).exit_code == 0
    names = []
    for _ in range(2):
        args = ["probe", "--manifest", str(mpath), "--out", str(out)]
        result = runner.invoke(app, [*args, "--fractions", "0.5", "--repeats", "2"])
        assert result.exit_code == 0, result.output
        names.append([f.name for f in _files(out)])
    return out, names


def test_every_repeat_of_a_curve_point_keeps_its_own_predictions(curve):
    out, (first, second) = curve
    assert first == second  # a rerun replaces each file, never adds one
    rows = read_results(out / "results.csv")
    fitted = rows[(rows.repeat >= 0) & (rows.metric == "accuracy")]
    assert len(first) == len(fitted)  # one file per fitted row (mean rows have none)
    assert sum("-f0.5-r1" in n for n in first) == 4  # 2 encoders x linear, knn
    for r in fitted.itertuples():
        p = read_predictions(out / "predictions" / row_key(r).file_name, row_key(r))
        assert (p.scores.argmax(1) == p.truth).mean() == pytest.approx(r.value, rel=1e-5)
    # the two repeats of one point are two fits on two subsets
    lin = sorted(n for n in first if "-linear-f0.5-" in n)
    a, b = (read_predictions(out / "predictions" / n).scores for n in lin[:2])
    assert not np.allclose(a, b)


def _preds(key: Key, samples=("a", "b", "c")) -> Predictions:
    n = len(samples)
    return Predictions(
        key,
        "classification",
        np.array(samples),
        truth=np.arange(n) % 2,
        scores=np.tile([[0.4, 0.6]], (n, 1)),
    )


KEY = Key("d", "e", False, 32, "", "default", "linear", "abc123")


def test_a_rerun_replaces_its_file_and_points_never_collide(tmp_path):
    write_predictions(tmp_path, _preds(KEY))
    write_predictions(tmp_path, _preds(KEY))
    assert [f.name for f in tmp_path.iterdir()] == ["d-abc123-linear.parquet"]
    points = [
        KEY,
        Key(**{**KEY.__dict__, "train_fraction": 0.1, "repeat": 2}),
        Key(**{**KEY.__dict__, "train_fraction": 0.1, "repeat": 0}),
        Key(**{**KEY.__dict__, "train_fraction": float("nan"), "shots": 5, "repeat": 1}),
        Key(**{**KEY.__dict__, "probe": "knn"}),
        Key(**{**KEY.__dict__, "dataset": "d2"}),  # two datasets of one content: one set
        Key(**{**KEY.__dict__, "pool": "max"}),
        Key(**{**KEY.__dict__, "protocol": "seed"}),
        Key(**{**KEY.__dict__, "seed": 1}),  # a trainable probe's seeds (`--seeds`)
        Key(**{**KEY.__dict__, "seed": 2}),
        Key(**{**KEY.__dict__, "train_fraction": 0.1, "repeat": 2, "seed": 1}),
        KEY.at(shots=5, repeat=2),
        KEY.at(fraction=0.25, repeat=1),
    ]
    assert len({k.file_name for k in points}) == len(points)
    assert points[1].file_name == "d-abc123-linear-f0.1-r2.parquet"
    assert points[8].file_name == "d-abc123-linear-s1.parquet"


def test_predictions_of_other_rows_or_units_are_refused(tmp_path):
    path = write_predictions(tmp_path, _preds(KEY))
    assert read_predictions(path, KEY, np.array(["c", "b", "a"])).key == KEY
    other = Key(**{**KEY.__dict__, "feature_set": "zzz999"})
    with pytest.raises(ProbeError, match=r"d-abc123-linear.parquet: these predictions are of"):
        read_predictions(path, other)
    with pytest.raises(ProbeError, match=r"its 3 test units are not the 2 units"):
        read_predictions(path, KEY, np.array(["a", "b"]))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ProbeError, match=r"junk.parquet: not a featstore prediction file"):
        read_predictions(tmp_path / "junk.parquet")
