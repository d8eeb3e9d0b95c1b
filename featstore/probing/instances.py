"""Neuron instances from boundary maps, and their scores (numpy, scipy, scikit-image;
no torch).

For a dataset with `instances:` (settings.Instances) the stored mask's class 1 is the
neurons' boundary (the membrane, or the boundaries between neuron ids), so the heads
are trained on boundaries as on any class. Both sides then become instances:

- the truth: the connected components of the non-boundary pixels of the stored mask
  (`truth_instances`; 0 marks the boundary, left out of every score, as the ISBI 2012
  and CREMI evaluations leave out the membrane);
- a prediction: the head's boundary probability (n, H, W) turned into instances by the
  dataset's rule (`predicted_instances`): `components` labels the connected components
  of the pixels below the threshold, its boundary pixels all 0 (scored as one more
  segment, so a thick predicted boundary costs merges); `watershed` grows those
  components over the probability map (`skimage.segmentation.watershed`), so every
  pixel belongs to a neuron.

Components are 4-connected within a section and never join across sections
(`SECTION`), for the truth and the prediction alike: EM is anisotropic, and in 3D the
interiors of neighbouring sections overlap, so 6-connected components of ISBI 2012's
six test sections make one neuron of 99.999% of the interior (measured), and every
prediction that merges everything scores near 0. A 2D dataset is scored per image, a
3D one per re-stacked volume, over the volume's per-section instances (linking a
neuron across sections is not scored). The scores are scikit-image's: the variation
of information split into its two conditional entropies (`variation_of_information`,
in bits: voi_split = H(prediction | truth), the false splits; voi_merge = H(truth |
prediction), the false merges) and the adapted Rand error (`adapted_rand_error`,
1 - the Rand F-score), all lower-is-better.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

from featstore.data.settings import Instances
from featstore.probing import bootstrap

# The rows of one unit's `instance_scores`; the scorer adds `voi` (split + merge).
INSTANCE_METRICS = ("voi_split", "voi_merge", "arand")
SCORED = ("voi_split", "voi_merge", "voi", "arand")  # the result rows' metrics
BOUNDARY = 1  # the class of an instance dataset's mask that separates neurons
# `scipy.ndimage.label`'s structure for (n, H, W) units: 4-connected in-plane, no link
# between sections (so each section's components get their own ids)
SECTION = np.zeros((3, 3, 3), bool)
SECTION[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]


def truth_instances(mask: np.ndarray) -> np.ndarray:
    """The neurons of one unit's stored mask: (n, H, W) uint8 class ids -> (n, H, W)
    int32 instance ids (1, 2, ...), 0 on the boundary class."""
    from scipy import ndimage

    labels, _ = ndimage.label(np.asarray(mask) != BOUNDARY, structure=SECTION)
    return labels.astype(np.int32)


def predicted_instances(prob: np.ndarray, rule: Instances) -> np.ndarray:
    """One unit's boundary probability (n, H, W) float -> (n, H, W) int32 instance ids
    by `rule` (module docstring), section by section: `components` leaves 0 on the
    predicted boundary (probability >= threshold); `watershed` labels every pixel of
    a section with seeds (one without any stays 0)."""
    from scipy import ndimage

    seeds, _ = ndimage.label(np.asarray(prob) < rule.threshold, structure=SECTION)
    seeds = seeds.astype(np.int32)
    if rule.rule == "components":
        return seeds
    from skimage.segmentation import watershed

    out = np.zeros_like(seeds)
    for z, (p, s) in enumerate(zip(prob, seeds, strict=True)):  # section by section
        out[z] = watershed(p, markers=s) if s.any() else 0
    return out


def instance_scores(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """`INSTANCE_METRICS` (3,) float64 of one unit: voi_split, voi_merge, arand.

    pred, truth: (n, H, W) int instance ids of the same shape; truth's 0 (the
    boundary) is left out of every score (`ignore_labels=(0,)`), pred's 0 counts as a
    segment. NaN where the truth holds no neuron pixel (nothing to score).
    """
    from skimage.metrics import adapted_rand_error, variation_of_information

    if not (truth != 0).any():
        return np.full(len(INSTANCE_METRICS), np.nan)
    with np.errstate(all="ignore"):  # one pixel: 0/0, NaN
        split, merge = variation_of_information(truth, pred, ignore_labels=(0,))
        arand, _, _ = adapted_rand_error(truth, pred, ignore_labels=(0,))
    return np.array([split, merge, arand], np.float64)


def unit_scores(prob: np.ndarray, mask: np.ndarray, rule: Instances) -> np.ndarray:
    """`instance_scores` of one unit from its predicted boundary probability and its
    stored mask, both (n, H, W)."""
    return instance_scores(predicted_instances(prob, rule), truth_instances(mask))


def instance_scorer(per: np.ndarray) -> Callable[[np.ndarray], dict[str, float]]:
    """The mean of each of `SCORED` over any resample of the units (NaN units left
    out). per: (V, 3) `instance_scores` of each unit."""

    def scores(i: np.ndarray) -> dict[str, float]:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample of NaN units only
            split, merge, arand = (float(np.nanmean(per[i, j])) for j in range(3))
        return {"voi_split": split, "voi_merge": merge, "voi": split + merge, "arand": arand}

    return scores


def instance_draws(per: np.ndarray, seed: int, groups: np.ndarray | None = None) -> bootstrap.Draws:
    """`instance_scorer`'s bootstrap draws over the units (`bootstrap.draws`; of whole
    patients where `groups` names each unit's)."""
    return bootstrap.draws(instance_scorer(per), len(per), seed, groups)
