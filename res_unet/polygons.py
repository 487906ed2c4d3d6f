"""Class maps as polygons for a GIS: every class, with its index and name, as GeoPackage
or GeoJSON.

A label map (H, W) of class indices becomes one polygon per 4-connected region of equal
class (holes as interior rings), in the raster's CRS, by ``rasterio.features.shapes``.
Simplification, when asked for, simplifies all polygons together as one coverage
(``shapely.coverage_simplify``), so neighbouring classes keep sharing their borders: no
gaps or slivers open between them. Files are written with pyogrio, atomically.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from rasterio.crs import CRS
from rasterio.features import shapes
from rasterio.transform import Affine

from res_unet.atomic import atomic_path
from res_unet.vector_files import load_pyogrio

_DRIVERS = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON"}


@dataclass
class ClassPolygons:
    """Polygons of a class map, aligned arrays: ``geometries`` (shapely Polygons in map
    coordinates, or pixel corners without a transform), ``classes`` (class index of each),
    ``names`` (class name of each), ``area`` (square map units, of the polygon as written),
    ``area_px`` (pixels of the region before any simplification)."""

    geometries: np.ndarray
    classes: np.ndarray
    names: np.ndarray
    area: np.ndarray
    area_px: np.ndarray

    def __len__(self) -> int:
        return len(self.geometries)


def class_polygons(label: np.ndarray, transform: Affine | None = None,
                   class_names: Sequence[str] | None = None, nodata: int | None = None,
                   simplify: float = 0.0, skip_classes: Sequence[int] = ()) -> ClassPolygons:
    """Polygons of every class of a (H, W) integer label map (uint8, int16, int32 or uint16).

    ``transform`` (rasterio ``Affine``) places the pixels on the map; without it the
    coordinates are pixel corners (x = column, y = row). ``class_names[i]`` names class
    ``i`` (else the name is the index as text). Pixels equal to ``nodata`` and classes in
    ``skip_classes`` make no polygons. ``simplify`` > 0 simplifies with about that tolerance
    in map units, keeping shared borders shared (coverage simplification).
    """
    label = np.ascontiguousarray(label)
    if label.dtype == np.uint16 or label.dtype.kind == "b":
        label = label.astype(np.int32)
    affine = Affine.identity() if transform is None else transform
    keep = np.ones(label.shape, dtype=bool)
    for value in [*skip_classes, *([] if nodata is None else [nodata])]:
        keep &= label != value
    found = [(shapely.geometry.shape(geometry), int(value))
             for geometry, value in shapes(label, mask=keep, connectivity=4,
                                           transform=affine)]
    geometries = np.array([g for g, _ in found], dtype=object)
    classes = np.array([v for _, v in found], dtype=np.int64)
    pixel_area = abs(affine.a * affine.e - affine.b * affine.d)
    area_px = np.rint(shapely.area(geometries) / pixel_area).astype(np.int64) if len(
        found) else np.zeros(0, dtype=np.int64)
    if simplify > 0 and len(found):
        geometries = shapely.coverage_simplify(geometries, simplify)
        kept = ~shapely.is_empty(geometries)
        geometries, classes, area_px = geometries[kept], classes[kept], area_px[kept]
    names = np.array([str(class_names[c]) if class_names is not None and c < len(class_names)
                      else str(c) for c in classes], dtype=object)
    return ClassPolygons(geometries, classes, names,
                         shapely.area(geometries).astype(np.float64) if len(geometries)
                         else np.zeros(0), area_px)


def _layer_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_") or "class"


def _write_layer(path: Path, driver: str, layer: str, polygons: ClassPolygons, crs: Any,
                 append: bool, description: str | None) -> None:
    pyogrio = load_pyogrio()  # not a plain import: TensorFlow's SQLite would stand in

    multi = any(shapely.get_type_id(g) == shapely.GeometryType.MULTIPOLYGON
                for g in polygons.geometries)
    pyogrio.raw.write(
        path, shapely.to_wkb(polygons.geometries) if len(polygons) else np.array([], object),
        [polygons.classes.astype(np.int32), polygons.names, polygons.area,
         polygons.area_px.astype(np.int64)],
        ["class", "name", "area", "area_px"], layer=layer, driver=driver,
        geometry_type="MultiPolygon" if multi else "Polygon", promote_to_multi=multi,
        crs=None if crs is None else CRS.from_user_input(crs).to_wkt(), append=append,
        layer_options=None if description is None else {"DESCRIPTION": description})


def write_class_polygons(path: str | os.PathLike, polygons: ClassPolygons, crs: Any = None,
                         layer: str = "classes", per_class_layers: bool = False,
                         description: str | None = None) -> Path:
    """Write :class:`ClassPolygons` as a GeoPackage (``.gpkg``) or GeoJSON (``.geojson``),
    atomically: one layer ``layer`` with attributes ``class`` (index), ``name``, ``area``
    (square map units) and ``area_px`` (pixels), in ``crs`` (anything rasterio's CRS takes;
    GeoJSON records it in its ``crs`` member as GDAL and QGIS read it).

    ``per_class_layers`` (GeoPackage only) adds one layer per class present, named after the
    class. ``description`` is stored with each layer (GeoPackage: the layer's description;
    GeoJSON: a ``description`` member), e.g. to say that the coordinates are pixels. Without
    ``crs`` the file has none. Returns ``path``.
    """
    path = Path(path)
    driver = _DRIVERS.get(path.suffix.lower())
    if driver is None:
        raise ValueError(f"{path}: polygons are written as .gpkg or .geojson")
    if per_class_layers and driver != "GPKG":
        raise ValueError(f"{path}: one layer per class needs a GeoPackage (.gpkg)")
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # No CRS is a choice here (pixel coordinates), not the accident pyogrio warns of.
        warnings.filterwarnings("ignore", "'crs' was not provided", UserWarning)
        # GDAL creates the file itself and will not open mkstemp's empty placeholder.
        tmp.unlink()
        _write_layer(tmp, driver, layer, polygons, crs, append=False, description=description)
        if per_class_layers:
            for value in np.unique(polygons.classes):
                pick = polygons.classes == value
                part = ClassPolygons(polygons.geometries[pick], polygons.classes[pick],
                                     polygons.names[pick], polygons.area[pick],
                                     polygons.area_px[pick])
                _write_layer(tmp, driver, _layer_safe(f"class_{value}_{part.names[0]}"),
                             part, crs, append=False, description=description)
    return path
