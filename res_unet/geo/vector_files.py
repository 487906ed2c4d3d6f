"""Polygon label files as pyogrio reads them: the layer named, only the features over the
scenes decoded, and every way a file can be wrong as one line (:func:`read_vector_labels`).

A label layer is a GeoPackage, GeoJSON or Shapefile of polygons (:data:`VECTOR_SUFFIXES`).
What the features become on an image's grid is :mod:`res_unet.geo.vectors`' (which re-exports
the names here). Checked on reading:

- the layer exists (named when the file holds several) and has a CRS;
- a geographic CRS holds longitude/latitude: a GeoJSON without its ``crs`` member reads as
  WGS 84, so projected metres in it mean the file lost its CRS (one line, not PROJ's
  "Invalid latitude" from deep inside the reprojection);
- coordinates are numbers (no NaN), features are polygons (invalid ones repaired);
- a GeoJSON is at most :data:`MAX_GEOJSON_BYTES`: it has no spatial index, so every process
  reading it parses it whole (features outside the scenes are dropped as they stream past,
  so memory stays small, but not time); a GeoPackage has an index.

Why pyogrio is loaded through :func:`load_pyogrio`: the pyogrio wheel ships one ``libgdal``
with SQLite (and PROJ) linked in and their symbols exported. TensorFlow loads
``libtensorflow_cc`` with ``RTLD_GLOBAL``, and that library exports an SQLite of its own
(another version). When pyogrio is imported after TensorFlow, the dynamic linker binds most
of GDAL's ``sqlite3_*`` calls to TensorFlow's copy while the calls inside GDAL's copy stay
there: two SQLite versions share one database handle, and listing the layers of a
GeoPackage holding a spatial view kills the process (SIGSEGV). Loading GDAL with
``RTLD_DEEPBIND`` first makes it resolve its symbols in itself before the global scope,
whatever was imported before; pyogrio then finds the library loaded (by its soname) and
uses it. Every pyogrio import in res_unet goes through :func:`load_pyogrio`.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
import os
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import shapely
from rasterio.crs import CRS

from res_unet.core.errors import UserError, listing

if TYPE_CHECKING:
    from res_unet.geo.vectors import SceneArea

VECTOR_SUFFIXES = (".gpkg", ".geojson", ".shp")
# GeoJSON has no spatial index: every process that reads it parses the whole file (twice:
# GDAL's first pass learns the fields). Above this size the fix is a GeoPackage.
MAX_GEOJSON_BYTES = 1_000_000_000
_POLYGONAL = {shapely.GeometryType.POLYGON, shapely.GeometryType.MULTIPOLYGON}
_MAX_LISTED = 8


def _listing(values: Sequence[Any]) -> str:
    return listing(values, _MAX_LISTED)


# Loading pyogrio -----------------------------------------------------------------------------

def _bundled_gdal() -> list[Path]:
    """The GDAL libraries bundled in the pyogrio wheel (none for a conda or system GDAL,
    which share one SQLite with everything else)."""
    spec = importlib.util.find_spec("pyogrio")
    if spec is None or not spec.submodule_search_locations:
        return []
    libs = Path(next(iter(spec.submodule_search_locations))).parent / "pyogrio.libs"
    return sorted(libs.glob("libgdal*.so*")) if libs.is_dir() else []


def load_pyogrio() -> ModuleType:
    """The ``pyogrio`` module (with ``pyogrio.raw`` and ``pyogrio.errors`` imported), its
    GDAL loaded first with ``RTLD_DEEPBIND`` on Linux when pyogrio is not imported yet."""
    deepbind = getattr(os, "RTLD_DEEPBIND", 0)
    if "pyogrio" not in sys.modules and deepbind:
        for library in _bundled_gdal():
            ctypes.CDLL(str(library), mode=os.RTLD_NOW | os.RTLD_LOCAL | deepbind)
    import pyogrio
    import pyogrio.errors
    import pyogrio.raw

    return pyogrio


# Text for messages ---------------------------------------------------------------------------

def crs_text(crs: CRS) -> str:
    """A CRS as users know it: ``EPSG:32633``, or the name in its WKT."""
    authority = crs.to_authority()
    if authority:
        return ":".join(authority)
    name = re.match(r'\s*\w+\["([^"]*)"', crs.to_wkt())
    return name.group(1) if name else crs.to_string()[:60]


def bounds_text(bounds: Sequence[float]) -> str:
    """Bounds as ``(xmin, ymin, xmax, ymax)`` with 6 significant digits."""
    return "(" + ", ".join(f"{b:.6g}" for b in bounds) + ")"


# Reading ------------------------------------------------------------------------------------

@dataclass
class VectorLabels:
    """The polygons of one label layer, in the layer's own CRS.

    ``geometries`` holds shapely Polygons/MultiPolygons (valid, non-empty), ``fids`` their
    feature ids in the file, ``attributes`` the attribute columns read (one array each,
    aligned with ``geometries``). ``repaired`` lists the fids that ``make_valid`` repaired;
    ``skipped`` counts features without a geometry (or left empty by the repair).
    ``layer`` is the layer's name when the file holds several (None otherwise).
    ``in_layer`` counts the layer's features when only those over some scenes were read
    (None: the whole layer was read).
    """

    path: Path
    layer: str | None
    crs: CRS
    geometries: np.ndarray
    fids: np.ndarray
    attributes: dict[str, np.ndarray] = field(default_factory=dict)
    repaired: list[int] = field(default_factory=list)
    skipped: int = 0
    in_layer: int | None = None

    def __len__(self) -> int:
        return len(self.geometries)

    @property
    def total(self) -> int:
        """The number of polygons in the layer, read or not."""
        return len(self) if self.in_layer is None else self.in_layer

    @property
    def where(self) -> str:
        """The file (and layer) in user messages."""
        return f"{self.path}" + (f" (layer {self.layer})" if self.layer else "")


def is_vector_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a vector label file by its suffix (:data:`VECTOR_SUFFIXES`)."""
    return Path(path).suffix.lower() in VECTOR_SUFFIXES


