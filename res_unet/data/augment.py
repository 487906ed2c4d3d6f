"""Random augmentation, for the training split only: geometric changes of an (image, label)
pair written into the dataset (:func:`augment_pair`), and photometric jitter drawn afresh on
the fly while training (:func:`photometric_jitter`).

Flips and 90-degree rotations are exact array operations. Rotation by a small angle, zoom
and shift are combined into one affine map about the image centre and applied once per band:
bilinear for the image (dtype kept), nearest neighbour for the label (no new class values).
Pixels mapped from outside the image take mirrored content, never a fill colour that would
look like a class of its own.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.ndimage import affine_transform

from res_unet.config.keys import Config


def _warp(band: np.ndarray, matrix: np.ndarray, offset: np.ndarray, order: int) -> np.ndarray:
    """Apply ``input = matrix @ output + offset`` to one (H, W) band, mirroring at the edges."""
    out_dtype = band.dtype if order == 0 else np.float32
    return affine_transform(band, matrix, offset=offset, output_shape=band.shape, order=order,
                            mode="mirror", output=out_dtype, prefilter=False)


def _to_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Float values back to ``dtype``: integers are rounded and clipped to their range."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype, copy=False)


def augment_pair(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                 cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """One random augmentation of ``image`` (H, W, B) or (H, W) and ``label`` (H, W).

    Uses AUG_HFLIP, AUG_VFLIP, AUG_ROT90 (any multiple of 90 degrees for square images, 0 or
    180 otherwise), AUG_ROT (max degrees), AUG_ZOOM (scale drawn from [1 - z, 1 + z], > 1
    magnifies), AUG_WIDTHSHIFT and AUG_HEIGHTSHIFT (fractions of the width/height). Returns
    new arrays of the same shapes and dtypes; label values are a subset of the input's. The
    result depends only on the inputs and the state of ``rng`` (draws are made in a fixed
    order whatever the config).
    """
    h, w = label.shape
    hflip = rng.random() < 0.5
    vflip = rng.random() < 0.5
    k90 = int(rng.integers(4))
    angle = np.deg2rad(rng.uniform(-1.0, 1.0) * cfg.AUG_ROT)
    zoom = 1.0 + rng.uniform(-1.0, 1.0) * cfg.AUG_ZOOM
    shift = np.array([rng.uniform(-1.0, 1.0) * cfg.AUG_HEIGHTSHIFT * h,
                      rng.uniform(-1.0, 1.0) * cfg.AUG_WIDTHSHIFT * w])

    bands = image if image.ndim == 3 else image[..., None]
    if cfg.AUG_HFLIP and hflip:
        bands, label = bands[:, ::-1], label[:, ::-1]
    if cfg.AUG_VFLIP and vflip:
        bands, label = bands[::-1], label[::-1]
    if cfg.AUG_ROT90:
        k = k90 if h == w else 2 * (k90 % 2)
        bands, label = np.rot90(bands, k, axes=(0, 1)), np.rot90(label, k, axes=(0, 1))

    if angle == 0 and zoom == 1 and not shift.any():
        out = np.array(bands, order="C")  # always a copy, never a view of the input
        return (out if image.ndim == 3 else out[..., 0]), np.array(label, order="C")

    # Output pixel o samples input R(angle) (o - c) / zoom + c - shift, c = the centre.
    cos, sin = np.cos(angle), np.sin(angle)
    matrix = np.array([[cos, -sin], [sin, cos]]) / zoom
    centre = (np.array([h, w], dtype=float) - 1.0) / 2.0
    offset = centre - matrix @ centre - shift
    label = np.ascontiguousarray(label)
    bands = np.ascontiguousarray(bands)
    new_label = _warp(label, matrix, offset, order=0)
    new_bands = np.stack([_to_dtype(_warp(bands[..., b], matrix, offset, order=1), image.dtype)
                          for b in range(bands.shape[-1])], axis=-1)
    return (new_bands if image.ndim == 3 else new_bands[..., 0]), new_label


def photometric_jitter(image: Any, strength: float, dtype: str | np.dtype) -> Any:
    """One random brightness, contrast and per-band gain change of a float (H, W, B) image.

    With s = ``strength``: the contrast about the mean of the image's valid pixels is scaled
    by exp(U(-s/2, s/2)), then every band by exp(U(-s, s)) (brightness) times its own
    exp(U(-s/4, s/4)) (tint); the result is clipped to the range of ``dtype``, the integer
    type the pixels are stored in. Pixels that are zero in every band (nodata, padding) stay
    zero. Draws come from TensorFlow's global random state.
    """
    import tensorflow as tf

    bands = tf.shape(image)[-1]
    contrast = tf.exp(tf.random.uniform([], -strength / 2, strength / 2))
    gain = tf.exp(tf.random.uniform([], -strength, strength)
                  + tf.random.uniform([bands], -strength / 4, strength / 4))
    nodata = tf.reduce_all(image == 0, axis=-1, keepdims=True)
    valid = tf.cast(tf.logical_not(nodata), image.dtype)
    mean = (tf.reduce_sum(image * valid, axis=[0, 1], keepdims=True)
            / tf.maximum(tf.reduce_sum(valid), 1.0))
    top = float(np.iinfo(dtype).max)
    out = tf.clip_by_value(((image - mean) * contrast + mean) * gain, 0.0, top)
    return tf.where(nodata, image, out)
