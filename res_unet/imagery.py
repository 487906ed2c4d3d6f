"""Reading and writing rasters and labels: the one place that touches image files.

Why this module is long: it is the one place that touches image files, and every format
has its own traps (palette and 16-bit PNGs, world files, GDAL vs tifffile, extra-band
folders, label colours), each handled once here rather than wherever a file is read.

Images come back as ``(H, W, B)`` arrays of raw uint8 or uint16 values, labels as ``(H, W)``
uint8 class indices, and georeferencing (CRS, transform, nodata) travels in a
:class:`RasterMeta` from input to output. JPEG and PNG are read with Pillow, TIFF with
rasterio (GDAL), which keeps GeoTIFF georeferencing; multi-page TIFFs, which GDAL would cut
to their first page, and TIFFs GDAL cannot open are read with tifffile.

Pixel types: uint8 and uint16 are kept; signed or wider integers are cast to uint16 when all
values fit in 0..65535; float rasters are accepted only when every value is a whole number in
0..65535 (a lossless cast). Anything else is a UserError asking for a uint8/uint16 export,
because rescaling reflectances silently would change what the model sees.

Nothing here writes beside the user's data or caches anything; every write is atomic.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import sys
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.errors
import tifffile
from PIL import Image
from rasterio.windows import Window

from res_unet.atomic import atomic_path
from res_unet.config import Config
from res_unet.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")

_TIFF_SUFFIXES = (".tif", ".tiff")
_MAX_LISTED = 20
# Errors the decoders raise on a damaged or unsupported file (Pillow raises SyntaxError for
# broken PNG chunks, tifffile raises ValueError subclasses, GDAL raises RasterioError).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error,
                  rasterio.errors.RasterioError)
# Pillow modes that are a colour encoding rather than extra data: convert them to RGB(A).
_PIL_TO_RGB = {"CMYK": "RGB", "YCbCr": "RGB", "RGBX": "RGB", "RGBa": "RGBA", "La": "LA"}
_PIL_NATIVE = ("1", "L", "LA", "RGB", "RGBA", "I", "F", "I;16", "I;16L", "I;16B", "I;16N")
_WORLD_FILES = {".png": (".pgw", ".pngw"), ".jpg": (".jgw", ".jpgw"),
                ".jpeg": (".jgw", ".jpegw")}


@dataclass
class RasterMeta:
    """Where an image came from and how it sits on the Earth.

    ``crs`` is a rasterio CRS, ``transform`` an affine.Affine (pixel -> map coordinates),
    ``nodata`` the input's nodata value; all None for plain (non-georeferenced) images.
    """

    path: Path
    crs: Any | None = None
    transform: Any | None = None
    nodata: float | None = None


@dataclass
class Pair:
    """One training example on disk: an image, its label (None when segmenting) and the
    co-registered single-band images appended as extra bands, in EXTRA_BAND_DIRS order."""

    stem: str
    image: Path
    label: Path | None
    extra_bands: list[Path] = field(default_factory=list)


def is_georeferenced(meta: RasterMeta) -> bool:
    """Whether the image has a CRS or a map transform worth carrying to outputs."""
    return meta.crs is not None or meta.transform is not None


# Reading -----------------------------------------------------------------------------------

def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _listing(names: Sequence[str]) -> str:
    """'a, b, c' with at most _MAX_LISTED names, then '... and N more'."""
    shown = ", ".join(names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return shown + (f", ... and {more} more" if more > 0 else "")


def _png_is_16bit_colour(path: Path) -> bool:
    """True for 16-bit RGB, RGBA or grey+alpha PNGs, which Pillow truncates to 8 bits."""
    with open(path, "rb") as fh:
        head = fh.read(26)
    return (len(head) == 26 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[24] == 16
            and head[25] in (2, 4, 6))


def _read_pil(path: Path, palette_indices: bool) -> np.ndarray | None:
    """Pixels of a JPEG/PNG as (H, W, B), any integer/float dtype; None if GDAL must read it.

    Palette images give their indices when ``palette_indices`` (labels), else their colours.
    """
    if path.suffix.lower() == ".png" and _png_is_16bit_colour(path):
        return None
    with warnings.catch_warnings():
        # Large scenes are legitimate here; the hard limit still routes them to GDAL below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
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


def _not_georeferenced(ds: Any) -> bool:
    return ds.crs is None and ds.transform.is_identity


def _gdal_meta(path: Path, ds: Any) -> RasterMeta:
    """The georeferencing of an open rasterio dataset (none for a plain, ungeoreferenced file)."""
    plain = _not_georeferenced(ds)
    return RasterMeta(path=path, crs=ds.crs, transform=None if plain else ds.transform,
                      nodata=None if ds.nodata is None else float(ds.nodata))


def _read_gdal(path: Path, pixels: bool = True) -> tuple[np.ndarray | None, RasterMeta, bool]:
    """Read with rasterio: (pixels (H, W, B) or None, meta, whether the file is multi-page)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path) as ds:
            meta = _gdal_meta(path, ds)
            multipage = bool(ds.subdatasets) and path.suffix.lower() in _TIFF_SUFFIXES
            if not pixels or multipage:
                return None, meta, multipage
            array = np.empty((ds.height, ds.width, ds.count), dtype=ds.dtypes[0])
            # Reading into a band-first view of a band-last buffer avoids a second copy.
            ds.read(out=np.moveaxis(array, -1, 0))
    return array, meta, False


