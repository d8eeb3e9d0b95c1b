"""Preprocessing: intensity modes, resize, pad and masks against values computed by hand.

Every expected value is built here with numpy or PIL directly, never with the code
under test, so a wrong window, a per-slice mapping or a blended mask fails.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from featstore.data.settings import Intensity
from featstore.encode.preprocess import preprocess
from featstore.identity import Preprocess

# Deliberately not ImageNet's: distinct per channel so a swapped channel shows.
MEAN = (0.1, 0.2, 0.3)
STD = (0.5, 0.25, 2.0)


def _cfg(resolution: int, fit: str = "resize", **intensity) -> Preprocess:
    return Preprocess(resolution, Intensity(**intensity), MEAN, STD, fit)


def _normalised(unit: np.ndarray) -> np.ndarray:
    """(D, H, W) grey values in [0, 1] -> (D, 3, H, W) as the encoder expects them."""
    return np.stack([(unit - m) / s for m, s in zip(MEAN, STD, strict=True)], axis=1)


def _pil_resize(plane: np.ndarray, r: int) -> np.ndarray:
    img = Image.fromarray(plane.astype(np.float32))
    return np.asarray(img.resize((r, r), Image.Resampling.BILINEAR))


# ------------------------------------------------------------------ intensity


def test_minmax_is_one_mapping_per_volume():
    # Three slices with very different ranges; the volume spans [-50, 200].
    vol = np.stack(
        [
            np.linspace(0, 10, 16).reshape(4, 4),
            np.linspace(100, 200, 16).reshape(4, 4),
            np.linspace(-50, 50, 16).reshape(4, 4),
        ]
    )
    pixels, mask = preprocess(vol[..., None], None, _cfg(4, mode="minmax"))
    assert mask is None
    assert pixels.shape == (3, 3, 4, 4) and pixels.dtype == np.float32
    unit = (vol - (-50.0)) / (200.0 - (-50.0))
    np.testing.assert_allclose(pixels, _normalised(unit), atol=1e-5)
    # Slice 0 tops out at 10 -> 60/250, not at 1 as a per-slice mapping would give.
    assert pixels[0, 0].max() == pytest.approx((60 / 250 - MEAN[0]) / STD[0], abs=1e-5)
    assert pixels[1, 0].max() == pytest.approx((1 - MEAN[0]) / STD[0], abs=1e-5)
    assert pixels[2, 0].min() == pytest.approx((0 - MEAN[0]) / STD[0], abs=1e-5)


def test_window_maps_center_and_width_in_hu():
    # center 40, width 400: [-160, 240] HU -> [0, 1], clipped outside.
    row = np.array([-1000.0, -160.0, 40.0, 140.0, 240.0, 3000.0])
    hu = np.broadcast_to(row, (1, 6, 6))  # square at the resolution: no resize
    pixels, _ = preprocess(hu[..., None], None, _cfg(6, mode="window", center=40, width=400))
    unit = np.array([0.0, 0.0, 0.5, 0.75, 1.0, 1.0])
    expected = _normalised(np.broadcast_to(unit, (1, 6, 6)))
    np.testing.assert_allclose(pixels, expected, atol=1e-5)


def test_window_is_fixed_not_data_driven():
    # The same HU value means the same pixel whatever else is in the volume.
    a = np.full((1, 4, 4, 1), 40.0)
    b = a.copy()
    b[0, 0, 0] = 5000.0
    cfg = _cfg(4, mode="window", center=40, width=400)
    pa, _ = preprocess(a, None, cfg)
    pb, _ = preprocess(b, None, cfg)
    assert pa[0, :, 1, 1] == pytest.approx(pb[0, :, 1, 1])
    assert pa[0, 0, 1, 1] == pytest.approx((0.5 - MEAN[0]) / STD[0], abs=1e-6)


def test_percentile_clips_to_volume_percentiles():
    rng = np.random.default_rng(0)
    vol = rng.normal(100, 30, (3, 8, 8))
    vol[1] += 200  # slices differ, so per-slice percentiles would differ
    lo, hi = np.percentile(vol, [10, 90])
    cfg = _cfg(8, mode="percentile", low=10, high=90)
    pixels, _ = preprocess(vol[..., None], None, cfg)
    unit = np.clip((vol - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(pixels, _normalised(unit), atol=1e-5)
    # About 10% of the voxels sit at each end after clipping.
    assert 0.05 < (unit == 0).mean() < 0.15 and 0.05 < (unit == 1).mean() < 0.15


def test_none_only_clips_to_unit_range():
    vals = np.array([-0.5, 0.0, 0.3, 0.7, 1.0, 2.5])
    img = np.broadcast_to(vals, (6, 6))[None, ..., None]
    pixels, _ = preprocess(img, None, _cfg(6, mode="none"))
    clipped = np.array([0.0, 0.0, 0.3, 0.7, 1.0, 1.0])  # 0.3 stays 0.3: no rescaling
    expected = _normalised(np.broadcast_to(clipped, (1, 6, 6)))
    np.testing.assert_allclose(pixels, expected, atol=1e-6)


@pytest.mark.parametrize("mode", ["minmax", "percentile"])
def test_constant_image_gives_no_nan(mode):
    pixels, _ = preprocess(np.full((2, 5, 7, 1), 7.0), None, _cfg(8, mode=mode))
    assert np.isfinite(pixels).all()
    np.testing.assert_allclose(pixels, _normalised(np.zeros((2, 8, 8))), atol=1e-6)


# ------------------------------------------------------------------ resize


@pytest.mark.parametrize("r", [8, 24])  # shrink (antialiased) and enlarge
def test_grey_resize_matches_pil_bilinear_on_three_channels(r):
    img = np.random.default_rng(1).uniform(0, 1000, (2, 11, 15))
    pixels, _ = preprocess(img[..., None], None, _cfg(r, mode="minmax"))
    unit = (img - img.min()) / (img.max() - img.min())
    resized = np.stack([_pil_resize(plane, r) for plane in unit])
    assert pixels.shape == (2, 3, r, r)
    np.testing.assert_allclose(pixels, _normalised(resized), atol=1e-5)
    # Grey is replicated: undoing each channel's mean/std gives the same plane.
    planes = [pixels[:, c] * s + m for c, (m, s) in enumerate(zip(MEAN, STD, strict=True))]
    np.testing.assert_allclose(planes[0], planes[1], atol=1e-5)
    np.testing.assert_allclose(planes[0], planes[2], atol=1e-5)


def test_rgb_resize_keeps_each_channel():
    rng = np.random.default_rng(2)
    rgb = np.stack(
        [rng.uniform(0, 50, (9, 12)), rng.uniform(100, 200, (9, 12)), np.zeros((9, 12))], -1
    )
    pixels, _ = preprocess(rgb[None], None, _cfg(16, mode="minmax"))
    unit = (rgb - rgb.min()) / (rgb.max() - rgb.min())  # one mapping across channels
    for c in range(3):
        expected = (_pil_resize(unit[..., c], 16) - MEAN[c]) / STD[c]
        np.testing.assert_allclose(pixels[0, c], expected, atol=1e-5)
    # The blue channel is all zero, the green one all bright: nothing was mixed.
    assert np.allclose(pixels[0, 2], (0 - MEAN[2]) / STD[2], atol=1e-6)
    assert (pixels[0, 1] * STD[1] + MEAN[1]).min() > 0.4


# ------------------------------------------------------------------ pad


def test_pad_centres_small_image_on_zero_canvas():
    img = np.arange(1, 16, dtype=float).reshape(1, 3, 5)  # values 1..15
    mask = np.array([[[1, 0, 2, 0, 1]] * 3], np.uint8)
    pixels, small = preprocess(img[..., None], mask, _cfg(8, fit="pad", mode="minmax"))
    # top = (8 - 3) // 2 = 2, left = (8 - 5) // 2 = 1
    unit = np.zeros((1, 8, 8))
    unit[0, 2:5, 1:6] = (img[0] - 1) / 14
    np.testing.assert_allclose(pixels, _normalised(unit), atol=1e-6)
    for c in range(3):
        assert pixels[0, c, 0, 0] == pytest.approx((0 - MEAN[c]) / STD[c])  # canvas
        assert pixels[0, c, 4, 5] == pytest.approx((1 - MEAN[c]) / STD[c])  # value 15
    expected_mask = np.zeros((1, 8, 8), np.uint8)
    expected_mask[0, 2:5, 1:6] = mask[0]
    assert small.dtype == np.uint8 and np.array_equal(small, expected_mask)


def test_pad_resizes_images_larger_than_the_canvas():
    img = np.random.default_rng(3).uniform(0, 1, (1, 20, 20, 1))
    padded, _ = preprocess(img, None, _cfg(8, fit="pad", mode="none"))
    resized, _ = preprocess(img, None, _cfg(8, fit="resize", mode="none"))
    np.testing.assert_array_equal(padded, resized)


# ------------------------------------------------------------------ masks


def test_mask_upsampling_is_nearest_blocks():
    img = np.zeros((1, 2, 2, 1))
    mask = np.array([[[1, 2], [3, 4]]], np.uint8)
    _, small = preprocess(img, mask, _cfg(4, mode="minmax"))
    expected = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]], np.uint8)
    assert small.shape == (1, 4, 4) and small.dtype == np.uint8
    assert np.array_equal(small[0], expected)


@pytest.mark.parametrize("r", [6, 23])
def test_mask_class_ids_are_never_blended(r):
    rng = np.random.default_rng(4)
    mask = rng.choice(np.array([0, 3, 7, 255], np.uint8), size=(2, 10, 13))
    img = rng.uniform(0, 1, (2, 10, 13, 1))
    _, small = preprocess(img, mask, _cfg(r, mode="minmax"))
    assert small.shape == (2, r, r) and small.dtype == np.uint8
    assert set(np.unique(small)) <= {0, 3, 7, 255}
    if r > 13:  # enlarging keeps every class present
        assert set(np.unique(small)) == set(np.unique(mask))