def _layer_name(path: Path, layer: str | None) -> tuple[str, bool]:
    """The layer to read and whether messages should name it (the file has several)."""
    pyogrio = load_pyogrio()

    try:
        # Tables without geometry (QGIS keeps its styles in "layer_styles") are no labels.
        layers = [str(name) for name, kind in pyogrio.list_layers(path) if kind is not None]
    except pyogrio.errors.DataSourceError as exc:
        raise UserError(f"{path}: cannot be read as a vector layer ({exc}); save it from "
                        "QGIS as a GeoPackage, GeoJSON or Shapefile") from None
    if layer is not None:
        if layer not in layers:
            raise UserError(f"{path}: has no layer {layer!r}; its layers are "
                            f"{_listing(layers)}: set LABEL_LAYER (or --layer) to one of them")
        return layer, len(layers) > 1
    if len(layers) > 1:
        raise UserError(f"{path}: holds {len(layers)} layers ({_listing(layers)}); name the "
                        "one that holds the labels with LABEL_LAYER in the config (or "
                        "--layer NAME)")
    if not layers:
        raise UserError(f"{path}: holds no layer with geometries; save the label polygons "
                        "into it from QGIS")
    return layers[0], False


def layer_name(path: str | os.PathLike, layer: str | None = None) -> str:
    """The name of the layer :func:`read_vector_labels` reads from ``path`` with ``layer``
    (the file's only layer when None); raises UserError as it does."""
    return _layer_name(Path(path), layer)[0]


def _polygonal_part(geometry: Any) -> Any:
    """The polygonal part of a repaired geometry (make_valid may return a collection)."""
    if shapely.get_type_id(geometry) in _POLYGONAL:
        return geometry
    parts = [p for p in shapely.get_parts(geometry) if shapely.get_type_id(p) in _POLYGONAL]
    return shapely.union_all(parts) if parts else shapely.Polygon()


def _size_text(n: int) -> str:
    return f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def _check_size(path: Path) -> None:
    """Refuse a GeoJSON larger than :data:`MAX_GEOJSON_BYTES` (no spatial index)."""
    size = path.stat().st_size
    if path.suffix.lower() == ".geojson" and size > MAX_GEOJSON_BYTES:
        raise UserError(f"{path}: {_size_text(size)} of GeoJSON, more than the "
                        f"{_size_text(MAX_GEOJSON_BYTES)} res_unet reads: GeoJSON has no "
                        "spatial index, so every process would parse all of it to find the "
                        "polygons over the scenes; convert it once to a GeoPackage, which "
                        f"has one (ogr2ogr -f GPKG {path.with_suffix('.gpkg').name} "
                        f"{path.name}, or in QGIS Export > Save Features As > GeoPackage), "
                        "and pass that file")


def _check_lon_lat(where: str, crs: CRS, bounds: Sequence[float]) -> None:
    """Raise UserError when a layer in a geographic CRS has coordinates beyond
    longitude +-180 / latitude +-90 (``bounds``: xmin, ymin, xmax, ymax in the layer's
    CRS): projected coordinates read as degrees, as a GeoJSON without its ``crs`` does."""
    if not crs.is_geographic or not all(math.isfinite(b) for b in bounds):
        return
    x0, y0, x1, y1 = bounds
    if max(abs(x0), abs(x1)) <= 180 and max(abs(y0), abs(y1)) <= 90:
        return
    raise UserError(f"{where}: coordinates up to {bounds_text(bounds)} are not longitude/"
                    f"latitude, yet the layer's CRS is {crs_text(crs)} (a GeoJSON without a "
                    "'crs' member is read as WGS 84), so the file probably lost its CRS; "
                    "in QGIS set the CRS it was drawn in (Layer > Set CRS of Layer) and save "
                    "it as a GeoPackage (or as GeoJSON in EPSG:4326)")