def _read_tifffile(path: Path) -> np.ndarray:
    """Pixels of a (multi-page) TIFF via tifffile, as (H, W, B)."""
    with tifffile.TiffFile(path) as tif:
        if len(tif.series) > 1:
            raise UserError(f"{path}: holds {len(tif.series)} images of different sizes; save "
                            "one image per file (bands of equal size may be pages)")
        series = tif.series[0]
        array, axes = series.asarray(), series.axes
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


def _read_raw(path: Path, palette_indices: bool) -> tuple[np.ndarray, RasterMeta]:
    """Any supported file -> (H, W, B) array in its stored dtype, and its meta."""
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise UserError(f"{path}: not a supported image type; use one of "
                        f"{', '.join(IMAGE_SUFFIXES)}")
    if not path.is_file():
        raise UserError(f"{path}: file not found; check the path")
    try:
        if suffix in _TIFF_SUFFIXES:
            return _read_tiff(path)
        array = _read_pil(path, palette_indices)
        if array is None:
            array, meta, _ = _read_gdal(path)
            return array, meta
        return array, _sidecar_meta(path)
    except _DECODE_ERRORS as exc:
        raise UserError(f"{path}: cannot be read as an image ({exc}); remove or re-export "
                        "it") from None


def _read_tiff(path: Path) -> tuple[np.ndarray, RasterMeta]:
    try:
        array, meta, multipage = _read_gdal(path)
    except rasterio.errors.RasterioIOError as gdal_error:
        try:
            return _read_tifffile(path), RasterMeta(path=path)
        except _DECODE_ERRORS:
            raise gdal_error from None
    if multipage:
        array = _read_tifffile(path)
    return array, meta


def _whole_number_range(array: np.ndarray, path: Path, what: str, top: int) -> None:
    """Raise unless every value is a whole number in 0..top (checked for non-uint types)."""
    kind = array.dtype.kind
    if kind not in "iuf":
        raise UserError(f"{path}: {array.dtype} pixels are not supported; export the {what} "
                        "as uint8 or uint16")
    if array.size == 0:
        raise UserError(f"{path}: the {what} has no pixels; remove or re-export it")
    lo, hi = array.min(), array.max()
    if kind == "f" and not (np.isfinite(lo) and np.isfinite(hi)
                            and np.array_equal(array, np.round(array))):
        raise UserError(f"{path}: {array.dtype} pixels with fractional or NaN values "
                        f"({lo:g}..{hi:g}) are not supported; export the {what} as uint8 or "
                        "uint16 (e.g. reflectance 0..1 scaled to 0..10000: gdal_translate -ot "
                        "UInt16 -scale 0 1 0 10000 in.tif out.tif)")
    if lo < 0:
        raise UserError(f"{path}: {array.dtype} {what} has negative values (min {lo:g}); "
                        f"export it as uint8/uint16 with values 0..{top} (e.g. clip negatives "
                        "to 0)")
    if hi > top:
        raise UserError(f"{path}: {what} values reach {hi:g}, above {top}; export it with "
                        f"values 0..{top}")


def _as_image_dtype(array: np.ndarray, path: Path) -> np.ndarray:
    """uint8/uint16 unchanged; bool -> uint8; other numeric -> uint16 if lossless, else raise."""
    if array.dtype in (np.uint8, np.uint16):
        return array
    if array.dtype == bool:
        return array.astype(np.uint8)
    _whole_number_range(array, path, "image", 65535)
    return array.astype(np.uint16)


