"""Failure cases from kept predictions (pure: `Predictions` in, rows out).

Classification: the test units whose arg-max class is wrong, most confident first
(confidence = the score of the predicted, wrong class). Multi-label: each wrong
decision at 0.5, by its distance from the truth. Segmentation: the units with the
lowest Dice (mean over the foreground classes scored in the unit).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featstore.probing.predictions import Predictions


@dataclass(frozen=True)
class Failure:
    """One failure: the unit, what was true and predicted, and how sure the probe was
    (`score`: the wrong class's probability, or the unit's Dice for segmentation)."""

    sample: str
    truth: str
    predicted: str
    score: float


def failures(p: Predictions) -> list[Failure]:
    """The failures of one probe's predictions, worst first (ties: by sample id)."""
    if p.task == "segmentation":
        assert p.per is not None
        d = p.per[:, 0, :]  # (n, classes); NaN: the class is in neither mask
        scored = np.isfinite(d).sum(1)
        dice = np.where(scored > 0, np.nansum(d, 1) / np.maximum(scored, 1), np.nan)
        rows = [
            Failure(str(s), "mask", "mask", float(d))
            for s, d in zip(p.sample, dice, strict=True)
            if np.isfinite(d)
        ]
        return sorted(rows, key=lambda f: (f.score, f.sample))
    assert p.truth is not None and p.scores is not None
    if p.task == "multilabel":
        rows = []
        for i, s in enumerate(p.sample):
            for j in range(p.scores.shape[1]):
                said, true = bool(p.scores[i, j] >= 0.5), bool(p.truth[i, j])
                if said != true:
                    conf = p.scores[i, j] if said else 1 - p.scores[i, j]
                    rows.append(Failure(str(s), f"{j}={int(true)}", f"{j}={int(said)}", conf))
        return sorted(rows, key=lambda f: (-f.score, f.sample, f.predicted))
    predicted = p.scores.argmax(1)
    wrong = np.flatnonzero(predicted != p.truth)
    rows = [
        Failure(str(p.sample[i]), str(int(p.truth[i])), str(int(predicted[i])),
                float(p.scores[i, predicted[i]]))
        for i in wrong
    ]  # fmt: skip
    return sorted(rows, key=lambda f: (-f.score, f.sample))


def disagreements(a: Predictions, b: Predictions) -> tuple[list[str], list[str]]:
    """Units of both (classification) that `a` gets right and `b` wrong, and the
    reverse, sorted by id."""
    if a.task != "classification" or b.task != "classification":
        return [], []
    assert a.scores is not None and b.scores is not None and a.truth is not None
    right_a = dict(zip(a.sample.tolist(), (a.scores.argmax(1) == a.truth).tolist(), strict=True))
    right_b = dict(zip(b.sample.tolist(), (b.scores.argmax(1) == b.truth).tolist(), strict=True))
    both = sorted(set(right_a) & set(right_b))
    return (
        [s for s in both if right_a[s] and not right_b[s]],
        [s for s in both if right_b[s] and not right_a[s]],
    )
