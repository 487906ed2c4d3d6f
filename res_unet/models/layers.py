"""Building blocks shared by the architectures: band normalisation, conv blocks, output head.

Models of a fixed input size are made of built-in Keras layers only, so a saved model
reloads with ``keras.models.load_model(path)`` and no custom objects. Models with unknown
rows/cols (for inference on any size) up-sample bilinearly with
:class:`BilinearUpSampling2D`, registered as "res_unet>BilinearUpSampling2D": loading such
a model needs this module imported first. The layer names defined here are the same
in every architecture: the training and prediction code may rely on them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
import numpy as np

from res_unet.core.errors import UserError

INPUT_NAME = "image"
NORMALIZATION_NAME = "band_normalization"
ENCODER_NAME = "encoder"
LOGITS_NAME = "logits"
PROBABILITIES_NAME = "probabilities"


def check_band_stats(band_mean: Sequence[float], band_std: Sequence[float],
                     n_bands: int) -> tuple[list[float], list[float]]:
    """Validate per-band statistics (raw pixel units) and return them as float lists.

    A band with zero (or non-finite) standard deviation is constant in the training data;
    its std is replaced by 1 so that the band is only shifted, never divided by ~0.
    Raises UserError when the counts disagree with the model's band count.
    """
    mean = [float(m) for m in band_mean]
    std = [float(s) for s in band_std]
    if len(mean) != n_bands or len(std) != n_bands:
        raise UserError(f"model: N_DATA_BANDS={n_bands} but the dataset's band statistics have "
                        f"{len(mean)} means and {len(std)} standard deviations; set "
                        "N_DATA_BANDS to the dataset's band count or rebuild the dataset with "
                        "make_tfrecords")
    if not all(math.isfinite(m) for m in mean):
        raise UserError(f"model: band means {mean} are not all finite; rebuild the dataset "
                        "with make_tfrecords")
    std = [s if math.isfinite(s) and s > 0 else 1.0 for s in std]
    return mean, std


def band_normalization(x: keras.KerasTensor, band_mean: Sequence[float],
                       band_std: Sequence[float]) -> keras.KerasTensor:
    """Standardise raw pixel values per band: (x - mean) / std, computed in float32.

    Kept in float32 under mixed precision: raw uint16 values (e.g. 10000) would lose whole
    tens of units in bfloat16 before the mean is subtracted.
    """
    return keras.layers.Normalization(
        axis=-1, mean=list(band_mean), variance=[s * s for s in band_std], dtype="float32",
        name=NORMALIZATION_NAME)(x)


def conv_bn_relu(x: keras.KerasTensor, filters: int, kernel_size: int,
                 name: str) -> keras.KerasTensor:
    """Same-padded convolution (no bias: BatchNorm adds one), BatchNorm, ReLU."""
    x = keras.layers.Conv2D(filters, kernel_size, padding="same", use_bias=False,
                            name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def dropout(x: keras.KerasTensor, rate: float, kind: str, name: str) -> keras.KerasTensor:
    """Dropout of the given rate: 'standard' (pixels) or 'spatial' (whole channels).

    Returns x unchanged when rate is 0, so the model holds no idle layers.
    """
    if rate <= 0:
        return x
    if kind == "spatial":
        return keras.layers.SpatialDropout2D(rate, name=name)(x)
    if kind == "standard":
        return keras.layers.Dropout(rate, name=name)(x)
    raise ValueError(f"dropout type must be 'standard' or 'spatial', got {kind!r}")


def segmentation_head(x: keras.KerasTensor, n_classes: int) -> keras.KerasTensor:
    """1x1 convolution to logits, then sigmoid (n_classes=1) or softmax (n_classes>1).

    Both layers run in float32 so that mixed-precision models still output float32
    probabilities in [0, 1] (and logits a loss could use) without bfloat16/float16 rounding.
    """
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    x = keras.layers.Conv2D(n_classes, 1, dtype="float32", name=LOGITS_NAME)(x)
    activation = "sigmoid" if n_classes == 1 else "softmax"
    return keras.layers.Activation(activation, dtype="float32", name=PROBABILITIES_NAME)(x)


@keras.saving.register_keras_serializable(package="res_unet")
class BilinearUpSampling2D(keras.layers.Layer):
    """2x bilinear up-sampling of (batch, rows, cols, channels), rows/cols possibly unknown.

    Gives the values of ``UpSampling2D(2, interpolation="bilinear")`` (half-pixel centres,
    edges clamped): output row 2i is 0.25 x[i-1] + 0.75 x[i], row 2i+1 is 0.75 x[i] +
    0.25 x[i+1], then the same along columns. Needed because Keras 3.15's UpSampling2D
    tests the target size with a Python ``if``, which fails inside ``tf.function`` (predict,
    fit) when rows or cols are unknown.
    """

    def call(self, inputs):
        return _upsample_axis(_upsample_axis(inputs, 1), 2)

    def compute_output_shape(self, input_shape):
        batch, rows, cols, channels = input_shape
        return (batch, None if rows is None else 2 * rows, None if cols is None else 2 * cols,
                channels)


def _upsample_axis(x, axis: int):
    """Bilinear 2x up-sampling along one spatial axis (1 = rows, 2 = cols) with keras.ops."""
    def part(start, stop):
        index = [slice(None)] * 4
        index[axis] = slice(start, stop)
        return x[tuple(index)]

    before = keras.ops.concatenate([part(0, 1), part(None, -1)], axis=axis)
    after = keras.ops.concatenate([part(1, None), part(-1, None)], axis=axis)
    even = 0.25 * before + 0.75 * x
    odd = 0.75 * x + 0.25 * after
    interleaved = keras.ops.stack([even, odd], axis=axis + 1)
    shape = keras.ops.shape(x)
    new_shape = [-1, shape[1], shape[2], shape[3]]
    new_shape[axis] = shape[axis] * 2
    return keras.ops.reshape(interleaved, new_shape)


def upsample_bilinear(x: keras.KerasTensor, name: str) -> keras.KerasTensor:
    """2x bilinear up-sampling: the built-in layer when the size is known, else ours."""
    if x.shape[1] is None or x.shape[2] is None:
        return BilinearUpSampling2D(name=name)(x)
    return keras.layers.UpSampling2D(2, interpolation="bilinear", name=name)(x)


def leaf_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """All layers of a model in order, nested models replaced by their own layers."""
    leaves = []
    for layer in model.layers:
        leaves += leaf_layers(layer) if isinstance(layer, keras.Model) else [layer]
    return leaves


def check_input_shape(input_shape: Sequence[int | None], factor: int) -> tuple:
    """Validate (rows, cols, bands); known spatial sizes must be multiples of ``factor``.

    None rows/cols are allowed (any size at run time, which must then be a multiple too).
    """
    shape = tuple(input_shape)
    if len(shape) != 3 or shape[2] is None or shape[2] < 1:
        raise ValueError(f"input_shape must be (rows, cols, bands), got {shape}")
    for size in shape[:2]:
        if size is not None and size % factor:
            raise ValueError(f"input size {shape[:2]} is not divisible by {factor}, the "
                             "model's down-sampling factor")
    return shape


def inflate_stem_kernel(kernel: np.ndarray, n_bands: int) -> np.ndarray:
    """Adapt an RGB stem kernel (kh, kw, 3, C) to ``n_bands`` input bands (kh, kw, B, C).

    B >= 3: the first three bands keep the R, G, B kernels, each extra band gets the mean of
    the three; everything is multiplied by 3 / B. B < 3: every band gets the mean of the
    three times 3 / B (B = 1: the sum, what a grey image through RGB weights gives). Either
    way the response to a uniform input (the same value in every band) is unchanged, as in
    fastai and Raster Vision.
    """
    if kernel.ndim != 4 or kernel.shape[2] != 3:
        raise ValueError(f"expected an RGB kernel (kh, kw, 3, C), got {kernel.shape}")
    mean = kernel.mean(axis=2, keepdims=True)
    bands = [kernel] + [mean] * (n_bands - 3) if n_bands >= 3 else [mean] * n_bands
    return (np.concatenate(bands, axis=2) * (3.0 / n_bands)).astype(kernel.dtype)


def adapt_stem_kernel(kernel: np.ndarray, target_shape: Sequence[int], label: str) -> np.ndarray:
    """A pretrained stem kernel for a stem of ``target_shape`` (kh, kw, B, C): as it is when
    the shapes agree, inflated (:func:`inflate_stem_kernel`) when only the band count differs
    from an RGB source. Raises UserError naming ``label`` otherwise."""
    target = tuple(target_shape)
    if kernel.shape == target:
        return kernel
    if kernel.shape[2] != 3 or kernel.shape[:2] != target[:2]:
        raise UserError(f"{label}: stem kernel {kernel.shape} cannot be adapted to {target}; "
                        "use RGB (3-band) pretrained weights")
    return inflate_stem_kernel(kernel, target[2])


def freeze_batchnorm(encoder: keras.Model) -> None:
    """Keep the BatchNorm layers of a pretrained encoder in inference mode for good.

    Small training batches (8 tiles on a CPU) give noisy batch statistics that would wash out
    the pretrained ones; the affine weights of other layers still train.
    """
    for layer in leaf_layers(encoder):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
