"""Is encoder A better than B on one test set? Paired tests (numpy + scipy; no torch).

A and B are scored on the same test units, so their errors are correlated and the
right tests are paired ones:

- `delong`: the difference of two AUROCs and its variance from the DeLong et al.
  (1988) structural components, computed with midranks in O(n log n) (Sun & Xu 2014,
  "Fast implementation of DeLong's algorithm"); `delong_per_label` per class/label.
  The components (`placements`) belong to one encoder: made once each, any pair of
  encoders is then compared in O(n) (`delong_from`).
- `mcnemar_exact`: the exact binomial McNemar test of two accuracies (= statsmodels'
  `mcnemar(table, exact=True)`).
- `adjust`: Holm or Benjamini-Hochberg adjusted p-values (= statsmodels'
  `multipletests(method="holm" | "fdr_bh")`).
- `verdict`: "better", "worse" or "no evidence of a difference at 0.05" in words.

Bootstrap and permutation comparisons of any metric are in `featstore.probing.pairdraws`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.stats import binom, norm, rankdata

Z95 = float(norm.ppf(0.975))


@dataclass(frozen=True)
class DeLong:
    """DeLong's test of AUROC(A) - AUROC(B) on the same units.

    `variance` is that of the difference (`se` its square root); `ci_low`/`ci_high`
    the normal 95% interval `difference +- 1.96 se`; `p_value` two-sided. NaN when a
    class is missing, or (variance, z, p, interval) with fewer than two of either class.
    """

    auc_a: float
    auc_b: float
    difference: float
    variance: float
    se: float
    z: float
    p_value: float
    ci_low: float
    ci_high: float
    n_positive: int
    n_negative: int


@dataclass(frozen=True, eq=False)
class Placements:
    """One encoder's DeLong structural components on one binary task.

    positive: (n,) bool, the positives; v10: (m,) each positive's share of negatives
    scored below it, v01: (q,) each negative's share of positives scored above it
    (ties count half). Pair-free: make them once per encoder and task, then
    `delong_from` any two of them costs O(n).
    """

    positive: np.ndarray
    v10: np.ndarray
    v01: np.ndarray

    @property
    def auc(self) -> float:
        """The AUROC, mean(v10); NaN without positives or negatives."""
        return float(self.v10.mean()) if len(self.v10) and len(self.v01) else float("nan")


def placements(y_true: np.ndarray, score: np.ndarray) -> Placements:
    """The `Placements` of one encoder's scores, from midranks (Sun & Xu 2014).

    Args:
        y_true: (n,) bool or 0/1, the positives.
        score: (n,) float, higher = more likely positive.
    """
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, np.float64)
    if y.ndim != 1 or s.shape != y.shape:
        raise ValueError(
            f"placements need y_true (n,) and score (n,); got {y.shape} and {s.shape} "
            "(per label: delong_per_label)"
        )
    x, z = s[y], s[~y]
    m, q = len(x), len(z)
    if m == 0 or q == 0:
        return Placements(y, np.full(m, np.nan), np.full(q, np.nan))
    tz = rankdata(np.concatenate([x, z]))
    v10 = (tz[:m] - rankdata(x)) / q
    v01 = 1.0 - (tz[m:] - rankdata(z)) / m
    return Placements(y, v10, v01)


def delong(y_true: np.ndarray, score_a: np.ndarray, score_b: np.ndarray) -> DeLong:
    """DeLong's paired test of two AUROCs (`delong_from` of both `placements`).

    Args:
        y_true: (n,) bool or 0/1, the positives.
        score_a, score_b: (n,) float, higher = more likely positive (A's and B's scores
            of the same units, in the same order).
    """
    if np.shape(score_a) != np.shape(score_b):
        raise ValueError(
            f"delong needs score_a (n,) and score_b (n,) of the same units; got "
            f"{np.shape(score_a)} and {np.shape(score_b)}"
        )
    return delong_from(placements(y_true, score_a), placements(y_true, score_b))


def delong_from(a: Placements, b: Placements) -> DeLong:
    """DeLong's test of AUROC(A) - AUROC(B) from the two encoders' placements.

    The variance is Var(V10_A - V10_B)/m + Var(V01_A - V01_B)/q (m positives, q
    negatives, sample variances), which equals [1, -1] S [1, -1]^T of DeLong's
    covariance S and is exactly 0 for identical scores: then z = 0 and p = 1. A zero
    variance with a non-zero difference (no unit's placement varies) gives z = +-inf
    and p = 0.
    """
    if a.positive.shape != b.positive.shape or not np.array_equal(a.positive, b.positive):
        raise ValueError(
            "the two placements are of different labels: compare A and B on the same "
            "test units, in the same order"
        )
    m, q = len(a.v10), len(a.v01)
    nan = float("nan")
    diff = a.auc - b.auc
    if m < 2 or q < 2:
        return DeLong(a.auc, b.auc, diff, nan, nan, nan, nan, nan, nan, m, q)
    var = float(np.var(a.v10 - b.v10, ddof=1) / m + np.var(a.v01 - b.v01, ddof=1) / q)
    se = float(np.sqrt(var))
    # se == 0: no unit's placements differ between A and B, or none varies at all
    z = diff / se if se > 0 else (0.0 if diff == 0 else float(np.copysign(np.inf, diff)))
    return DeLong(
        auc_a=a.auc,
        auc_b=b.auc,
        difference=diff,
        variance=var,
        se=se,
        z=z,
        p_value=float(2 * norm.sf(abs(z))),
        ci_low=diff - Z95 * se,
        ci_high=diff + Z95 * se,
        n_positive=m,
        n_negative=q,
    )


def label_placements(y: np.ndarray, scores: np.ndarray) -> list[Placements]:
    """`placements` of each class (one-vs-rest) or label, in column order.

    Args:
        y: (n, L) multi-hot labels, or (n,) int class labels 0..K-1.
        scores: (n, L) or (n, K) float scores of one encoder.
    """
    s = np.asarray(scores)
    if s.ndim != 2 or len(s) != len(y):
        raise ValueError(f"scores must be (n, L) for n = {len(y)} units; got {s.shape}")
    truth = y == 1 if y.ndim == 2 else y[:, None] == np.arange(s.shape[1])
    if truth.shape != s.shape:
        raise ValueError(f"labels {y.shape} do not match scores {s.shape}")
    return [placements(truth[:, j], s[:, j]) for j in range(s.shape[1])]


def delong_per_label(y: np.ndarray, score_a: np.ndarray, score_b: np.ndarray) -> list[DeLong]:
    """`delong` of each class (one-vs-rest) or label, in column order.

    Args:
        y: (n, L) multi-hot labels, or (n,) int class labels 0..K-1.
        score_a, score_b: (n, L) or (n, K) float scores of A and B.

    Returns:
        L (or K) `DeLong` results; a class without positives or negatives is NaN. For
        a binary task use `delong(y == 1, proba_a[:, 1], proba_b[:, 1])`.
    """
    if np.shape(score_a) != np.shape(score_b):
        raise ValueError(
            f"delong_per_label needs A's and B's scores of one shape; got "
            f"{np.shape(score_a)} and {np.shape(score_b)}"
        )
    pa, pb = label_placements(y, score_a), label_placements(y, score_b)
    return [delong_from(a, b) for a, b in zip(pa, pb, strict=True)]


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test of two classifiers' accuracies on the same units.

    `a_only`: units A gets right and B wrong; `b_only` the reverse (the discordant
    pairs). `p_value`: two-sided exact binomial, min(1, 2 P(X <= min(a_only, b_only)))
    with X ~ Binomial(a_only + b_only, 1/2); 1 without discordant pairs.
    """

    n: int
    both_correct: int
    a_only: int
    b_only: int
    both_wrong: int
    p_value: float


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> McNemar:
    """McNemar's exact test (= statsmodels' `mcnemar([[both, a_only], [b_only, neither]],
    exact=True).pvalue`).

    Args:
        correct_a, correct_b: (n,) bool, whether A (B) predicted each unit right.
    """
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"mcnemar_exact needs two (n,) bool arrays; got {a.shape} and {b.shape}")
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    p = min(1.0, 2.0 * float(binom.cdf(min(a_only, b_only), a_only + b_only, 0.5)))
    return McNemar(
        n=len(a),
        both_correct=int((a & b).sum()),
        a_only=a_only,
        b_only=b_only,
        both_wrong=int((~a & ~b).sum()),
        p_value=p,
    )


