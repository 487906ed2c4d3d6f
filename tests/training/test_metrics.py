"""Confusion-matrix scores by hand on a 3x3 example, threshold sweep, batch confusion."""

import json
import math

import numpy as np
import pytest

from res_unet.training import metrics
from res_unet.training.metrics import (
    ThresholdSweep,
    confusion_matrix,
    optimal_threshold,
    scores_from_confusion,
    threshold_counts,
)

TRUTH = np.array([[0, 0, 1], [1, 2, 2], [2, 2, 0]])
PRED = np.array([[0, 1, 1], [1, 2, 0], [2, 2, 0]])
# rows = truth, columns = prediction
CM = np.array([[2, 1, 0], [0, 2, 0], [1, 0, 3]])


def test_confusion_matrix_by_hand():
    cm = confusion_matrix(TRUTH, PRED, 3)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, CM)


def test_confusion_matrix_is_additive_and_skips_the_ignore_class():
    rng = np.random.default_rng(0)
    a_true, a_pred, b_true, b_pred = rng.integers(0, 4, size=(4, 5, 7))
    joint = confusion_matrix(np.stack([a_true, b_true]), np.stack([a_pred, b_pred]), 4)
    np.testing.assert_array_equal(
        confusion_matrix(a_true, a_pred, 4) + confusion_matrix(b_true, b_pred, 4), joint)
    np.testing.assert_array_equal(confusion_matrix(TRUTH, PRED, 3, ignore_class=2),
                                  [[2, 1, 0], [0, 2, 0], [0, 0, 0]])


def test_confusion_matrix_rejects_out_of_range_classes():
    with pytest.raises(ValueError, match=r"outside 0\.\.2"):
        confusion_matrix(TRUTH, PRED + 1, 3)


def test_scores_by_hand():
    s = scores_from_confusion(CM)
    # diag [2, 2, 3], rows [3, 2, 4], columns [3, 3, 3], 9 pixels
    iou = [2 / 4, 2 / 3, 3 / 4]
    assert s["iou"] == pytest.approx(iou)
    assert s["mean_iou"] == pytest.approx(np.mean(iou))
    assert s["dice"] == pytest.approx([4 / 6, 4 / 5, 6 / 7])
    assert s["mean_dice"] == pytest.approx(np.mean([4 / 6, 4 / 5, 6 / 7]))
    assert s["precision"] == pytest.approx([2 / 3, 2 / 3, 1.0])
    assert s["recall"] == pytest.approx([2 / 3, 1.0, 3 / 4])
    assert s["pixel_accuracy"] == pytest.approx(7 / 9)
    assert s["frequency_weighted_iou"] == pytest.approx((3 * 0.5 + 2 * 2 / 3 + 4 * 0.75) / 9)
    # expected agreement sum(row * col) / n^2 = 27 / 81
    assert s["kappa"] == pytest.approx((7 / 9 - 1 / 3) / (1 - 1 / 3))
    # Gorodkin: (c s - sum p t) / sqrt((s^2 - sum p^2)(s^2 - sum t^2))
    assert s["mcc"] == pytest.approx((7 * 9 - 27) / math.sqrt((81 - 27) * (81 - 29)))
    assert s["support"] == [3, 2, 4]
    assert s["n_pixels"] == 9
    assert s["confusion_matrix"] == CM.tolist()
    json.dumps(s, allow_nan=False)


def test_binary_scores_match_the_textbook_formulas():
    tn, fp, fn, tp = 50, 10, 5, 35
    s = scores_from_confusion(np.array([[tn, fp], [fn, tp]]))
    assert s["iou"][1] == pytest.approx(tp / (tp + fp + fn))
    assert s["dice"][1] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert s["mcc"] == pytest.approx(mcc)
    n = tn + fp + fn + tp
    po, pe = (tp + tn) / n, ((tp + fp) * (tp + fn) + (tn + fn) * (tn + fp)) / n**2
    assert s["kappa"] == pytest.approx((po - pe) / (1 - pe))


def test_absent_class_is_none_and_left_out_of_the_means():
    cm4 = np.zeros((4, 4), np.int64)
    cm4[:3, :3] = CM
    s = scores_from_confusion(cm4)
    assert s["iou"][3] is None and s["dice"][3] is None
    assert s["precision"][3] is None and s["recall"][3] is None
    assert s["mean_iou"] == pytest.approx(scores_from_confusion(CM)["mean_iou"])
    json.dumps(s, allow_nan=False)


def test_ignore_class_scores():
    s = scores_from_confusion(CM, ignore_class=2)
    # the ignore row is dropped: [[2, 1, 0], [0, 2, 0], [0, 0, 0]]
    assert s["iou"] == pytest.approx([2 / 3, 2 / 3, None])
    assert s["mean_iou"] == pytest.approx(2 / 3)
    assert s["pixel_accuracy"] == pytest.approx(4 / 5)
    assert s["n_pixels"] == 5


def test_empty_confusion_matrix_is_json_ready():
    s = scores_from_confusion(np.zeros((2, 2), np.int64))
    assert s["mean_iou"] is None and s["pixel_accuracy"] is None and s["kappa"] is None
    assert s["mcc"] is None
    # One class only: defined (pixels were scored) but without correlation.
    assert scores_from_confusion(np.array([[5, 0], [0, 0]]))["mcc"] == 0.0
    json.dumps(s, allow_nan=False)


