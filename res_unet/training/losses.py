"""Segmentation losses: small pure functions of (y_true, y_pred) and one serialisable sum.

Conventions shared by every function here:

- ``y_true`` is float (batch, H, W, 1) with 0/1 values for a binary model (NCLASSES=1) or
  one-hot (batch, H, W, N) for a multiclass model; ``y_pred`` holds the model's
  probabilities (sigmoid or softmax output) with the same shape. The channel count tells
  binary (1) from multiclass (> 1).
- Everything is computed in float32 (``y_pred`` is cast first, so mixed-precision models
  are safe).
- The model outputs probabilities, not logits, so logarithms are taken of probabilities
  clipped to [EPSILON, 1 - EPSILON]; this keeps cross-entropy and focal terms finite when a
  prediction saturates (the Keras convention for probability inputs). Beyond the clip the
  gradient is 0, but there the sigmoid/softmax gradient has vanished anyway.
- ``class_weights`` is a list with one float per label class, background first (2 values
  for a binary model: background, foreground).
- ``ignore_class`` (multiclass only) is the index of a label class to leave out: pixels
  whose true class is the ignore class carry zero weight in every term, the prediction at
  those pixels has no effect (not even through the boundary pooling), and the ignore
  class's channel is left out of the dice and boundary averages.
- Dice and boundary scores are *batch* scores: sums run over the batch and spatial axes per
  class before the ratio is taken. Per-image ratios are unstable on tiles with little or no
  foreground (a tile without water scores dice ~0 for any faint false positive, whatever
  its size), and FIT_MODE='tile' produces many such tiles; pooled over the batch, an empty
  tile still adds its false positives to the denominator, so predicting p > 0 there is
  penalised, but it cannot dominate the loss by itself.
- For a binary model the dice and boundary terms use the foreground channel only: the
  background score is close to 1 on almost every batch and would halve the gradient of the
  class that matters, while focal and cross-entropy terms already cover background pixels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from res_unet.config.keys import Config
from res_unet.config.registry import LOSS_TERMS

EPSILON = 1e-7
WEIGHT_BOUNDS = (0.1, 10.0)


# Helpers --------------------------------------------------------------------------------

def _prepare(y_true, y_pred, ignore_class: int | None) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Cast to float32 and build the mask of counted pixels.

    Returns (y, p, valid): y and p (batch, H, W, C); valid (batch, H, W, 1) is 1 where the
    pixel counts. At ignored pixels p is replaced by y, so the prediction there cannot leak
    into any term (neighbouring boundary maps included) and receives no gradient.
    """
    y = tf.cast(y_true, tf.float32)
    p = tf.cast(y_pred, tf.float32)
    if ignore_class is None:
        return y, p, tf.ones_like(y[..., :1])
    if not 0 <= ignore_class < y.shape[-1] or y.shape[-1] == 1:
        raise ValueError(f"ignore_class={ignore_class} needs a multiclass one-hot y_true with "
                         f"more than {ignore_class} channels, got {y.shape[-1]}")
    valid = 1.0 - y[..., ignore_class:ignore_class + 1]
    p = tf.where(valid > 0.5, p, y)
    return y, p, valid


def _check_weights(class_weights: Sequence[float] | None, n_label_classes: int) -> np.ndarray:
    """Class weights as a float array of length n_label_classes (ones when None)."""
    if class_weights is None:
        return np.ones(n_label_classes, np.float32)
    weights = np.asarray(class_weights, np.float32)
    if weights.shape != (n_label_classes,):
        raise ValueError(f"class_weights has {weights.size} values but there are "
                         f"{n_label_classes} label classes (background first)")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError(f"class_weights must be finite and non-negative, got {class_weights}")
    return weights


