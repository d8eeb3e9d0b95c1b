"""Paired comparisons of two encoders on one test set, and ranks over many datasets:
each statistic against an independent computation (a brute-force DeLong, statsmodels,
scipy, sklearn), the null cases (identical predictions), a case where A is truly
better, and the whole-group resampling."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

from featstore.probing import bootstrap
from featstore.probing.bootstrap import Resampling, macro_auroc_of, weighted_mean
from featstore.probing.metrics import macro_auroc
from featstore.probing.pairdraws import (
    compare_draws,
    from_indices,
    paired_bootstrap,
    paired_permutation,
    seeded_bootstrap,
)
from featstore.probing.paired import (
    adjust,
    delong,
    delong_from,
    delong_per_label,
    mcnemar_exact,
    placements,
    verdict,
)
from featstore.probing.ranks import mean_ranks, rank_encoders
from featstore.report.cdplot import plot_critical_difference


def _two_encoders(n: int, seed: int, noise_a: float = 0.7, noise_b: float = 2.0):
    """Binary labels and two encoders' scores: A's noise is smaller, so A is better."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.5
    return y, y + rng.normal(0, noise_a, n), y + rng.normal(0, noise_b, n)


def _proba(score: np.ndarray) -> np.ndarray:
    p1 = 1 / (1 + np.exp(-(score - 0.5) * 3))
    return np.stack([1 - p1, p1], axis=1)


def _brute_delong(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """DeLong et al. (1988) written out: placement values from all m x q pairwise
    comparisons psi(x, y) = 1 / 0.5 / 0, and the 2x2 covariance S = S10/m + S01/q.
    Returns (auc_a, auc_b, variance of the difference)."""
    v10, v01 = [], []
    for s in (a, b):
        x, z = s[y][:, None], s[~y][None, :]
        psi = (x > z) + 0.5 * (x == z)  # (m, q)
        v10.append(psi.mean(1))
        v01.append(psi.mean(0))
    m, q = int(y.sum()), int((~y).sum())
    cov = np.cov(np.stack(v10)) / m + np.cov(np.stack(v01)) / q
    return float(v10[0].mean()), float(v10[1].mean()), float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])


@pytest.mark.parametrize(("n", "seed", "digits"), [(30, 0, 1), (200, 1, 2), (501, 2, None)])
def test_delong_equals_the_pairwise_definition_and_sklearn(n, seed, digits):
    """Ties (scores rounded) and no ties; the AUCs are sklearn's, the variance DeLong's
    O(m q) covariance, the p-value the normal one of z."""
    y, a, b = _two_encoders(n, seed, 1.0, 1.3)
    if digits is not None:
        a, b = np.round(a, digits), np.round(b, digits)
    got = delong(y, a, b)
    auc_a, auc_b, var = _brute_delong(y, a, b)
    assert got.auc_a == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert got.auc_b == pytest.approx(roc_auc_score(y, b), abs=1e-12)
    assert abs(got.auc_a - auc_a) < 1e-9 and abs(got.auc_b - auc_b) < 1e-9
    assert abs(got.variance - var) < 1e-9 and got.variance == pytest.approx(var, rel=1e-9)
    z = (auc_a - auc_b) / np.sqrt(var)
    assert got.z == pytest.approx(z, rel=1e-9)
    assert got.p_value == pytest.approx(2 * stats.norm.sf(abs(z)), rel=1e-9)
    assert got.ci_low < got.difference < got.ci_high


def test_delong_per_label_is_delong_of_each_column():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 120)
    a, b = rng.random((120, 3)), rng.random((120, 3))
    for c, res in enumerate(delong_per_label(y, a, b)):
        assert res == delong(y == c, a[:, c], b[:, c])
    multi = rng.random((120, 4)) < 0.3
    multi[:, 3] = False  # a label without positives: NaN, not an error
    per = delong_per_label(multi.astype(int), a[:, [0, 1, 2, 0]], b[:, [0, 1, 2, 0]])
    assert per[0] == delong(multi[:, 0], a[:, 0], b[:, 0])
    assert np.isnan(per[3].auc_a) and np.isnan(per[3].p_value)


