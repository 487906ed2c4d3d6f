"""Tests for res_unet.inference.postprocess: hand-made label maps,
small deterministic CRF scenes."""

from __future__ import annotations

import numpy as np
import pytest

from res_unet.config.keys import Config
from res_unet.data.report import to_display_rgb
from res_unet.geo.tiling import downsample_image, upsample_rows
from res_unet.inference import postprocess as pp


def _iou(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(((pred == 1) & (truth == 1)).sum() / ((pred == 1) | (truth == 1)).sum())


def _two_region_scene(dtype=np.uint8, bands: int = 3):
    """A 48 x 64 scene: a bright disk (truth 1) on a dark field, and noisy probabilities."""
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[:48, :64]
    truth = (((rows - 24) ** 2 + (cols - 30) ** 2) < 15**2).astype(np.uint8)
    fg = np.array([200, 70, 40, 180, 90, 120][:bands])
    bg = np.array([30, 120, 60, 20, 40, 10][:bands])
    image = np.where(truth[..., None] == 1, fg, bg)
    if dtype == np.uint16:
        image = image * 13 + 1000  # raw uint16 reflectances, far from 0-255
    image = image.astype(dtype)
    noisy = np.where(truth == 1, 0.6, 0.4) + rng.normal(0.0, 0.25, truth.shape)
    prob = np.clip(noisy, 0.01, 0.99).astype(np.float32)[..., None]
    return image, prob, truth


def _majority_reference(label: np.ndarray, radius: int) -> np.ndarray:
    """Brute-force majority over a disk of in-image pixels; ties keep the pixel's class if
    tied, else go to the lowest tied class."""
    h, w = label.shape
    out = np.empty_like(label)
    for r in range(h):
        for c in range(w):
            votes: dict[int, int] = {}
            for dr in range(-radius, radius + 1):
                for dc in range(-radius, radius + 1):
                    rr, cc = r + dr, c + dc
                    if dr * dr + dc * dc <= radius * radius and 0 <= rr < h and 0 <= cc < w:
                        votes[int(label[rr, cc])] = votes.get(int(label[rr, cc]), 0) + 1
            best = max(votes.values())
            tied = [k for k, v in votes.items() if v == best]
            out[r, c] = label[r, c] if label[r, c] in tied else min(tied)
    return out


# Probabilities -> labels -------------------------------------------------------------------

def test_to_two_class_and_probs_to_label():
    prob = np.array([[[0.2], [0.5]], [[0.49], [1.0]]], np.float32)
    two = pp.to_two_class(prob)
    assert two.shape == (2, 2, 2) and two.dtype == np.float32
    np.testing.assert_allclose(two[..., 0], 1 - prob[..., 0])
    np.testing.assert_allclose(two[..., 1], prob[..., 0])
    label = pp.probs_to_label(prob)
    assert label.dtype == np.uint8
    np.testing.assert_array_equal(label, [[0, 1], [0, 1]])  # p >= threshold is foreground
    np.testing.assert_array_equal(pp.probs_to_label(prob, 0.3), [[0, 1], [1, 1]])
    multi = np.array([[[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]]], np.float32)
    np.testing.assert_array_equal(pp.probs_to_label(multi, 0.99), [[1, 0]])


def test_otsu_threshold_lies_between_modes():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(0.2, 0.08, 600), rng.normal(0.75, 0.08, 400)])
    prob = np.clip(values, 0, 1).astype(np.float32).reshape(25, 40, 1)
    t = pp.otsu_threshold(prob)
    assert 0.35 < t < 0.6
    assert abs(pp.probs_to_label(prob, t).mean() - 0.4) < 0.02
    assert pp.otsu_threshold(np.full((4, 4, 1), 0.3, np.float32)) == 0.5
    with pytest.raises(ValueError):
        pp.otsu_threshold(np.full((4, 4, 3), 0.3, np.float32))


def test_resolve_threshold_prefers_config_then_fallback():
    prob = np.zeros((2, 2, 1), np.float32)
    prob[0] = 1.0
    assert pp.resolve_threshold(prob, 0.7, 0.3) == 0.7
    assert pp.resolve_threshold(prob, None, 0.3) == 0.3
    assert pp.resolve_threshold(prob, None, None) == 0.5
    assert 0.0 <= pp.resolve_threshold(prob, "otsu", 0.3) < 1.0


# Dense CRF --------------------------------------------------------------------------------

def test_crf_grid_factor():
    assert pp.crf_grid_factor(4096, 3607, 4_000_000) == 2
    assert pp.crf_grid_factor(100, 100, 10_000) == 1
    assert pp.crf_grid_factor(101, 100, 10_000) == 2
    assert pp.crf_grid_factor(48, 64, 500) == 3