def _append_bands(image: np.ndarray, image_path: Path,
                  extra_bands: Sequence[Path]) -> np.ndarray:
    """Append single-band images (same size) as extra bands; uint16 if any part is."""
    if not extra_bands:
        return image
    parts = [image]
    for extra in map(Path, extra_bands):
        band = _as_image_dtype(_read_raw(extra, palette_indices=False)[0], extra)
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


def read_image(path: str | os.PathLike, extra_bands: Sequence[str | os.PathLike] = ()
               ) -> tuple[np.ndarray, RasterMeta]:
    """Read an image and optional single-band extra-band images appended in order.

    Returns ``(image, meta)``: image (H, W, B) uint8 or uint16 raw values, every band in the
    file (alpha included; see :func:`load_image` for dropping a constant alpha), then the
    extra bands; meta of the main image (CRS, transform, nodata when georeferenced).
    Palette PNGs give their colours (palette TIFFs their indices). Raises UserError for
    unreadable files, unsupported pixel types and extra bands of another size.
    """
    path = Path(path)
    raw, meta = _read_raw(path, palette_indices=False)
    image = _as_image_dtype(raw, path)
    return _append_bands(image, path, [Path(p) for p in extra_bands]), meta


def _alpha_is_constant(alpha: np.ndarray) -> bool:
    return bool((alpha == alpha.flat[0]).all())


def read_label(path: str | os.PathLike) -> np.ndarray:
    """Read a label image as (H, W) uint8 class values (not yet remapped or range-checked).

    Palette PNGs give their indices. RGB/RGBA (or grey+alpha) labels whose colour channels
    are all equal and whose alpha is constant are read as grey; colour labels, transparent
    labels and values above 255 are a UserError.
    """
    path = Path(path)
    raw, _ = _read_raw(path, palette_indices=True)
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
    _whole_number_range(label, path, "label", 255)
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


def _values_text(values: Sequence[int]) -> str:
    shown = ", ".join(str(v) for v in values[:_MAX_LISTED])
    return shown + (f", ... ({len(values)} values)" if len(values) > _MAX_LISTED else "")


_NOTED: set[str] = set()


def _note_once(kind: str, message: str) -> None:
    """Print a note the first time this kind of thing is seen in the process, not per file."""
    if kind not in _NOTED:
        _NOTED.add(kind)
        print(f"note: {message}")


def prepare_label(label: np.ndarray, cfg: Config, path: str | os.PathLike) -> np.ndarray:
    """Turn a raw (H, W) uint8 label into class indices 0..cfg.n_label_classes-1.

    Applies REMAP_CLASSES first; then, for binary models (NCLASSES=1), a 0/255 mask becomes
    0/1 with a printed note. Raises UserError naming ``path``, the values found and the fix
    when a value is not a class (IGNORE_CLASS is allowed). Returns (H, W) uint8 (the input
    itself when nothing changed).
    """
    path = Path(path)
    if cfg.REMAP_CLASSES:
        lut = np.arange(256, dtype=np.uint8)
        for key, value in cfg.REMAP_CLASSES.items():
            if 0 <= int(key) <= 255:
                lut[int(key)] = value
        label = lut[label]
    counts = np.bincount(label.ravel(), minlength=256)
    present = [int(v) for v in np.flatnonzero(counts)]
    if cfg.NCLASSES == 1 and 255 in present and set(present) <= {0, 255}:
        _note_once("0/255", f"{path}: 0/255 mask read as 0/1 (and any further 0/255 masks)")
        return (label == 255).astype(np.uint8)
    n = cfg.n_label_classes
    bad = [v for v in present if v >= n and v != cfg.IGNORE_CLASS]
    if bad:
        raise UserError(_range_message(path, present, bad, cfg))
    return label


