"""Pixel types and nodata of the rasters res_unet reads.

Pixel types: models take raw uint8 or uint16 values, standardised with the band statistics
of the raw training pixels, so other types are accepted where those statistics hold: uint8
and uint16 are kept; signed or wider integers (int16, int32, uint32) and floats (float32,
float64) are cast to uint16 (to uint8 for a model trained on uint8,
:func:`res_unet.geo.rasters.fit_model_dtype`) when every valid pixel is a whole number in that
range (a lossless cast), and refused with one line naming the real type otherwise
(rescaling reflectances silently would change what the model sees). The stored type is
kept in ``RasterMeta.stored_dtype`` for messages.

Nodata: a pixel whose bands all equal the raster's declared nodata (NaN too) is nodata, the
one rule :func:`nodata_mask` applies everywhere (segmentation marks such pixels nodata in its
outputs; training leaves them out of the loss through IGNORE_CLASS). Nodata pixels are left
out of the type checks; when the declared value has no place in the unsigned type (-9999,
NaN) they read as 0, and ``RasterMeta.nodata`` says 0, so the rule still finds them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from res_unet.core.errors import UserError


def whole_number_range(array: np.ndarray, path: Path, what: str, top: int,
                       stored: str | None = None, nodata: float | None = None,
                       model: str = "") -> None:
    """Raise unless every value of ``array`` (the valid pixels) is a whole number in 0..top.

    ``stored`` names the file's pixel type when ``array`` is already converted; ``nodata``
    is the declared value the pixels checked exclude; ``model`` says whose range top is."""
    kind = array.dtype.kind
    dtype = stored or array.dtype.name
    if kind not in "iuf":
        raise UserError(f"{path}: {dtype} pixels are not supported; export the {what} "
                        "as uint8 or uint16")
    if array.size == 0:
        raise UserError(f"{path}: the {what} has no pixels" + (
            f" but nodata ({nodata:g})" if nodata is not None else "") + "; remove or "
            "re-export it")
    lo, hi = array.min(), array.max()
    besides = (f", besides its nodata {nodata:g}" if nodata is not None else
               ", and no nodata value declared")
    if kind == "f" and not (np.isfinite(lo) and np.isfinite(hi)
                            and np.array_equal(array, np.round(array))):
        raise UserError(f"{path}: {dtype} pixels with fractional or NaN values "
                        f"({lo:g}..{hi:g}{besides}) are not supported; export the {what} as "
                        "uint8 or uint16 (e.g. reflectance 0..1 scaled to 0..10000: "
                        "gdal_translate -ot UInt16 -scale 0 1 0 10000 in.tif out.tif)")
    declare = (f", or if {lo:g} marks missing data declare it (gdal_edit.py -a_nodata {lo:g} "
               f"{path.name})" if nodata is None and kind != "u" else "")
    if lo < 0:
        raise UserError(f"{path}: {dtype} {what} has negative values (min {lo:g}{besides}); "
                        f"the model takes whole numbers 0..{top}: export it as uint8/uint16 "
                        f"with values 0..{top} (e.g. clip negatives to 0){declare}")
    if hi > top:
        named = "" if kind == "u" and stored is None else f"{dtype} "
        raise UserError(f"{path}: {named}{what} values reach {hi:g}, above {top}{model}; "
                        f"export it with values 0..{top}")


UINT8_MODEL = " (the model was trained on 8-bit, uint8, imagery)"


def nodata_mask(image: np.ndarray, values: Sequence[float]) -> np.ndarray:
    """(H, W) bool: True where every band of ``image`` (H, W, B) equals one of ``values``
    (NaN: where every band is NaN). The one nodata rule of inputs and outputs."""
    mask = np.zeros(image.shape[:2], bool)
    for value in values:
        same = np.isnan(image) if np.isnan(value) else image == value
        mask |= np.all(same, axis=-1)
    return mask


def nodata_as_read(nodata: float | None, dtype: np.dtype) -> float | None:
    """The nodata value of pixels stored as ``dtype`` once read (:func:`as_image_dtype`):
    as declared for uint8/uint16 and for values uint16 holds, else 0."""
    if nodata is None or np.dtype(dtype) in (np.uint8, np.uint16):
        return nodata
    return nodata if math.isfinite(nodata) and nodata == round(nodata) and (
        0 <= nodata <= 65535) else 0.0


def as_image_dtype(array: np.ndarray, path: Path, nodata: float | None = None,
                   target: type = np.uint16) -> np.ndarray:
    """uint8/uint16 unchanged; bool -> uint8; other numeric -> ``target`` (uint16, or uint8)
    if lossless, else raise. Pixels at the declared ``nodata`` are not checked and become
    :func:`nodata_as_read`'s value."""
    if array.dtype in (np.uint8, np.uint16):
        return array
    if array.dtype == bool:
        return array.astype(np.uint8)
    top = int(np.iinfo(target).max)
    model = UINT8_MODEL if top == 255 else ""
    invalid = None if nodata is None else nodata_mask(array, [nodata])
    if invalid is not None and invalid.any():
        whole_number_range(array[~invalid], path, "image", top, nodata=nodata, model=model)
        out = np.where(invalid[..., None], np.array(0, array.dtype), array).astype(target)
        out[invalid] = nodata_as_read(nodata, array.dtype)
        return out
    whole_number_range(array, path, "image", top, nodata=nodata, model=model)
    return array.astype(target)