def test_identical_predictions_are_no_difference_in_every_test():
    y, a, _ = _two_encoders(300, 4)
    proba = _proba(a)
    correct = proba.argmax(1) == y

    d = delong(y, a, a)
    assert d.difference == 0 and d.variance == 0 and d.p_value == 1
    assert d.ci_low <= 0 <= d.ci_high

    m = mcnemar_exact(correct, correct)
    assert (m.a_only, m.b_only, m.p_value) == (0, 0, 1.0)

    groups = np.arange(300) // 3
    for metric, pred in ((macro_auroc_of(y.astype(int)), proba), (weighted_mean, correct * 1.0)):
        boot = paired_bootstrap(metric, pred, pred.copy(), groups, n_resamples=200)
        assert boot.difference == 0 and boot.ci_low == 0 == boot.ci_high and boot.p_value == 1
        perm = paired_permutation(metric, pred, pred.copy(), groups, n_permutations=200)
        assert perm.difference == 0 and perm.p_value == 1
    seeds = np.stack([proba, proba])
    same = seeded_bootstrap(macro_auroc_of(y.astype(int)), seeds, seeds, n_resamples=200)
    assert same.difference == 0 and same.p_value == 1


def test_a_truly_better_encoder_is_found_at_n_400():
    """n = 400, A's score noise sd 0.7 against B's 2.0 (AUROC about 0.84 vs 0.57)."""
    y, a, b = _two_encoders(400, 5)
    pa, pb = _proba(a), _proba(b)
    yi = y.astype(int)

    d = delong(y, a, b)
    assert d.difference > 0 and d.p_value < 0.01
    assert str(verdict(d.difference, d.ci_low, d.ci_high, d.p_value, higher_is_better=True)) == (
        "better"
    )
    m = mcnemar_exact(pa.argmax(1) == yi, pb.argmax(1) == yi)
    assert m.a_only > m.b_only and m.p_value < 0.01
    boot = paired_bootstrap(macro_auroc_of(yi), pa, pb, seed=1)
    assert boot.ci_low > 0 and boot.p_value < 0.01
    assert boot.difference == pytest.approx(macro_auroc(yi, pa) - macro_auroc(yi, pb), abs=1e-12)
    perm = paired_permutation(macro_auroc_of(yi), pa, pb, n_permutations=300)
    assert perm.p_value < 0.01
    # and the reverse comparison, of a lower-is-better metric, reads "worse"
    assert verdict(0.2, 0.1, 0.3, 0.001, higher_is_better=False).direction == "worse"


def test_verdict_needs_both_a_small_p_and_an_interval_off_zero():
    assert str(verdict(0.02, -0.01, 0.05, 0.01, higher_is_better=True)) == (
        "no evidence of a difference at 0.05"
    )
    assert verdict(0.02, 0.01, 0.05, 0.2, higher_is_better=True).direction == "none"
    assert verdict(-0.02, -0.05, -0.01, 0.01, higher_is_better=True).direction == "worse"
    assert verdict(-0.5, -0.9, -0.1, 0.001, higher_is_better=False).direction == "better"
    assert verdict(float("nan"), 0.1, 0.2, 0.001, higher_is_better=True).direction == "none"


@pytest.mark.parametrize("case", [(30, 5, 12, 8), (100, 0, 0, 0), (50, 3, 1, 0), (10, 60, 25, 5)])
def test_mcnemar_equals_statsmodels_exact(case):
    both, a_only, b_only, neither = case
    correct_a = np.repeat([True, True, False, False], case)
    correct_b = np.repeat([True, False, True, False], case)
    got = mcnemar_exact(correct_a, correct_b)
    want = mcnemar([[both, a_only], [b_only, neither]], exact=True)
    assert (got.both_correct, got.a_only, got.b_only, got.both_wrong) == case
    assert got.p_value == pytest.approx(want.pvalue, rel=1e-12, abs=0)


@pytest.mark.parametrize("m", [1, 2, 7, 50])
@pytest.mark.parametrize(("ours", "theirs"), [("holm", "holm"), ("bh", "fdr_bh")])
def test_adjust_equals_statsmodels_multipletests(m, ours, theirs):
    rng = np.random.default_rng(m)
    p = np.round(rng.random(m) ** 3, 3)  # small p-values and ties
    np.testing.assert_allclose(adjust(p, ours), multipletests(p, method=theirs)[1], rtol=1e-12)
    assert adjust(np.array([]), ours).shape == (0,)


def test_adjust_refuses_missing_p_values():
    with pytest.raises(ValueError, match="leave untested"):
        adjust(np.array([0.1, np.nan]))


def _whole_groups(w: np.ndarray, group_of: np.ndarray) -> bool:
    """Every unit of a group has the same count in every resample."""
    return all((w[group_of == g] == w[group_of == g][0]).all() for g in np.unique(group_of))


