"""Segmentation models: a registry of architectures and helpers that work on any of them.

Every model maps float32 raw pixels (batch, rows, cols, bands) to float32 probabilities
(batch, rows, cols, 1) sigmoid for NCLASSES=1 or (batch, rows, cols, N) softmax for N > 1.
It standardises its input with the dataset's per-band mean and std. Models of a fixed
input size (the default, TARGET_SIZE) are made of built-in Keras layers only:
``keras.models.load_model("model.keras")`` needs no custom objects. Models built with
unknown rows/cols (``input_shape=(None, None, bands)``) contain
:class:`BilinearUpSampling2D`; load those after ``import res_unet.models``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import keras

from res_unet.config import Config
from res_unet.models.efficientnet_unet import (
    build_efficientnet_unet,
    efficientnet_unet_from_config,
    freeze_batchnorm,
)
from res_unet.models.layers import (
    ENCODER_NAME,
    LOGITS_NAME,
    PROBABILITIES_NAME,
    BilinearUpSampling2D,
    inflate_stem_kernel,
    leaf_layers,
)
from res_unet.models.resunet import build_resunet, resunet_from_config

__all__ = [
    "LOGITS_NAME",
    "MODELS",
    "PROBABILITIES_NAME",
    "BilinearUpSampling2D",
    "build_efficientnet_unet",
    "build_model",
    "build_resunet",
    "count_flops",
    "inflate_stem_kernel",
    "set_encoder_trainable",
]

ModelBuilder = Callable[..., keras.Model]

# cfg.MODEL -> function(cfg, band_mean, band_std, input_shape=None) -> keras.Model
MODELS: dict[str, ModelBuilder] = {
    "resunet": resunet_from_config,
    "efficientnet_unet": efficientnet_unet_from_config,
}


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

    Raises UserError for bad user input (band statistics, encoder weights).
    """
    return MODELS[cfg.MODEL](cfg, band_mean, band_std, input_shape=input_shape)


def set_encoder_trainable(model: keras.Model, trainable: bool) -> None:
    """Freeze (False) or unfreeze (True) the pretrained encoder of a model.

    A frozen encoder's BatchNorm layers run in inference mode (moving statistics neither
    used from the batch nor updated), which is what fine-tuning needs. Re-compile the model
    after calling this so that the optimizer sees the new set of trainable weights. Raises
    ValueError for models without a nested 'encoder' (the residual U-Net).
    """
    try:
        encoder = model.get_layer(ENCODER_NAME)
    except ValueError:
        raise ValueError(f"model '{model.name}' has no pretrained encoder to freeze") from None
    encoder.trainable = trainable
    if trainable:
        # Unfreezing a pretrained encoder trains its weights, never its BatchNorm statistics.
        freeze_batchnorm(encoder)


def _spatial_size(shape: Sequence[int | None], layer: keras.layers.Layer) -> int:
    """Number of positions in a (batch, ..., channels) shape; all must be known."""
    dims = tuple(shape[1:-1])
    if any(d is None for d in dims):
        raise ValueError(f"count_flops needs a model with a fixed input size; layer "
                         f"'{layer.name}' has shape {tuple(shape)}")
    return math.prod(dims)


def count_flops(model: keras.Model, batch_size: int = 1) -> int:
    """Forward-pass FLOPs of ``batch_size`` images (1 multiply-add = 2 FLOPs).

    Counts the multiply-adds of Conv2D, DepthwiseConv2D, Conv2DTranspose and Dense layers
    from their kernel and feature-map sizes: 2 * kh*kw*cin*cout * output positions for a
    convolution (cin per group), 2 * kh*kw*cin*cout * *input* positions for a transposed
    one. BatchNorm, activations, pooling, resizing and biases (a few % at most) are left out.
    The model must have a fixed input size.
    """
    macs = 0
    for layer in leaf_layers(model):
        kernel = getattr(layer, "kernel", None)
        if kernel is None:
            continue
        size = math.prod(kernel.shape)
        if isinstance(layer, keras.layers.Conv2DTranspose):
            macs += size * _spatial_size(layer.input.shape, layer)
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D,
                                keras.layers.Dense)):
            macs += size * _spatial_size(layer.output.shape, layer)
    return 2 * macs * batch_size
