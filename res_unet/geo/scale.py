"""Pixel size in metres, and moving rasters between a scene's pixel size and a model's.

A model learns objects at one ground size per pixel; a scene at another pixel size is
resampled to the model's before segmentation and the result mapped back onto the scene's
own grid, so masks always line up with the user's data.

Pixel sizes are (x, y) in metres, positive. Resampling keeps the scene's extent: the new grid
has ``round(H * src / dst)`` x ``round(W * src / dst)`` pixels over the same ground, so the
mapping back by :func:`restore_scene_grid` is exact in shape whatever the rounding.
Geographic CRSs are measured at the scene centre on the WGS 84 ellipsoid (other datums'
ellipsoids differ by less than 1e-4 in the radii, far below any tolerance used here).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.errors
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.transform import Affine
from rasterio.warp import reproject

from res_unet.core import messages
from res_unet.core.errors import UserError
from res_unet.geo.grid import open_raster

_WGS84_A = 6378137.0
_WGS84_F = 1 / 298.257223563
PixelSize = float | tuple[float, float]


def _xy(size: PixelSize) -> tuple[float, float]:
    if isinstance(size, (int, float)):
        return float(size), float(size)
    x, y = size
    return float(x), float(y)


def pixel_size_m(source: Any, crs: Any = None, shape: Sequence[int] | None = None
                 ) -> tuple[float, float]:
    """Ground size of one pixel, (x, y) in metres.

    ``source`` is an open rasterio dataset (its transform, CRS and size are used), or an
    affine transform given with ``crs`` (and, for a geographic CRS, the raster ``shape``
    (H, W) to find the scene centre). Projected CRSs: the transform's pixel size times the
    CRS's linear unit (feet count as feet). Geographic CRSs: metres along the parallel and
    the meridian at the scene centre. Raises UserError when there is no CRS.
    """
    name = getattr(source, "name", None)
    if hasattr(source, "transform"):
        transform, crs, shape = source.transform, source.crs, (source.height, source.width)
    else:
        transform = source
    if crs is None:
        raise UserError(f"{name or 'the image'}: has no CRS, so its pixel size in metres is "
                        "unknown; export it as a GeoTIFF with its CRS, or give the pixel size")
    crs = CRS.from_user_input(crs)
    # Column and row steps in map units (exact for rotated grids too).
    step_x = math.hypot(transform.a, transform.d)
    step_y = math.hypot(transform.b, transform.e)
    if not crs.is_geographic:
        _, metres = crs.linear_units_factor
        return step_x * metres, step_y * metres
    if shape is None:
        raise ValueError("pixel_size_m needs the raster shape (H, W) for a geographic CRS")
    _, radians = crs.units_factor
    _, lat = transform @ (shape[1] / 2, shape[0] / 2)
    phi = lat * radians
    e2 = _WGS84_F * (2 - _WGS84_F)
    w = math.sqrt(1 - e2 * math.sin(phi) ** 2)
    prime_vertical = _WGS84_A / w
    meridional = _WGS84_A * (1 - e2) / w ** 3
    return (step_x * radians * prime_vertical * math.cos(phi), step_y * radians * meridional)


def raster_pixel_size(path: str | os.PathLike) -> tuple[float, float] | None:
    """Pixel size (x, y) in metres of a raster file in a CRS (a GeoTIFF), read from its
    header; None for a plain image (JPEG, PNG, a TIFF without a CRS) or a file GDAL cannot
    open (reading it later says why)."""
    try:
        with open_raster(path) as src:
            return pixel_size_m(src) if src.crs is not None else None
    except rasterio.errors.RasterioError:
        return None


def training_pixel_size(images: Sequence[str | os.PathLike], plain: float | None,
                        downsample: int = 1) -> float | None:
    """Metres per pixel of what a model trained on ``images`` sees: the median pixel size of
    the georeferenced ones (the mean of x and y), else ``plain`` (the config's PIXEL_SIZE for
    plain JPEG/PNG images), times ``downsample``; None when neither is known. Images whose
    pixel sizes differ by more than 10 % from that are named in a note (a model learns one
    ground size per pixel)."""
    sizes = {Path(p): raster_pixel_size(p) for p in images}
    known = {p: (x + y) / 2 for p, size in sizes.items() if size is not None for x, y in [size]}
    if not known:
        return None if plain is None else plain * downsample
    median = float(np.median(list(known.values())))
    odd = [p for p, size in known.items() if needs_resampling(size, median)]
    if odd:
        messages.note(f"{len(odd)} training images are not at the median pixel size of "
                      f"{median:g} m (e.g. {odd[0]}: {known[odd[0]]:g} m); the model card records "
                      f"{median:g} m")
    if len(known) < len(sizes) and plain is not None and needs_resampling(plain, median):
        messages.note(f"PIXEL_SIZE {plain:g} m differs from the georeferenced training images' "
                      f"{median:g} m; the model card records {median:g} m")
    return median * downsample


def needs_resampling(scene_px: PixelSize, model_px: PixelSize, tol: float = 0.1) -> bool:
    """Whether a scene's pixel size differs from the model's by more than ``tol`` (a
    fraction: 0.1 = 10 %) along either axis; within it the scene is used as it is."""
    return any(abs(s / m - 1) > tol for s, m in zip(_xy(scene_px), _xy(model_px), strict=True))


def resampled_shape(shape_hw: Sequence[int], src_pixel: PixelSize, dst_pixel: PixelSize
                    ) -> tuple[int, int]:
    """(H, W) of a raster of ``shape_hw`` at ``src_pixel`` resampled to ``dst_pixel``
    (same extent, at least one pixel)."""
    (sx, sy), (dx, dy) = _xy(src_pixel), _xy(dst_pixel)
    return (max(1, round(shape_hw[0] * sy / dy)), max(1, round(shape_hw[1] * sx / dx)))


def _warp(array: np.ndarray, shape_hw: Sequence[int], method: Resampling) -> np.ndarray:
    """``array`` (H, W) or (H, W, B) stretched over the same extent onto ``shape_hw``."""
    h, w = array.shape[:2]
    out_h, out_w = int(shape_hw[0]), int(shape_hw[1])
    src = np.ascontiguousarray(np.moveaxis(array[..., None] if array.ndim == 2 else array,
                                           -1, 0))
    dst = np.zeros((src.shape[0], out_h, out_w), dtype=src.dtype)
    # A unit extent on both sides: only the ratio of the grids matters. A projected CRS,
    # because GDAL warps nothing without one; no nodata, so every output pixel is filled.
    reproject(src, dst, src_transform=Affine.scale(1 / w, -1 / h),
              dst_transform=Affine.scale(1 / out_w, -1 / out_h), src_crs="EPSG:3857",
              dst_crs="EPSG:3857", resampling=method)
    dst = np.moveaxis(dst, 0, -1)
    return dst[..., 0] if array.ndim == 2 else dst


def resample_to_pixel_size(array: np.ndarray, src_pixel: PixelSize, dst_pixel: PixelSize
                           ) -> np.ndarray:
    """An image (H, W) or (H, W, B), any numeric dtype, resampled from ``src_pixel`` to
    ``dst_pixel`` (metres, or any unit both share) over the same extent.

    Shrinking (coarser pixels) averages the area each new pixel covers; enlarging (finer
    pixels) interpolates bilinearly. Integer images stay integer (rounded). The result's
    shape is :func:`resampled_shape`.
    """
    shape = resampled_shape(array.shape[:2], src_pixel, dst_pixel)
    shrinking = shape[0] * shape[1] < array.shape[0] * array.shape[1]
    return _warp(array, shape, Resampling.average if shrinking else Resampling.bilinear)


def restore_scene_grid(array: np.ndarray, scene_shape: Sequence[int], classes: bool
                       ) -> np.ndarray:
    """A result computed on the resampled grid mapped back onto the scene's (H, W).

    ``classes=True``: a class-index map (H', W') of any integer dtype, nearest neighbour
    (no new class values appear; nodata values stay). ``classes=False``: probabilities
    (H', W') or (H', W', C) float, bilinear. Returns an array of ``scene_shape`` (and C).
    """
    method = Resampling.nearest if classes else Resampling.bilinear
    return _warp(array, scene_shape[:2], method)


def scale_factor(scene_px: PixelSize, model_px: PixelSize) -> float:
    """How many times a scene is enlarged (> 1) or reduced (< 1) along each axis when brought
    from ``scene_px`` to ``model_px`` (geometric means of x and y)."""
    (sx, sy), (mx, my) = _xy(scene_px), _xy(model_px)
    return math.sqrt(sx * sy) / math.sqrt(mx * my)


def _ratio_text(factor: float) -> str:
    """2 -> '2x', 0.125 -> '1/8' (three significant digits)."""
    return f"{factor:.3g}x" if factor >= 1 else f"1/{1 / factor:.3g}"


def _count_text(value: float) -> str:
    """25.5 -> '25.5', 3600 -> '3,600'."""
    return f"{value:,.0f}" if value >= 1000 else f"{value:.3g}"


def _metres_text(size: PixelSize) -> str:
    x, y = _xy(size)
    return f"{math.sqrt(x * y):.3g} m"


def rescale_note(name: str, scene_px: PixelSize, model_px: PixelSize) -> str:
    """The line saying how a scene is brought to the model's scale, e.g. ``note: scene.tif at
    1 m, model at 0.5 m: segmented at 2x`` (``1/8`` for a reduction)."""
    return (f"note: {name} at {_metres_text(scene_px)}, model at {_metres_text(model_px)}: "
            f"segmented at {_ratio_text(scale_factor(scene_px, model_px))}")


def check_enlargement(name: str, scene_px: PixelSize, model_px: PixelSize, limit: float
                      ) -> None:
    """Raise UserError when bringing a scene at ``scene_px`` to ``model_px`` would enlarge it
    more than ``limit`` times along each axis (MAX_ENLARGEMENT): the model would see the
    same coarse pixels smeared over limit^2 times the memory and time, for no detail."""
    factor = scale_factor(scene_px, model_px)
    if factor <= limit * (1 + 1e-9):
        return
    raise UserError(f"{name}: {_metres_text(scene_px)} pixels but the model sees "
                    f"{_metres_text(model_px)} per pixel: it would be enlarged "
                    f"{_ratio_text(factor)} ({_count_text(factor * factor)} times the "
                    "pixels), "
                    f"beyond MAX_ENLARGEMENT {limit:g}; use a model trained nearer "
                    f"{_metres_text(scene_px)}, or allow it with \"MAX_ENLARGEMENT\": "
                    f"{math.ceil(factor)} in a JSON given with --config")
