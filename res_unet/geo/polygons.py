"""Class maps as polygons for a GIS: every class, with its index and name, as GeoPackage
or GeoJSON.

A label map (H, W) of class indices becomes one polygon per 4-connected region of equal
class (holes as interior rings), in the raster's CRS, by ``rasterio.features.shapes``.
Simplification, when asked for, simplifies all polygons together as one coverage
(``shapely.coverage_simplify``), so neighbouring classes keep sharing their borders: no
gaps or slivers open between them. Files are written with pyogrio, atomically.

Areas are square metres whatever the CRS (field ``area_m2``). Projected CRSs: the planar
area times the linear unit squared (within 0.1 % of the ground area in UTM), except Mercator
maps (Web Mercator's planar areas are sec^2(lat) too large: 4x at 60 degrees), which are
measured on the ellipsoid like geographic CRSs. On the ellipsoid (the CRS's own; WGS 84 for
Mercator): pyproj is not among the dependencies, so rather than ``pyproj.Geod`` the
polygons' vertices are mapped by the ellipsoidal Lambert cylindrical equal-area projection
(x = a lon, y = a q(lat) / 2, q the authalic function; Snyder 1987, eq. 3-12), whose planar
areas are the ellipsoid's. That is exact for pixel polygons of these CRSs, whose edges follow
meridians and parallels (the geodesic area pyproj gives would take each edge as a geodesic
instead: a parallel is not one).
GeoPackages keep the scene's CRS; GeoJSON is RFC 7946 (WGS 84 longitude/latitude, reprojected
by GDAL's GeoJSON driver), as web maps and most tools assume.
"""

from __future__ import annotations

import math
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
from rasterio.warp import transform as transform_xy

from res_unet.core.atomic import atomic_path
from res_unet.geo.vector_files import load_pyogrio

_DRIVERS = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON"}
# "a" and "1/f" of a WKT ellipsoid (WKT1 SPHEROID or WKT2 ELLIPSOID).
_MERCATOR = re.compile(r'PROJECTION\["(Mercator|Popular_Visualisation)', re.IGNORECASE)
_ELLIPSOID = re.compile(r'(?:SPHEROID|ELLIPSOID)\["[^"]*",\s*([-+0-9.eE]+),\s*([-+0-9.eE]+)')


@dataclass
class ClassPolygons:
    """Polygons of a class map, aligned arrays: ``geometries`` (shapely Polygons in map
    coordinates, or pixel corners without a transform), ``classes`` (class index of each),
    ``names`` (class name of each), ``area_m2`` (square metres on the ground, of the polygon
    as written; NaN without a CRS), ``area_px`` (pixels of the region before any
    simplification)."""

    geometries: np.ndarray
    classes: np.ndarray
    names: np.ndarray
    area_m2: np.ndarray
    area_px: np.ndarray

    def __len__(self) -> int:
        return len(self.geometries)