def test_group_resampling_keeps_whole_groups_and_widens_the_interval():
    """40 patients of 5 to 40 near-duplicate images each: A right or wrong on a whole
    patient at once, B right on 70% of the patients' images independently."""
    rng = np.random.default_rng(6)
    sizes = rng.integers(5, 41, 40)
    patient = np.repeat(np.arange(40), sizes)
    a_right = (rng.random(40) < 0.75)[patient] * 1.0
    b_right = (rng.random(len(patient)) < 0.7) * 1.0

    res = Resampling.of(len(patient), patient, n_resamples=300, seed=2)
    w = res.weights()
    assert w.shape == (len(patient), 301) and (w[:, 0] == 1).all()
    assert _whole_groups(w, res.group_of)
    per_group = np.stack([w[patient == g][0] for g in range(40)])  # (40, 301) draws
    assert (per_group[:, 1:].sum(0) == 40).all()  # 40 patients drawn per resample
    np.testing.assert_array_equal((w * 1).sum(0)[1:], (per_group * sizes[:, None]).sum(0)[1:])

    with_groups = paired_bootstrap(weighted_mean, a_right, b_right, patient, seed=2)
    units = paired_bootstrap(weighted_mean, a_right, b_right, seed=2)
    assert with_groups.difference == units.difference
    width = with_groups.ci_high - with_groups.ci_low
    assert width > 2 * (units.ci_high - units.ci_low)


def test_resamples_follow_the_bootstrap_streams():
    """No groups: the resamples of `bootstrap.resamples` (so kept classification draws
    pair with these); groups: one `integers(0, G, G)` per resample, in id order."""
    w = Resampling.of(50, seed=3).weights()
    for j, idx in enumerate(bootstrap.resamples(50, 3), start=1):
        np.testing.assert_array_equal(w[:, j], np.bincount(idx, minlength=50))
    groups = np.array(list("cab") * 10)  # ids sorted: a=0, b=1, c=2
    rng = np.random.default_rng(9)
    gw = Resampling.of(30, groups, n_resamples=20, seed=9).weights()
    for j in range(1, 21):
        counts = np.bincount(rng.integers(0, 3, 3), minlength=3)
        np.testing.assert_array_equal(gw[:, j], counts[np.searchsorted(["a", "b", "c"], groups)])


def test_kept_draws_and_index_metrics_give_the_same_comparison():
    """`compare_draws` of `classification_draws` equals `paired_bootstrap` of the
    weighted AUROC; `from_indices` (one resample at a time) equals the weighted form."""
    rng = np.random.default_rng(7)
    y = rng.integers(0, 3, 90)
    pa, pb = rng.dirichlet(np.ones(3), 90), rng.dirichlet(np.ones(3), 90)
    kept = compare_draws(
        bootstrap.classification_draws(y, pa, 4)["auroc"],
        bootstrap.classification_draws(y, pb, 4)["auroc"],
    )
    assert kept == paired_bootstrap(macro_auroc_of(y), pa, pb, seed=4)
    groups = np.arange(90) // 4
    slow = from_indices(lambda p, i: macro_auroc(y[i], p[i]))
    r = Resampling.of(90, groups, n_resamples=40, seed=1)
    np.testing.assert_allclose(
        bootstrap.weighted_draws(slow, pa, r),
        bootstrap.weighted_draws(macro_auroc_of(y), pa, r),
        atol=1e-12,
    )


def test_weighted_auroc_is_the_same_for_many_columns_or_one():
    """Many resamples take the row-at-a-time running sums, one column numpy's cumsum:
    the same bits, and sklearn's AUROC on the repeated units."""
    rng = np.random.default_rng(11)
    y = rng.random(400) < 0.3
    s = np.round(rng.random(400), 2)  # ties
    w = Resampling.of(400, n_resamples=80, seed=3).weights()
    many = bootstrap.weighted_auroc(y, s, w)
    one = np.concatenate([bootstrap.weighted_auroc(y, s, w[:, [j]]) for j in range(81)])
    np.testing.assert_array_equal(many, one)
    idx = np.repeat(np.arange(400), w[:, 5].astype(int))
    assert many[5] == pytest.approx(roc_auc_score(y[idx], s[idx]), abs=1e-12)


