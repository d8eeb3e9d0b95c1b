"""Seed variance: `--seeds` refits the trainable probes, rows and predictions per seed,
a mean row with the spread; comparing two trainable probes resamples seeds and units."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import synth_entry, write_manifest
from typer.testing import CliRunner

from featstore.errors import ProbeError
from featstore.probing import bootstrap
from featstore.probing.options import ProbeOptions
from featstore.probing.pairdraws import paired_bootstrap, seeded_bootstrap
from featstore.probing.predictions import FOLDER, Key, Predictions, kept, read_predictions
from featstore.probing.results_file import read_results
from featstore.probing.rows import MEAN_OF_SEEDS, ordinary
from featstore.probing.seed_pairs import kept_seeds, seeded_difference
from featstore.probing.seeds import nested_draws, trainable
from pipelines.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """A 2D segmentation set (its decoder is trained with torch, its linear head is not)
    and a 3D classification set under --pool abmil (ABMIL trains the pooling that linear
    and kNN read), probed with --seeds 0,1,2, twice: the second run must replace."""
    tmp = tmp_path_factory.mktemp("seeds")
    cls3d = synth_entry("v", "cls3d", n=16, slices=3) + "    metadata: {patient: patient}\n"
    datasets = synth_entry("s", "seg2d", n=12) + cls3d
    mpath = write_manifest(tmp, datasets, "['pixels:4']")
    out = tmp / "out"
    assert runner.invoke(app, ["extract", "--manifest", str(mpath)]).exit_code == 0
    runs = []
    args = ["probe", "--manifest", str(mpath), "--out", str(out), "--pool", "abmil"]
    for _ in range(2):
        res = runner.invoke(app, [*args, "--seeds", "0,1,2"])
        assert res.exit_code == 0, res.output
        runs.append((read_results(out / "results.csv"), sorted((out / FOLDER).iterdir())))
    return out, runs, res.output


def test_seeds_refit_the_trainable_probes_only(seeded):
    _out, runs, output = seeded
    df = runs[-1][0]
    for probe in ("seg-decoder", "abmil", "linear", "knn"):
        for _enc, rows in df[df.probe == probe].groupby("encoder"):
            assert sorted(set(rows.seed)) == [MEAN_OF_SEEDS, 0, 1, 2], probe
    assert set(df[df.probe == "seg-linear"].seed) == {0}  # deterministic: fitted once
    assert "linear and kNN on fixed features are deterministic" in output
    # one row per key: the ordinary table shows seed 0 alone
    shown = ordinary(df)
    assert set(shown.seed) == {0}
    assert not shown.duplicated(["dataset", "encoder", "probe", "metric"]).any()


def test_each_seed_has_its_own_predictions_and_a_rerun_replaces_them(seeded):
    out, runs, _ = seeded
    (df1, files1), (df2, files2) = runs
    assert [f.name for f in files1] == [f.name for f in files2]  # replaced, not added
    assert len(df1) == len(df2)
    names = {f.name for f in files2}
    assert not any("-seg-linear" in n and "-s1" in n for n in names)
    for probe, metric in (("abmil", "accuracy"), ("seg-decoder", "dice")):
        rows = df2[(df2.probe == probe) & (df2.metric == metric)]
        (first, *_), _missing = kept(out, df2[df2.probe == probe])
        preds = kept_seeds(out, df2, first)
        assert [p.key.seed for p in preds] == [0, 1, 2]
        assert all(any(n == p.key.file_name for n in names) for p in preds)
        for p in preds:  # each file reproduces its own row
            r = rows[(rows.encoder == p.key.encoder) & (rows.seed == p.key.seed)]
            if probe == "abmil":
                got = float((p.scores.argmax(1) == p.truth).mean())
            else:
                got = float(np.nanmean(np.nanmean(p.per[:, 0], 1)))
            assert got == pytest.approx(float(r.value.iloc[0]), rel=1e-5), p.key
        differ = [
            not np.allclose(_numbers(a), _numbers(b), equal_nan=True)
            for a, b in itertools.pairwise(preds)
        ]
        assert any(differ), probe  # the seed changed the fit


def _numbers(p: Predictions) -> np.ndarray:
    return p.frame().select_dtypes("number").to_numpy(np.float64)


def test_the_mean_row_carries_the_spread_across_seeds(seeded):
    df = seeded[1][-1][0]
    trained = df[df.probe.isin(["seg-decoder", "abmil"])]
    for (_ds, _enc, _p, _m), rows in trained.groupby(["dataset", "encoder", "probe", "metric"]):
        each = rows[rows.seed >= 0].set_index("seed").value
        mean = rows[rows.seed == MEAN_OF_SEEDS].iloc[0]
        if not np.isfinite(each).all():
            continue
        assert mean.value == pytest.approx(each.mean(), rel=1e-5)  # results.csv: 6 digits
        assert mean["std"] == pytest.approx(np.std(each), rel=1e-4, abs=1e-5)
        assert (mean.value_min, mean.value_max) == pytest.approx((each.min(), each.max()))
        assert mean.resampled == ("patient" if mean.dataset == "v" else "image")


def test_seed_options_are_checked():
    with pytest.raises(ProbeError, match="distinct whole numbers"):
        ProbeOptions(seeds=(1, 1))
    with pytest.raises(ProbeError, match="distinct whole numbers"):
        ProbeOptions(seeds=(-1,))
    with pytest.raises(ProbeError, match="go below seed 3"):
        ProbeOptions(seed=3, seeds=(0, 3))
    assert trainable("classification", ProbeOptions(), bags=False) == ()
    assert trainable("classification", ProbeOptions(protocol="seed"), bags=False) == ("linear",)
    assert trainable("classification", ProbeOptions(pool="abmil"), bags=True) == (
        "linear",
        "knn",
        "abmil",
    )
    assert trainable("segmentation", ProbeOptions(), bags=False) == ("seg-decoder",)


def test_nested_draws_add_the_seed_variance_to_the_mean_rows_interval():
    """Seeds that shift the score by a constant: pooling their draws (the test sampling
    alone) misses that spread; resampling seeds as well holds it."""
    rng = np.random.default_rng(0)
    base = rng.normal(0.8, 0.01, 1001)
    per = np.stack([base + shift for shift in (-0.05, 0.0, 0.05)])
    nested = bootstrap.intervals({"m": nested_draws(per, 1)})["m"]
    pooled = bootstrap.intervals({"m": bootstrap.pooled([{"m": p} for p in per])["m"]})["m"]
    assert nested[0] == pooled[0] == pytest.approx(per[:, 0].mean())
    assert nested[2] - nested[1] > 2 * (pooled[2] - pooled[1])
    np.testing.assert_array_equal(nested_draws(per[:1]), per[0])


def _seed_preds(name: str, scores: np.ndarray, y: np.ndarray, patient=None) -> list[Predictions]:
    key = Key("d", name, False, 32, "", "seed", "linear", "abc")
    sample = np.array([f"u{i:03d}" for i in range(len(y))])
    return [
        Predictions(Key(**{**key.__dict__, "seed": s}), "classification", sample, patient, y, p)
        for s, p in enumerate(scores)
    ]


def test_seeded_difference_resamples_seeds_and_units_in_any_unit_order():
    rng = np.random.default_rng(5)
    n, s = 120, 4
    y = rng.integers(0, 2, n)
    patient = np.repeat(np.arange(n // 3), 3).astype(str)

    def fits(strength: float) -> np.ndarray:
        p1 = 1 / (1 + np.exp(-(strength * (y - 0.5) + rng.normal(0, 1, (s, n)))))
        return np.stack([1 - p1, p1], -1)  # (S, n, 2)

    a, b = fits(2.0), fits(0.5)
    metric = bootstrap.macro_auroc_of(y)
    pa, pb = _seed_preds("a", a, y, patient), _seed_preds("b", b, y, patient)
    got = seeded_difference(metric, pa, pb)
    want = seeded_bootstrap(metric, a, b, patient)
    assert got == want
    # one seed of B stored in another unit order: aligned on A's units, same answer
    shuffled = _seed_preds("b", b, y, patient)
    order = rng.permutation(n)
    p = shuffled[1]
    shuffled[1] = Predictions(
        p.key, p.task, p.sample[order], p.patient[order], p.truth[order], p.scores[order]
    )
    assert seeded_difference(metric, pa, shuffled) == want
    # identical fits: a difference of exactly 0, an interval about 0; p is near 1 but
    # not 1, since A's and B's seeds are drawn on their own (as two trainings would be)
    same = seeded_difference(metric, _seed_preds("a", a, y), _seed_preds("a", a, y))
    assert same.difference == 0 and same.p_value > 0.9 and same.ci_low <= 0 <= same.ci_high
    # one seed each is the ordinary paired bootstrap
    one = seeded_difference(metric, _seed_preds("a", a[:1], y), _seed_preds("b", b[:1], y))
    assert one == paired_bootstrap(metric, a[0], b[0])
    with pytest.raises(ValueError, match="test units differ"):
        seeded_difference(metric, _seed_preds("a", a, y), _seed_preds("b", b[:, :-1], y[:-1]))


def test_seeded_difference_of_segmentation_units():
    """Segmentation predictions are per-unit scores: `values` picks each unit's Dice."""
    rng = np.random.default_rng(1)
    key = Key("s", "a", False, 32, "", "default", "seg-decoder", "abc")
    sample = np.array([f"v{i}" for i in range(40)])
    per = rng.random((3, 40, 5, 2))
    seeds = [
        Predictions(Key(**{**key.__dict__, "seed": i}), "segmentation", sample, per=p)
        for i, p in enumerate(per)
    ]
    dice = lambda x: np.nanmean(x[:, 0], 1)  # noqa: E731  # a unit's Dice over classes
    r = seeded_difference(bootstrap.weighted_mean, seeds, seeds[:1], dice)
    want = seeded_bootstrap(bootstrap.weighted_mean, per[:, :, 0].mean(-1), per[:1, :, 0].mean(-1))
    assert r == want


