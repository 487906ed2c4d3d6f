"""Segmentation scores: numpy evaluation from confusion matrices, and per-batch confusion
matrices in TensorFlow ops for the training loop.

The confusion matrix is the one summary everything is derived from. It is additive, so an
evaluation over a whole validation set sums per-batch matrices and scores once at the end.
Rows are true classes, columns predicted classes. Pixels whose true class is the ignore
class are not counted; predicting the ignore class on a counted pixel is an error.

Binary models (NCLASSES=1) are scored as two classes (0 background, 1 foreground): a pixel
is foreground when its probability is >= threshold (0.5 while training), as in
postprocess.probs_to_label.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

DEFAULT_THRESHOLDS = np.linspace(0.05, 0.95, 19)


# Numpy evaluation -------------------------------------------------------------------------

def confusion_matrix(y_true_idx: np.ndarray, y_pred_idx: np.ndarray, n_classes: int,
                     ignore_class: int | None = None) -> np.ndarray:
    """Count (true class, predicted class) pairs.

    y_true_idx, y_pred_idx: integer class indices 0..n_classes-1, any equal shapes. Pixels
    whose true class is ignore_class are skipped. Returns an (n_classes, n_classes) int64
    matrix, rows = truth, columns = prediction.
    """
    truth = np.asarray(y_true_idx).ravel().astype(np.int64)
    pred = np.asarray(y_pred_idx).ravel().astype(np.int64)
    if truth.shape != pred.shape:
        raise ValueError(f"truth has {truth.size} pixels but prediction {pred.size}")
    if ignore_class is not None:
        keep = truth != ignore_class
        truth, pred = truth[keep], pred[keep]
    for name, values in (("truth", truth), ("prediction", pred)):
        if values.size and (values.min() < 0 or values.max() >= n_classes):
            raise ValueError(f"{name} has class indices outside 0..{n_classes - 1}")
    counts = np.bincount(truth * n_classes + pred, minlength=n_classes * n_classes)
    return counts.reshape(n_classes, n_classes).astype(np.int64)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, NaN where den is 0."""
    num = np.asarray(num, np.float64)
    den = np.asarray(den, np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _json_value(x: Any) -> Any:
    """Plain Python float (None for NaN) or list of them."""
    if isinstance(x, np.ndarray):
        return [_json_value(v) for v in x.tolist()]
    if isinstance(x, list):
        return [_json_value(v) for v in x]
    value = float(x)
    return None if math.isnan(value) else value


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


def scores_from_confusion(cm: np.ndarray, ignore_class: int | None = None) -> dict[str, Any]:
    """Every score from a confusion matrix (rows truth, columns prediction), JSON-ready.

    Per class (lists, None where undefined): iou = diag / (row + col - diag), None when the
    class is absent from both truth and prediction; dice (= F1) = 2 diag / (row + col);
    precision = diag / col; recall = diag / row; support = row (true pixels). The ignore
    class's row is dropped (its pixels do not count) and its per-class scores are None; its
    column stays (predicting it on a counted pixel is an error).
    Overall: mean_iou and mean_dice (mean over classes with a defined value),
    frequency_weighted_iou (sum of iou weighted by each class's share of true pixels),
    pixel_accuracy, kappa (Cohen), mcc (multiclass Matthews correlation, Gorodkin 2004;
    0 when undefined over scored pixels, as in scikit-learn; None with no pixels), n_pixels,
    and confusion_matrix (list of lists).
    """
    cm = np.array(cm, dtype=np.int64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {cm.shape}")
    if ignore_class is not None:
        cm[ignore_class, :] = 0
    diag = np.diag(cm).astype(np.float64)
    rows = cm.sum(axis=1).astype(np.float64)
    cols = cm.sum(axis=0).astype(np.float64)
    total = float(cm.sum())

    iou = _ratio(diag, rows + cols - diag)
    dice = _ratio(2 * diag, rows + cols)
    precision = _ratio(diag, cols)
    recall = _ratio(diag, rows)
    if ignore_class is not None:
        for per_class in (iou, dice, precision, recall):
            per_class[ignore_class] = np.nan

    share = _ratio(rows, total)
    defined = ~np.isnan(iou)
    fw_iou = float(np.sum(share[defined] * iou[defined])) if total else math.nan

    accuracy = float(diag.sum() / total) if total else math.nan
    expected = float(np.sum(rows * cols) / total**2) if total else math.nan
    kappa = (accuracy - expected) / (1 - expected) if total and expected < 1 else math.nan
    mcc_den = math.sqrt((total**2 - np.sum(cols**2)) * (total**2 - np.sum(rows**2)))
    mcc = float((diag.sum() * total - np.sum(cols * rows)) / mcc_den) if mcc_den > 0 else (
        0.0 if total else math.nan)

    scores = {
        "iou": iou, "dice": dice, "precision": precision, "recall": recall,
        "mean_iou": _nanmean(iou), "mean_dice": _nanmean(dice),
        "frequency_weighted_iou": fw_iou, "pixel_accuracy": accuracy,
        "kappa": kappa, "mcc": mcc,
    }
    out = {k: _json_value(v) for k, v in scores.items()}
    out["n_pixels"] = int(total)
    out["support"] = [int(v) for v in rows]
    out["confusion_matrix"] = cm.tolist()
    return out


def threshold_counts(y_true_bin: np.ndarray, prob: np.ndarray,
                     thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> np.ndarray:
    """Binary confusion counts at each threshold, additive over batches.

    y_true_bin: 0/1 truth; prob: foreground probabilities in [0, 1], same shape; thresholds
    strictly increasing. A pixel is foreground when prob >= threshold (as in
    postprocess.probs_to_label). Returns int64 (len(thresholds), 4) with columns true
    positives, false positives, false negatives, true negatives. One pass over the pixels
    whatever the number of thresholds: each pixel is binned by how many thresholds it reaches.
    """
    edges = np.asarray(thresholds, np.float64)
    if edges.ndim != 1 or np.any(np.diff(edges) <= 0):
        raise ValueError("thresholds must be strictly increasing")
    truth = np.asarray(y_true_bin).ravel() >= 0.5
    bins = np.searchsorted(edges, np.asarray(prob, np.float64).ravel(), side="right")
    n = edges.size + 1
    pos = np.bincount(bins[truth], minlength=n)
    neg = np.bincount(bins[~truth], minlength=n)
    # Pixels reaching threshold j are those in bins j+1..T: a reversed cumulative sum.
    tp = np.cumsum(pos[::-1])[::-1][1:]
    fp = np.cumsum(neg[::-1])[::-1][1:]
    return np.stack([tp, fp, pos.sum() - tp, neg.sum() - fp], axis=1).astype(np.int64)


def threshold_from_counts(counts: np.ndarray, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
                          ) -> tuple[float, np.ndarray]:
    """Best threshold from (summed) :func:`threshold_counts`.

    Returns (threshold maximising foreground IoU, rounded to 6 decimals; IoU per threshold as
    float64, NaN where undefined). Ties go to the lowest threshold; 0.5 when no IoU is
    defined (no foreground in truth nor prediction at any threshold).
    """
    counts = np.asarray(counts, np.float64)
    ious = _ratio(counts[:, 0], counts[:, :3].sum(axis=1))
    if np.all(np.isnan(ious)):
        return 0.5, ious
    return round(float(np.asarray(thresholds)[np.nanargmax(ious)]), 6), ious


def optimal_threshold(y_true_bin: np.ndarray, prob: np.ndarray,
                      thresholds: Sequence[float] = DEFAULT_THRESHOLDS
                      ) -> tuple[float, np.ndarray]:
    """Threshold on foreground probability that maximises foreground IoU (binary models).

    y_true_bin: 0/1 truth; prob: probabilities, same shape. Returns (best threshold, IoU per
    threshold). Histogram based: one pass over the pixels whatever the number of thresholds.
    """
    return threshold_from_counts(threshold_counts(y_true_bin, prob, thresholds), thresholds)


class ThresholdSweep:
    """:func:`optimal_threshold` accumulated batch by batch over a validation set."""

    def __init__(self, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> None:
        self.thresholds = np.asarray(thresholds, np.float64)
        self.counts = np.zeros((self.thresholds.size, 4), np.int64)

    def update(self, y_true_bin: np.ndarray, prob: np.ndarray) -> None:
        """Add a batch: 0/1 truth and foreground probabilities of the same shape."""
        self.counts += threshold_counts(y_true_bin, prob, self.thresholds)

    def best(self) -> tuple[float, list[dict[str, float | None]]]:
        """(best threshold, JSON-ready curve [{"threshold": t, "iou": iou or None}, ...])."""
        best, ious = threshold_from_counts(self.counts, self.thresholds)
        curve = [{"threshold": round(float(t), 6), "iou": _json_value(v)}
                 for t, v in zip(self.thresholds, ious, strict=True)]
        return best, curve

    def confusion_at(self, threshold: float) -> np.ndarray:
        """2x2 confusion matrix (rows truth, columns prediction) at one of the thresholds."""
        match = np.flatnonzero(np.isclose(self.thresholds, threshold, rtol=0, atol=1e-6))
        if not match.size:
            raise ValueError(f"threshold {threshold} is not one of the swept thresholds")
        tp, fp, fn, tn = self.counts[match[0]]
        return np.array([[tn, fp], [fn, tp]], np.int64)


def evaluation_scores(cm: np.ndarray, sweep: ThresholdSweep | None,
                      ignore_class: int | None = None) -> dict[str, Any]:
    """The scores of an evaluation: at 0.5 (binary, ``sweep`` given) or argmax (``cm`` of
    the predictions made that way), plus for binary models the IoU-optimal threshold of the
    sweep, the whole sweep and the scores there. JSON-ready."""
    result: dict[str, Any] = {"threshold": 0.5 if sweep is not None else None,
                              "scores": scores_from_confusion(cm, ignore_class=ignore_class)}
    if sweep is not None and cm.sum() > 0:
        best, curve = sweep.best()
        result["optimal_threshold"] = best
        result["threshold_sweep"] = curve
        result["scores_at_optimal_threshold"] = scores_from_confusion(sweep.confusion_at(best))
    return result


# Training (TensorFlow) -------------------------------------------------------------------

def batch_confusion(y_true: tf.Tensor, y_pred: tf.Tensor, n_classes: int,
                    ignore_class: int | None = None, threshold: float = 0.5,
                    sample_weight: tf.Tensor | None = None) -> tf.Tensor:
    """Confusion matrix (truth rows, prediction columns) of one batch, float64, in TF ops.

    y_true 0/1 (batch, H, W, 1) or one-hot; y_pred probabilities of the same shape. Binary
    predictions are thresholded at ``threshold``, multiclass ones arg-maxed; pixels whose true
    class is ``ignore_class`` are skipped. Graph- and tf.distribute-safe (no numpy).
    """
    y_true = tf.cast(y_true, tf.float32)
    y_pred = tf.cast(y_pred, tf.float32)
    if y_pred.shape[-1] == 1:
        truth = tf.cast(y_true[..., 0] >= 0.5, tf.int32)
        pred = tf.cast(y_pred[..., 0] >= threshold, tf.int32)
    else:
        truth = tf.argmax(y_true, axis=-1, output_type=tf.int32)
        pred = tf.argmax(y_pred, axis=-1, output_type=tf.int32)
    weights = tf.ones_like(truth, tf.float64)
    if ignore_class is not None:
        weights = tf.cast(tf.not_equal(truth, ignore_class), tf.float64)
    if sample_weight is not None:
        sample_weight = tf.cast(sample_weight, tf.float64)
        if sample_weight.shape.rank == 1:
            sample_weight = tf.reshape(sample_weight, [-1, 1, 1])
        elif sample_weight.shape.rank == 4:
            sample_weight = sample_weight[..., 0]
        weights = weights * sample_weight
    return tf.math.confusion_matrix(tf.reshape(truth, [-1]), tf.reshape(pred, [-1]),
                                    num_classes=n_classes, weights=tf.reshape(weights, [-1]),
                                    dtype=tf.float64)