def _range_message(path: Path, present: list[int], bad: list[int], cfg: Config) -> str:
    n = cfg.n_label_classes
    after = " (after REMAP_CLASSES)" if cfg.REMAP_CLASSES else ""
    fixes = []
    if path.suffix.lower() in (".jpg", ".jpeg"):
        fixes.append("JPEG compression invents label values: save labels as PNG")
    if len(present) <= n:
        mapping = {str(v): i for i, v in enumerate(present)}
        fixes.append(f"map the values to classes with REMAP_CLASSES {json.dumps(mapping)}")
    if present[-1] + 1 <= 255:
        fixes.append(f"set NCLASSES to {present[-1] + 1} if every value 0..{present[-1]} is a "
                     "class")
    if len(present) > n:
        fixes.append("merge values into classes with REMAP_CLASSES, e.g. "
                     f"{json.dumps({str(bad[0]): 0})}")
    return (f"{path}: label values {_values_text(present)}{after} but NCLASSES={cfg.NCLASSES} "
            f"allows only 0..{n - 1} (found {_values_text(bad)}); " + ", or ".join(fixes))


def load_image(pair: Pair, cfg: Config, for_model: bool = False
               ) -> tuple[np.ndarray, RasterMeta]:
    """Read a pair's image plus extra bands and check the band count against N_DATA_BANDS.

    A constant, fully opaque alpha band (255, or 65535 for uint16) one band beyond what the
    config expects from the image (RGBA for 3 bands, grey+alpha for 1) is dropped. Returns
    (image (H, W, N_DATA_BANDS) uint8|uint16, meta). Raises UserError on a band mismatch;
    ``for_model``: N_DATA_BANDS is a trained model's, which the message says cannot change.
    """
    raw, meta = _read_raw(pair.image, palette_indices=False)
    image = _as_image_dtype(raw, pair.image)
    expected = cfg.N_DATA_BANDS - len(pair.extra_bands)
    found = image.shape[-1]
    alpha_hint = ""
    if found == expected + 1 and found in (2, 4):
        alpha = image[..., -1]
        if (alpha == np.iinfo(image.dtype).max).all():
            image = np.ascontiguousarray(image[..., :-1])
        else:
            alpha_hint = (" (the last band is an alpha channel with transparent pixels: set "
                          f"N_DATA_BANDS to {cfg.N_DATA_BANDS + 1} to use it as data, or "
                          "re-save the image without transparency)")
    if image.shape[-1] != expected:
        extra = f" plus {_count(len(pair.extra_bands), 'extra band')}" if pair.extra_bands else ""
        total = found + len(pair.extra_bands)
        counted = " (image bands plus extra bands)" if pair.extra_bands else ""
        convert = f", or convert this image to {expected} bands" if expected >= 1 else ""
        if for_model:
            raise UserError(f"{pair.image}: {_count(found, 'band')} found{extra} but the model "
                            f"takes {_count(cfg.N_DATA_BANDS, 'band')} (as it was trained); "
                            f"convert this image to {expected} bands, or use a model trained "
                            f"on {total}-band imagery")
        fix = alpha_hint or (f"; set N_DATA_BANDS to {total}{counted} if all images are like "
                             f"this{convert}")
        raise UserError(f"{pair.image}: {_count(found, 'band')} found{extra} but N_DATA_BANDS "
                        f"is {cfg.N_DATA_BANDS}{fix}")
    return _append_bands(image, pair.image, pair.extra_bands), meta


# GDAL block cache while a scene is read in windows, MB: about two bands of tile rows of a
# 30000-px-wide RGB scene, so overlapping windows rarely decode a block twice.
WINDOW_CACHE_MB = 128