Adjustment = Literal["holm", "bh"]


def adjust(p_values: np.ndarray, method: Adjustment = "holm") -> np.ndarray:
    """Multiple-comparison adjusted p-values, in the input order: (m,) float64.

    "holm": Holm's step-down family-wise correction; "bh": Benjamini-Hochberg false
    discovery rate. Equal to statsmodels' `multipletests(p, method="holm" | "fdr_bh")[1]`.

    Args:
        p_values: (m,) p-values in [0, 1] (m may be 0).
    """
    p = np.asarray(p_values, np.float64)
    if p.ndim != 1 or not np.all((p >= 0) & (p <= 1)):
        raise ValueError(
            f"adjust needs a (m,) array of p-values in [0, 1]; got shape {p.shape} with "
            f"{int(np.sum(~((p >= 0) & (p <= 1))))} outside it (NaN counts): leave untested "
            "comparisons out before adjusting"
        )
    m = len(p)
    order = np.argsort(p)
    ranked = p[order]
    if method == "holm":
        steps = np.maximum.accumulate(ranked * (m - np.arange(m)))
    elif method == "bh":
        steps = np.minimum.accumulate((ranked * m / np.arange(1, m + 1))[::-1])[::-1]
    else:
        raise ValueError(f"unknown adjustment {method!r}: use 'holm' or 'bh'")
    out = np.empty(m)
    out[order] = np.minimum(steps, 1.0)
    return out


