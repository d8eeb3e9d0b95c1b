"""Does scale help? Paired steps up a family's size ladder and up the resolutions."""

from __future__ import annotations

import numpy as np
import pytest

from featstore.encode.presets import preset_family
from featstore.probing import paired
from featstore.probing.predictions import Key, Predictions
from featstore.probing.steps import STEP_COLUMNS, steps


def _pred(encoder: str, resolution: int, score: np.ndarray, y: np.ndarray, ri: bool = False):
    key = Key("d", encoder, ri, resolution, "", "default", "linear", f"{encoder}-{resolution}")
    samples = np.array([f"u{i}" for i in range(len(y))])
    return Predictions(key, "classification", samples, None, y, np.stack([1 - score, score], 1))


@pytest.fixture
def scores():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    noise = [rng.normal(0, s, 300) for s in (2.0, 0.8, 0.2)]  # weak, better, best
    return y, [1 / (1 + np.exp(-(2 * y - 1 + n))) for n in noise]


def test_the_family_ladder_orders_sizes_and_leaves_other_encoders_out():
    assert preset_family("dinov3-vits16") == ("dinov3", 0)
    assert preset_family("dinov3-vitl16")[1] > preset_family("dinov3-vitb16")[1]
    assert preset_family("dinov2-vitb14") == ("dinov2", 1)
    assert preset_family("timm:vit_base_patch16_dinov3.lvd1689m")[0] == "timm:dinov3"
    assert preset_family("biomedclip") is None and preset_family("rad-dino") is None


def test_size_steps_go_between_successive_sizes_of_one_family(scores):
    y, (weak, better, best) = scores
    preds = [
        _pred("dinov3-vitl16", 224, best, y),
        _pred("dinov3-vits16", 224, weak, y),
        _pred("dinov3-vitb16", 224, better, y),
        _pred("biomedclip", 224, best, y),  # outside any ladder
        _pred("dinov2-vits14", 224, weak, y),  # a family of one: no step
    ]
    df = steps(preds, preset_family)
    assert list(df.columns) == list(STEP_COLUMNS)
    auc = df[(df.step == "size") & (df.metric == "auroc")]
    pairs = list(zip(auc.encoder_a, auc.encoder_b, strict=True))
    assert pairs == [("dinov3-vitb16", "dinov3-vits16"), ("dinov3-vitl16", "dinov3-vitb16")]
    assert (auc.test == "delong").all() and (auc.verdict == "better").all()
    first = auc.iloc[0]
    assert first.p_value == pytest.approx(paired.delong(y == 1, better, weak).p_value)
    assert first.ci_low > 0 and (df.p_adjusted >= df.p_value - 1e-12).all()
    assert (df.step == "resolution").sum() == 0  # one resolution each


def test_resolution_steps_and_random_inits_kept_apart(scores):
    y, (weak, better, best) = scores
    preds = [
        _pred("dinov3-vits16", 448, better, y),
        _pred("dinov3-vits16", 112, weak, y),
        _pred("dinov3-vits16", 224, better, y),
        _pred("dinov3-vitb16", 224, best, y, ri=True),  # random init: not a size step
    ]
    df = steps(preds, preset_family)
    res = df[(df.step == "resolution") & (df.metric == "auroc")]
    assert list(zip(res.resolution_b, res.resolution, strict=True)) == [(112, 224), (224, 448)]
    assert res.verdict.iloc[0] == "better"
    same = res.iloc[1]  # identical predictions at 224 and 448: exactly no difference
    assert same.difference == 0 and same.verdict == "no evidence of a difference at 0.05"
    assert (df.step == "size").sum() == 0


def test_steps_on_other_units_are_named_not_compared(scores):
    y, (weak, better, _) = scores
    other = _pred("dinov3-vitb16", 224, better, y)
    other = Predictions(
        other.key, other.task, np.array([f"x{i}" for i in range(len(y))]), None, y, other.scores
    )
    df = steps([_pred("dinov3-vits16", 224, weak, y), other], preset_family)
    assert len(df) == 1 and df.verdict.iloc[0] == "not compared"
    assert "different test units" in df.reason.iloc[0]
    assert steps([], preset_family).empty
