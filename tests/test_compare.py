"""Is A better than B? Paired comparisons of kept predictions, pure and through the CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import synth_entry, write_manifest
from typer.testing import CliRunner

import featstore
from featstore.probing import paired
from featstore.probing.compare import compare
from featstore.probing.predictions import Key, Predictions
from pipelines.cli import app

runner = CliRunner()


def _key(encoder: str, random_init: bool = False) -> Key:
    return Key("d", encoder, random_init, 32, "", "default", "linear", f"set-{encoder}")


def _binary(encoder: str, score: np.ndarray, y: np.ndarray, samples=None, patient=None):
    samples = np.array([f"u{i}" for i in range(len(y))]) if samples is None else samples
    proba = np.stack([1 - score, score], 1)
    return Predictions(_key(encoder), "classification", samples, patient, y, proba)


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    good = np.clip(y * 0.6 + rng.normal(0.2, 0.2, 200), 0, 1)
    poor = rng.uniform(0, 1, 200)
    return y, good, poor


def test_a_clearly_better_encoder_is_better_with_delong_p(pair):
    y, good, poor = pair
    df = compare([_binary("ref", poor, y), _binary("new", good, y)])
    auc = df[df.metric == "auroc"].iloc[0]
    assert (auc.encoder_a, auc.encoder_b, auc.test) == ("new", "ref", "delong")
    assert auc.p_value == pytest.approx(paired.delong(y == 1, good, poor).p_value)
    assert auc.verdict == "better" and auc.ci_low > 0
    assert set(df.metric) == {"auroc", "accuracy", "f1"}
    assert df[df.metric == "accuracy"].test.iloc[0] == "mcnemar"
    # reversed reference: worse
    back = compare([_binary("ref", poor, y), _binary("new", good, y)], reference="new")
    assert back[back.metric == "auroc"].verdict.iloc[0] == "worse"
    # adjusted p never below raw p (Holm over the run's comparisons)
    assert (df.p_adjusted >= df.p_value - 1e-12).all()


def test_identical_predictions_give_no_evidence(pair):
    y, good, _ = pair
    df = compare([_binary("a", good, y), _binary("b", good, y)])
    assert (df.verdict == "no evidence of a difference at 0.05").all()
    assert (df.difference == 0).all()


def test_units_in_another_order_are_paired_and_other_units_are_not_compared(pair):
    y, good, poor = pair
    n = len(y)
    order = np.arange(n)[::-1]
    ids = np.array([f"u{i}" for i in range(n)])
    shuffled = _binary("b", poor[order], y[order], ids[order])
    plain = compare([_binary("a", good, y), _binary("b", poor, y)])
    same = compare([_binary("a", good, y), shuffled])
    pd.testing.assert_frame_equal(plain, same)
    other = _binary("c", poor, y, np.array([f"x{i}" for i in range(n)]))
    df = compare([_binary("a", good, y), other])
    assert len(df) == 1 and df.verdict.iloc[0] == "not compared"
    assert "different test units" in df.reason.iloc[0]


def test_patients_are_resampled_where_known(pair):
    y, good, poor = pair
    patient = np.array([f"p{i // 4}" for i in range(len(y))])
    df = compare([_binary("a", good, y, patient=patient), _binary("b", poor, y, patient=patient)])
    assert set(df.resampled) == {"patient"}
    assert set(compare([_binary("a", good, y), _binary("b", poor, y)]).resampled) == {"unit"}
    wide = df[df.metric == "f1"].iloc[0]
    narrow = compare([_binary("a", good, y), _binary("b", poor, y)])
    narrow_f1 = narrow[narrow.metric == "f1"].iloc[0]
    assert wide.ci_high - wide.ci_low != narrow_f1.ci_high - narrow_f1.ci_low


def test_hd95_lower_is_better():
    per_a = np.zeros((6, 5, 1))
    per_b = np.zeros((6, 5, 1))
    per_a[:, 0], per_b[:, 0] = 0.9, 0.5  # dice
    per_a[:, 4] = np.linspace(1, 2, 6)[:, None]  # hd95
    per_b[:, 4] = np.linspace(10, 12, 6)[:, None]
    ids = np.array([f"v{i}" for i in range(6)])

    def seg(enc, per):
        return Predictions(_key(enc), "segmentation", ids, per=per, classes=("1",))

    df = compare([seg("b", per_b), seg("a", per_a)], reference="b")
    hd = df[df.metric == "hd95"].iloc[0]
    assert not hd.higher_is_better and hd.difference < 0 and hd.verdict == "better"
    assert df[df.metric == "dice"].verdict.iloc[0] == "better"


def test_featstore_compare_writes_comparisons_csv(tmp_path):
    mpath = write_manifest(tmp_path, synth_entry("c2", "cls2d", n=24), "['pixels:4']", "[32, 64]")
    out = tmp_path / "out"
    for cmd in (["extract", "--manifest", str(mpath)], ["probe", "--manifest", str(mpath)]):
        result = runner.invoke(app, [*cmd, *(["--out", str(out)] if cmd[0] == "probe" else [])])
        assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["compare", "--out", str(out), "--all-pairs", "--adjust", "bh"])
    assert result.exit_code == 0, result.output
    df = pd.read_csv(out / "comparisons.csv")
    assert set(df.probe) == {"linear", "knn"} and set(df.encoder_a) | set(df.encoder_b) == {
        "pixels:4",
        "pixels:8",
    }
    assert "p adjusted by bh" in result.output
    api = featstore.compare(out)
    assert len(api) == len(df)
    kept = featstore.predictions(out, dataset="c2", probe="linear")
    assert set(kept.encoder) == {"pixels:4", "pixels:8"} and "score_0" in kept
    # does scale help? each encoder's 32 -> 64 px step, the same as the API's
    steps = pd.read_csv(out / "steps.csv")
    res = steps[steps.step == "resolution"]
    assert set(zip(res.resolution_b, res.resolution, strict=True)) == {(32, 64)}
    assert set(res.encoder_a) == {"pixels:4", "pixels:8"} and (res.test != "").all()
    assert "Does scale help?" in result.output
    assert len(featstore.scale_steps(out)) == len(steps)
    report = runner.invoke(app, ["report", "--out", str(out)])
    assert report.exit_code == 0, report.output
    section = (out / "report.md").read_text().split("### Does scale help?")[1]
    assert "| resolution | c2 | linear | auroc | pixels:4 @ 64 | pixels:4 @ 32 |" in section
    bad = runner.invoke(app, ["compare", "--out", str(out), "--reference", "nope"])
    assert bad.exit_code != 0 and "--reference 'nope' has no predictions" in bad.output


def test_the_report_answers_is_a_better_than_b_with_ranks(tmp_path):
    datasets = "".join(synth_entry(f"c{i}", "cls2d", n=24) for i in range(3))
    mpath = write_manifest(tmp_path, datasets, "['pixels:4', 'pixels:16']")
    out = tmp_path / "out"
    for cmd in (["extract", "--manifest", str(mpath)], ["probe", "--manifest", str(mpath)]):
        result = runner.invoke(app, [*cmd, *(["--out", str(out)] if cmd[0] == "probe" else [])])
        assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["report", "--out", str(out)])
    assert result.exit_code == 0, result.output
    md = (out / "report.md").read_text()
    section = md.split("## Is A better than B?")[1].split("\n## ")[0]
    assert "random initialisations" in section and "| c2 | linear | auroc |" in section
    assert "Mean ranks over 3 datasets" in section and "Friedman p" in section
    assert (out / "plots" / "critical_difference.png").is_file()


@pytest.mark.parametrize("multilabel", [False, True])
def test_weighted_f1_is_the_f1_of_each_resample(multilabel):
    from featstore.probing import bootstrap, metrics
    from featstore.probing.compare import _f1

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, (60, 3)) if multilabel else rng.integers(0, 4, 60)
    proba = rng.uniform(0, 1, (60, 3 if multilabel else 4))
    res = bootstrap.Resampling.of(60, None, n_resamples=20, seed=3)
    got = bootstrap.weighted_draws(_f1(y), proba, res)
    w = res.weights()
    units = np.arange(60)
    for b in range(5):
        idx = np.repeat(units, w[:, b].astype(int))
        want = metrics.classification_scores(y[idx], proba[idx])["f1"]
        assert got[b] == pytest.approx(want)