def test_crf_binary_improves_agreement_with_truth():
    image, prob, truth = _two_region_scene()
    refined = pp.crf_refine(prob, image, iterations=5)
    assert refined.shape == (48, 64, 1) and refined.dtype == np.float32
    assert refined.min() >= 0.0 and refined.max() <= 1.0
    before = _iou(pp.probs_to_label(prob), truth)
    after = _iou(pp.probs_to_label(refined), truth)
    assert before < 0.85 and after > 0.95 and after > before


def test_crf_multiclass_returns_distribution_and_improves_accuracy():
    rng = np.random.default_rng(2)
    truth = np.zeros((40, 60), np.uint8)
    truth[:, 20:40] = 1
    truth[:, 40:] = 2
    colours = np.array([[30, 120, 60], [200, 70, 40], [60, 60, 220]], np.uint8)
    image = colours[truth]
    prob = np.eye(3, dtype=np.float32)[truth] * 0.3 + 0.7 / 3 + rng.normal(0, 0.15, (40, 60, 3))
    prob = np.clip(prob, 0.01, None).astype(np.float32)
    prob /= prob.sum(axis=-1, keepdims=True)
    refined = pp.crf_refine(prob, image, iterations=5)
    assert refined.shape == (40, 60, 3) and refined.dtype == np.float32
    np.testing.assert_allclose(refined.sum(axis=-1), 1.0, atol=1e-4)
    before = (pp.probs_to_label(prob) == truth).mean()
    after = (pp.probs_to_label(refined) == truth).mean()
    assert after > before and after > 0.97


def test_crf_large_input_uses_coarse_grid_and_keeps_shape():
    image, prob, truth = _two_region_scene()
    refined = pp.crf_refine(prob, image, iterations=5, max_pixels=500)  # factor 3
    assert refined.shape == prob.shape and refined.dtype == np.float32
    assert refined.min() >= 0.0 and refined.max() <= 1.0
    assert not np.allclose(refined, pp.crf_refine(prob, image, iterations=5))
    assert _iou(pp.probs_to_label(refined), truth) > _iou(pp.probs_to_label(prob), truth) + 0.1


def test_crf_coarse_grid_is_the_downsample_grid(monkeypatch):
    # The CRF's coarse grid is DOWNSAMPLE's block means, and its up-sampling has the same
    # geometry as DOWNSAMPLE's (it rounds apart in float32's last digits only).
    image, prob, _ = _two_region_scene()
    seen = {}
    real = pp._dense_crf

    def spy(p, rgb, *args):
        seen["p"], seen["rgb"] = p.copy(), rgb.copy()
        return real(p, rgb, *args)

    monkeypatch.setattr(pp, "_dense_crf", spy)
    pp.crf_refine(prob, image, iterations=2, max_pixels=500)  # factor 3
    np.testing.assert_array_equal(seen["p"], downsample_image(pp.to_two_class(prob), 3))
    np.testing.assert_array_equal(seen["rgb"], downsample_image(to_display_rgb(image), 3))
    assert seen["rgb"].dtype == np.uint8 and seen["p"].shape == (16, 22, 2)
    small = np.random.default_rng(0).standard_normal((16, 22, 2)).astype(np.float32)
    np.testing.assert_allclose(pp._upsample_bilinear(small, 3, (48, 64)),
                               upsample_rows(small, 3, (48, 64)), rtol=0, atol=1e-6)


def test_crf_accepts_uint16_six_band_image():
    image, prob, truth = _two_region_scene(np.uint16, bands=6)
    refined = pp.crf_refine(prob, image, iterations=5)
    assert refined.shape == (48, 64, 1)
    assert _iou(pp.probs_to_label(refined), truth) > 0.95


def test_crf_rejects_mismatched_image():
    _, prob, _ = _two_region_scene()
    with pytest.raises(ValueError):
        pp.crf_refine(prob, np.zeros((10, 10, 3), np.uint8))


# Label clean-up ---------------------------------------------------------------------------

def test_median_filter_removes_salt_and_fills_pepper():
    label = np.zeros((12, 12), np.uint8)
    label[4:10, 4:10] = 1
    label[6, 6] = 0  # pepper inside the block
    label[1, 1] = label[1, 10] = label[10, 2] = 1  # salt
    out = pp.median_filter(label, 2)
    assert out.shape == label.shape and out.dtype == np.uint8
    assert out[1, 1] == out[1, 10] == out[10, 2] == 0
    assert out[6, 6] == 1 and out[7, 7] == 1
    np.testing.assert_array_equal(out, _majority_reference(label, 2))


@pytest.mark.parametrize("radius", [0, 1])
def test_median_filter_radius_up_to_one_is_a_no_op(radius):
    label = np.random.default_rng(3).integers(0, 2, (9, 9)).astype(np.uint8)
    np.testing.assert_array_equal(pp.median_filter(label, radius), label)