def test_older_results_and_predictions_without_the_new_columns_still_read(tmp_path, seeded):
    """A results.csv written before `seed`, `resampled`, `value_min`/`value_max`:
    rows read with seed 0 and resampled '' and are still the ordinary rows; a
    prediction file whose metadata has no seed nor unit reads as seed 0, unit 'unit'."""
    import json

    import pyarrow.parquet as pq

    out, runs, _ = seeded
    df = runs[-1][0]
    old = df[df.seed == 0].drop(columns=["seed", "resampled", "value_min", "value_max"])
    old.to_csv(tmp_path / "results.csv", index=False)
    back = read_results(tmp_path / "results.csv")
    assert set(back.seed) == {0} and set(back.resampled) == {""}
    assert len(ordinary(back)) == len(old)
    (first, *_), _ = kept(out, df[df.probe == "abmil"])
    table = pq.read_table(out / FOLDER / first.key.file_name)
    info = json.loads(table.schema.metadata[b"featstore"])
    info.pop("unit")
    info["key"].pop("seed")
    table = table.replace_schema_metadata({b"featstore": json.dumps(info).encode()})
    pq.write_table(table, tmp_path / "old.parquet")
    p = read_predictions(tmp_path / "old.parquet", first.key)
    assert p.key.seed == 0 and p.unit == "unit" and p.groups()[1] == "patient"
    assert first.unit == "volume"