Direction = Literal["better", "worse", "none"]


@dataclass(frozen=True)
class Verdict:
    """A comparison of A with B in plain words; `str(verdict)` is them.

    direction: "better" (A better than B), "worse", or "none" (no evidence of a
    difference at level `alpha`).
    """

    direction: Direction
    alpha: float

    def __str__(self) -> str:
        if self.direction == "none":
            return f"no evidence of a difference at {self.alpha:g}"
        return self.direction


def verdict(
    difference: float,
    ci_low: float,
    ci_high: float,
    p_value: float,
    *,
    higher_is_better: bool,
    alpha: float = 0.05,
) -> Verdict:
    """Whether A is better or worse than B, from the difference A - B of a metric.

    A side is taken only when the (adjusted) p-value is below `alpha` AND the interval
    excludes 0 on the side of the difference; otherwise the two disagree (possible
    when the p-value comes from another test than the interval, or after adjustment)
    and the verdict is "none". NaN anywhere is "none".

    Args:
        difference: metric(A) - metric(B) on the full test set.
        ci_low, ci_high: an interval of the difference (e.g. 95%).
        p_value: its p-value, adjusted for the number of comparisons made.
        higher_is_better: True for AUROC, accuracy, Dice; False for HD95.
    """
    finite = bool(np.isfinite([difference, ci_low, ci_high]).all())
    if not (finite and p_value < alpha):
        return Verdict("none", alpha)
    if difference > 0 and ci_low > 0:
        a_higher = True
    elif difference < 0 and ci_high < 0:
        a_higher = False
    else:
        return Verdict("none", alpha)
    return Verdict("better" if a_higher == higher_is_better else "worse", alpha)