def _score_weights(n_channels: int, class_weights: Sequence[float] | None,
                   ignore_class: int | None) -> np.ndarray:
    """Weights of the channels averaged in dice and boundary scores, summing to 1.

    Binary (one channel): the foreground channel alone, weight 1. Multiclass: the class
    weights (ones by default), 0 for the ignore class.
    """
    if n_channels == 1:
        _check_weights(class_weights, 2)
        return np.ones(1, np.float32)
    weights = _check_weights(class_weights, n_channels).copy()
    if ignore_class is not None:
        weights[ignore_class] = 0.0
    if weights.sum() <= 0:
        raise ValueError("class_weights give zero weight to every counted class")
    return weights / weights.sum()


def _pixel_mean(loss_map: tf.Tensor, valid: tf.Tensor) -> tf.Tensor:
    """Mean of a (batch, H, W, 1) map over the counted pixels (0 when none counts)."""
    return tf.reduce_sum(loss_map * valid) / tf.maximum(tf.reduce_sum(valid), 1.0)


def _weighted_focal(y_true, y_pred, alphas: np.ndarray, gamma: float,
                    class_weights: Sequence[float] | None, ignore_class: int | None) -> tf.Tensor:
    """Mean over counted pixels of -sum_k alpha_k w_k (1 - p_k)^gamma y_k log p_k.

    Binary inputs are expanded to two channels (background 1 - y, 1 - p; foreground y, p),
    which turns this into the two-term binary formula. Gamma 0 and alphas 1 give
    cross-entropy.
    """
    y, p, valid = _prepare(y_true, y_pred, ignore_class)
    if y.shape[-1] == 1:
        y = tf.concat([1.0 - y, y], axis=-1)
        p = tf.concat([1.0 - p, p], axis=-1)
    weights = _check_weights(class_weights, y.shape[-1])
    factor = tf.constant(alphas * weights, tf.float32)
    p = tf.clip_by_value(p, EPSILON, 1.0 - EPSILON)
    modulation = tf.pow(1.0 - p, gamma) if gamma else 1.0
    per_pixel = -tf.reduce_sum(factor * modulation * y * tf.math.log(p), axis=-1, keepdims=True)
    return _pixel_mean(per_pixel, valid)


def _boundary_map(mask: tf.Tensor) -> tf.Tensor:
    """Inner boundary of a soft mask (batch, H, W, C): maxpool3x3(1 - m) - (1 - m).

    Pooling pads with nothing (SAME), so the image edge is not a boundary.
    """
    inverse = 1.0 - mask
    return tf.nn.max_pool2d(inverse, ksize=3, strides=1, padding="SAME") - inverse


# Loss terms -----------------------------------------------------------------------------

def dice_loss(y_true, y_pred, *, class_weights: Sequence[float] | None = None,
              ignore_class: int | None = None, smooth: float = 1.0) -> tf.Tensor:
    """1 - batch soft dice, weighted mean over classes; scalar float32 in [0, 1].

    Per class k: (2 sum(y_k p_k) + smooth) / (sum(y_k) + sum(p_k) + smooth), sums over the
    batch and both spatial axes of counted pixels. Binary: foreground channel only (class
    weights then have no effect). A class absent from the batch scores
    smooth / (sum(p_k) + smooth): 1 when nothing is predicted, lower (with a gradient pushing
    p_k down) for any false positive.
    """
    y, p, valid = _prepare(y_true, y_pred, ignore_class)
    weights = tf.constant(_score_weights(y.shape[-1], class_weights, ignore_class))
    axes = [0, 1, 2]
    intersection = tf.reduce_sum(y * p * valid, axis=axes)
    total = tf.reduce_sum((y + p) * valid, axis=axes)
    dice = (2.0 * intersection + smooth) / (total + smooth)
    return 1.0 - tf.reduce_sum(weights * dice)


def focal_loss(y_true, y_pred, *, alpha: float = 0.25, gamma: float = 2.0,
               class_weights: Sequence[float] | None = None,
               ignore_class: int | None = None) -> tf.Tensor:
    """Focal loss, mean over counted pixels; scalar float32 >= 0.

    Binary: -alpha y (1-p)^gamma log p - (1-alpha) (1-y) p^gamma log(1-p) (alpha weighs the
    foreground). Multiclass: -sum_k w_k (1-p_k)^gamma y_k log p_k with the class weights w_k
    (alpha is not used: per-class weighting is what class_weights is for). Class weights, if
    given, also multiply the binary terms (background weight on the second term).
    """
    n_channels = y_pred.shape[-1]
    alphas = (np.array([1.0 - alpha, alpha], np.float32) if n_channels == 1
              else np.ones(n_channels, np.float32))
    return _weighted_focal(y_true, y_pred, alphas, gamma, class_weights, ignore_class)