class RasterRows:
    """A raster GDAL can read in windows (GeoTIFF and the like), read a band of rows at a
    time: the :class:`res_unet.tiling.RowSource` that lets scenes larger than memory be
    segmented. Rows come back as :func:`load_image` would give them (uint8/uint16, the same
    checks on other pixel types, window by window). Close it, or use it in a ``with``."""

    def __init__(self, path: Path, dataset: Any, meta: RasterMeta,
                 env: contextlib.ExitStack) -> None:
        self.path, self.meta, self._ds, self._env = path, meta, dataset, env
        self.shape = (int(dataset.height), int(dataset.width), int(dataset.count))
        native = np.dtype(dataset.dtypes[0])
        self.dtype = native if native in (np.uint8, np.uint16) else np.dtype(
            np.uint8 if native.kind == "b" else np.uint16)

    def rows(self, r0: int, r1: int) -> np.ndarray:
        r0, r1 = max(r0, 0), min(r1, self.shape[0])
        band = np.empty((r1 - r0, self.shape[1], self.shape[2]), self._ds.dtypes[0])
        self._ds.read(out=np.moveaxis(band, -1, 0), window=Window(0, r0, self.shape[1], r1 - r0))
        return _as_image_dtype(band, self.path)

    def close(self) -> None:
        self._ds.close()
        self._env.close()

    def __enter__(self) -> RasterRows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_image_rows(pair: Pair, cfg: Config) -> RasterRows | None:
    """The pair's image as :class:`RasterRows` when it can be read in windows: a single-page
    TIFF that GDAL reads, no extra-band folders, and exactly the model's N_DATA_BANDS bands
    (an alpha band to drop needs the whole image read). Else None: use :func:`load_image`,
    which reads the image whole and gives the messages for the other cases."""
    if pair.extra_bands or pair.image.suffix.lower() not in _TIFF_SUFFIXES:
        return None
    env = contextlib.ExitStack()
    # GDAL keeps decoded blocks up to 5 % of RAM by default: most of a big scene, read once.
    env.enter_context(rasterio.Env(GDAL_CACHEMAX=WINDOW_CACHE_MB))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            dataset = rasterio.open(pair.image)
    except rasterio.errors.RasterioError:
        env.close()
        return None
    usable = (not dataset.subdatasets and dataset.count == cfg.N_DATA_BANDS
              and len(set(dataset.dtypes)) == 1 and np.dtype(dataset.dtypes[0]).kind in "uifb")
    if not usable:
        dataset.close()
        env.close()
        return None
    return RasterRows(pair.image, dataset, _gdal_meta(pair.image, dataset), env)


def load_pair(pair: Pair, cfg: Config) -> tuple[np.ndarray, np.ndarray, RasterMeta]:
    """Read one training example and check it against the config.

    Returns (image (H, W, N_DATA_BANDS) uint8|uint16 raw values, label (H, W) uint8 class
    indices 0..n_label_classes-1, meta of the image). Raises UserError for band-count or size
    mismatches (naming both files and sizes) and invalid label values.
    """
    if pair.label is None:
        raise ValueError(f"load_pair needs a labelled pair; {pair.stem} has no label")
    image, meta = load_image(pair, cfg)
    label = read_label(pair.label)
    if label.shape != image.shape[:2]:
        raise UserError(f"{pair.label}: label size {label.shape[1]}x{label.shape[0]} (WxH) "
                        f"differs from its image {pair.image} ({image.shape[1]}x"
                        f"{image.shape[0]}); labels must cover their image pixel for pixel")
    return image, prepare_label(label, cfg, pair.label), meta


# Finding files -----------------------------------------------------------------------------

def _has_images(folder: Path) -> bool:
    return any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())


def _scan_folder(folder: Path, role: str) -> list[Path]:
    """Image files directly in ``folder``, sorted. Non-image files are ignored; hidden image
    files (names starting with '.', e.g. macOS '._' copies) are skipped with one warning line
    on stderr giving their number and names."""
    if not folder.exists():
        raise UserError(f"{folder}: {role} folder not found; check the path")
    if not folder.is_dir():
        raise UserError(f"{folder}: is a file, not a folder; pass the folder holding the {role}")
    entries = sorted(folder.iterdir())
    dangling = [p for p in entries if p.is_symlink() and not p.exists()
                and p.suffix.lower() in IMAGE_SUFFIXES]
    if dangling:
        raise UserError(f"{dangling[0]}: is a link to {os.readlink(dangling[0])}, which does "
                        f"not exist ({_count(len(dangling), 'broken link')} among the {role}); "
                        "restore the target or remove the link")
    images = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    files = [p for p in images if not p.name.startswith(".")]
    hidden = [p.name for p in images if p.name.startswith(".")]
    if hidden:
        one = len(hidden) == 1
        print(f"warning: {folder}: skipped {_count(len(hidden), 'image file')} whose "
              f"{'name starts' if one else 'names start'} with '.' ({_listing(hidden)}): hidden "
              f"files are not read; rename {'it' if one else 'them'} without the leading '.' "
              f"to use {'it' if one else 'them'}", file=sys.stderr)
    if not files:
        subs = [d for d in entries if d.is_dir() and not d.name.startswith(".")
                and _has_images(d)]
        hint = f"; the sub-folder {subs[0]} holds images: pass that folder" if subs else ""
        raise UserError(f"{folder}: no {role} ({', '.join(IMAGE_SUFFIXES)}) in this folder; "
                        f"put the {role} files directly in it{hint}")
    return files


