"""Segmentation models: :func:`build_model` builds the architecture the config names.

The architectures are named in :mod:`res_unet.config.registry` (:data:`MODELS`, re-exported here),
which the config reads without loading Keras; each entry says which model file here builds
it. The U-Net's encoders are records in :mod:`res_unet.models.encoders` (one file per
encoder family). Functions that work on a built model of any architecture are in
:mod:`res_unet.models.helpers`; :mod:`res_unet.models.saving` mends Keras' saving (a cache
Keras 3.15 misses), for the run folders and encoder weights that go through it.

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
from collections.abc import Sequence
from typing import TYPE_CHECKING

from res_unet.config.registry import ENCODERS, MODELS, Architecture

if TYPE_CHECKING:
    import keras

    from res_unet.config.keys import Config

__all__ = ["ENCODERS", "MODELS", "Architecture", "build_model"]


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