def cross_entropy_loss(y_true, y_pred, *, class_weights: Sequence[float] | None = None,
                       ignore_class: int | None = None) -> tf.Tensor:
    """Binary or categorical cross-entropy, -sum_k w_k y_k log p_k averaged over counted pixels.

    The mean divides by the number of counted pixels, not by the sum of weights, so class
    weights scale the loss the way Keras sample weights do.
    """
    n_classes = 2 if y_pred.shape[-1] == 1 else y_pred.shape[-1]
    return _weighted_focal(y_true, y_pred, np.ones(n_classes, np.float32), 0.0, class_weights,
                           ignore_class)


def boundary_loss(y_true, y_pred, *, class_weights: Sequence[float] | None = None,
                  ignore_class: int | None = None, smooth: float = 1.0) -> tf.Tensor:
    """1 - boundary F1 (BF1), weighted mean over classes; scalar float32 in [0, 1].

    Boundaries b = maxpool3x3(1 - m) - (1 - m) of truth and prediction; tolerance maps are
    5x5 *max* pooling of the boundaries (1 within 2 pixels of a boundary), so a perfect
    prediction scores BF1 = 1. (The EfficientNet notebook's 5x5 average pooling gives a
    straight perfect edge a tolerance of only 0.2 and can never reach 0 loss; max pooling is
    the original formulation of Bokhovkin and Burnaev, 2019.) Per class, over the batch:
    precision = (sum(b_pred tol_true) + smooth) / (sum(b_pred) + smooth), recall likewise with
    truth and prediction swapped, BF1 = 2PR / (P + R). The smoothing guards masks without
    boundaries (empty or full): no boundary in either gives BF1 = 1, and keeps gradients
    bounded. Binary: foreground channel only.
    """
    y, p, valid = _prepare(y_true, y_pred, ignore_class)
    weights = tf.constant(_score_weights(y.shape[-1], class_weights, ignore_class))
    # At ignored pixels y and p agree (both 0 for counted classes), so boundaries there are 0;
    # multiplying by valid only matters for soft labels.
    b_true = _boundary_map(y) * valid
    b_pred = _boundary_map(p) * valid
    tol_true = tf.nn.max_pool2d(b_true, ksize=5, strides=1, padding="SAME")
    tol_pred = tf.nn.max_pool2d(b_pred, ksize=5, strides=1, padding="SAME")
    axes = [0, 1, 2]
    precision = ((tf.reduce_sum(b_pred * tol_true, axis=axes) + smooth)
                 / (tf.reduce_sum(b_pred, axis=axes) + smooth))
    recall = ((tf.reduce_sum(b_true * tol_pred, axis=axes) + smooth)
              / (tf.reduce_sum(b_true, axis=axes) + smooth))
    bf1 = 2.0 * precision * recall / (precision + recall + EPSILON)
    return 1.0 - tf.reduce_sum(weights * bf1)


# Combined loss --------------------------------------------------------------------------

