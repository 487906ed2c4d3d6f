"""Loss terms against hand-computed values on tiny masks, ignore class, weights, saving."""

import dataclasses
import functools
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from res_unet.config.keys import Config, config_from_dict
from res_unet.config.registry import LOSS_TERMS
from res_unet.training.losses import (
    SegmentationLoss,
    boundary_loss,
    class_weights_from_frequency,
    cross_entropy_loss,
    dice_loss,
    focal_loss,
    make_loss,
)

# A 3x3 mask (3 foreground pixels) and a soft prediction of it.
MASK = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]], np.float32)
PROB = np.array([[0.8, 0.6, 0.2], [0.4, 0.1, 0.0], [0.0, 0.0, 0.5]], np.float32)
ALL_TERMS = (dice_loss, focal_loss, boundary_loss, cross_entropy_loss)


def binary(*masks: np.ndarray) -> np.ndarray:
    """Stack (H, W) masks into a (batch, H, W, 1) float32 batch."""
    return np.stack(masks)[..., None].astype(np.float32)


def square(size: int = 16, top: int = 4, left: int = 4, side: int = 6) -> np.ndarray:
    mask = np.zeros((size, size), np.float32)
    mask[top:top + side, left:left + side] = 1
    return mask


def value_and_grad(loss_fn, y_true: np.ndarray, y_pred: np.ndarray, **kwargs):
    """Loss value (float) and its gradient with respect to y_pred (numpy)."""
    pred = tf.Variable(y_pred)
    with tf.GradientTape() as tape:
        loss = loss_fn(y_true, pred, **kwargs)
    return float(loss), tape.gradient(loss, pred).numpy()


def random_multiclass(rng: np.random.Generator, n: int = 3, shape=(2, 6, 6)):
    """Random one-hot truth and softmax-like probabilities, (batch, H, W, n) float32."""
    labels = rng.integers(0, n, size=shape)
    y = np.eye(n, dtype=np.float32)[labels]
    logits = rng.normal(size=(*shape, n))
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return labels, y, p.astype(np.float32)


# Dice ------------------------------------------------------------------------------------

def test_dice_hand_values_on_3x3():
    y = binary(MASK)
    # intersection 0.8+0.6+0.4 = 1.8; sum y = 3; sum p = 2.6; smooth 1
    assert float(dice_loss(y, binary(PROB))) == pytest.approx(1 - 4.6 / 6.6, rel=1e-6)
    assert float(dice_loss(y, y)) == pytest.approx(0.0, abs=1e-7)
    # complete miss: intersection 0, sum y 3, sum p 6 -> dice 1/10
    assert float(dice_loss(y, 1 - y)) == pytest.approx(0.9, rel=1e-6)


def test_dice_complete_miss_approaches_one_on_a_larger_mask():
    y = binary(square())
    assert float(dice_loss(y, 1 - y)) > 0.995


def test_dice_pools_over_the_batch():
    y = binary(MASK, np.zeros((3, 3)))
    p = binary(PROB, np.full((3, 3), 0.5))
    # pooled: intersection 1.8, sum y 3, sum p 2.6 + 4.5
    assert float(dice_loss(y, p)) == pytest.approx(1 - 4.6 / 11.1, rel=1e-6)


def test_dice_empty_truth_and_empty_prediction_is_zero_with_finite_gradient():
    y = binary(np.zeros((3, 3)))
    loss, grad = value_and_grad(dice_loss, y, y.copy())
    assert loss == pytest.approx(0.0, abs=1e-7)
    assert np.all(np.isfinite(grad))
    # d/dp of 1 - 1 / (sum p + 1) at p = 0 is 1: a prediction > 0 would raise the loss
    np.testing.assert_allclose(grad, 1.0, rtol=1e-6)


def test_dice_penalises_prediction_on_an_empty_tile():
    y = binary(np.zeros((3, 3)))
    loss, grad = value_and_grad(dice_loss, y, np.full_like(y, 0.2))
    assert loss == pytest.approx(1 - 1 / 2.8, rel=1e-6)
    # gradient descent lowers p everywhere
    np.testing.assert_allclose(grad, 1 / 2.8**2, rtol=1e-5)