def _by_stem(files: Iterable[Path], key: Callable[[str], str], folder: Path,
             role: str) -> dict[str, Path]:
    """Index files by key(stem); several files with one key are a UserError listing all."""
    index: dict[str, list[Path]] = {}
    for path in files:
        index.setdefault(key(path.stem), []).append(path)
    clashes = [" & ".join(p.name for p in paths) for paths in index.values() if len(paths) > 1]
    if clashes:
        raise UserError(f"{folder}: several {role} files share a name ({_listing(clashes)}); "
                        "keep one file per name")
    return {k: paths[0] for k, paths in index.items()}


def _label_key(stem: str, usemask: bool) -> str | None:
    """The image stem a label belongs to, or None if the name breaks the USEMASK convention."""
    if usemask:
        return stem[: -len("_mask")] if stem.endswith("_mask") else None
    return stem[: -len("_label")] if stem.endswith("_label") else stem


def _attach_extra_bands(pairs: list[Pair], extra_band_dirs: Sequence[str | os.PathLike]
                        ) -> None:
    for folder in map(Path, extra_band_dirs):
        bands = _by_stem(_scan_folder(folder, "extra-band images"), str, folder,
                         "extra-band image")
        missing = [p.image.name for p in pairs if p.stem not in bands]
        if missing:
            raise UserError(f"{folder}: no extra-band image for {_count(len(missing), 'image')} "
                            f"({_listing(missing)}); every image NAME.* needs a NAME.* here")
        for pair in pairs:
            pair.extra_bands.append(bands[pair.stem])


def find_pairs(images_dir: str | os.PathLike, labels_dir: str | os.PathLike,
               usemask: bool = False, extra_band_dirs: Sequence[str | os.PathLike] = ()
               ) -> list[Pair]:
    """Match images to labels by file stem; returns Pairs sorted by stem.

    Labels are named NAME_mask.* when ``usemask``, else NAME_label.* or NAME.* (any supported
    suffix). Images and labels may share one folder when labels carry the _mask/_label tag.
    Raises one UserError listing every image without a label and every label without an
    image; also for missing or empty folders and duplicate names.
    """
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    image_files = _scan_folder(images_dir, "images")
    tag = "_mask" if usemask else "_label"
    if images_dir.resolve() == labels_dir.resolve():
        label_files = [p for p in image_files if p.stem.endswith(tag)]
        image_files = [p for p in image_files if not p.stem.endswith(tag)]
        if not image_files or not label_files:
            raise UserError(f"{images_dir}: images and labels share this folder, so labels "
                            f"must be named NAME{tag}.* beside NAME.*; found "
                            f"{len(image_files)} images and {len(label_files)} labels")
    else:
        label_files = _scan_folder(labels_dir, "labels")
    images = _by_stem(image_files, str, images_dir, "image")
    misnamed = [p for p in label_files if _label_key(p.stem, usemask) is None]
    well_named = [p for p in label_files if _label_key(p.stem, usemask) is not None]
    labels = _by_stem(well_named, lambda s: str(_label_key(s, usemask)), labels_dir, "label")
    no_label = [images[s].name for s in sorted(images) if s not in labels]
    no_image = sorted([labels[s].name for s in labels if s not in images]
                      + [p.name for p in misnamed])
    if no_label or no_image:
        raise UserError(_unmatched_message(images_dir, labels_dir, no_label, no_image,
                                           usemask))
    pairs = [Pair(stem=s, image=images[s], label=labels[s]) for s in sorted(images)]
    _attach_extra_bands(pairs, extra_band_dirs)
    return pairs


def _unmatched_message(images_dir: Path, labels_dir: Path, no_label: list[str],
                       no_image: list[str], usemask: bool) -> str:
    naming = "NAME_mask.*" if usemask else "NAME.* / NAME_label.*"
    lines = []
    if no_label:
        lines.append(f"{images_dir}: {_count(len(no_label), 'image')} without a label in "
                     f"{labels_dir} ({_listing(no_label)}); add the labels (named {naming}) or "
                     "remove these images")
    if no_image:
        stems = [Path(n).stem for n in no_image]
        if usemask and sum(not s.endswith("_mask") for s in stems) > len(stems) / 2:
            hint = "; these labels are not named NAME_mask.*: set USEMASK to false"
        elif not usemask and sum(s.endswith("_mask") for s in stems) > len(stems) / 2:
            hint = "; these labels are named NAME_mask.*: set USEMASK to true"
        else:
            hint = f"; name each label like its image ({naming}) or remove these labels"
        lines.append(f"{labels_dir}: {_count(len(no_image), 'label')} without an image in "
                     f"{images_dir} ({_listing(no_image)}){hint}")
    return "\n".join(lines)