def test_multiclass_majority_filter_is_not_a_median_of_indices():
    label = np.full((5, 5), 7, np.uint8)
    for r, c in [(2, 2), (1, 2), (3, 2), (2, 1), (2, 3)]:
        label[r, c] = 0  # 5 votes
    for r, c in [(1, 1), (1, 3), (3, 1), (3, 3)]:
        label[r, c] = 1  # 4 votes
    for r, c in [(0, 2), (4, 2), (2, 0), (2, 4)]:
        label[r, c] = 2  # 4 votes: the median of the 13 indices would be 1
    out = pp.median_filter(label, 2)
    assert out[2, 2] == 0
    np.testing.assert_array_equal(out, _majority_reference(label, 2))
    checker = np.array([[0, 1], [1, 0]], np.uint8)  # 2 votes each: every pixel keeps its class
    np.testing.assert_array_equal(pp.median_filter(checker, 2), checker)
    row = np.array([[0, 0, 2, 1, 1]], np.uint8)  # centre: 0 and 1 tie above its own class 2
    assert pp.median_filter(row, 2)[0, 2] == 0


def test_opening_removes_speck_and_rectangle_corners():
    label = np.zeros((8, 8), np.uint8)
    label[1:5, 1:6] = 1
    label[6, 6] = 1
    expected = label.copy()
    expected[6, 6] = 0
    expected[1, 1] = expected[1, 5] = expected[4, 1] = expected[4, 5] = 0
    out = pp.morphological_open(label, 1)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(pp.morphological_open(label, 0), label)


def test_closing_fills_one_pixel_gap():
    label = np.zeros((9, 11), np.uint8)
    label[2:7, 1:10] = 1
    label[2:7, 5] = 0  # a 1-px gap cutting the bar in two
    expected = label.copy()
    expected[3:6, 5] = 1  # the gap's ends stay open: they are notches, not gap
    np.testing.assert_array_equal(pp.morphological_close(label, 1), expected)
    np.testing.assert_array_equal(pp.morphological_close(label, 0), label)


def test_multiclass_opening_gives_removed_speck_the_nearest_class():
    label = np.full((9, 9), 2, np.uint8)
    label[:, :3] = 0
    label[4, 7] = 1
    expected = label.copy()
    expected[4, 7] = 2
    np.testing.assert_array_equal(pp.morphological_open(label, 1, n_classes=3), expected)


def test_multiclass_closing_fills_gap_with_the_claiming_class():
    label = np.full((9, 11), 2, np.uint8)
    label[2:7, 1:10] = 1
    label[2:7, 5] = 0
    expected = label.copy()
    expected[3:6, 5] = 1
    # Closing class 2, which surrounds the bars, rounds their four outer corners.
    expected[2, 1] = expected[6, 1] = expected[2, 9] = expected[6, 9] = 2
    np.testing.assert_array_equal(pp.morphological_close(label, 1, n_classes=3), expected)


def test_remove_small_objects_binary_exact():
    label = np.zeros((6, 6), np.uint8)
    label[0, 0] = 1  # area 1
    label[0, 3:5] = 1  # area 2
    label[3:5, 3:5] = 1  # area 4
    label[5, 0] = label[4, 1] = 1  # diagonal: two 1-px objects under 4-connectivity
    expected = np.zeros_like(label)
    expected[3:5, 3:5] = 1
    np.testing.assert_array_equal(pp.remove_small_objects(label, 3), expected)
    expected[0, 3:5] = 1
    np.testing.assert_array_equal(pp.remove_small_objects(label, 2), expected)
    np.testing.assert_array_equal(pp.remove_small_objects(label, 0), label)


def test_fill_small_holes_binary_exact():
    label = np.zeros((7, 12), np.uint8)
    label[1:6, 1:6] = 1
    label[3, 3] = 0  # hole of 1 px
    label[1:6, 6:11] = 1
    label[2:4, 7:9] = 0  # hole of 4 px
    expected = label.copy()
    expected[3, 3] = 1
    np.testing.assert_array_equal(pp.fill_small_holes(label, 4), expected)
    expected[2:4, 7:9] = 1
    np.testing.assert_array_equal(pp.fill_small_holes(label, 5)[1:6, 1:11], expected[1:6, 1:11])


def test_multiclass_small_objects_join_majority_neighbour():
    label = np.zeros((4, 4), np.uint8)
    label[2:, :] = 1
    label[1, 1] = 2  # 3 edges to class 0, 1 edge to class 1
    label[2, 2] = 2  # 1 edge to class 0, 3 edges to class 1
    expected = label.copy()
    expected[1, 1] = 0
    expected[2, 2] = 1
    np.testing.assert_array_equal(pp.remove_small_objects(label, 2, n_classes=3), expected)


