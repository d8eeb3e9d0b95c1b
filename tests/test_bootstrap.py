"""Bootstrap draws from resample counts equal scoring each resample (exactly)."""

from __future__ import annotations

import numpy as np
import pytest

from featstore.probing import bootstrap
from featstore.probing.metrics import classification_scores


@pytest.mark.parametrize(
    ("k", "n", "absent"), [(2, 60, False), (4, 200, False), (5, 40, True), (3, 30, False)]
)
def test_classification_draws_equal_per_resample_scores(k, n, absent):
    """Ties (scores rounded to 0.1), a class absent from the labels, and all resamples:
    the weighted path gives the same bits as `classification_scores` on each resample."""
    rng = np.random.default_rng(k)
    y = rng.integers(0, k - 1 if absent else k, n)
    proba = np.round(rng.random((n, k)), 1) + 1e-3
    proba /= proba.sum(1, keepdims=True)
    want = bootstrap.draws(lambda i: classification_scores(y[i], proba[i]), n, seed=5)
    got = bootstrap.classification_draws(y, proba, seed=5)
    assert set(got) == set(want)
    for m in want:
        np.testing.assert_array_equal(got[m], want[m], err_msg=m)


def test_multilabel_draws_and_pooled_intervals():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (50, 3))
    y[:, 2] = 0  # a label never on: its AUROC is NaN and left out
    proba = rng.random((50, 3))
    want = bootstrap.draws(lambda i: classification_scores(y[i], proba[i]), 50, seed=1)
    got = bootstrap.classification_draws(y, proba, seed=1)
    for m in want:
        np.testing.assert_array_equal(got[m], want[m], err_msg=m)
    # pooling two repeats: each resample's mean; one repeat pools to itself
    other = bootstrap.classification_draws(y, rng.random((50, 3)), seed=1)
    both = bootstrap.pooled([got, other])
    np.testing.assert_allclose(both["auroc"], (got["auroc"] + other["auroc"]) / 2)
    assert bootstrap.intervals(bootstrap.pooled([got])) == bootstrap.intervals(got)


def test_a_single_unit_has_no_interval():
    """One test volume resampled is that volume again: the interval is unknown (NaN),
    never the zero-width [x, x] that the percentiles of identical draws would give."""

    def score(idx):
        return {"dice": float(np.mean(np.array([0.7, 0.9])[idx]))}

    (value, lo, hi) = bootstrap.intervals(bootstrap.draws(score, 1))["dice"]
    assert value == 0.7 and np.isnan(lo) and np.isnan(hi)
    (value, lo, hi) = bootstrap.intervals(bootstrap.draws(score, 2))["dice"]
    assert value == 0.8 and lo < hi  # two units: a real interval


def _near_duplicates(n_patients: int = 40, per: int = 10, seed: int = 0):
    """Each patient has `per` images of one label whose scores are nearly the same (one
    patient-level score plus a little image noise): the images are not independent."""
    rng = np.random.default_rng(seed)
    y_p = np.arange(n_patients) % 2
    s_p = rng.normal(y_p * 1.0, 1.0)
    y = np.repeat(y_p, per)
    s = np.repeat(s_p, per) + rng.normal(0, 0.01, n_patients * per)
    p1 = 1 / (1 + np.exp(-s))
    patient = np.repeat([f"p{i:02d}" for i in range(n_patients)], per)
    return y, np.stack([1 - p1, p1], 1), patient


def test_patients_with_near_duplicate_images_widen_the_intervals():
    """Resampling images as if independent counts each patient `per` times: its interval
    is about sqrt(per) too narrow. Resampling whole patients gives the honest width."""
    y, proba, patient = _near_duplicates()
    by_image = bootstrap.intervals(bootstrap.classification_draws(y, proba, seed=3))
    by_patient = bootstrap.intervals(bootstrap.classification_draws(y, proba, 3, patient))
    for m in ("auroc", "accuracy", "f1"):
        (v1, lo1, hi1), (v2, lo2, hi2) = by_image[m], by_patient[m]
        assert v1 == v2  # the full set is the same
        assert hi2 - lo2 > 2 * (hi1 - lo1), m  # sqrt(10) ~ 3.2 in theory
        assert lo2 <= v2 <= hi2


def test_every_resample_keeps_whole_patients():
    """Patients of 1 to 5 images, shuffled among the units: in every resample each
    patient's images are all in, the same number of times, or all out; the weighted and
    the index resamples draw the same patients; one patient alone has no interval."""
    rng = np.random.default_rng(4)
    patient = rng.permutation(np.repeat(np.arange(20), rng.integers(1, 6, 20))).astype(str)
    n = len(patient)
    members = {p: np.flatnonzero(patient == p) for p in np.unique(patient)}
    w = bootstrap.Resampling.of(n, patient, seed=7).weights()[:, 1:]
    for b, idx in enumerate(bootstrap.resamples(n, 7, patient)):
        counts = np.bincount(idx, minlength=n)
        for units in members.values():
            assert len(set(counts[units])) == 1  # whole patients
        np.testing.assert_array_equal(counts, w[:, b])  # the same draw as `Resampling`
    y = rng.integers(0, 2, n)
    proba = rng.random((n, 2))
    proba /= proba.sum(1, keepdims=True)
    want = bootstrap.draws(lambda i: classification_scores(y[i], proba[i]), n, 7, patient)
    got = bootstrap.classification_draws(y, proba, 7, patient)
    for m in want:
        np.testing.assert_allclose(got[m], want[m], rtol=1e-12, err_msg=m)
    one = bootstrap.classification_draws(y, proba, 7, np.full(n, "p"))
    assert np.isnan(bootstrap.intervals(one)["auroc"][1])


def test_segmentation_volumes_resample_by_patient():
    """Two volumes per patient with the same Dice: by patient the interval is wider."""
    from featstore.probing.segscores import volume_draws

    rng = np.random.default_rng(2)
    dice = np.repeat(rng.random(30), 2)
    per = np.zeros((60, 5, 1))
    per[:, 0, 0] = dice
    patient = np.repeat(np.arange(30), 2).astype(str)
    vols = bootstrap.intervals(volume_draws(per, ["fg"], 0))["dice"]
    pats = bootstrap.intervals(volume_draws(per, ["fg"], 0, patient))["dice"]
    assert vols[0] == pats[0] and (pats[2] - pats[1]) > 1.2 * (vols[2] - vols[1])


def test_probe_outcomes_resample_the_patients_of_the_test_rows():
    """`classification.outcome` (what every probe row's interval comes from) draws whole
    patients where the set has them and says so; without, the rows are resampled."""
    from featstore.probing import classification, probes

    y, proba, patient = _near_duplicates(per=5)
    n = len(y)
    base = dict(x=np.zeros((n, 1)), y=y, split=np.full(n, "test"), n_classes=2)
    runs = {"linear": ("C", probes.Prediction(proba, 1.0, 0.0))}
    with_p = classification.ClassArrays(**base, group=patient, has_patient=True)
    without = classification.ClassArrays(**base, group=np.arange(n).astype(str), unit="volume")
    a, b = (classification.outcome(c, runs, 3) for c in (with_p, without))
    assert a.fitted[0].resampled == "patient" and b.fitted[0].resampled == "volume"
    want = bootstrap.classification_draws(y, proba, 3, patient)
    np.testing.assert_array_equal(a.draws["linear"]["auroc"], want["auroc"])
    lo_a, hi_a = a.fitted[0].scores["auroc"][1:]
    lo_b, hi_b = b.fitted[0].scores["auroc"][1:]
    assert hi_a - lo_a > 1.5 * (hi_b - lo_b)