def class_polygons(label: np.ndarray, transform: Affine | None = None,
                   class_names: Sequence[str] | None = None, nodata: int | None = None,
                   simplify: float = 0.0, skip_classes: Sequence[int] = (), crs: Any = None
                   ) -> ClassPolygons:
    """Polygons of every class of a (H, W) integer label map (uint8, int16, int32 or uint16).

    ``transform`` (rasterio ``Affine``) places the pixels on the map; without it the
    coordinates are pixel corners (x = column, y = row). ``class_names[i]`` names class
    ``i`` (else the name is the index as text). Pixels equal to ``nodata`` and classes in
    ``skip_classes`` make no polygons. ``simplify`` > 0 simplifies with about that tolerance
    in map units, keeping shared borders shared (coverage simplification). ``crs`` (of the
    map coordinates, anything rasterio's CRS takes) gives the areas in square metres
    (:func:`ground_area_m2`); without it they are NaN.
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
    return ClassPolygons(geometries, classes, names, ground_area_m2(geometries, crs), area_px)


def _authalic_y(lat_rad: np.ndarray, e: float) -> np.ndarray:
    """q(lat) / 2 of the ellipsoidal cylindrical equal-area projection (unit semi-major
    axis): dy = (1 - e^2) cos(lat) / (1 - e^2 sin^2(lat))^2 dlat, the ellipsoid's area
    element, so planar areas in (lon, y) are areas on the ellipsoid."""
    sin = np.sin(lat_rad)
    if e == 0:
        return sin
    return 0.5 * (1 - e * e) * (sin / (1 - (e * sin) ** 2)
                                + np.arctanh(e * sin) / e)


def ground_area_m2(geometries: np.ndarray, crs: Any) -> np.ndarray:
    """Areas in square metres on the ground of shapely polygons in ``crs`` (float64, one
    per geometry; NaN for all when ``crs`` is None). Projected CRSs: planar area times the
    linear unit squared; geographic and Mercator: on the ellipsoid (module docstring)."""
    geometries = np.asarray(geometries, dtype=object)
    if crs is None:
        return np.full(len(geometries), np.nan)
    if not len(geometries):
        return np.zeros(0)
    crs = CRS.from_user_input(crs)
    wkt = crs.to_wkt()
    if not crs.is_geographic and not _MERCATOR.search(wkt):
        _, metres = crs.linear_units_factor
        return shapely.area(geometries).astype(np.float64) * metres ** 2
    if not crs.is_geographic:
        geometries = shapely.transform(geometries, lambda xy: np.column_stack(
            transform_xy(crs, "EPSG:4326", xy[:, 0], xy[:, 1])))
        crs = CRS.from_epsg(4326)
        wkt = crs.to_wkt()
    _, radians = crs.units_factor
    found = _ELLIPSOID.search(wkt)
    a, inverse_f = (float(found[1]), float(found[2])) if found else (6378137.0, 298.257223563)
    e = 0.0 if inverse_f == 0 else math.sqrt((2 - 1 / inverse_f) / inverse_f)

    def equal_area(xy: np.ndarray) -> np.ndarray:
        return np.column_stack([a * xy[:, 0] * radians,
                                a * _authalic_y(xy[:, 1] * radians, e)])

    return shapely.area(shapely.transform(geometries, equal_area)).astype(np.float64)


def _layer_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_") or "class"


def _write_layer(path: Path, driver: str, layer: str, polygons: ClassPolygons, crs: Any,
                 append: bool, description: str | None) -> None:
    pyogrio = load_pyogrio()  # not a plain import: TensorFlow's SQLite would stand in

    options = {} if description is None else {"DESCRIPTION": description}
    if driver == "GeoJSON" and crs is not None:
        # RFC 7946: GDAL reprojects to WGS 84 longitude/latitude and writes no crs member.
        options["RFC7946"] = "YES"

    multi = any(shapely.get_type_id(g) == shapely.GeometryType.MULTIPOLYGON
                for g in polygons.geometries)
    pyogrio.raw.write(
        path, shapely.to_wkb(polygons.geometries) if len(polygons) else np.array([], object),
        [polygons.classes.astype(np.int32), polygons.names, polygons.area_m2,
         polygons.area_px.astype(np.int64)],
        ["class", "name", "area_m2", "area_px"], layer=layer, driver=driver,
        geometry_type="MultiPolygon" if multi else "Polygon", promote_to_multi=multi,
        crs=None if crs is None else CRS.from_user_input(crs).to_wkt(), append=append,
        layer_options=options or None)


def write_class_polygons(path: str | os.PathLike, polygons: ClassPolygons, crs: Any = None,
                         layer: str = "classes", per_class_layers: bool = False,
                         description: str | None = None) -> Path:
    """Write :class:`ClassPolygons` as a GeoPackage (``.gpkg``) or GeoJSON (``.geojson``),
    atomically: one layer ``layer`` with attributes ``class`` (index), ``name``, ``area_m2``
    (square metres, null without a CRS) and ``area_px`` (pixels). A GeoPackage is in ``crs``
    (anything rasterio's CRS takes); a GeoJSON file is RFC 7946, reprojected from ``crs`` to
    WGS 84 longitude/latitude (without ``crs``: the coordinates as they are).

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
                                     polygons.names[pick], polygons.area_m2[pick],
                                     polygons.area_px[pick])
                _write_layer(tmp, driver, _layer_safe(f"class_{value}_{part.names[0]}"),
                             part, crs, append=False, description=description)
    return path