def test_dice_binary_uses_the_foreground_channel_only():
    # class weights cannot change a single-channel score
    y, p = binary(MASK), binary(PROB)
    assert float(dice_loss(y, p, class_weights=[5.0, 1.0])) == pytest.approx(
        float(dice_loss(y, p)), rel=1e-7)


def test_dice_multiclass_class_weights():
    rng = np.random.default_rng(0)
    _, y, p = random_multiclass(rng)
    per_class = []
    for k in range(3):
        inter = (y[..., k] * p[..., k]).sum()
        per_class.append((2 * inter + 1) / (y[..., k].sum() + p[..., k].sum() + 1))
    assert float(dice_loss(y, p)) == pytest.approx(1 - np.mean(per_class), rel=1e-5)
    assert float(dice_loss(y, p, class_weights=[0, 1, 0])) == pytest.approx(
        1 - per_class[1], rel=1e-5)
    weighted = (1 * per_class[0] + 2 * per_class[1] + 1 * per_class[2]) / 4
    assert float(dice_loss(y, p, class_weights=[1, 2, 1])) == pytest.approx(
        1 - weighted, rel=1e-5)


# Focal and cross-entropy -----------------------------------------------------------------

def test_focal_binary_single_pixel_hand_values():
    one = np.ones((1, 1, 1, 1), np.float32)
    p = np.full_like(one, 0.9)
    assert float(focal_loss(one, p)) == pytest.approx(-0.25 * 0.1**2 * math.log(0.9), rel=1e-5)
    # background pixel predicted 0.1: -(1 - alpha) p^gamma log(1 - p)
    assert float(focal_loss(0 * one, 1 - p)) == pytest.approx(
        -0.75 * 0.1**2 * math.log(0.9), rel=1e-5)
    assert float(focal_loss(one, p, alpha=0.5, gamma=0.0)) == pytest.approx(
        -0.5 * math.log(0.9), rel=1e-5)


def test_focal_is_a_mean_over_pixels():
    y = binary(np.array([[1.0, 0.0]]))
    p = binary(np.array([[0.9, 0.3]]))
    expected = (-0.25 * 0.1**2 * math.log(0.9) - 0.75 * 0.3**2 * math.log(0.7)) / 2
    assert float(focal_loss(y, p)) == pytest.approx(expected, rel=1e-5)


def test_focal_multiclass_hand_value_and_class_weights():
    y = np.array([[[[0, 1, 0]]]], np.float32)
    p = np.array([[[[0.2, 0.7, 0.1]]]], np.float32)
    expected = -(0.3**2) * math.log(0.7)
    assert float(focal_loss(y, p)) == pytest.approx(expected, rel=1e-5)
    assert float(focal_loss(y, p, class_weights=[1, 2, 1])) == pytest.approx(2 * expected,
                                                                            rel=1e-5)
    assert float(focal_loss(y, p, class_weights=[3, 1, 3])) == pytest.approx(expected, rel=1e-5)


def test_cross_entropy_hand_values_and_class_weights():
    y = binary(np.array([[1.0, 0.0]]))
    p = binary(np.array([[0.9, 0.9]]))
    plain = (-math.log(0.9) - math.log(0.1)) / 2
    assert float(cross_entropy_loss(y, p)) == pytest.approx(plain, rel=1e-5)
    # background weight 2 doubles the background pixel's term only
    weighted = (-math.log(0.9) - 2 * math.log(0.1)) / 2
    assert float(cross_entropy_loss(y, p, class_weights=[2.0, 1.0])) == pytest.approx(
        weighted, rel=1e-5)
    yc = np.array([[[[0, 0, 1]]]], np.float32)
    pc = np.array([[[[0.2, 0.3, 0.5]]]], np.float32)
    assert float(cross_entropy_loss(yc, pc)) == pytest.approx(-math.log(0.5), rel=1e-5)


def test_log_terms_stay_finite_on_saturated_predictions():
    y = binary(np.array([[1.0, 0.0]]))
    wrong = binary(np.array([[0.0, 1.0]]))
    for fn in (focal_loss, cross_entropy_loss):
        loss, grad = value_and_grad(fn, y, wrong)
        assert math.isfinite(loss) and loss > 5
        assert np.all(np.isfinite(grad))


