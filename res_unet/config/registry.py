"""The registry of names the config offers: architectures (with their encoders and size
constraints), encoder families and loss terms.

The one place that names the architectures (:data:`MODELS`): the config takes the MODEL and
ENCODER choices and the input size constraint from it, and
:func:`res_unet.models.build_model` finds each architecture's model file through it. Plain
data: it imports neither Keras nor TensorFlow (the model file is imported when a model is
built), so a config is read and checked before TensorFlow loads. Adding an architecture is
one model file and one entry here.

Runtimes are registered here too (:data:`RUNTIMES`): each names the module of
:mod:`res_unet.inference` and the function that makes a batch -> probabilities call of a
loaded model, and the package it needs. INFER_RUNTIME offers 'auto' and these names; adding a
runtime is that module and one ``Runtime`` entry here.

Encoders are registered here too, by family (:data:`ENCODER_FAMILIES`): each family is one
file of :mod:`res_unet.models.encoders` holding an ``EncoderSpec`` record per encoder name
(builder of the P1..P5 features, weights, input statistics, decoder widths). Adding an
encoder family is that file and one ``EncoderFamily`` entry here; the U-Net takes every
encoder named here, and a test checks each file defines exactly the names listed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from res_unet.config.keys import Config

__all__ = ["ENCODERS", "ENCODER_FAMILIES", "LOSS_TERMS", "MODELS", "RUNTIMES", "Architecture",
           "EncoderFamily", "Runtime"]

# The terms a LOSS may weigh (res_unet.training.losses implements each).
LOSS_TERMS = ("dice", "focal", "boundary", "ce")


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


@dataclass(frozen=True)
class EncoderFamily:
    """Encoders defined in one file of :mod:`res_unet.models.encoders`.

    Attributes:
        module: the file's name in res_unet/models/encoders/ (without .py); it defines
            ``ENCODERS``, {name: EncoderSpec} for exactly ``names``.
        names: the ENCODER values it provides.
        description: what they are, for the config reference.
    """

    module: str
    names: tuple[str, ...]
    description: str


# The encoders of the U-Net, family by family, in the order the config reference lists them.
ENCODER_FAMILIES = (
    EncoderFamily(
        module="efficientnet",
        names=tuple(f"B{i}" for i in range(8)),
        description="EfficientNet B0..B7 (B7 as in the original work; 64 M parameters)",
    ),
    EncoderFamily(
        module="efficientnet_lite",
        names=("lite0", "lite1", "lite2"),
        description="EfficientNet-Lite 'lite0', 'lite1', 'lite2' (3.4-4.8 M parameters, fast "
                    "on CPUs)",
    ),
)

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
        # The name predates the encoder registry; it stays so configs and run folders load.
        description="U-Net with an EfficientNet encoder, optionally pretrained",
        module="res_unet.models.unet",
        function="unet_from_config",
        downsampling_factor=lambda cfg: 32,
        encoders=tuple(name for family in ENCODER_FAMILIES for name in family.names),
        encoder_description=" or ".join(family.description for family in ENCODER_FAMILIES),
    ),
)

# cfg.MODEL -> its Architecture, in the order the config reference lists them.
MODELS: dict[str, Architecture] = {a.name: a for a in _ARCHITECTURES}

# Every ENCODER value some architecture accepts, without repeats.
ENCODERS: tuple[str, ...] = tuple(dict.fromkeys(e for a in _ARCHITECTURES for e in a.encoders))


@dataclass(frozen=True)
class Runtime:
    """One INFER_RUNTIME value: what runs a loaded model.

    Attributes:
        module: the module of :mod:`res_unet.inference` that defines ``function``.
        function: ``function(loaded: LoadedModel) -> Callable[[np.ndarray], np.ndarray]``,
            float32 raw-pixel batches (N, h, w, bands) -> float32 probabilities.
        package: the Python package it needs (imported only when used), or None.
        extra: the res_unet extra that installs ``package`` (for the message when missing).
    """

    module: str
    function: str
    package: str | None = None
    extra: str | None = None


# INFER_RUNTIME -> Runtime ('auto' chooses among them: res_unet.inference.runtime).
RUNTIMES: dict[str, Runtime] = {
    "tensorflow": Runtime(module="runtime", function="tensorflow_runner"),
    "openvino": Runtime(module="openvino", function="float32_runner", package="openvino",
                        extra="openvino"),
    "openvino_bf16": Runtime(module="openvino", function="bf16_runner", package="openvino",
                             extra="openvino"),
}
