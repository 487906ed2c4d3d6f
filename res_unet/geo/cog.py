"""Cloud-Optimized GeoTIFFs of class maps and probabilities.

A COG is a GeoTIFF with internal tiles and overviews laid out so that a GIS, a web map or
a cloud bucket reader fetches only the part and zoom level it shows. GDAL's ``COG`` driver
writes the layout; overviews of class maps use nearest neighbour (they stay class indices),
overviews of probabilities average. CRS, transform and nodata are kept; every write is
atomic. The COG driver writes a whole dataset at once, never strips of rows: a raster
written in strips goes to an ordinary tiled GeoTIFF first, which :func:`copy_to_cog`
translates.

What the bands mean travels in the file (a :class:`RasterDescription`), so a GIS shows it
without a style: label maps carry a colour table (the overlays' colours, from
:mod:`res_unet.geo.palette`), their class names in the band description and in ``CLASS_k``
metadata items (a GeoTIFF has no category names or attribute table without an .aux.xml
beside it); probabilities carry each band's class name as its description.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.errors
import rasterio.shutil

from res_unet.core.atomic import atomic_path
from res_unet.geo.palette import class_colours


@dataclass(frozen=True)
class RasterDescription:
    """What a raster's bands mean, written into its file: ``band_names`` (one description
    per band), ``colormap`` of band 1 ({value: (r, g, b, a)}, 0-255; uint8 rasters only)
    and ``tags`` (dataset metadata items)."""

    band_names: Sequence[str] = ()
    colormap: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def apply(self, dataset: Any) -> None:
        """Write the description into ``dataset``, open for writing."""
        for band, name in enumerate(self.band_names, start=1):
            dataset.set_band_description(band, name)
        if self.colormap:
            dataset.write_colormap(1, self.colormap)
        if self.tags:
            dataset.update_tags(**self.tags)


def label_description(class_names: Sequence[str], nodata: int) -> RasterDescription:
    """The description of a class map of ``len(class_names)`` classes (binary: 2): the
    overlays' colour of every class (:func:`res_unet.geo.palette.class_colours`; a TIFF colour
    table has no alpha, so a binary map's background is black, and nodata is shown
    transparent by being nodata), class names in the band description and as ``CLASS_k``
    items."""
    colours = class_colours(len(class_names))
    colormap = {k: (*(int(v) for v in colour), 255) for k, colour in enumerate(colours)}
    colormap[nodata] = (0, 0, 0, 0)
    listed = ", ".join(f"{k} {name}" for k, name in enumerate(class_names))
    return RasterDescription(
        band_names=[f"class ({listed}; {nodata} nodata)"], colormap=colormap,
        tags={f"CLASS_{k}": str(name) for k, name in enumerate(class_names)})


def probability_description(class_names: Sequence[str], binary: bool) -> RasterDescription:
    """Band descriptions of a probability raster: one band per class, named after it; a
    binary model's one band is the probability of its foreground (class 1)."""
    names = [class_names[1]] if binary else list(class_names)
    return RasterDescription(band_names=[f"probability of {name}" for name in names])


@contextlib.contextmanager
def gdal_writing() -> Iterator[None]:
    """GDAL as every raster res_unet writes needs it: PAM off, so that GDAL leaves no
    .aux.xml beside a temporary file (the rename into place would orphan it), and no
    warning for a plain raster written without georeferencing, which is a choice."""
    with warnings.catch_warnings(), rasterio.Env(GDAL_PAM_ENABLED="NO"):
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        yield


def _cog_options(classes: bool, blocksize: int, compress: str) -> dict[str, Any]:
    """Creation options of the COG driver: tiles, compression, overview resampling."""
    resampling = "NEAREST" if classes else "AVERAGE"
    return {"BLOCKSIZE": int(blocksize), "COMPRESS": compress, "PREDICTOR": "YES",
            "OVERVIEW_RESAMPLING": resampling, "RESAMPLING": resampling,
            "BIGTIFF": "IF_SAFER"}


def band_stack(array: np.ndarray, writer: str) -> np.ndarray:
    """``array`` (H, W) or (H, W, B) as (H, W, B); ValueError naming ``writer`` for any other
    shape or an empty array."""
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or 0 in array.shape:
        raise ValueError(f"{writer} takes a non-empty (H, W) or (H, W, B) array; got "
                         f"{array.shape}")
    return array


def write_cog(path: str | os.PathLike, array: np.ndarray, crs: Any = None,
              transform: Any = None, nodata: float | None = None, classes: bool = True,
              blocksize: int = 512, compress: str = "DEFLATE",
              description: RasterDescription | None = None) -> Path:
    """Write a class map or probabilities as a Cloud-Optimized GeoTIFF, atomically.

    ``array``: with ``classes`` an (H, W) map of class indices (written as uint8, e.g.
    255 as ``nodata``); otherwise probabilities (H, W) or (H, W, C), 0..1, written as
    float32 (one band per class). ``crs`` and ``transform`` (rasterio CRS and ``Affine``)
    georeference it; ``blocksize`` is the tile edge in pixels (a power of two). Overviews
    are made down to one tile: nearest neighbour for classes, average for probabilities.
    ``description`` (band names, colour table, tags) is written into the file.
    """
    array = band_stack(array, "write_cog")
    if classes and array.shape[2] != 1:
        raise ValueError(f"a class map is (H, W); got {array.shape}")
    dtype = np.uint8 if classes else np.float32
    profile = {
        "driver": "COG", "height": array.shape[0], "width": array.shape[1],
        "count": array.shape[2], "dtype": np.dtype(dtype).name, "crs": crs,
        "transform": transform, "nodata": nodata, **_cog_options(classes, blocksize, compress),
    }
    path = Path(path)
    with atomic_path(path) as tmp, gdal_writing(), rasterio.open(tmp, "w", **profile) as ds:
        ds.write(np.moveaxis(array.astype(dtype, copy=False), -1, 0))
        if description is not None:
            description.apply(ds)
    return path


def copy_to_cog(source: str | os.PathLike, path: str | os.PathLike, classes: bool = True,
                blocksize: int = 512, compress: str = "DEFLATE") -> Path:
    """Translate the raster file ``source`` (e.g. a tiled GeoTIFF written in strips) into a
    Cloud-Optimized GeoTIFF at ``path``, atomically: pixels, data type, CRS, transform,
    nodata, colour table, band descriptions and metadata as they are; tiles and overviews
    as :func:`write_cog` makes them (``classes``: nearest-neighbour overviews, else
    average)."""
    path = Path(path)
    with atomic_path(path) as tmp, gdal_writing():
        rasterio.shutil.copy(source, tmp, driver="COG",
                             **_cog_options(classes, blocksize, compress))
    return path