def test_optimal_threshold_finds_the_separating_threshold():
    rng = np.random.default_rng(1)
    truth = np.repeat([0, 1], 500)
    prob = np.concatenate([rng.uniform(0.02, 0.58, 500), rng.uniform(0.62, 0.98, 500)])
    prob[0], prob[-1] = 0.58, 0.62  # 0.55 lets a negative through, 0.65 loses a positive
    best, ious = optimal_threshold(truth, prob)
    assert best == pytest.approx(0.6)
    assert ious[11] == pytest.approx(1.0)
    assert ious[10] < 1 and ious[12] < 1
    assert len(ious) == 19


def test_threshold_sweep_matches_brute_force_and_counts_ties_as_foreground():
    rng = np.random.default_rng(2)
    truth = rng.integers(0, 2, size=(3, 20, 20))
    prob = np.clip(truth * 0.3 + rng.uniform(0, 0.7, size=truth.shape), 0, 1)
    prob[0, 0, :5] = 0.5  # exactly on a threshold: foreground, as in postprocess
    thresholds = np.linspace(0.05, 0.95, 19)
    _, ious = optimal_threshold(truth, prob, thresholds)
    counts = threshold_counts(truth, prob, thresholds)
    for t, iou, (tp, fp, fn, tn) in zip(thresholds, ious, counts, strict=True):
        pred = prob >= t
        fg = truth == 1
        assert (tp, fp, fn, tn) == ((pred & fg).sum(), (pred & ~fg).sum(), (~pred & fg).sum(),
                                    (~pred & ~fg).sum())
        assert iou == pytest.approx((pred & fg).sum() / (pred | fg).sum())
    halves = threshold_counts(truth[:1], prob[:1]) + threshold_counts(truth[1:], prob[1:])
    np.testing.assert_array_equal(halves, counts)


def test_threshold_sweep_accumulates_batches():
    rng = np.random.default_rng(4)
    truth = rng.integers(0, 2, size=(4, 10, 10))
    prob = np.clip(truth * 0.4 + rng.uniform(0, 0.6, size=truth.shape), 0, 1)
    sweep = ThresholdSweep()
    for i in range(4):
        sweep.update(truth[i], prob[i])
    best, curve = sweep.best()
    expected, ious = optimal_threshold(truth, prob)
    assert best == expected
    assert [c["iou"] for c in curve] == pytest.approx(list(ious))
    assert curve[11]["threshold"] == 0.6
    json.dumps(curve, allow_nan=False)
    np.testing.assert_array_equal(sweep.confusion_at(best),
                                  confusion_matrix(truth, prob >= best, 2))
    with pytest.raises(ValueError, match="not one of"):
        sweep.confusion_at(0.123)


def test_threshold_sweep_without_foreground_falls_back_to_half():
    best, ious = optimal_threshold(np.zeros(10), np.zeros(10))
    assert best == 0.5 and np.all(np.isnan(ious))


# Training (TensorFlow) -------------------------------------------------------------------

def test_batch_confusion_equals_numpy_on_random_multiclass_batches():
    rng = np.random.default_rng(3)
    n = 4
    labels = rng.integers(0, n, size=(2, 8, 8))
    prob = rng.dirichlet(np.ones(n), size=(2, 8, 8)).astype(np.float32)
    got = metrics.batch_confusion(np.eye(n, dtype=np.float32)[labels], prob, n,
                                  ignore_class=3)
    np.testing.assert_array_equal(np.asarray(got),
                                  confusion_matrix(labels, prob.argmax(-1), n, ignore_class=3))


def test_batch_confusion_binary_threshold_half():
    y = np.array([1, 1, 0, 0], np.float32).reshape(1, 2, 2, 1)
    p = np.array([0.7, 0.5, 0.2, 0.6], np.float32).reshape(1, 2, 2, 1)
    # predictions [1, 1, 0, 1] (0.5 counts as foreground): rows truth
    np.testing.assert_array_equal(np.asarray(metrics.batch_confusion(y, p, 2)),
                                  [[1, 1], [0, 2]])


def test_evaluation_scores_binary_and_multiclass():
    truth = np.array([0, 0, 1, 1])
    prob = np.array([0.1, 0.6, 0.7, 0.4])
    sweep = metrics.ThresholdSweep()
    sweep.update(truth, prob)
    cm = metrics.confusion_matrix(truth, (prob >= 0.5).astype(int), 2)
    out = metrics.evaluation_scores(cm, sweep)
    assert out["threshold"] == 0.5
    assert out["scores"]["iou"][1] == pytest.approx(1 / 3)
    # from 0.15 to 0.4, 0.4, 0.6 and 0.7 are water: IoU 2/3 beats 1/3 at 0.5; ties go to
    # the lowest threshold, and 0.1 < 0.15 stays land
    assert out["optimal_threshold"] == pytest.approx(0.15)
    assert out["scores_at_optimal_threshold"]["iou"][1] == pytest.approx(2 / 3)
    multi = metrics.evaluation_scores(np.eye(3, dtype=np.int64) * 5, None)
    assert multi["threshold"] is None and "optimal_threshold" not in multi
    assert multi["scores"]["mean_iou"] == 1.0