def test_seeded_bootstrap_adds_seed_variance():
    """One seed each: the paired bootstrap exactly. Five seeds whose AUROC moves with
    the seed: a wider interval than the same seed-mean under test resampling alone."""
    y, a, b = _two_encoders(300, 8, 1.0, 1.1)
    yi, metric = y.astype(int), macro_auroc_of(y.astype(int))
    pa, pb = _proba(a), _proba(b)
    one = seeded_bootstrap(metric, pa[None], pb[None], n_resamples=300, seed=2)
    assert one == paired_bootstrap(metric, pa, pb, n_resamples=300, seed=2)
    # n = 1000 test units; A's seeds range from AUROC about 0.84 to 0.6 (ratio of the
    # widths about 2 over other data seeds)
    y, a, b = _two_encoders(1000, 8, 1.0, 1.1)
    yi, metric = y.astype(int), macro_auroc_of(y.astype(int))
    rng = np.random.default_rng(0)
    seeds_a = np.stack([_proba(a + rng.normal(0, s, 1000)) for s in (0.1, 0.3, 1.0, 2.0, 3.0)])
    seeds_b = np.stack([_proba(b + rng.normal(0, 0.05, 1000)) for _ in range(5)])
    both = seeded_bootstrap(metric, seeds_a, seeds_b, n_resamples=300, seed=2)
    r = Resampling.of(1000, n_resamples=300, seed=2)
    test_only = compare_draws(
        *(
            np.mean([bootstrap.weighted_draws(metric, p, r) for p in s], 0)
            for s in (seeds_a, seeds_b)
        )
    )
    assert both.difference == pytest.approx(test_only.difference, abs=1e-12)
    assert both.ci_high - both.ci_low > 1.5 * (test_only.ci_high - test_only.ci_low)
    want = np.mean([macro_auroc(yi, p) for p in seeds_a]) - np.mean(
        [macro_auroc(yi, p) for p in seeds_b]
    )
    assert both.difference == pytest.approx(want, abs=1e-12)


def test_mismatched_inputs_name_the_problem():
    with pytest.raises(ValueError, match="same test units"):
        paired_bootstrap(weighted_mean, np.ones(5), np.ones(6))
    with pytest.raises(ValueError, match="one group id"):
        paired_bootstrap(weighted_mean, np.ones(5), np.ones(5), np.arange(4))
    with pytest.raises(ValueError, match="delong_per_label"):
        delong(np.ones(4), np.ones((4, 2)), np.ones((4, 2)))
    s = np.arange(6.0)
    with pytest.raises(ValueError, match="different labels"):
        delong_from(placements(s > 2, s), placements(s > 3, s))


def _scores(datasets: int = 6, encoders: int = 4, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.linspace(0.9, 0.75, encoders)
    return rng.random((datasets, 1)) * 0.1 + base + rng.normal(0, 0.03, (datasets, encoders))


def test_friedman_and_pairwise_wilcoxon_equal_scipy():
    s = _scores(8, 5, 1)
    r = rank_encoders(s, list("abcde"))
    want = stats.friedmanchisquare(*s.T)
    assert r.friedman_statistic == pytest.approx(want.statistic, rel=1e-12)
    assert r.friedman_p == pytest.approx(want.pvalue, rel=1e-12)
    raw = []
    for i in range(5):
        for j in range(i + 1, 5):
            p = stats.wilcoxon(s[:, i], s[:, j]).pvalue
            assert r.wilcoxon_p[i, j] == r.wilcoxon_p[j, i] == pytest.approx(p, rel=1e-12)
            raw.append(p)
    holm = multipletests(raw, method="holm")[1]
    upper = r.wilcoxon_holm[np.triu_indices(5, 1)]
    np.testing.assert_allclose(upper, holm, rtol=1e-12)
    np.testing.assert_allclose(r.mean_ranks, stats.rankdata(-s, axis=1).mean(0))
    assert r.mean_ranks.sum() == pytest.approx(5 * 6 / 2)
    # lower is better (HD95): the ranks flip, the tests do not
    flipped = rank_encoders(s, list("abcde"), higher_is_better=False)
    np.testing.assert_allclose(flipped.mean_ranks, 6 - r.mean_ranks)
    assert flipped.friedman_p == r.friedman_p
    np.testing.assert_allclose(mean_ranks(s, higher_is_better=False), flipped.mean_ranks)


def test_rank_encoders_refuses_missing_scores():
    s = _scores()
    s[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"\(2, 1\)"):
        rank_encoders(s, list("abcd"))


def test_critical_difference_diagram_is_written(tmp_path):
    ranking = rank_encoders(_scores(5, 4), ["dinov3-s", "dinov2-b", "rad-dino", "pixels"])
    path = tmp_path / "cd.png"
    assert plot_critical_difference(ranking, path)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 2000
    assert not plot_critical_difference(ranking, path)  # same bytes: not rewritten


def test_the_statistics_do_not_import_torch():
    code = (
        "import sys, featstore.probing.paired, featstore.probing.pairdraws, "
        "featstore.probing.ranks; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