@keras.saving.register_keras_serializable(package="res_unet")
class SegmentationLoss(keras.losses.Loss):
    """Weighted sum of the loss terms named in ``terms`` ({'dice': 1.0, 'focal': 1.0, ...};
    None: the config's default LOSS).

    Serialisable with plain data (get_config), so a saved model reloads without
    custom_objects once res_unet.training.losses is imported. Returns a scalar per batch.
    """

    def __init__(self, terms: Mapping[str, float] | None = None, focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0, class_weights: Sequence[float] | None = None,
                 ignore_class: int | None = None, name: str = "segmentation_loss",
                 reduction: str = "sum_over_batch_size") -> None:
        super().__init__(name=name, reduction=reduction)
        terms = dict(Config().LOSS if terms is None else terms)
        unknown = [t for t in terms if t not in LOSS_TERMS]
        if unknown:
            raise ValueError(f"unknown loss terms {unknown}; use {', '.join(LOSS_TERMS)}")
        if not any(w > 0 for w in terms.values()):
            raise ValueError("the loss needs at least one term with a positive weight")
        self.terms = {t: float(w) for t, w in terms.items()}
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]
        self.ignore_class = None if ignore_class is None else int(ignore_class)

    def term_values(self, y_true, y_pred) -> dict[str, tf.Tensor]:
        """Each term's unweighted value (scalar tensors), for logging and tests."""
        common = {"class_weights": self.class_weights, "ignore_class": self.ignore_class}
        functions = {
            "dice": lambda: dice_loss(y_true, y_pred, **common),
            "focal": lambda: focal_loss(y_true, y_pred, alpha=self.focal_alpha,
                                        gamma=self.focal_gamma, **common),
            "boundary": lambda: boundary_loss(y_true, y_pred, **common),
            "ce": lambda: cross_entropy_loss(y_true, y_pred, **common),
        }
        return {t: functions[t]() for t, w in self.terms.items() if w}

    def call(self, y_true, y_pred) -> tf.Tensor:
        values = self.term_values(y_true, y_pred)
        return tf.add_n([self.terms[t] * v for t, v in values.items()])

    def get_config(self) -> dict:
        return {**super().get_config(), "terms": dict(self.terms),
                "focal_alpha": self.focal_alpha, "focal_gamma": self.focal_gamma,
                "class_weights": self.class_weights, "ignore_class": self.ignore_class}


def make_loss(cfg: Config, class_weights: Sequence[float] | None = None) -> SegmentationLoss:
    """The training loss described by cfg.LOSS, FOCAL_ALPHA/GAMMA, CLASS_WEIGHTS, IGNORE_CLASS.

    ``class_weights`` (one per label class, background first) overrides cfg.CLASS_WEIGHTS;
    it is required when CLASS_WEIGHTS is 'auto' (compute it with
    :func:`class_weights_from_frequency` from the manifest's class_pixel_frequency).
    """
    if class_weights is None:
        if cfg.CLASS_WEIGHTS == "auto":
            raise ValueError("CLASS_WEIGHTS='auto': pass class_weights computed with "
                             "class_weights_from_frequency(manifest.class_pixel_frequency)")
        class_weights = cfg.CLASS_WEIGHTS
    if class_weights is not None:
        _check_weights(class_weights, cfg.n_label_classes)
    return SegmentationLoss(terms=cfg.LOSS, focal_alpha=cfg.FOCAL_ALPHA,
                            focal_gamma=cfg.FOCAL_GAMMA, class_weights=class_weights,
                            ignore_class=cfg.IGNORE_CLASS)


def class_weights_from_frequency(freq: Sequence[float],
                                 ignore_class: int | None = None) -> list[float]:
    """Inverse-frequency class weights, one per class (background first).

    ``freq`` is each class's share of training pixels (any scale: counts work too). Classes
    present (freq > 0, not ignored) get 1/freq normalised to mean 1 over them, then clipped to
    WEIGHT_BOUNDS = [0.1, 10] so a class covering a few pixels cannot swamp the loss (the
    clip may move the mean slightly off 1). Absent classes get 1 (they have no pixels; the
    weight only matters for the dice average), the ignore class 0.
    """
    values = np.asarray(freq, np.float64)
    if values.ndim != 1 or not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError(f"class pixel frequencies must be finite and non-negative, got {freq}")
    present = values > 0
    if ignore_class is not None:
        present[ignore_class] = False
    weights = np.ones_like(values)
    if present.any():
        inverse = 1.0 / values[present]
        weights[present] = np.clip(inverse / inverse.mean(), *WEIGHT_BOUNDS)
    if ignore_class is not None:
        weights[ignore_class] = 0.0
    return [float(w) for w in weights]