def find_images(images_dir: str | os.PathLike,
                extra_band_dirs: Sequence[str | os.PathLike] = ()) -> list[Pair]:
    """Images to segment (no labels): Pairs with label=None, sorted by stem.

    Raises UserError for a missing or empty folder, duplicate names, or extra-band folders
    lacking an image's stem.
    """
    images_dir = Path(images_dir)
    images = _by_stem(_scan_folder(images_dir, "images"), str, images_dir, "image")
    pairs = [Pair(stem=s, image=images[s], label=None) for s in sorted(images)]
    _attach_extra_bands(pairs, extra_band_dirs)
    return pairs


# Display -------------------------------------------------------------------------------------

# Pixels sampled for the percentile stretch of large images.
_STRETCH_SAMPLE = 1_000_000
# Percentiles of the per-band stretch of imagery that is not 8-bit.
STRETCH_PERCENTILES = (2.0, 98.0)


def to_display_rgb(image: np.ndarray) -> np.ndarray:
    """An image (H, W, B) of any dtype -> C-contiguous uint8 (H, W, 3) in 0-255: the one
    display stretch (overlays, figures, and the colours the dense CRF compares).

    uint8 images keep their values (they already are 0-255 display values, the units of
    ``CRF_BILATERAL_SRGB``). Other dtypes (uint16, float) get a 2-98 percentile stretch per
    band, ignoring all-zero (nodata) pixels. The first three bands are used; one band is
    repeated as grey and two bands become (b0, b1, b1).
    """
    if image.ndim == 2:
        image = image[..., None]
    bands = image[..., [min(i, image.shape[2] - 1) for i in range(3)]]
    if bands.dtype == np.uint8:
        return np.ascontiguousarray(bands)
    step = max(1, int(math.sqrt(bands.shape[0] * bands.shape[1] / _STRETCH_SAMPLE)))
    sample = bands[::step, ::step].reshape(-1, 3).astype(np.float64)
    valid = sample.any(axis=1)
    if valid.any():
        sample = sample[valid]
    lo, hi = np.percentile(sample, STRETCH_PERCENTILES, axis=0)
    scale = np.where(hi > lo, 255.0 / np.maximum(hi - lo, 1e-12), 0.0).astype(np.float32)
    out = (bands.astype(np.float32) - lo.astype(np.float32)) * scale
    return np.ascontiguousarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


# Writing -----------------------------------------------------------------------------------

# zlib level of the PNGs we write: 1 writes an RGB overlay about 4x faster than PIL's default 6
# (0.07 vs 0.27 s for 0.8 Mpx, a third of segment_folder's time without TTA) for files about
# 10 % larger; label maps compress well at any level.
PNG_LEVEL = 1


