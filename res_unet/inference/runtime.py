"""The runtime that runs a trained model: TensorFlow or OpenVINO behind one callable
(:class:`LoadedModel`), with the 'auto' choice and its checks.

:func:`load_run` reads a run folder (:mod:`res_unet.training.runfolder`, the format) and wraps
its model here; :mod:`res_unet.inference.openvino` converts, caches and compiles for OpenVINO.
A new runtime is a runner in a module of its own and a branch in
:meth:`LoadedModel._compile`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from res_unet.config.registry import RUNTIMES
from res_unet.core import messages
from res_unet.core.errors import UserError
from res_unet.data.records import file_sha256
from res_unet.inference import openvino as ov_runtime
from res_unet.training import devices
from res_unet.training.runfolder import ModelCard, load_model


@dataclass
class LoadedModel:
    """A trained model ready for inference.

    ``model`` maps float32 raw pixels (N, *tile_hw, n_bands) to float32 probabilities
    (N, *tile_hw, n_outputs): 1 sigmoid channel for binary models, else one softmax channel
    per class. ``threshold`` is the model card's validation-optimal binary threshold.
    """

    model: keras.Model
    tile_hw: tuple[int, int]
    n_bands: int
    n_outputs: int
    threshold: float | None = None
    downsample: int = 1
    input_dtype: str | None = None
    pixel_size_m: float | None = None
    run_dir: Path | None = None
    card: ModelCard | None = None
    weights: Path | None = None
    runtime: str = "tensorflow"
    auto: bool = False  # INFER_RUNTIME 'auto': prepare() checks OpenVINO on a test tile
    runtime_note: str = ""
    _fn: Any = field(default=None, repr=False)
    _twin: Any = field(default=None, repr=False)

    @property
    def binary(self) -> bool:
        """Whether the model has one sigmoid output (classes 0 and 1)."""
        return self.n_outputs == 1

    @property
    def n_classes(self) -> int:
        """Label classes: 2 for binary models, else the number of outputs."""
        return 2 if self.binary else self.n_outputs

    @classmethod
    def from_model(cls, model: keras.Model, tile_hw: Sequence[int] | None = None,
                   threshold: float | None = None) -> LoadedModel:
        """Wrap an in-memory Keras model; ``tile_hw`` defaults to its input size."""
        shape = model.input_shape
        hw = tuple(int(v) for v in (tile_hw or shape[1:3]))
        return cls(model=model, tile_hw=(hw[0], hw[1]), n_bands=int(shape[-1]),
                   n_outputs=int(model.output_shape[-1]), threshold=threshold)

    def use_runtime(self, runtime: str) -> None:
        """Run the model with one of :data:`res_unet.config.registry.RUNTIMES` ('tensorflow',
        'openvino', 'openvino_bf16') or 'auto' (TensorFlow when it sees a GPU or OpenVINO is
        not installed, else OpenVINO if :meth:`prepare` finds it sound). OpenVINO compiles
        the model's float32 twin for this CPU on first use (seconds) and gives the same
        probabilities to about 1e-5; 'openvino_bf16' lets it compute in bfloat16 where the
        CPU has bf16 units (faster, probabilities move by ~1e-2). Raises UserError when a
        runtime's package is not installed."""
        self.auto = runtime == "auto"
        note = ""
        if self.auto:
            runtime = "openvino"
            if devices.visible_gpus():
                runtime, note = "tensorflow", "TensorFlow sees a GPU"
            elif not ov_runtime.openvino_installed():
                runtime, note = "tensorflow", "OpenVINO is not installed"
        elif runtime not in RUNTIMES:
            raise UserError(f"INFER_RUNTIME {runtime!r} is not one of auto, "
                            f"{', '.join(RUNTIMES)}")
        elif not _installed(RUNTIMES[runtime].package):
            spec = RUNTIMES[runtime]
            raise UserError(f"INFER_RUNTIME '{runtime}' needs the {spec.package} package: pip "
                            f"install 'res_unet[{spec.extra}]' (or use --runtime tensorflow)")
        if runtime != self.runtime or self.auto:
            self.runtime, self.runtime_note, self._fn = runtime, note, None

    def prepare(self) -> str:
        """Compile the model for its runtime now (not at the first tile) and say which
        runtime runs it, e.g. 'openvino (auto: same probabilities as TensorFlow to 2e-06)'.

        'auto' keeps OpenVINO only when it works and agrees with TensorFlow on a test tile
        (ov_runtime.auto_openvino: in bfloat16 where the CPU has bf16 units and the class
        map stays float32's); else TensorFlow, and the note names the cause. An explicit
        OpenVINO runtime that cannot run the model raises UserError."""
        if self._fn is None and self.auto and self.runtime == "openvino":
            try:
                probe = ov_runtime.probe_batch(self.tile_hw, self.n_bands, self.input_dtype)
                run, self.runtime, self.runtime_note = ov_runtime.auto_openvino(
                    self.float32_model(), self.openvino_cache(), probe, self.threshold)
            except Exception as exc:  # no float32 twin, or OpenVINO unusable: TensorFlow
                run, self.runtime = None, "tensorflow"
                self.runtime_note = f"OpenVINO failed, {ov_runtime.failure_cause(exc)}"
            self._fn = run or self._compile()
        elif self._fn is None:
            try:
                self._fn = self._compile()
            except Exception as exc:  # OpenVINO raises many types; TensorFlow's propagate
                if self.runtime == "tensorflow":  # the reference runtime: a real error
                    raise
                raise UserError(f"{self.weights or 'the model'}: INFER_RUNTIME '{self.runtime}' "
                                f"cannot run this model ({ov_runtime.failure_cause(exc)}); use "
                                "--runtime tensorflow (or auto)") from None
        return self.runtime + (f" ({'auto: ' if self.auto else ''}{self.runtime_note})"
                               if self.runtime_note else "")

    def float32_model(self) -> keras.Model:
        """The model computing in float32 (its float32 twin when it is mixed precision)."""
        if self._twin is None:
            self._twin = ov_runtime.float32_twin(self.model)
        return self._twin

    def _compile(self) -> Any:
        """This model's batch call on its runtime, through the runtime's registry entry."""
        spec = RUNTIMES[self.runtime]
        module = importlib.import_module(f"res_unet.inference.{spec.module}")
        return getattr(module, spec.function)(self)

    def openvino_cache(self) -> Path | None:
        """This model's folder in the OpenVINO conversion cache, keyed by the weights file's
        content, the tile size, and the versions of OpenVINO, Keras and res_unet; None for
        a model that was not loaded from a file. 'float32 twin' in the key keeps out entries
        converted before float32_twin, from mixed-precision graphs OpenVINO cannot compile."""
        if self.weights is None or not self.weights.is_file():
            return None
        ov = ov_runtime.import_openvino()

        from res_unet import __version__

        digest = hashlib.sha256()
        file_sha256(self.weights, digest)
        digest.update(repr((self.tile_hw, self.n_bands, ov.__version__, keras.__version__,
                            __version__, "float32 twin")).encode())
        return ov_runtime.cache_dir() / "openvino" / digest.hexdigest()[:32]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities (N, h, w, n_outputs) float32 of a float32 batch (N, h, w, n_bands)."""
        if self._fn is None:
            described = self.prepare()
            if self.auto and self.runtime_note.startswith(("OpenVINO failed", "OpenVINO's")):
                # Prepared on first use (scene evaluation): nothing else says why.
                messages.note(f"runtime {described}")
        return self._fn(np.ascontiguousarray(batch, np.float32))


def _installed(package: str | None) -> bool:
    """Whether ``package`` (None: nothing needed) can be imported, without importing it."""
    return package is None or importlib.util.find_spec(package) is not None


def tensorflow_runner(loaded: LoadedModel) -> Any:
    """The Keras model of ``loaded`` as a traced batch -> float32 probabilities call."""
    import tensorflow as tf

    spec = tf.TensorSpec([None, *loaded.tile_hw, loaded.n_bands], tf.float32)
    function = tf.function(lambda x: tf.cast(loaded.model(x, training=False), tf.float32),
                           input_signature=[spec])
    return lambda batch: function(tf.constant(batch, tf.float32)).numpy()


def load_run(run_dir: str | os.PathLike, tile_hw: Sequence[int] | None = None) -> LoadedModel:
    """Load a run folder for inference (see :func:`res_unet.training.runfolder.load_model`
    for ``tile_hw`` and the errors raised)."""
    model, card, source, want = load_model(run_dir, tile_hw)
    spec = card.input
    return LoadedModel(model=model, tile_hw=want, n_bands=int(spec.bands),
                       n_outputs=card.n_outputs,
                       threshold=None if card.threshold is None else float(card.threshold),
                       downsample=int(spec.downsample), input_dtype=spec.dtype,
                       pixel_size_m=spec.pixel_size_m,
                       run_dir=Path(run_dir), card=card, weights=source)
