"""Segmentation models: the registry of architectures, and :func:`build_model`.

The registry (:data:`MODELS`) is the one place that names the architectures: the config
takes the MODEL and ENCODER choices and the input size constraint from it, and
:func:`build_model` finds each architecture's model file through it. This module imports
neither Keras nor TensorFlow (the model file is imported when a model is built), so the
config can be read and checked before TensorFlow loads. Adding an architecture is one
model file and one entry here. Functions that work on a built model of any architecture
are in :mod:`res_unet.models.helpers`.

Every model maps float32 raw pixels (batch, rows, cols, bands) to float32 probabilities
(batch, rows, cols, 1) sigmoid for NCLASSES=1 or (batch, rows, cols, N) softmax for N > 1.
It standardises its input with the dataset's per-band mean and std. Models of a fixed
input size (the default, TARGET_SIZE) are made of built-in Keras layers only:
``keras.models.load_model("model.keras")`` needs no custom objects. Models built with
unknown rows/cols (``input_shape=(None, None, bands)``) contain
:class:`~res_unet.models.layers.BilinearUpSampling2D`; load those after
``import res_unet.models.layers`` (every model file imports it, so any
:func:`build_model` call also registers the layer).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import keras

    from res_unet.config import Config

__all__ = ["ENCODERS", "MODELS", "Architecture", "build_model"]


@dataclass(frozen=True)
class Architecture:
    """What the config and :func:`build_model` need to know about one architecture.

    Attributes:
        name: the config's MODEL value.
        description: a few words for the config reference and messages.
        module, function: where the builder lives, imported only to build a model;
            ``function(cfg, band_mean, band_std, input_shape=None) -> keras.Model``.
        downsampling_factor: how many times the model halves its input, from the config;
            rows and cols (TARGET_SIZE, inference tiles) must be multiples of it.
        downsampling_keys: the config keys that factor depends on, named in messages.
        encoders: the ENCODER values it accepts; () when it has no ENCODER.
        encoder_description: what those encoders are, for the config reference.
    """

    name: str
    description: str
    module: str
    function: str
    downsampling_factor: Callable[[Config], int]
    downsampling_keys: tuple[str, ...] = ()
    encoders: tuple[str, ...] = ()
    encoder_description: str = ""


_ARCHITECTURES = (
    Architecture(
        name="resunet",
        description="residual U-Net",
        module="res_unet.models.resunet",
        function="resunet_from_config",
        downsampling_factor=lambda cfg: 2**cfg.DEPTH,
        downsampling_keys=("DEPTH",),
    ),
    Architecture(
        name="efficientnet_unet",
        description="U-Net with an EfficientNet encoder, optionally pretrained",
        module="res_unet.models.efficientnet_unet",
        function="efficientnet_unet_from_config",
        downsampling_factor=lambda cfg: 32,
        encoders=(*(f"B{i}" for i in range(8)), "lite0", "lite1", "lite2"),
        encoder_description="EfficientNet B0..B7 (B7 as in the original work; 64 M "
                            "parameters) or EfficientNet-Lite 'lite0', 'lite1', 'lite2' "
                            "(3.4-4.8 M parameters, fast on CPUs)",
    ),
)

# cfg.MODEL -> its Architecture, in the order the config reference lists them.
MODELS: dict[str, Architecture] = {a.name: a for a in _ARCHITECTURES}

# Every ENCODER value some architecture accepts, without repeats.
ENCODERS: tuple[str, ...] = tuple(dict.fromkeys(e for a in _ARCHITECTURES for e in a.encoders))


def build_model(cfg: Config, band_mean: Sequence[float], band_std: Sequence[float],
                input_shape: Sequence[int | None] | None = None) -> keras.Model:
    """Build the model named by cfg.MODEL (uncompiled, fresh or pretrained-encoder weights).

    Args:
        cfg: the validated config (MODEL, TARGET_SIZE, N_DATA_BANDS, NCLASSES and the
            architecture's keys).
        band_mean, band_std: per-band mean and standard deviation of the raw training
            pixels (the dataset manifest's "band_mean", "band_std"), one per band.
        input_shape: (rows, cols, bands); default (*TARGET_SIZE, N_DATA_BANDS). Use
            (None, None, bands) for a model that takes any size the architecture divides
            (tiled inference); weights are interchangeable between the two.

    Raises UserError for bad user input (band statistics, encoder weights), ValueError for
    an input size that is not a multiple of the architecture's down-sampling factor.
    """
    architecture = MODELS[cfg.MODEL]
    builder = getattr(importlib.import_module(architecture.module), architecture.function)
    return builder(cfg, band_mean, band_std, input_shape=input_shape)
