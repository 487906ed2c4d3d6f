"""Functions that work on a built model of any architecture: freezing its pretrained
encoder and counting its FLOPs."""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras

from res_unet.models.efficientnet_unet import freeze_batchnorm
from res_unet.models.layers import ENCODER_NAME, leaf_layers


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
