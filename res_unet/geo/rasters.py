"""Reading rasters: decoding image and label files, whole or in windows of rows.

Images come back as ``(H, W, B)`` arrays of raw uint8 or uint16 values, labels as ``(H, W)``
uint8 values, and georeferencing (CRS, transform, nodata) travels in a :class:`RasterMeta`
from input to output (:mod:`res_unet.geo.writers` writes it back). JPEG and PNG are read with
Pillow, TIFF with rasterio (GDAL), which keeps GeoTIFF georeferencing; multi-page TIFFs,
which GDAL would cut to their first page, and TIFFs GDAL cannot open are read with tifffile.
Every format has its own traps (palette and 16-bit PNGs, world files, GDAL vs tifffile,
label colours); each is handled once here rather than wherever a file is read.

Pixel types and nodata are :mod:`res_unet.geo.pixeltypes`' (uint8/uint16 kept, other types
converted where lossless, the one nodata rule); :func:`fit_model_dtype` narrows a converted
scene to a uint8 model's type.

Sizes are checked from the header before any pixel is decoded (:func:`check_pixel_count`):
an image read whole may hold at most :func:`pixel_limit` pixels (MAX_IMAGE_PIXELS, else what
fits in the memory available), and so may one row of blocks of a raster read in windows, so
a small file that decodes to gigabytes (a 7 MB PNG of 50000 x 50000 px) is refused with the
fix instead of filling the memory.

Which files form an example, and what label values mean, is :mod:`res_unet.data.pairing`'s.
Nothing here writes or caches anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import struct
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import rasterio
import rasterio.errors
import tifffile
from PIL import Image
from rasterio.windows import Window

from res_unet.core.errors import UserError
from res_unet.geo.grid import RasterMeta, open_raster
from res_unet.geo.pixeltypes import (
    UINT8_MODEL,
    as_image_dtype,
    nodata_as_read,
    nodata_mask,
    whole_number_range,
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")

_TIFF_SUFFIXES = (".tif", ".tiff")
# The GDAL VRTs of scenes from URLs and catalogues (res_unet.geo.scenes): read like GeoTIFFs.
_VRT_SUFFIX = ".vrt"
# Errors the decoders raise on a damaged or unsupported file (Pillow raises SyntaxError for
# broken PNG chunks, tifffile raises ValueError subclasses, GDAL raises RasterioError).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error,
                  rasterio.errors.RasterioError)
# Pillow modes that are a colour encoding rather than extra data: convert them to RGB(A).
_PIL_TO_RGB = {"CMYK": "RGB", "YCbCr": "RGB", "RGBX": "RGB", "RGBa": "RGBA", "La": "LA"}
_PIL_NATIVE = ("1", "L", "LA", "RGB", "RGBA", "I", "F", "I;16", "I;16L", "I;16B", "I;16N")
_WORLD_FILES = {".png": (".pgw", ".pngw"), ".jpg": (".jgw", ".jpgw"),
                ".jpeg": (".jgw", ".jpegw")}


# What a pixel of an image read whole costs while it is segmented, bytes: 8 a band (the
# decoded values and their float32 copy for the model, with room to spare) and 16 for the
# rest (blended float32 probabilities and their weights, the label map, the overlay).
_AUTO_BYTES_PER_PIXEL, _AUTO_BYTES_PER_BAND = 16, 8


def pixel_limit(bands: int, max_pixels: int | None = None) -> int:
    """Most pixels (rows x columns) of a ``bands``-band raster decoded at once: ``max_pixels``
    (the config's MAX_IMAGE_PIXELS) when given, else as many as fit in the memory available
    now at 16 bytes a pixel plus 8 a band."""
    if max_pixels:
        return int(max_pixels)
    per_pixel = _AUTO_BYTES_PER_PIXEL + _AUTO_BYTES_PER_BAND * max(bands, 1)
    return max(1, psutil.virtual_memory().available // per_pixel)


def check_pixel_count(path: Path, height: int, width: int, bands: int,
                      max_pixels: int | None = None, part: str = "", fix: str = "") -> None:
    """Raise UserError unless ``height`` x ``width`` pixels of ``bands`` bands (from a file's
    header, before decoding) are within :func:`pixel_limit`. ``part`` names what is decoded
    at once when it is not the whole image (one row of blocks), ``fix`` replaces the advice
    to convert the file to a tiled GeoTIFF."""
    limit = pixel_limit(bands, max_pixels)
    if height * width <= limit:
        return
    source = ("MAX_IMAGE_PIXELS" if max_pixels else
              f"what fits in the {psutil.virtual_memory().available / 2**30:.1f} GB of memory "
              "available; MAX_IMAGE_PIXELS sets it")
    what = f"{part} of {width}x{height} px" if part else f"{width}x{height} px"
    fix = fix or ("convert it to a tiled GeoTIFF, which seg_images_in_folder reads in windows "
                  "(gdal_translate -of GTiff -co TILED=YES -co COMPRESS=DEFLATE -co "
                  f"BIGTIFF=IF_SAFER {path.name} {path.stem}_tiled.tif), or cut it into "
                  "smaller images (gdal_retile.py)")
    raise UserError(f"{path}: {what} ({bands} band{'s' if bands != 1 else ''}) is more than "
                    f"can be decoded at once ({limit} px, {source}); {fix}")


def _png_is_16bit_colour(path: Path) -> bool:
    """True for 16-bit RGB, RGBA or grey+alpha PNGs, which Pillow truncates to 8 bits."""
    with open(path, "rb") as fh:
        head = fh.read(26)
    return (len(head) == 26 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[24] == 16
            and head[25] in (2, 4, 6))


def _read_pil(path: Path, palette_indices: bool, max_pixels: int | None,
              more_bands: int) -> np.ndarray | None:
    """Pixels of a JPEG/PNG as (H, W, B), any integer/float dtype; None if GDAL must read it.

    Palette images give their indices when ``palette_indices`` (labels), else their colours.
    The size in the header is checked (:func:`check_pixel_count`, with ``more_bands`` bands to
    be appended) before decoding.
    """
    if path.suffix.lower() == ".png" and _png_is_16bit_colour(path):
        return None
    with warnings.catch_warnings():
        # Large scenes are legitimate here: check_pixel_count is the limit, and Pillow's own
        # (hard above 179 M px) routes them to GDAL below, which checks the header again.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                check_pixel_count(path, im.height, im.width, len(im.getbands()) + more_bands,
                                  max_pixels)
                im.load()
                mode = im.mode
                if mode in ("P", "PA") and not palette_indices:
                    has_alpha = mode == "PA" or "transparency" in im.info
                    im = im.convert("RGBA" if has_alpha else "RGB")
                elif mode in _PIL_TO_RGB:
                    im = im.convert(_PIL_TO_RGB[mode])
                elif mode not in _PIL_NATIVE and mode not in ("P", "PA"):
                    raise UserError(f"{path}: unsupported pixel mode {mode}; re-export it as "
                                    "an 8- or 16-bit grey, RGB or RGBA image")
                # A writable copy: callers may modify the pixels in place.
                array = np.array(im)
        except Image.DecompressionBombError:
            return None
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("="))
    return array[..., None] if array.ndim == 2 else array


def _read_gdal(path: Path, pixels: bool = True, max_pixels: int | None = None,
               more_bands: int = 0) -> tuple[np.ndarray | None, RasterMeta, bool]:
    """Read with rasterio: (pixels (H, W, B) or None, meta, whether the file is multi-page).
    The size in the header is checked (:func:`check_pixel_count`) before decoding."""
    with open_raster(path) as ds:
        meta = RasterMeta.of_dataset(path, ds)
        multipage = bool(ds.subdatasets) and path.suffix.lower() in _TIFF_SUFFIXES
        if not pixels or multipage:
            return None, meta, multipage
        check_pixel_count(path, ds.height, ds.width, ds.count + more_bands, max_pixels)
        array = np.empty((ds.height, ds.width, ds.count), dtype=ds.dtypes[0])
        # Reading into a band-first view of a band-last buffer avoids a second copy.
        ds.read(out=np.moveaxis(array, -1, 0))
    return array, meta, False


def _read_tifffile(path: Path, max_pixels: int | None = None, more_bands: int = 0
                   ) -> np.ndarray:
    """Pixels of a (multi-page) TIFF via tifffile, as (H, W, B); the size in the header is
    checked (:func:`check_pixel_count`) before decoding."""
    with tifffile.TiffFile(path) as tif:
        if len(tif.series) > 1:
            raise UserError(f"{path}: holds {len(tif.series)} images of different sizes; save "
                            "one image per file (bands of equal size may be pages)")
        series = tif.series[0]
        axes = series.axes
        height, width = (series.shape[axes.index(a)] if a in axes else 1 for a in "YX")
        bands = math.prod(series.shape) // max(height * width, 1)  # exact for any size
        check_pixel_count(path, height, width, bands + more_bands, max_pixels)
        array = series.asarray()
    if array.ndim == 2:
        return array[..., None]
    if array.ndim == 3 and axes.endswith("S"):
        return array
    if array.ndim == 3 and axes.endswith("YX"):
        return np.ascontiguousarray(np.moveaxis(array, 0, -1))
    raise UserError(f"{path}: TIFF layout {axes} {array.shape} is not an image of bands; save "
                    "it as one (rows, columns, bands) image")


def _sidecar_meta(path: Path) -> RasterMeta:
    """Georeferencing of a JPEG/PNG from a world file or .aux.xml beside it, if any."""
    names = [*(path.stem + s for s in _WORLD_FILES.get(path.suffix.lower(), ())),
             path.stem + ".wld", path.name + ".aux.xml"]
    if not any((path.parent / n).is_file() for n in names):
        return RasterMeta(path=path)
    return _read_gdal(path, pixels=False)[1]


def _read_raw(path: Path, palette_indices: bool, max_pixels: int | None = None,
              more_bands: int = 0) -> tuple[np.ndarray, RasterMeta]:
    """Any supported file -> (H, W, B) array in its stored dtype, and its meta. Its size is
    checked from the header (:func:`check_pixel_count`, counting ``more_bands`` bands to be
    appended) before decoding."""
    suffix = path.suffix.lower()
    if suffix == _VRT_SUFFIX and path.is_file():
        array, meta, _ = _read_gdal(path, max_pixels=max_pixels, more_bands=more_bands)
        return array, meta
    if suffix not in IMAGE_SUFFIXES:
        raise UserError(f"{path}: not a supported image type; use one of "
                        f"{', '.join(IMAGE_SUFFIXES)}")
    if not path.is_file():
        raise UserError(f"{path}: file not found; check the path")
    try:
        if suffix in _TIFF_SUFFIXES:
            return _read_tiff(path, max_pixels, more_bands)
        array = _read_pil(path, palette_indices, max_pixels, more_bands)
        if array is None:
            array, meta, _ = _read_gdal(path, max_pixels=max_pixels, more_bands=more_bands)
            return array, meta
        return array, _sidecar_meta(path)
    except _DECODE_ERRORS as exc:
        raise UserError(f"{path}: cannot be read as an image ({exc}); remove or re-export "
                        "it") from None


def _read_tiff(path: Path, max_pixels: int | None, more_bands: int
               ) -> tuple[np.ndarray, RasterMeta]:
    try:
        array, meta, multipage = _read_gdal(path, max_pixels=max_pixels, more_bands=more_bands)
    except rasterio.errors.RasterioIOError as gdal_error:
        try:
            return _read_tifffile(path, max_pixels, more_bands), RasterMeta(path=path)
        except _DECODE_ERRORS:
            raise gdal_error from None
    if multipage:
        array = _read_tifffile(path, max_pixels, more_bands)
    return array, meta


def fit_model_dtype(image: np.ndarray | RasterRows, meta: RasterMeta, dtype: str | None
                    ) -> np.ndarray | RasterRows:
    """A scene converted on reading (``meta.stored_dtype``: int16, float32, ...) brought to
    the pixel type a model was trained on (``dtype``, "uint8" or "uint16"; None: unknown):
    uint8 when every valid pixel fits 0..255, else a UserError naming the stored type. Other
    images come back as they are (the model's own check names their type)."""
    if dtype != "uint8" or meta.stored_dtype is None or image.dtype == np.uint8:
        return image
    if isinstance(image, RasterRows):
        image.dtype = np.dtype(np.uint8)
        return image
    invalid = None if meta.nodata is None else nodata_mask(image, [meta.nodata])
    valid = image if invalid is None or not invalid.any() else image[~invalid]
    whole_number_range(valid, meta.path, "image", 255, meta.stored_dtype, meta.nodata,
                        UINT8_MODEL)
    return image.astype(np.uint8)


def append_bands(image: np.ndarray, image_path: Path, extra_bands: Sequence[Path],
                 max_pixels: int | None = None) -> np.ndarray:
    """Append single-band images (same size) as extra bands; uint16 if any part is. Each is
    checked against :func:`pixel_limit` (for the bands of the whole stack) before decoding."""
    if not extra_bands:
        return image
    parts = [image]
    stack_bands = image.shape[-1] + len(extra_bands)
    for extra in map(Path, extra_bands):
        raw, meta = _read_raw(extra, False, max_pixels, stack_bands - 1)
        band = as_image_dtype(raw, extra, meta.nodata)
        if band.shape[-1] != 1:
            raise UserError(f"{extra}: extra-band images must have one band, this one has "
                            f"{band.shape[-1]}; split it into single-band files")
        if band.shape[:2] != image.shape[:2]:
            raise UserError(f"{extra}: size {band.shape[1]}x{band.shape[0]} (WxH) differs from "
                            f"{image_path} ({image.shape[1]}x{image.shape[0]}); extra bands "
                            "must be co-registered with the image, pixel for pixel")
        parts.append(band)
    dtype = np.result_type(*(p.dtype for p in parts))
    return np.concatenate([p.astype(dtype, copy=False) for p in parts], axis=-1)


def read_image(path: str | os.PathLike, extra_bands: Sequence[str | os.PathLike] = (),
               max_pixels: int | None = None) -> tuple[np.ndarray, RasterMeta]:
    """Read an image and optional single-band extra-band images appended in order.

    Returns ``(image, meta)``: image (H, W, B) uint8 or uint16 raw values, every band in the
    file (alpha included; see :func:`load_image` for dropping a constant alpha), then the
    extra bands; meta of the main image (CRS, transform, nodata as read, stored type when
    converted).
    Palette PNGs give their colours (palette TIFFs their indices). Raises UserError for
    unreadable files, unsupported pixel types, extra bands of another size and images
    larger than :func:`pixel_limit` (``max_pixels``: MAX_IMAGE_PIXELS), found from the
    header before decoding.
    """
    path = Path(path)
    raw, meta = _read_raw(path, False, max_pixels, len(extra_bands))
    image = as_image_dtype(raw, path, meta.nodata)
    if image.dtype != raw.dtype:
        meta = dataclasses.replace(meta, nodata=nodata_as_read(meta.nodata, raw.dtype),
                                   stored_dtype=raw.dtype.name)
    return append_bands(image, path, [Path(p) for p in extra_bands], max_pixels), meta


def _alpha_is_constant(alpha: np.ndarray) -> bool:
    return bool((alpha == alpha.flat[0]).all())


def read_label(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """Read a label image as (H, W) uint8 class values (not yet remapped or range-checked).

    Palette PNGs give their indices. RGB/RGBA (or grey+alpha) labels whose colour channels
    are all equal and whose alpha is constant are read as grey; colour labels, transparent
    labels, values above 255 and labels larger than :func:`pixel_limit` (``max_pixels``:
    MAX_IMAGE_PIXELS, checked from the header) are a UserError.
    """
    path = Path(path)
    raw, _ = _read_raw(path, True, max_pixels)
    bands = raw.shape[-1]
    if bands > 1:
        alpha = raw[..., -1] if bands in (2, 4) else None
        colour = raw[..., :-1] if alpha is not None else raw
        if alpha is not None and not _alpha_is_constant(alpha):
            raise UserError(f"{path}: label has transparent pixels; labels must be single-"
                            "channel class indices: save it without an alpha channel")
        if not (colour[..., 1:] == colour[..., :1]).all():
            raise UserError(_colour_label_message(path, colour))
        raw = colour[..., :1]
    label = raw[..., 0]
    if label.dtype == np.uint8:
        return label
    if label.dtype == bool:
        return label.astype(np.uint8)
    whole_number_range(label, path, "label", 255)
    return label.astype(np.uint8)


def _colour_label_message(path: Path, colour: np.ndarray) -> str:
    """Name a few of the colours so users can build their colour -> index table."""
    flat = colour.reshape(-1, colour.shape[-1])
    colours = np.unique(flat[:: max(1, len(flat) // 100_000)], axis=0)
    shown = ", ".join(str(tuple(int(v) for v in c)) for c in colours[:6])
    more = " ..." if len(colours) > 6 else ""
    return (f"{path}: labels must be single-channel class indices; found a colour label with "
            f"{colour.shape[-1]} channels (colours {shown}{more}); convert colours to indices "
            "(one grey value 0..N-1 per class) and save as a one-channel PNG")



# GDAL block cache while a scene is read in windows, MB: about two bands of tile rows of a
# 30000-px-wide RGB scene, so overlapping windows rarely decode a block twice.
WINDOW_CACHE_MB = 128


class RasterRows:
    """A raster GDAL can read in windows (GeoTIFF and the like), read a band of rows at a
    time: the :class:`res_unet.geo.tiling.RowSource` that lets scenes larger than memory be
    segmented. Rows come back as :func:`load_image` would give them (uint8/uint16, the same
    checks on other pixel types, window by window). Close it, or use it in a ``with``."""

    def __init__(self, path: Path, dataset: Any, meta: RasterMeta,
                 env: contextlib.ExitStack, max_pixels: int | None = None) -> None:
        self.path, self._ds, self._env = path, dataset, env
        self.max_pixels = max_pixels
        self.shape = (int(dataset.height), int(dataset.width), int(dataset.count))
        native = np.dtype(dataset.dtypes[0])
        # The type rows come back as (fit_model_dtype may narrow a converted one to uint8).
        self.dtype = native if native in (np.uint8, np.uint16) else np.dtype(
            np.uint8 if native.kind == "b" else np.uint16)
        self._declared = meta.nodata
        if native != self.dtype and native.kind != "b":
            meta = dataclasses.replace(meta, nodata=nodata_as_read(meta.nodata, native),
                                       stored_dtype=native.name)
        self.meta = meta

    def rows(self, r0: int, r1: int) -> np.ndarray:
        r0, r1 = max(r0, 0), min(r1, self.shape[0])
        check_pixel_count(self.path, r1 - r0, self.shape[1], self.shape[2], self.max_pixels,
                          part=f"a window of rows {r0}..{r1}",
                          fix="raise MAX_IMAGE_PIXELS to the window's size (a band of tile "
                          "rows across the scene), or cut the scene into narrower images "
                          "(gdal_retile.py)")
        band = np.empty((r1 - r0, self.shape[1], self.shape[2]), self._ds.dtypes[0])
        self._ds.read(out=np.moveaxis(band, -1, 0), window=Window(0, r0, self.shape[1], r1 - r0))
        return as_image_dtype(band, self.path, self._declared, self.dtype.type)

    def close(self) -> None:
        self._ds.close()
        self._env.close()

    def __enter__(self) -> RasterRows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_raster_rows(path: Path, n_bands: int, max_pixels: int | None = None
                     ) -> RasterRows | None:
    """The raster at ``path`` as :class:`RasterRows` when it can be read in windows: a
    single-page TIFF that GDAL reads with exactly ``n_bands`` bands (an alpha band to drop
    needs the whole image read). Else None: read it whole. Raises UserError when one row of
    its blocks (GDAL decodes whole blocks: a striped TIFF of one strip is one block) is
    larger than :func:`pixel_limit` (``max_pixels``: MAX_IMAGE_PIXELS)."""
    if path.suffix.lower() not in (*_TIFF_SUFFIXES, _VRT_SUFFIX):
        return None
    env = contextlib.ExitStack()
    # GDAL keeps decoded blocks up to 5 % of RAM by default: most of a big scene, read once.
    env.enter_context(rasterio.Env(GDAL_CACHEMAX=WINDOW_CACHE_MB))
    try:
        dataset = open_raster(path)
    except rasterio.errors.RasterioError:
        env.close()
        return None
    usable = (not dataset.subdatasets and dataset.count == n_bands
              and len(set(dataset.dtypes)) == 1 and np.dtype(dataset.dtypes[0]).kind in "uifb")
    if not usable:
        dataset.close()
        env.close()
        return None
    try:
        check_pixel_count(path, min(dataset.block_shapes[0][0], dataset.height), dataset.width,
                          dataset.count, max_pixels, part="one row of blocks")
    except UserError:
        dataset.close()
        env.close()
        raise
    return RasterRows(path, dataset, RasterMeta.of_dataset(path, dataset), env, max_pixels)