def test_losses_compute_in_float32_from_half_precision():
    y = binary(MASK)
    for dtype in (tf.float16, tf.bfloat16):
        p = tf.cast(binary(PROB), dtype)
        for fn in ALL_TERMS:
            out = fn(y, p)
            assert out.dtype == tf.float32
            assert float(out) == pytest.approx(float(fn(y, binary(PROB))), rel=1e-2, abs=1e-3)


# Boundary --------------------------------------------------------------------------------

@pytest.mark.parametrize("fill", [0.0, 1.0])
def test_boundary_is_guarded_on_masks_without_boundaries(fill):
    y = binary(np.full((8, 8), fill))
    loss, grad = value_and_grad(boundary_loss, y, y.copy())
    assert loss == pytest.approx(0.0, abs=1e-6)
    assert np.all(np.isfinite(grad))


def test_boundary_perfect_square_is_zero_and_shifted_square_is_not():
    y = binary(square())
    assert float(boundary_loss(y, y)) == pytest.approx(0.0, abs=1e-6)
    # within the 2-pixel tolerance a one-pixel shift costs nothing, three pixels do
    assert float(boundary_loss(y, binary(square(left=5)))) == pytest.approx(0.0, abs=1e-6)
    near, far = (float(boundary_loss(y, binary(square(left=4 + s)))) for s in (3, 5))
    assert 0 < near < far < 1


def test_boundary_hand_value_for_a_square_on_an_empty_tile():
    y = binary(np.zeros((16, 16)))
    p = binary(square())
    # the 6x6 square's inner boundary has 20 pixels: P = 1/21, R = 1/1, BF1 = 2P/(P+1) = 1/11
    loss, grad = value_and_grad(boundary_loss, y, p)
    assert loss == pytest.approx(1 - 1 / 11, rel=1e-5)
    assert np.all(np.isfinite(grad))


def test_boundary_multiclass_averages_channels():
    labels = np.zeros((1, 16, 16), int)
    labels[0, 4:10, 4:10] = 1
    y = np.eye(2, dtype=np.float32)[labels]
    shifted = np.roll(y, 4, axis=2)
    per_channel = [float(boundary_loss(y[..., k:k + 1], shifted[..., k:k + 1]))
                   for k in range(2)]
    assert float(boundary_loss(y, shifted)) == pytest.approx(np.mean(per_channel), rel=1e-5)
    assert float(boundary_loss(y, y)) == pytest.approx(0.0, abs=1e-6)


# Ignore class ----------------------------------------------------------------------------

def test_ignored_pixels_do_not_change_any_loss():
    rng = np.random.default_rng(1)
    labels, y, p = random_multiclass(rng, n=3, shape=(2, 12, 12))
    ignored = labels == 2
    other = rng.dirichlet(np.ones(3), size=ignored.sum()).astype(np.float32)
    p2 = p.copy()
    p2[ignored] = other
    loss = SegmentationLoss(terms={"dice": 1, "focal": 1, "boundary": 1, "ce": 1},
                            ignore_class=2)
    for fn in ALL_TERMS:
        a, grad = value_and_grad(fn, y, p, ignore_class=2)
        b = float(fn(y, p2, ignore_class=2))
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7), fn.__name__
        assert np.all(grad[ignored] == 0), fn.__name__
        assert float(fn(y, p2)) != pytest.approx(b, rel=1e-4), fn.__name__
    assert float(loss(y, p)) == pytest.approx(float(loss(y, p2)), rel=1e-6)


def test_ignore_class_channel_is_left_out_of_the_dice_average():
    rng = np.random.default_rng(2)
    labels, y, p = random_multiclass(rng, n=3, shape=(2, 6, 6))
    valid = (labels != 2)[..., None]
    per_class = []
    for k in range(2):
        inter = (y[..., k:k + 1] * p[..., k:k + 1] * valid).sum()
        total = ((y[..., k:k + 1] + p[..., k:k + 1]) * valid).sum()
        per_class.append((2 * inter + 1) / (total + 1))
    assert float(dice_loss(y, p, ignore_class=2)) == pytest.approx(1 - np.mean(per_class),
                                                                   rel=1e-5)


