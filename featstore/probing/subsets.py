"""Label-efficiency subsets of a train split: stratified, nested, whole groups.

A point of a label-efficiency curve fits the probes on part of the train split: a
fraction of each class's training units (`train_fraction`), or k units per class
(`shots`). A unit is what a probe fits on: an image (2D) or a volume (3D). Units
of one group (a patient, else the unit itself) are drawn together, so no group is
split between the subset and the rest. For repeat r the groups of each class are
put in one random order (seed r), and every point takes a prefix of that order:
the 5% subset of repeat r contains its 1% subset, and 5 shots contain 1 shot.
Validation and test units never change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featstore.errors import ProbeError


@dataclass(frozen=True)
class Point:
    """One point of a curve: `fraction` of each class's training units, or `shots`
    units per class (exactly one of the two is set)."""

    fraction: float | None = None
    shots: int | None = None

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.shots is None):
            raise ProbeError("a label-efficiency point has a fraction or a number of shots")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ProbeError(
                f"train fraction {self.fraction!r}: give a fraction in (0, 1], e.g. 0.05 for 5%"
            )
        if self.shots is not None and self.shots < 1:
            raise ProbeError(f"shots {self.shots!r}: give a whole number >= 1 per class")

    @property
    def full(self) -> bool:
        """Whether this point is the whole train split (the ordinary probe)."""
        return self.fraction == 1.0

    def __str__(self) -> str:
        return f"{self.fraction:g} of the labels" if self.shots is None else f"{self.shots}-shot"


class SkippedPoint(ProbeError):
    """A point that cannot be drawn (more shots than a class has units); recorded, not fatal."""


def strata(y: np.ndarray | None, n: int) -> np.ndarray:
    """The class each unit is stratified by: its label (n,) int; one stratum (all 0)
    for multi-hot labels (n, L) and for segmentation (y None)."""
    if y is None or y.ndim == 2:
        return np.zeros(n, np.int64)
    return np.asarray(y, np.int64)


def group_order(stratum: np.ndarray, group: np.ndarray, seed: int) -> dict[int, list[np.ndarray]]:
    """For each stratum, its groups' units in the random order of `seed`.

    stratum, group: (n,) per training unit. A group belongs to the stratum most of
    its units have (ties: the lowest). Strata and groups are visited in sorted order
    before shuffling, so the order depends on the seed and the data only.
    """
    _, inv = np.unique(group, return_inverse=True)
    inv = inv.reshape(-1)
    members = np.split(np.argsort(inv, kind="stable"), np.cumsum(np.bincount(inv))[:-1])
    home = np.array([np.bincount(stratum[m]).argmax() for m in members], np.int64)
    rng = np.random.default_rng(seed)
    return {
        int(s): [members[g] for g in rng.permutation(np.flatnonzero(home == s))]
        for s in np.unique(home)
    }


def _prefix(groups: list[np.ndarray], target: int) -> list[np.ndarray]:
    """The shortest prefix of `groups` holding at least `target` units."""
    out, n = [], 0
    for g in groups:
        if n >= target:
            break
        out.append(g)
        n += len(g)
    return out


def draw(order: dict[int, list[np.ndarray]], point: Point) -> np.ndarray:
    """The training units (sorted positions) of `point` under one repeat's `order`.

    A fraction f takes, per stratum of n units, whole groups until round(f * n) units
    (at least one) are in; shots k take whole groups until k units are in. Raises
    `SkippedPoint` when a stratum has fewer than k units.
    """
    picked: list[np.ndarray] = []
    for s, groups in order.items():
        n = sum(len(g) for g in groups)
        if point.shots is not None:
            if n < point.shots:
                raise SkippedPoint(
                    f"{point}: class {s} has only {n} training units; use at most {n} shots"
                )
            target = point.shots
        else:
            assert point.fraction is not None
            target = max(1, int(np.floor(point.fraction * n + 0.5)))
        picked += _prefix(groups, target)
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)
