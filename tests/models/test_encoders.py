"""Tests for res_unet.models.encoders, parametrized over the registry: every architecture
and every registered encoder builds (feature pyramid, parameter count, decoder widths),
saves and reloads, runs under mixed_bfloat16 and converts to OpenVINO. A new encoder or
architecture is tested here by its registration alone.

Costs (2 cores, AVX2, shared): the models are built once per module (``built``) at 32x32
px with random weights. Building is tested for every encoder but the big B4..B7 (18-64 M
parameters and 10-20 s each, built with RES_UNET_TEST_ALL_ENCODERS=1). Saving, bfloat16
and OpenVINO (5-30 s per encoder) are tested on every architecture and the first encoder
of each family (B0, lite0), whose layer kinds the other members of the family repeat at
other widths and depths; RES_UNET_TEST_ALL_ENCODERS=1 runs them on every encoder (minutes).
"""

from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

from res_unet.config.keys import config_from_dict
from res_unet.config.registry import ENCODER_FAMILIES, ENCODERS, MODELS
from res_unet.core.errors import UserError
from res_unet.models import build_model
from res_unet.models.encoders import encoder_names, encoder_spec

SIZE = 32  # the smallest tile every architecture divides (P5 is 1x1)
NCLASSES = 3
# Per architecture, keys that make its model small and quick to build.
TINY = {"resunet": {"FILTERS": 2, "DEPTH": 2}}
BIG = {"B4", "B5", "B6", "B7"}
ALL_ENCODERS = os.environ.get("RES_UNET_TEST_ALL_ENCODERS") == "1"
FAMILY_FIRST = {family.names[0] for family in ENCODER_FAMILIES}


def _cases(every: bool) -> list:
    """(MODEL, ENCODER) for every architecture and every encoder it takes (``every``), or
    only the first encoder of each family unless RES_UNET_TEST_ALL_ENCODERS=1."""
    cases = []
    for name, architecture in MODELS.items():
        for encoder in architecture.encoders or (None,):
            marks = [pytest.mark.slow] if encoder in BIG else []
            if encoder in BIG and not ALL_ENCODERS:
                marks.append(pytest.mark.skip(reason="B4..B7 take 10-20 s each to build; "
                                              "RES_UNET_TEST_ALL_ENCODERS=1 builds them"))
            elif not (every or ALL_ENCODERS or encoder is None or encoder in FAMILY_FIRST):
                marks.append(pytest.mark.skip(reason="the first encoder of its family stands "
                                              "for it; RES_UNET_TEST_ALL_ENCODERS=1 runs it"))
            cases.append(pytest.param(name, encoder, id=encoder or name, marks=marks))
    return cases


