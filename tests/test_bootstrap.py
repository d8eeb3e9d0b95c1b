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