def test_multiclass_nested_small_objects_end_in_the_surrounding_class():
    label = np.zeros((7, 7), np.uint8)
    label[2:5, 2:5] = 1
    label[3, 3] = 2
    out = pp.remove_small_objects(label, 10, n_classes=3)
    np.testing.assert_array_equal(out, np.zeros_like(label))
    # Two equal small neighbours must not swap forever.
    np.testing.assert_array_equal(pp.remove_small_objects(np.array([[1, 2]], np.uint8), 5, 3),
                                  [[2, 2]])


def test_multiclass_fill_small_holes_only_enclosed():
    label = np.zeros((6, 8), np.uint8)
    label[1:5, 1:5] = 1
    label[2, 2] = 2  # enclosed by class 1: a hole
    label[4, 5] = 2  # touches classes 0 and 1: not a hole
    expected = label.copy()
    expected[2, 2] = 1
    np.testing.assert_array_equal(pp.fill_small_holes(label, 2, n_classes=3), expected)


@pytest.mark.parametrize("n_classes", [2, 4])
def test_cleanup_keeps_shape_dtype_and_class_set(n_classes):
    rng = np.random.default_rng(4)
    coarse = rng.integers(0, n_classes, (6, 8)).astype(np.uint8)
    label = np.kron(coarse, np.ones((5, 5), np.uint8))
    label[rng.random(label.shape) < 0.05] = n_classes - 1
    steps = [lambda x: pp.median_filter(x, 2),
             lambda x: pp.morphological_open(x, 1, n_classes),
             lambda x: pp.morphological_close(x, 2, n_classes),
             lambda x: pp.remove_small_objects(x, 12, n_classes),
             lambda x: pp.fill_small_holes(x, 12, n_classes)]
    for step in steps:
        out = step(label)
        assert out.shape == label.shape and out.dtype == np.uint8
        assert set(np.unique(out)) <= set(range(n_classes))
        assert not np.shares_memory(out, label)


# The chain --------------------------------------------------------------------------------

def test_postprocess_all_off_is_plain_thresholding():
    image, prob, _ = _two_region_scene()
    cfg = Config()
    np.testing.assert_array_equal(pp.postprocess(prob, image, cfg), pp.probs_to_label(prob))
    np.testing.assert_array_equal(pp.postprocess(prob, None, cfg, threshold=0.3),
                                  pp.probs_to_label(prob, 0.3))
    cfg.THRESHOLD = 0.7
    np.testing.assert_array_equal(pp.postprocess(prob, None, cfg, threshold=0.3),
                                  pp.probs_to_label(prob, 0.7))
    multi = np.random.default_rng(5).random((8, 9, 3)).astype(np.float32)
    np.testing.assert_array_equal(pp.postprocess(multi, None, Config(NCLASSES=3)),
                                  pp.probs_to_label(multi))


@pytest.mark.parametrize("channels", [1, 3])
def test_postprocess_runs_steps_in_documented_order(channels):
    image, prob, _ = _two_region_scene()
    if channels == 3:
        prob = np.concatenate([1 - prob, prob * 0.6, prob * 0.4], axis=-1)
    cfg = Config(NCLASSES=channels, DO_CRF_REFINE=True, CRF_ITERATIONS=3,
                 MEDIAN_FILTER_VALUE=2, OPENING_RADIUS=1, CLOSING_RADIUS=2,
                 MIN_OBJECT_AREA=20, MIN_HOLE_AREA=20, THRESHOLD="otsu")
    n = 2 if channels == 1 else channels
    refined = pp.crf_refine(prob, image, iterations=3)
    label = pp.probs_to_label(refined, pp.otsu_threshold(refined) if channels == 1 else 0.5)
    label = pp.median_filter(label, 2)
    label = pp.morphological_open(label, 1, n)
    label = pp.morphological_close(label, 2, n)
    label = pp.remove_small_objects(label, 20, n)
    label = pp.fill_small_holes(label, 20, n)
    out = pp.postprocess(prob, image, cfg)
    assert out.dtype == np.uint8 and out.shape == prob.shape[:2]
    np.testing.assert_array_equal(out, label)
    with pytest.raises(ValueError):
        pp.postprocess(prob, None, cfg)


def test_binary_opening_and_closing_properties():
    rng = np.random.default_rng(6)
    label = (rng.random((30, 30)) < 0.5).astype(np.uint8)
    opened = pp.morphological_open(label, 2)
    closed = pp.morphological_close(label, 2)
    assert np.all(opened <= label) and np.all(closed >= label)
    np.testing.assert_array_equal(pp.morphological_open(opened, 2), opened)
    np.testing.assert_array_equal(pp.morphological_close(closed, 2), closed)
    full = np.ones((5, 5), np.uint8)  # the border neither erodes nor dilates
    np.testing.assert_array_equal(pp.morphological_open(full, 2), full)
    np.testing.assert_array_equal(pp.morphological_close(1 - full, 2), 1 - full)
