"""Tests for res_unet.inference.runtime: the runtime registry behind one callable."""

from __future__ import annotations

import dataclasses
import importlib
import sys
import types

import numpy as np
import pytest
from helpers import pixel_model

from res_unet.config.keys import Config
from res_unet.config.registry import RUNTIMES, Runtime
from res_unet.core.errors import UserError
from res_unet.inference import runtime
from res_unet.inference.runtime import LoadedModel


def test_infer_runtime_offers_auto_and_every_registered_runtime():
    choices = next(f for f in dataclasses.fields(Config)
                   if f.name == "INFER_RUNTIME").metadata["choices"]
    assert tuple(choices) == ("auto", *RUNTIMES)


@pytest.mark.parametrize("name", sorted(RUNTIMES))
def test_every_registered_runtime_names_a_function_that_exists(name):
    spec = RUNTIMES[name]
    module = importlib.import_module(f"res_unet.inference.{spec.module}")
    assert callable(getattr(module, spec.function))


def _register(monkeypatch, name: str, runner) -> None:
    """Register ``runner`` as INFER_RUNTIME ``name``, from a stand-in module of its own."""
    module = types.ModuleType(f"res_unet.inference.{name}_runtime")
    module.runner = runner
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(RUNTIMES, name, Runtime(module=f"{name}_runtime", function="runner"))


def test_a_new_runtime_is_one_module_and_one_registration(monkeypatch):
    """A runtime registered in RUNTIMES runs a LoadedModel with no other change."""
    calls = []

    def doubling_runner(loaded):
        calls.append(loaded.tile_hw)
        return lambda batch: np.full((*batch.shape[:3], loaded.n_outputs), 0.25, np.float32)

    _register(monkeypatch, "fake", doubling_runner)
    loaded = LoadedModel.from_model(pixel_model(size=16))
    loaded.use_runtime("fake")
    assert loaded.prepare() == "fake"
    out = loaded(np.zeros((2, 16, 16, 3), np.float32))
    assert out.shape == (2, 16, 16, 1) and np.all(out == 0.25) and calls == [(16, 16)]


def test_a_runtime_whose_package_is_missing_is_one_line(monkeypatch):
    monkeypatch.setitem(RUNTIMES, "fake", Runtime(module="fake_runtime", function="runner",
                                                  package="no_such_package_xyz", extra="fake"))
    loaded = LoadedModel.from_model(pixel_model(size=16))
    with pytest.raises(UserError, match=r"INFER_RUNTIME 'fake' needs the no_such_package_xyz "
                                        r"package: pip install 'res_unet\[fake\]'"):
        loaded.use_runtime("fake")


def test_a_registered_runtime_that_fails_is_one_line_but_tensorflow_errors_propagate(
        monkeypatch):
    def broken(loaded):
        raise RuntimeError("cannot compile\nsecond line")

    _register(monkeypatch, "broken", broken)
    loaded = LoadedModel.from_model(pixel_model(size=16))
    loaded.use_runtime("broken")
    with pytest.raises(UserError, match=r"INFER_RUNTIME 'broken' cannot run this model "
                                        r"\(RuntimeError: cannot compile\)"):
        loaded.prepare()
    monkeypatch.setattr(runtime, "tensorflow_runner", broken)
    monkeypatch.setitem(RUNTIMES, "tensorflow", Runtime(module="runtime",
                                                        function="tensorflow_runner"))
    loaded.use_runtime("tensorflow")
    with pytest.raises(RuntimeError, match="cannot compile"):
        loaded.prepare()


def test_tensorflow_runner_gives_the_model_probabilities():
    model = pixel_model(size=16)
    loaded = LoadedModel.from_model(model)
    batch = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(runtime.tensorflow_runner(loaded)(batch),
                               np.asarray(model(batch)), rtol=1e-6, atol=1e-6)