CASES = _cases(every=False)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Fail any attempt to open a network connection (no test downloads weights)."""
    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in tests")
    monkeypatch.setattr(socket.socket, "connect", refuse)


def make_model(model: str, encoder: str | None) -> keras.Model:
    """A 3-band, NCLASSES-class model of SIZE x SIZE px with random weights."""
    keys = {"MODEL": model, "N_DATA_BANDS": 3, "NCLASSES": NCLASSES, **TINY.get(model, {})}
    if encoder is not None:
        keys.update(ENCODER=encoder, ENCODER_WEIGHTS=None)
    cfg, _ = config_from_dict(keys)
    return build_model(cfg, [100.0, 90.0, 80.0], [50.0, 40.0, 30.0],
                       input_shape=(SIZE, SIZE, 3))


@pytest.fixture(scope="module")
def built():
    """(MODEL, ENCODER) -> its float32 model, built on first use and shared by the tests."""
    cache: dict[tuple[str, str | None], keras.Model] = {}

    def get(model: str, encoder: str | None) -> keras.Model:
        if (model, encoder) not in cache:
            cache[model, encoder] = make_model(model, encoder)
        return cache[model, encoder]

    yield get
    cache.clear()
    keras.backend.clear_session()


def tile(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (2, SIZE, SIZE, 3)).astype("float32")


def probabilities(net: keras.Model, x: np.ndarray) -> np.ndarray:
    return np.asarray(net(x, training=False))


def test_each_family_file_defines_exactly_its_registered_names():
    for family in ENCODER_FAMILIES:
        module = importlib.import_module(f"res_unet.models.encoders.{family.module}")
        assert tuple(module.ENCODERS) == family.names
        for name, spec in module.ENCODERS.items():
            assert spec.name == name
            assert encoder_spec(name) is spec
            assert len(spec.decoder_filters) == 5
    # The config's ENCODER choices are the registry's, every one of them a U-Net encoder.
    assert ENCODERS == encoder_names() == MODELS["efficientnet_unet"].encoders
    assert len(set(encoder_names())) == len(encoder_names())
    with pytest.raises(ValueError, match=r"encoder must be one of B0, .*lite2, got 'B8'"):
        encoder_spec("B8")


def test_registry_and_encoder_records_load_without_keras():
    """The config reads the encoder names before TensorFlow loads (5-7 s saved on a bad
    config): neither the registry nor the encoder registry module imports Keras."""
    code = ("import sys, res_unet.config.registry, res_unet.config.keys, "
            "res_unet.models.encoders as e; "
            "assert e.encoder_names(); "
            "print(sorted(m for m in ('keras', 'tensorflow') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("model,encoder", _cases(every=True))
def test_builds_probabilities_feature_pyramid_and_decoder(model, encoder, built):
    net = built(model, encoder)
    probs = probabilities(net, tile())
    assert probs.shape == (2, SIZE, SIZE, NCLASSES) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-5)
    assert net.get_layer("logits").output.shape[-1] == NCLASSES
    if encoder is None:
        return
    spec = encoder_spec(encoder)
    features = net.get_layer("encoder").output
    assert {k: tuple(v.shape[1:3]) for k, v in features.items()} == {
        f"P{n}": (SIZE >> n, SIZE >> n) for n in range(1, 6)}
    assert net.get_layer("encoder").count_params() == spec.parameters
    assert f"{spec.parameters / 1e6:.1f} M parameters" in spec.description
    assert tuple(net.get_layer(f"decoder{s}_2_conv").kernel.shape[-1]
                 for s in range(5)) == spec.decoder_filters


@pytest.mark.parametrize("model,encoder", CASES)
def test_save_and_reload_give_the_same_probabilities(model, encoder, built, tmp_path):
    net = built(model, encoder)
    net.save(tmp_path / "model.keras")
    again = keras.models.load_model(tmp_path / "model.keras", compile=False)
    np.testing.assert_array_equal(probabilities(again, tile(1)), probabilities(net, tile(1)))
    assert [layer.name for layer in again.layers] == [layer.name for layer in net.layers]


@pytest.mark.parametrize("model,encoder", CASES)
def test_mixed_bfloat16_gives_finite_float32_probabilities(model, encoder):
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        net = make_model(model, encoder)
        probs = probabilities(net, tile(2))
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert probs.dtype == np.float32 and np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-5)
    convs = [la for la in net.layers if isinstance(la, keras.layers.Conv2D)]
    assert [la.name for la in convs if la.compute_dtype != "bfloat16"] == ["logits"]
    for name in ("band_normalization", "logits", "probabilities"):
        assert net.get_layer(name).compute_dtype == "float32"


@pytest.mark.parametrize("model,encoder", CASES)
def test_openvino_gives_the_keras_probabilities(model, encoder, built):
    pytest.importorskip("openvino")
    from res_unet.inference.openvino import converted_model, openvino_runner

    net = built(model, encoder)
    x = tile(3)
    np.testing.assert_allclose(openvino_runner(converted_model(net))(x), probabilities(net, x),
                               atol=1e-4)


@pytest.mark.parametrize("encoder", encoder_names())
def test_weights_reader_names_a_missing_file(encoder, tmp_path):
    missing = tmp_path / "missing.weights"
    with pytest.raises(UserError, match=f"^{missing}: encoder weights file not found"):
        encoder_spec(encoder).read_weights(str(missing))


def _tiny_encoder(input_shape) -> keras.Model:
    """A 5-convolution encoder keeping the contract: {"Pn": 2**n times smaller}."""
    inputs = keras.Input(tuple(input_shape), name="encoder_input")
    x, features = inputs, {}
    for n in range(1, 6):
        x = keras.layers.Conv2D(2 * n, 3, strides=2, padding="same", name=f"tiny{n}")(x)
        features[f"P{n}"] = x
    return keras.Model(inputs, features, name="encoder")


def test_the_unet_takes_any_registered_encoder(monkeypatch):
    """A new family is one file defining ENCODERS plus one EncoderFamily entry: the U-Net
    builds over it with its band statistics and decoder widths, nothing else edited."""
    import types

    from res_unet.config.registry import EncoderFamily
    from res_unet.models import encoders
    from res_unet.models.encoders import EncoderSpec
    from res_unet.models.unet import build_unet

    spec = EncoderSpec(name="tiny", description="test encoder", parameters=1506,
                       build=_tiny_encoder, read_weights=lambda w: ({}, w),
                       load_weights=lambda e, w, label: None,
                       band_stats=lambda m, s: ([v + 1 for v in m], [2 * v for v in s]),
                       decoder_filters=(10, 8, 6, 4, 2))
    module = types.ModuleType("res_unet.models.encoders.tiny")
    module.ENCODERS = {"tiny": spec}
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(encoders, "ENCODER_FAMILIES",
                        (*ENCODER_FAMILIES, EncoderFamily("tiny", ("tiny",), "a test")))
    net = build_unet((32, 32, 2), 2, [10.0, 20.0], [3.0, 4.0], encoder="tiny")
    assert net.get_layer("encoder").count_params() == spec.parameters
    assert [net.get_layer(f"decoder{s}_2_conv").kernel.shape[-1] for s in range(5)] == [
        10, 8, 6, 4, 2]
    norm = net.get_layer("band_normalization")
    np.testing.assert_allclose(np.ravel(norm.mean), [11.0, 21.0])
    np.testing.assert_allclose(np.ravel(norm.variance), [36.0, 64.0])
    probs = probabilities(net, np.ones((1, 32, 32, 2), "float32"))
    assert probs.shape == (1, 32, 32, 2)
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-5)
