"""Residual U-Net: an encoder-decoder of residual convolution blocks with skip connections.

Level ``i`` (0 = full resolution) has ``filters * 2**i`` channels; ``depth`` max-pooling
steps lead to the bottleneck at level ``depth``, so the input size must be a multiple of
``2**depth``. Every convolution, the bottleneck's included, uses ``kernel_size``.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from res_unet.config.keys import Config
from res_unet.models.layers import (
    INPUT_NAME,
    band_normalization,
    check_band_stats,
    check_input_shape,
    conv_bn_relu,
    dropout,
    segmentation_head,
    upsample_bilinear,
)

# Layers


def residual_block(x: keras.KerasTensor, filters: int, kernel_size: int,
                   name: str) -> keras.KerasTensor:
    """Two convolutions plus a projected shortcut: relu(bn(conv(relu(bn(conv x)))) + bn(conv1x1 x)).

    The shortcut is a 1x1 convolution with BatchNorm so that it matches ``filters``
    channels; the last ReLU comes after the addition, as in He et al.'s residual units.
    """
    shortcut = keras.layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_shortcut_conv")(x)
    shortcut = keras.layers.BatchNormalization(name=f"{name}_shortcut_bn")(shortcut)
    y = conv_bn_relu(x, filters, kernel_size, name=f"{name}_1")
    y = keras.layers.Conv2D(filters, kernel_size, padding="same", use_bias=False,
                            name=f"{name}_2_conv")(y)
    y = keras.layers.BatchNormalization(name=f"{name}_2_bn")(y)
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def upsample(x: keras.KerasTensor, filters: int, kernel_size: int, mode: str,
             name: str) -> keras.KerasTensor:
    """Double the spatial size: 'transpose' (learned 2x2 stride-2 transposed convolution,
    no checkerboard overlap) or 'bilinear' (fixed interpolation, then a convolution)."""
    if mode == "transpose":
        return keras.layers.Conv2DTranspose(filters, 2, strides=2, padding="same",
                                            name=f"{name}_transpose")(x)
    if mode == "bilinear":
        x = upsample_bilinear(x, name=f"{name}_bilinear")
        return keras.layers.Conv2D(filters, kernel_size, padding="same", name=f"{name}_conv")(x)
    raise ValueError(f"upsample must be 'transpose' or 'bilinear', got {mode!r}")


def level_dropout(rate: float, change_per_level: float, level: int) -> float:
    """Dropout rate at a level: ``rate + level * change_per_level`` clipped to [0, 0.9]."""
    return min(0.9, max(0.0, rate + level * change_per_level))


# Model


def build_resunet(input_shape: Sequence[int | None], n_classes: int,
                  band_mean: Sequence[float], band_std: Sequence[float], *,
                  filters: int = 16, depth: int = 4, kernel_size: int = 3,
                  upsample_mode: str = "transpose", dropout_rate: float = 0.1,
                  dropout_change_per_level: float = 0.0, dropout_type: str = "standard",
                  dropout_on_upsampling: bool = False, name: str = "resunet") -> keras.Model:
    """Build a residual U-Net.

    Args:
        input_shape: (rows, cols, bands); rows/cols multiples of ``2**depth`` or None
            (any multiple at run time, e.g. for tiled inference).
        n_classes: 1 -> one sigmoid channel (binary); N > 1 -> N softmax channels.
        band_mean, band_std: per-band statistics of the raw training pixels; the model
            standardises its raw float32 input with them.
        filters: channels at the shallowest level, doubled per level.
        depth: number of 2x down-sampling steps.
        kernel_size: odd convolution kernel size used in every residual block.
        upsample_mode: 'transpose' or 'bilinear'.
        dropout_rate: dropout at the shallowest level; ``dropout_change_per_level`` is added
            per deeper level (clipped to [0, 0.9]); 0 disables it.
        dropout_type: 'standard' or 'spatial'.
        dropout_on_upsampling: also drop out in the decoder, at the level's rate.

    Returns:
        A keras.Model from float32 raw pixels (batch, rows, cols, bands) to float32
        probabilities (batch, rows, cols, n_classes); layers 'logits' and 'probabilities'.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    shape = check_input_shape(input_shape, 2**depth)
    band_mean, band_std = check_band_stats(band_mean, band_std, shape[2])

    inputs = keras.Input(shape=shape, dtype="float32", name=INPUT_NAME)
    x = band_normalization(inputs, band_mean, band_std)

    skips = []
    for level in range(depth):
        x = residual_block(x, filters * 2**level, kernel_size, name=f"encoder{level}")
        x = dropout(x, level_dropout(dropout_rate, dropout_change_per_level, level),
                    dropout_type, name=f"encoder{level}_dropout")
        skips.append(x)
        x = keras.layers.MaxPooling2D(2, name=f"encoder{level}_pool")(x)

    x = residual_block(x, filters * 2**depth, kernel_size, name="bottleneck")
    x = dropout(x, level_dropout(dropout_rate, dropout_change_per_level, depth),
                dropout_type, name="bottleneck_dropout")

    for level in reversed(range(depth)):
        x = upsample(x, filters * 2**level, kernel_size, upsample_mode, name=f"decoder{level}_up")
        x = keras.layers.Concatenate(name=f"decoder{level}_concat")([x, skips[level]])
        if dropout_on_upsampling:
            x = dropout(x, level_dropout(dropout_rate, dropout_change_per_level, level),
                        dropout_type, name=f"decoder{level}_dropout")
        x = residual_block(x, filters * 2**level, kernel_size, name=f"decoder{level}")

    outputs = segmentation_head(x, n_classes)
    return keras.Model(inputs, outputs, name=name)


# Config


def resunet_from_config(cfg: Config, band_mean: Sequence[float], band_std: Sequence[float],
                        input_shape: Sequence[int | None] | None = None) -> keras.Model:
    """Build the residual U-Net described by the config.

    ``input_shape`` defaults to (*TARGET_SIZE, N_DATA_BANDS); pass (None, None, bands) for a
    model that accepts any multiple of 2**DEPTH.
    """
    return build_resunet(
        input_shape or (*cfg.TARGET_SIZE, cfg.N_DATA_BANDS), cfg.NCLASSES, band_mean, band_std,
        filters=cfg.FILTERS, depth=cfg.DEPTH, kernel_size=cfg.KERNEL_SIZE,
        upsample_mode=cfg.UPSAMPLE, dropout_rate=cfg.DROPOUT,
        dropout_change_per_level=cfg.DROPOUT_CHANGE_PER_LAYER, dropout_type=cfg.DROPOUT_TYPE,
        dropout_on_upsampling=cfg.USE_DROPOUT_ON_UPSAMPLING)
