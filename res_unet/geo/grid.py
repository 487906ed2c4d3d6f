"""Where a raster's pixels lie on the Earth, read once the same way for rasters and polygons.

:class:`RasterMeta` is what an image read carries to its outputs (CRS, transform, nodata);
:class:`SceneGrid` is the grid polygon labels are burnt onto (CRS, transform and size, read
from the header without the pixels). Both take their georeferencing from an open dataset
through :func:`map_transform`, so a plain image (JPEG, PNG, a TIFF without a CRS) is plain
for both; every raster is opened through :func:`open_raster`, which keeps rasterio's
warning about such images quiet (being plain is no fault: reading says when it matters).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rasterio
import rasterio.errors
import shapely
from rasterio.crs import CRS
from rasterio.transform import Affine


def open_raster(path: str | os.PathLike) -> Any:
    """``rasterio.open(path)`` for reading (a dataset, also a context manager), without the
    NotGeoreferencedWarning rasterio gives when it opens a plain image. Raises rasterio's
    errors (RasterioIOError for a file GDAL cannot open)."""
    with warnings.catch_warnings():
        # rasterio warns when it opens the file only, not when its transform is read later.
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        return rasterio.open(path)


def map_transform(ds: Any) -> Affine | None:
    """The pixel -> map transform of an open dataset; None for a plain image (no CRS and
    GDAL's identity transform)."""
    return None if ds.crs is None and ds.transform.is_identity else ds.transform


@dataclass
class RasterMeta:
    """Where an image came from and how it sits on the Earth.

    ``crs`` is a rasterio CRS, ``transform`` an affine.Affine (pixel -> map coordinates),
    ``nodata`` the nodata value of the pixels as read (the declared one, or 0 where that had
    no place in the unsigned type); all None for plain (non-georeferenced) images.
    ``stored_dtype`` is the file's pixel type when reading converted it (e.g. "int16"),
    else None.
    """

    path: Path
    crs: Any | None = None
    transform: Any | None = None
    nodata: float | None = None
    stored_dtype: str | None = None

    @classmethod
    def of_dataset(cls, path: Path, ds: Any) -> RasterMeta:
        """The georeferencing of an open rasterio dataset (none for a plain file)."""
        return cls(path=path, crs=ds.crs, transform=map_transform(ds),
                   nodata=None if ds.nodata is None else float(ds.nodata))


def is_georeferenced(meta: RasterMeta) -> bool:
    """Whether the image has a CRS or a map transform worth carrying to outputs."""
    return meta.crs is not None or meta.transform is not None


@dataclass(frozen=True)
class SceneGrid:
    """Where an image's pixels lie: CRS, affine transform (pixel -> map) and (H, W) size."""

    path: Path
    crs: CRS | None
    transform: Affine | None
    height: int
    width: int

    @classmethod
    def of_file(cls, path: str | os.PathLike) -> SceneGrid:
        """The grid of a raster file, read without its pixels."""
        with open_raster(path) as ds:
            return cls(Path(path), ds.crs, map_transform(ds), ds.height, ds.width)

    def footprint(self) -> Any:
        """The image's outline as a shapely Polygon in its CRS (exact for rotated grids)."""
        corners = [(0, 0), (self.width, 0), (self.width, self.height), (0, self.height)]
        return shapely.Polygon([self.transform @ c for c in corners])
