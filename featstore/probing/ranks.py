"""Encoders ranked over many datasets (numpy + scipy; no torch).

Demšar (2006) and Benavoli et al. (2016): one score per encoder and dataset, the
datasets as blocks. `rank_encoders` gives the mean rank of each encoder (1 = best),
Friedman's test that all encoders rank alike (= `scipy.stats.friedmanchisquare`), and
the pairwise Wilcoxon signed-rank tests over datasets (= `scipy.stats.wilcoxon`) with
Holm's adjustment over all pairs, the post-hoc Benavoli et al. recommend over
Nemenyi's. Nemenyi's critical difference of mean ranks is kept too, for the diagram
(`featstore.report.cdplot`).

Few datasets give little power: with D datasets the smallest two-sided exact Wilcoxon
p-value is 2 / 2^D, so with D <= 5 no pair can reach 0.05 at all (2/32 = 0.0625), and
the per-dataset paired tests (`featstore.probing.paired`) are the evidence to read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np
from scipy.stats import friedmanchisquare, rankdata, studentized_range, wilcoxon

from featstore.probing.paired import adjust


@dataclass(frozen=True)
class Ranking:
    """Encoders compared over datasets.

    mean_ranks: (E,) float64, rank 1 = best on a dataset (ties share the mean rank).
    friedman_statistic, friedman_p: Friedman's chi-square test over the D datasets.
    wilcoxon_p: (E, E) raw two-sided signed-rank p-values of each pair (1 on the
    diagonal); wilcoxon_holm: the same adjusted by Holm over the E(E-1)/2 pairs.
    nemenyi_cd: Nemenyi's critical difference of mean ranks at `alpha`.
    """

    names: tuple[str, ...]
    higher_is_better: bool
    n_datasets: int
    mean_ranks: np.ndarray
    friedman_statistic: float
    friedman_p: float
    wilcoxon_p: np.ndarray
    wilcoxon_holm: np.ndarray
    nemenyi_cd: float
    alpha: float


def _check(scores: np.ndarray, names: Sequence[str]) -> np.ndarray:
    s = np.asarray(scores, np.float64)
    if s.ndim != 2 or s.shape[1] != len(names) or len(names) < 3 or len(s) < 2:
        raise ValueError(
            f"rank_encoders needs scores (datasets, encoders) with >= 2 datasets and >= 3 "
            f"encoders, one name each; got {s.shape} for {len(names)} names (two encoders: "
            "use the paired tests per dataset)"
        )
    if not np.isfinite(s).all():
        where = [tuple(int(i) for i in ix) for ix in np.argwhere(~np.isfinite(s))[:3]]
        raise ValueError(
            f"scores are missing (NaN/inf) at (dataset, encoder) {where}: drop those "
            "datasets or encoders first, every encoder needs a score on every dataset"
        )
    return s


def mean_ranks(scores: np.ndarray, *, higher_is_better: bool = True) -> np.ndarray:
    """The mean over datasets of each encoder's rank (1 = best): (E,) float64.

    scores: (D, E) one score per dataset and encoder.
    """
    s = np.asarray(scores, np.float64)
    return rankdata(-s if higher_is_better else s, axis=1).mean(0)


def _wilcoxon(x: np.ndarray, y: np.ndarray) -> float:
    if np.all(x == y):  # no difference anywhere: nothing to rank
        return 1.0
    return float(wilcoxon(x, y).pvalue)


def rank_encoders(
    scores: np.ndarray,
    names: Sequence[str],
    *,
    higher_is_better: bool = True,
    alpha: float = 0.05,
) -> Ranking:
    """Mean ranks, Friedman's test and pairwise Wilcoxon-Holm tests of E encoders.

    Args:
        scores: (D, E) float, the main metric of each encoder (column) on each dataset
            (row), e.g. test AUROC; all finite.
        names: E encoder names, in column order.
        higher_is_better: False for HD95-like metrics (ranks and the diagram flip;
            Friedman and Wilcoxon do not depend on the direction).
        alpha: the level of Nemenyi's critical difference.
    """
    s = _check(scores, names)
    d, e = s.shape
    stat, p = friedmanchisquare(*s.T)
    pairs = list(combinations(range(e), 2))
    raw = np.array([_wilcoxon(s[:, i], s[:, j]) for i, j in pairs])
    held = adjust(raw, "holm")
    wil, holm = np.ones((e, e)), np.ones((e, e))
    for (i, j), r, h in zip(pairs, raw, held, strict=True):
        wil[i, j] = wil[j, i] = r
        holm[i, j] = holm[j, i] = h
    q = studentized_range.ppf(1 - alpha, e, np.inf) / np.sqrt(2)
    return Ranking(
        names=tuple(names),
        higher_is_better=higher_is_better,
        n_datasets=d,
        mean_ranks=mean_ranks(s, higher_is_better=higher_is_better),
        friedman_statistic=float(stat),
        friedman_p=float(p),
        wilcoxon_p=wil,
        wilcoxon_holm=holm,
        nemenyi_cd=float(q * np.sqrt(e * (e + 1) / (6 * d))),
        alpha=alpha,
    )