def write_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a PNG atomically: uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), or uint16
    (H, W) / (H, W, 1) grey. Values are written as they are (no scaling)."""
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    ok = (array.dtype == np.uint8 and (array.ndim == 2 or array.shape[-1] in (3, 4))) or (
        array.dtype == np.uint16 and array.ndim == 2)
    if not ok:
        raise ValueError(f"write_png takes uint8 (H,W), (H,W,3), (H,W,4) or uint16 (H,W); got "
                         f"{array.dtype} {array.shape}")
    image = Image.fromarray(np.ascontiguousarray(array))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", compress_level=PNG_LEVEL)


@contextlib.contextmanager
def png_writer(path: str | os.PathLike, shape_hw: Sequence[int]
               ) -> Iterator[Callable[[int, np.ndarray], None]]:
    """Open an 8-bit greyscale PNG of ``shape_hw`` for writing in row strips, top to bottom.

    Yields ``write(first_row, rows)`` taking (rows, W) uint8 arrays in order; the file is
    renamed into place when the block ends without error (after every row came), so a label
    map larger than memory never needs to be held whole. Pixel values are written as they
    are, as :func:`write_png` does (the bytes differ: another zlib stream).
    """
    height, width = int(shape_hw[0]), int(shape_hw[1])
    next_row = 0

    def chunk(fh: Any, kind: bytes, data: bytes) -> None:
        fh.write(struct.pack(">I", len(data)) + kind + data)
        fh.write(struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n")
        chunk(fh, b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        compressor = zlib.compressobj(PNG_LEVEL)

        def write(first_row: int, rows: np.ndarray) -> None:
            nonlocal next_row
            if first_row != next_row or rows.shape[1:] != (width,) or rows.dtype != np.uint8:
                raise ValueError(f"png_writer wants uint8 rows of width {width} from row "
                                 f"{next_row}; got {rows.dtype} {rows.shape} at {first_row}")
            filtered = np.zeros((len(rows), width + 1), np.uint8)  # filter type 0 per row
            filtered[:, 1:] = rows
            data = compressor.compress(filtered.tobytes())
            if data:
                chunk(fh, b"IDAT", data)
            next_row += len(rows)

        yield write
        if next_row != height:
            raise ValueError(f"png_writer got {next_row} of {height} rows")
        chunk(fh, b"IDAT", compressor.flush())
        chunk(fh, b"IEND", b"")
        fh.flush()
        os.fsync(fh.fileno())


def _geotiff_profile(shape_hw: Sequence[int], count: int, dtype: np.dtype, meta: RasterMeta,
                     nodata: float | None) -> dict[str, Any]:
    """The one GeoTIFF profile of res_unet outputs: deflate (with the predictor that suits
    the dtype), 256 x 256 blocks beyond 512 px, BigTIFF when it may exceed 4 GB."""
    height, width = int(shape_hw[0]), int(shape_hw[1])
    dtype = np.dtype(dtype)
    profile: dict[str, Any] = {
        "driver": "GTiff", "height": height, "width": width, "count": int(count),
        "dtype": dtype.name, "crs": meta.crs, "transform": meta.transform,
        "nodata": nodata, "compress": "deflate",
        "predictor": 3 if dtype.kind == "f" else 2,
    }
    if max(height, width) > 512:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    if height * width * count * dtype.itemsize > 3_500_000_000:
        profile["BIGTIFF"] = "IF_SAFER"
    return profile


@contextlib.contextmanager
def geotiff_writer(path: str | os.PathLike, shape_hw: Sequence[int], count: int,
                   dtype: np.dtype | str, meta: RasterMeta, nodata: float | None = None
                   ) -> Iterator[Callable[[int, np.ndarray], None]]:
    """Open a GeoTIFF of ``shape_hw`` x ``count`` bands for writing in row strips.

    Yields ``write(first_row, rows)`` taking (rows, W) or (rows, W, count) arrays (cast to
    ``dtype``); the file is renamed into place when the block ends without error, so a
    partial file never appears under ``path``. Georeferenced with ``meta.crs`` and
    ``meta.transform`` when present; ``nodata`` is written as given (``meta.nodata``
    describes the input's values, not this array's).
    """
    dtype = np.dtype(np.uint8 if np.dtype(dtype) == bool else (
        np.float32 if np.dtype(dtype) == np.float16 else dtype))
    profile = _geotiff_profile(shape_hw, count, dtype, meta, nodata)
    width = profile["width"]
    # PAM off: GDAL must not leave an .aux.xml beside the temp file, which the rename orphans.
    with atomic_path(path) as tmp, warnings.catch_warnings(), rasterio.Env(
            GDAL_PAM_ENABLED="NO"):
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(tmp, "w", **profile) as ds:

            def write(first_row: int, rows: np.ndarray) -> None:
                rows = rows if rows.ndim == 3 else rows[..., None]
                ds.write(np.moveaxis(rows.astype(dtype, copy=False), -1, 0),
                         window=Window(0, first_row, width, len(rows)))

            yield write


def write_geotiff(path: str | os.PathLike, array: np.ndarray, meta: RasterMeta,
                  nodata: float | None = None) -> None:
    """Write (H, W) or (H, W, B) pixels of any numeric dtype as a GeoTIFF, atomically
    (profile and georeferencing as :func:`geotiff_writer`)."""
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or 0 in array.shape:
        raise ValueError(f"write_geotiff takes a non-empty (H,W) or (H,W,B) array; got "
                         f"{array.shape}")
    with geotiff_writer(path, array.shape[:2], array.shape[2], array.dtype, meta,
                        nodata) as write:
        write(0, array)