def test_report_and_compare_read_the_ordinary_rows_of_a_seeded_run(seeded):
    """The seed rows and their mean do not break the report or the comparison table,
    which read the ordinary (seed 0) rows and predictions."""
    out = seeded[0]
    rep = runner.invoke(app, ["report", "--out", str(out)])
    assert rep.exit_code == 0, rep.output
    cmp = runner.invoke(app, ["compare", "--out", str(out)])
    assert cmp.exit_code == 0, cmp.output
    assert "pixels:8" in cmp.output and "seg-decoder" in cmp.output


def test_compare_tests_probes_fitted_with_seeds_over_seeds_and_units(seeded):
    """`featstore compare` of a --seeds run: the trainable probes' pairs are the seeded
    bootstrap (every seed of both), the one-fit probe's the ordinary tests."""
    import pandas as pd

    out = seeded[0]
    df = pd.read_csv(out / "comparisons.csv", keep_default_na=False)
    trained = df[df.probe.isin(["seg-decoder", "abmil"]) & (df.metric != "")]
    assert len(trained) and set(trained.test) == {"seeded bootstrap"}
    assert set(trained.seeds_a) == {3} and set(trained.seeds_b) == {3}
    once = df[(df.probe == "seg-linear") & (df.metric != "")]
    assert len(once) and set(once.test) == {"paired bootstrap"} and set(once.seeds_a) == {1}


def test_compare_with_seeds_is_seeded_difference():
    from featstore.probing.compare import compare

    rng = np.random.default_rng(2)
    n, s = 90, 3
    y = rng.integers(0, 2, n)

    def fits(strength: float) -> np.ndarray:
        p1 = 1 / (1 + np.exp(-(strength * (y - 0.5) + rng.normal(0, 1, (s, n)))))
        return np.stack([1 - p1, p1], -1)

    pa, pb = _seed_preds("a", fits(2.0), y), _seed_preds("b", fits(0.5), y)
    seeds = {pa[0].key: pa, pb[0].key: pb}
    df = compare([pa[0], pb[0]], "b", seeds=seeds).set_index("metric")
    want = seeded_difference(bootstrap.macro_auroc_of(y), pa, pb)
    got = df.loc["auroc"]
    assert got.test == "seeded bootstrap" and got.seeds_a == 3
    assert (got.difference, got.ci_low, got.p_value) == pytest.approx(
        (want.difference, want.ci_low, want.p_value)
    )
    plain = compare([pa[0], pb[0]], "b").set_index("metric")
    assert plain.loc["auroc"].test == "delong" and plain.loc["accuracy"].test == "mcnemar"
