"""Functions that work on a built model of any architecture: freezing its pretrained
encoder, running its BatchNorm through TensorFlow's fused kernel, and counting its FLOPs."""

from __future__ import annotations

import math
import types
from collections.abc import Sequence

import keras
import tensorflow as tf

from res_unet.models.layers import ENCODER_NAME, freeze_batchnorm, leaf_layers


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


def _fused_call(self: keras.layers.BatchNormalization, inputs, training=None, mask=None):
    """BatchNormalization.call with the training-mode statistics and normalisation done by
    TensorFlow's FusedBatchNormV3 (and its fused gradient) instead of Keras's separate
    moments and normalisation ops. Same result: float32 arithmetic, moving statistics
    updated with the biased batch variance as Keras does. Inference mode, frozen layers
    and masked inputs take Keras's own path."""
    if not (training and self.trainable) or mask is not None:
        return type(self).call(self, inputs, training=training, mask=mask)
    x = tf.cast(inputs, tf.float32)
    channels = x.shape[-1]
    gamma = self.gamma if self.scale else tf.ones([channels], tf.float32)
    beta = self.beta if self.center else tf.zeros([channels], tf.float32)
    y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
        x, tf.cast(gamma, tf.float32), tf.cast(beta, tf.float32), epsilon=self.epsilon,
        is_training=True)
    # The fused kernel returns the unbiased (n / (n - 1)) variance; Keras averages the
    # biased one into its moving statistics.
    n = tf.cast(tf.size(x, out_type=tf.int64) // channels, tf.float32)
    variance = variance * (n - 1.0) / tf.maximum(n, 2.0)
    momentum = self.momentum
    self.moving_mean.assign(self.moving_mean * momentum + mean * (1.0 - momentum))
    self.moving_variance.assign(self.moving_variance * momentum + variance * (1.0 - momentum))
    return tf.cast(y, self.compute_dtype)


def _fusable(layer: keras.layers.Layer) -> bool:
    """Whether TensorFlow's fused kernel computes what this BatchNormalization layer does:
    4-D input normalised over its last axis, no renorm or cross-replica statistics, and an
    epsilon the kernel accepts (it raises smaller ones to 1.001e-5)."""
    if type(layer) is not keras.layers.BatchNormalization:
        return False
    try:
        shape = layer.input.shape
    except (AttributeError, ValueError):  # never called on a symbolic input
        return False
    return (len(shape) == 4 and layer.axis in (-1, 3)
            and not layer.renorm and not layer.synchronized and layer.epsilon >= 1.001e-5)


def fuse_batchnorm(model: keras.Model) -> int:
    """Make the training-mode BatchNormalization layers of ``model`` use TensorFlow's fused
    kernel; returns how many layers were changed.

    Keras 3 computes a training-mode BatchNorm as separate ops (mean, variance, then scale
    and shift), each a pass over the feature map forward and backward; the fused kernel
    does each direction in one op. On a CPU, where these layers are bound by memory, the
    residual U-Net's training step ran 1.07x faster with TensorFlow's Eigen kernels and
    1.14-1.38x with oneDNN's (bench/bench_train.py --keras-batchnorm; docs/experiments.md).
    Only the instances' ``call`` changes: the layers stay ``keras.layers.BatchNormalization``
    (saved files are unchanged), and inference and frozen layers run as before.
    """
    changed = 0
    for layer in leaf_layers(model):
        if _fusable(layer):
            layer.call = types.MethodType(_fused_call, layer)
            changed += 1
    return changed


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