def test_focal_with_ignore_class_averages_over_counted_pixels_only():
    y = np.array([[[[1, 0, 0], [0, 0, 1]]]], np.float32)
    p = np.array([[[[0.5, 0.25, 0.25], [0.9, 0.05, 0.05]]]], np.float32)
    expected = -(0.5**2) * math.log(0.5)
    assert float(focal_loss(y, p, ignore_class=2)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("n,ignore_class", [(1, None), (3, None), (3, 2)],
                         ids=["binary", "multiclass", "multiclass-ignore-class"])
def test_every_term_traced_with_unknown_batch_and_size_is_its_eager_value(n, ignore_class):
    """The training step traces the loss (tf.function): each term and their weighted sum,
    traced once for any batch and tile size, give their eager values and gradients on two
    batches of different shapes."""
    rng = np.random.default_rng(5)
    batches = []
    for shape in ((2, 12, 12), (3, 8, 16)):
        if n == 1:
            y = (rng.random((*shape, 1)) < 0.4).astype(np.float32)
            p = rng.uniform(0.01, 0.99, (*shape, 1)).astype(np.float32)
        else:
            _, y, p = random_multiclass(rng, n=n, shape=shape)
        batches.append((y, p))
    terms = {"dice": 1.0, "focal": 0.5, "boundary": 0.25, "ce": 2.0}
    functions = [functools.partial(fn, ignore_class=ignore_class) for fn in ALL_TERMS]
    functions.append(SegmentationLoss(terms=terms, ignore_class=ignore_class))
    spec = tf.TensorSpec([None, None, None, n], tf.float32)
    for fn in functions:
        @tf.function(input_signature=[spec, spec])
        def traced(y, p, fn=fn):
            with tf.GradientTape() as tape:
                tape.watch(p)
                loss = fn(y, p)
            return loss, tape.gradient(loss, p)

        for y, p in batches:
            value, grad = traced(tf.constant(y), tf.constant(p))
            expected, expected_grad = value_and_grad(fn, y, p)
            assert float(value) == pytest.approx(expected, rel=1e-5, abs=1e-6), fn
            np.testing.assert_allclose(grad.numpy(), expected_grad, rtol=1e-4, atol=1e-6)
        assert traced.experimental_get_tracing_count() == 1


# Combined loss ---------------------------------------------------------------------------

def test_make_loss_default_is_dice_plus_focal_plus_boundary():
    cfg, _ = config_from_dict({})
    loss = make_loss(cfg)
    y, p = binary(square()), binary(np.clip(square(left=6) * 0.8 + 0.1, 0, 1))
    expected = (float(dice_loss(y, p)) + float(focal_loss(y, p, alpha=0.25, gamma=2.0))
                + float(boundary_loss(y, p)))
    assert float(loss(y, p)) == pytest.approx(expected, rel=1e-6)
    assert set(loss.term_values(y, p)) == {"dice", "focal", "boundary"}


def test_loss_terms_default_and_names_are_tied():
    # registry.LOSS_TERMS (what a config may name), the terms SegmentationLoss computes, the
    # LOSS key's default and meaning, and Gym's loss names all agree.
    y, p = binary(square()), binary(np.clip(square(left=6) * 0.8 + 0.1, 0, 1))
    every = SegmentationLoss(terms={term: 1.0 for term in LOSS_TERMS})
    values = every.term_values(y, p)
    assert list(values) == list(LOSS_TERMS)
    assert all(np.isfinite(float(v)) and float(v) > 0 for v in values.values())
    assert SegmentationLoss().terms == Config().LOSS == {"dice": 1.0, "focal": 1.0,
                                                         "boundary": 1.0}
    assert set(Config().LOSS) <= set(LOSS_TERMS)
    doc = next(f.metadata["doc"] for f in dataclasses.fields(Config) if f.name == "LOSS")
    assert all(term in doc for term in LOSS_TERMS), doc
    for name in ("dice", "cat"):
        cfg, _ = config_from_dict({"LOSS": name})
        assert set(cfg.LOSS) <= set(LOSS_TERMS)
    with pytest.raises(ValueError, match="unknown loss terms"):
        SegmentationLoss(terms={"hinge": 1.0})


def test_make_loss_follows_cfg_loss_weights_and_class_weights():
    cfg, _ = config_from_dict({"NCLASSES": 3, "LOSS": {"dice": 2.0, "ce": 0.5},
                               "CLASS_WEIGHTS": [1.0, 2.0, 0.5], "IGNORE_CLASS": 2})
    _, y, p = random_multiclass(np.random.default_rng(3))
    common = {"class_weights": [1.0, 2.0, 0.5], "ignore_class": 2}
    expected = (2 * float(dice_loss(y, p, **common))
                + 0.5 * float(cross_entropy_loss(y, p, **common)))
    assert float(make_loss(cfg)(y, p)) == pytest.approx(expected, rel=1e-6)
    # an explicit argument overrides the config
    other = make_loss(cfg, class_weights=[1.0, 1.0, 1.0])
    assert other.class_weights == [1.0, 1.0, 1.0]
    assert float(other(y, p)) != pytest.approx(expected, rel=1e-4)


def test_make_loss_rejects_auto_without_weights_and_wrong_lengths():
    cfg, _ = config_from_dict({"CLASS_WEIGHTS": "auto"})
    with pytest.raises(ValueError, match="class_weights_from_frequency"):
        make_loss(cfg)
    with pytest.raises(ValueError, match="2 label classes"):
        make_loss(cfg, class_weights=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="unknown loss terms"):
        SegmentationLoss(terms={"hinge": 1.0})


@pytest.mark.parametrize("settings", [
    {},
    {"NCLASSES": 3, "LOSS": "dice+ce", "CLASS_WEIGHTS": [0.5, 2.0, 1.0], "IGNORE_CLASS": 0,
     "FOCAL_GAMMA": 1.5},
])
def test_model_with_loss_saves_and_reloads_without_custom_objects(tmp_path, settings):
    cfg, _ = config_from_dict(settings)
    n_out = cfg.NCLASSES
    model = keras.Sequential([
        keras.Input((8, 8, 2)),
        keras.layers.Conv2D(n_out, 3, padding="same",
                            activation="sigmoid" if n_out == 1 else "softmax"),
    ])
    loss = make_loss(cfg)
    model.compile(optimizer="adam", loss=loss)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 8, 8, 2)).astype(np.float32)
    if n_out == 1:
        y = binary(*(rng.integers(0, 2, size=(2, 8, 8))))
    else:
        y = np.eye(n_out, dtype=np.float32)[rng.integers(0, n_out, size=(2, 8, 8))]
    before = model.evaluate(x, y, verbose=0, return_dict=True)
    model.optimizer.build(model.trainable_variables)
    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.models.load_model(path)
    assert isinstance(reloaded.loss, SegmentationLoss)
    assert reloaded.loss.get_config() == loss.get_config()
    after = reloaded.evaluate(x, y, verbose=0, return_dict=True)
    assert set(after) == {"loss"}
    for key, value in before.items():
        assert after[key] == pytest.approx(value, rel=1e-5), key