def _geometries(where: str, wkb: np.ndarray | None, fids: np.ndarray) -> np.ndarray:
    """Shapely geometries from WKB (None where a feature has none); raises UserError for a
    geometry that cannot be read or has coordinates that are not numbers."""
    if wkb is None:
        return np.full(len(fids), None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        geometries = shapely.from_wkb(wkb, on_invalid="ignore")
        coords, owner = shapely.get_coordinates(geometries, return_index=True)
    broken = np.flatnonzero(np.not_equal(wkb, None) & np.equal(geometries, None))
    nonfinite = owner[~np.isfinite(coords).all(axis=1)]
    bad = sorted(set(broken.tolist()) | set(nonfinite.tolist()))
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UserError(f"{where}: feature {fids[bad[0]]}{more} has coordinates that are not "
                        "numbers (NaN or infinite); "
                        "fix or delete it in QGIS (Vector > Geometry Tools > Check Validity "
                        "lists it)")
    return geometries


def read_vector_labels(path: str | os.PathLike, layer: str | None = None,
                       attribute: str | None = None, strict: bool = False,
                       within: SceneArea | None = None) -> VectorLabels:
    """Read a polygon label layer (GeoPackage, GeoJSON, Shapefile) with pyogrio.

    ``layer`` names the layer in a multi-layer file (required when there are several);
    ``attribute`` is the column read along with the geometries (the class column), none
    when labels are binary. ``within``: read only the features over these scenes (the
    others are never decoded; ``in_layer`` then counts the whole layer). Invalid polygons
    are repaired with ``make_valid`` and their fids listed in ``repaired``; with ``strict``
    they raise instead. Raises UserError for an unreadable file, a missing layer or
    attribute, a layer without a CRS or whose coordinates do not fit its geographic CRS,
    coordinates that are not numbers, non-polygon features (points, lines) and a GeoJSON
    over :data:`MAX_GEOJSON_BYTES`.
    """
    pyogrio = load_pyogrio()

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such label file; check the labels path")
    _check_size(path)
    layer, named = _layer_name(path, layer)
    info = pyogrio.read_info(path, layer=layer)
    where = f"{path}" + (f" (layer {layer})" if named else "")
    fields = [str(f) for f in info["fields"]]
    if attribute is not None and attribute not in fields:
        raise UserError(f"{where}: has no attribute {attribute!r}; its attributes are "
                        f"{_listing(fields) or 'none'}: set LABEL_ATTRIBUTE to the one that "
                        "holds the class")
    if not info["crs"]:
        raise UserError(f"{where}: the layer has no CRS, so it cannot be placed on the "
                        "images; in QGIS set it (Layer > Set CRS of Layer) and save again, "
                        "or keep the .prj beside a Shapefile")
    crs = CRS.from_user_input(info["crs"])
    mask = None if within is None else within.in_crs(crs)
    meta, fids, wkb, columns = pyogrio.raw.read(
        path, layer=layer, columns=[] if attribute is None else [attribute], force_2d=True,
        return_fids=True, mask=mask)
    geometries = _geometries(where, wkb, fids)
    if len(fids):
        _check_lon_lat(where, crs, shapely.total_bounds(geometries))
    elif mask is not None:
        _check_lon_lat(where, crs, layer_extent(path, layer))
    attributes = {str(name): np.asarray(col)
                  for name, col in zip(meta["fields"], columns, strict=True)}

    keep = np.zeros(len(geometries), dtype=bool)
    repaired: list[int] = []
    out = np.empty(len(geometries), dtype=object)
    for i, geometry in enumerate(geometries):
        if geometry is None or shapely.is_empty(geometry):
            continue
        kind = shapely.get_type_id(geometry)
        if kind not in _POLYGONAL and kind != shapely.GeometryType.GEOMETRYCOLLECTION:
            raise UserError(f"{where}: feature {fids[i]} is a "
                            f"{geometry.geom_type}, not a polygon; "
                            "labels must be polygons (buffer lines or points in QGIS first)")
        if not shapely.is_valid(geometry):
            if strict:
                raise UserError(f"{where}: feature {fids[i]} is an invalid polygon "
                                f"({shapely.is_valid_reason(geometry)}); fix it in QGIS "
                                "(Vector > Geometry Tools > Fix Geometries)")
            geometry = shapely.make_valid(geometry, method="structure", keep_collapsed=False)
            repaired.append(int(fids[i]))
        geometry = _polygonal_part(geometry)
        if shapely.is_empty(geometry):
            continue
        out[i] = geometry
        keep[i] = True
    in_layer = None
    if mask is not None:
        # The count GDAL knows without a pass (GeoPackage, Shapefile); counted otherwise.
        in_layer = int(info["features"]) if info["features"] >= 0 else int(
            pyogrio.read_info(path, layer=layer, force_feature_count=True)["features"])
    return VectorLabels(path, layer if named else None, crs, out[keep],
                        np.asarray(fids)[keep], {k: v[keep] for k, v in attributes.items()},
                        repaired, int((~keep).sum()), in_layer)


def layer_extent(path: str | os.PathLike, layer: str | None = None
                 ) -> tuple[float, float, float, float]:
    """The bounds (xmin, ymin, xmax, ymax) of a layer's features in its CRS, from the
    file (a full pass for GeoJSON); NaNs for a layer without features."""
    info = load_pyogrio().read_info(path, layer=layer, force_total_bounds=True)
    bounds = info["total_bounds"]
    return tuple(float(b) for b in bounds) if bounds is not None else (math.nan,) * 4
