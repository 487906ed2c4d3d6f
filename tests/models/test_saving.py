"""Keras' saving with its attribute skip-sets kept once per kind (res_unet.models.saving)."""

from __future__ import annotations

import h5py
import keras
import numpy as np
from keras.src.backend.common import global_state
from keras.src.layers.layer import Layer
from keras.src.saving import saving_lib

from res_unet.models import saving

KINDS = ("Layer", "Functional", "Operation", "Optimizer")


def keras_own() -> object:
    """Keras' get_attr_skipset as Keras defines it (unwrapped if res_unet cached it)."""
    current = saving_lib.get_attr_skipset
    return getattr(current, "__wrapped__", current)


def small_model() -> keras.Model:
    inputs = keras.Input((8, 8, 3))
    x = inputs
    for filters in (4, 4, 8):
        x = keras.layers.Conv2D(filters, 3, padding="same")(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
    return keras.Model(inputs, keras.layers.Conv2D(1, 1)(x))


def h5_contents(path) -> dict[str, np.ndarray]:
    found = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: found.__setitem__(name, obj[()])
                     if isinstance(obj, h5py.Dataset) else None)
    return found


def test_importing_the_run_folder_format_caches_the_skip_sets():
    import res_unet.training.runfolder  # noqa: F401

    assert saving_lib.get_attr_skipset("Layer") is saving_lib.get_attr_skipset("Layer")


def test_cached_skip_sets_are_keras_own(monkeypatch):
    """Each kind's cached set is the one Keras builds; a second call returns it unbuilt."""
    monkeypatch.setattr(saving_lib, "get_attr_skipset", keras_own())
    saving.cache_attr_skipsets()
    assert saving.keras_caches_attr_skipsets()
    for kind in KINDS:
        assert saving_lib.get_attr_skipset(kind) == keras_own()(kind)
        assert saving_lib.get_attr_skipset(kind) is saving_lib.get_attr_skipset(kind)
    cached = saving_lib.get_attr_skipset
    saving.cache_attr_skipsets()
    assert saving_lib.get_attr_skipset is cached, "a second call wraps nothing again"


def test_a_keras_that_caches_them_itself_is_left_as_it_is(monkeypatch):
    def fixed(kind):
        skipset = global_state.get_global_attribute(f"saving_attr_skiplist_{kind}", None)
        if skipset is None:
            skipset = {"_self_unconditional_dependency_names"}
            global_state.set_global_attribute(f"saving_attr_skiplist_{kind}", skipset)
        return skipset

    monkeypatch.setattr(saving_lib, "get_attr_skipset", fixed)
    assert saving.keras_caches_attr_skipsets()
    saving.cache_attr_skipsets()
    assert saving_lib.get_attr_skipset is fixed
    global_state.set_global_attribute("saving_attr_skiplist_Layer", None)


def test_saving_builds_no_reference_layer_per_layer_and_writes_the_same_file(monkeypatch,
                                                                             tmp_path):
    """With the cache a save builds no throwaway Layer (Keras 3.15 builds one per layer
    saved); the weights file holds the same datasets and values either way, Keras' own file
    loads into a new model, and model.keras saved with the cache reloads to the same
    predictions."""
    model = small_model()
    built = []
    original_init = Layer.__init__

    def counting_init(self, *args, **kwargs):
        built.append(type(self).__name__)
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(saving_lib, "get_attr_skipset", keras_own())
    model.save_weights(tmp_path / "keras.weights.h5")
    monkeypatch.setattr(Layer, "__init__", counting_init)
    model.save_weights(tmp_path / "keras_again.weights.h5")
    uncached = len(built)

    saving.cache_attr_skipsets()
    model.save_weights(tmp_path / "warm_up.weights.h5")
    built.clear()
    model.save_weights(tmp_path / "cached.weights.h5")
    model.save(tmp_path / "cached.keras")
    assert built == [], f"reference layers built while saving: {built}"
    if keras_own()("Layer") is not keras_own()("Layer"):  # Keras' own cache misses (3.15)
        assert uncached >= len(model.layers)

    keras_file = h5_contents(tmp_path / "keras.weights.h5")
    cached_file = h5_contents(tmp_path / "cached.weights.h5")
    assert keras_file.keys() == cached_file.keys() and keras_file
    for name, values in keras_file.items():
        np.testing.assert_array_equal(values, cached_file[name])
    other = small_model()
    other.load_weights(tmp_path / "keras.weights.h5")
    for a, b in zip(model.get_weights(), other.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    reloaded = keras.models.load_model(tmp_path / "cached.keras", compile=False)
    x = np.random.default_rng(0).random((2, 8, 8, 3), dtype=np.float32)
    np.testing.assert_array_equal(model.predict(x, verbose=0), reloaded.predict(x, verbose=0))