def test_loss_config_is_plain_data():
    loss = SegmentationLoss(terms={"dice": 1, "focal": 0.5}, class_weights=[1, 2],
                            focal_alpha=0.3)
    config = loss.get_config()
    assert config == {"name": "segmentation_loss", "reduction": "sum_over_batch_size",
                      "terms": {"dice": 1.0, "focal": 0.5}, "focal_alpha": 0.3,
                      "focal_gamma": 2.0, "class_weights": [1.0, 2.0], "ignore_class": None}
    assert SegmentationLoss.from_config(config).get_config() == config


# Class weights from frequency ------------------------------------------------------------

def test_class_weights_from_frequency():
    assert class_weights_from_frequency([0.9, 0.1]) == pytest.approx([0.2, 1.8])
    # inverse [1.001.., 1000] / 500.5 -> [0.002, 1.998]: the small one clipped to 0.1
    assert class_weights_from_frequency([0.999, 0.001]) == pytest.approx([0.1, 1.998], rel=1e-3)
    # ignore class 0, mean 1 over the others: inverse [2, 10/3] / (8/3)
    assert class_weights_from_frequency([0.5, 0.3, 0.2], ignore_class=2) == pytest.approx(
        [0.75, 1.25, 0.0])
    # absent class keeps weight 1
    assert class_weights_from_frequency([0.5, 0.0, 0.5]) == pytest.approx([1.0, 1.0, 1.0])
    assert all(type(w) is float for w in class_weights_from_frequency([3, 1]))
    with pytest.raises(ValueError, match="non-negative"):
        class_weights_from_frequency([0.5, -0.1])


def test_ignore_class_needs_a_multiclass_truth():
    with pytest.raises(ValueError, match="ignore_class=1"):
        dice_loss(binary(MASK), binary(PROB), ignore_class=1)
