"""Encoders of the U-Net: one :class:`EncoderSpec` record per ENCODER name, and the
feature-pyramid contract every encoder keeps.

The contract (keras-hub's ``FeaturePyramidBackbone.pyramid_outputs``): an encoder is a
Keras model named 'encoder' that takes standardised bands (rows, cols, B), rows/cols
multiples of 32 or None, and returns a dict {"P1": ..., "P5": ...} of feature maps, Pn
2**n times smaller than its input. The decoder reads only that dict, never layer names.

A family of encoders is one file here defining ``ENCODERS`` = {name: EncoderSpec}
(``efficientnet.py``: keras.applications B0..B7; ``efficientnet_lite.py``: Lite0..2),
registered by one ``EncoderFamily`` entry in :data:`res_unet.config.registry.ENCODER_FAMILIES`,
which the config reads without Keras. This module imports no Keras itself: a family's file
is imported when one of its encoders is asked for (:func:`encoder_spec`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from res_unet.config.registry import ENCODER_FAMILIES

if TYPE_CHECKING:
    import keras

__all__ = ["EncoderSpec", "encoder_names", "encoder_spec", "same_band_stats"]


@dataclass(frozen=True)
class EncoderSpec:
    """Everything the U-Net needs to know about one encoder.

    Attributes:
        name: the config's ENCODER value.
        description: what it is, in a few words (the architecture and its size).
        parameters: its parameter count at 3 bands (a test checks the built encoder).
        build: ``build(input_shape) -> keras.Model``, the encoder with random weights,
            keeping the feature-pyramid contract (see the module docstring).
        read_weights: ``read_weights(weights) -> (weights, label)``: what ENCODER_WEIGHTS
            ('imagenet' or a file path) means for this encoder, read before the model is
            built so that a bad file fails fast; ``label`` names the source in messages.
            Raises UserError for weights it cannot use.
        load_weights: ``load_weights(encoder, weights, label)`` copies what
            ``read_weights`` returned into a built encoder (inflating the stem kernel to
            its band count). Raises UserError when they do not fit.
        band_stats: ``band_stats(band_mean, band_std) -> (mean, std)``: the normalisation
            statistics that turn raw bands into the input the encoder's stem expects
            (:func:`same_band_stats` for a plain per-band z-score).
        decoder_filters: default channels of the U-Net's 5 decoder stages, deepest first.
    """

    name: str
    description: str
    parameters: int
    build: Callable[[Sequence[int | None]], keras.Model]
    read_weights: Callable[[str], tuple[Any, str]]
    load_weights: Callable[[keras.Model, Any, str], Any]
    band_stats: Callable[[Sequence[float], Sequence[float]], tuple[list[float], list[float]]]
    decoder_filters: tuple[int, int, int, int, int]


def same_band_stats(band_mean: Sequence[float], band_std: Sequence[float]
                    ) -> tuple[list[float], list[float]]:
    """The dataset's statistics unchanged: the stem sees per-band z-scores."""
    return [float(m) for m in band_mean], [float(s) for s in band_std]


def encoder_names() -> tuple[str, ...]:
    """Every registered ENCODER value, family by family."""
    return tuple(name for family in ENCODER_FAMILIES for name in family.names)


def encoder_spec(name: str) -> EncoderSpec:
    """The record of encoder ``name``, importing its family's file (and Keras).

    Raises ValueError for a name no family registers.
    """
    for family in ENCODER_FAMILIES:
        if name in family.names:
            module = importlib.import_module(f"{__name__}.{family.module}")
            return module.ENCODERS[name]
    raise ValueError(f"encoder must be one of {', '.join(encoder_names())}, got {name!r}")
