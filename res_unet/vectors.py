"""Polygon labels as users draw them in QGIS: read a layer, put it on an image's grid.

A label layer is a GeoPackage, GeoJSON or Shapefile of polygons (:data:`VECTOR_SUFFIXES`),
read with pyogrio. Its features become class indices through one attribute (integer class
indices, or class names looked up in the list of class names), or are all class 1 when no
attribute is named (binary labels). They are reprojected to the image's CRS and burnt onto
its grid as an (H, W) uint8 label map, 0 (background) where no polygon lies.

Rules, fixed here once:

- A pixel belongs to a polygon when its centre lies inside it (GDAL's default rasterising,
  ``all_touched=False``); holes (interior rings) stay background.
- Overlaps: **later features win**, in the layer's own feature order, the order in which
  QGIS draws them (the last drawn is on top). With ``priority`` (class indices, lowest
  priority first) the classes are layered in that order instead, e.g. ``[1, 2]`` puts
  class 2 on top of class 1 wherever they overlap; within a class the later feature wins.
- Invalid geometries (self-intersections, as a slip of the mouse in QGIS makes) are
  **repaired** with ``shapely.make_valid`` (method "structure", which keeps only the
  polygonal area and drops collapsed lines and points) and counted: the count travels in
  :class:`LabelFacts` for the command to report. ``strict=True`` refuses them instead.
- Reprojection moves vertices (``rasterio.warp.transform``, the image CRS being the target);
  edges are not densified, as QGIS draws them when it reprojects on the fly.

Pairing images with layers is :mod:`res_unet.pairing`'s (``NAME.tif`` takes ``NAME.gpkg``,
``.geojson`` or ``.shp``; or one vector file covers many scenes, and
:func:`features_by_scene` picks each scene's features).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.errors
import shapely
from rasterio.crs import CRS
from rasterio.features import rasterize
from rasterio.transform import Affine
from rasterio.warp import transform as warp_coords

from res_unet.errors import UserError, listing

VECTOR_SUFFIXES = (".gpkg", ".geojson", ".shp")
_POLYGONAL = {shapely.GeometryType.POLYGON, shapely.GeometryType.MULTIPOLYGON}
_MAX_LISTED = 8


def _listing(values: Sequence[Any]) -> str:
    return listing(values, _MAX_LISTED)


# Reading ------------------------------------------------------------------------------------

@dataclass
class VectorLabels:
    """The polygons of one label layer, in the layer's own CRS.

    ``geometries`` holds shapely Polygons/MultiPolygons (valid, non-empty), ``fids`` their
    feature ids in the file, ``attributes`` the attribute columns read (one array each,
    aligned with ``geometries``). ``repaired`` lists the fids that ``make_valid`` repaired;
    ``skipped`` counts features without a geometry (or left empty by the repair).
    ``layer`` is the layer's name when the file holds several (None otherwise).
    """

    path: Path
    layer: str | None
    crs: CRS
    geometries: np.ndarray
    fids: np.ndarray
    attributes: dict[str, np.ndarray] = field(default_factory=dict)
    repaired: list[int] = field(default_factory=list)
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.geometries)

    @property
    def where(self) -> str:
        """The file (and layer) in user messages."""
        return f"{self.path}" + (f" (layer {self.layer})" if self.layer else "")

    def subset(self, indices: np.ndarray) -> VectorLabels:
        """The features at ``indices`` (positions, not fids), everything else kept."""
        indices = np.asarray(indices, dtype=np.intp)
        kept = set(self.fids[indices].tolist())
        return VectorLabels(self.path, self.layer, self.crs, self.geometries[indices],
                            self.fids[indices],
                            {k: v[indices] for k, v in self.attributes.items()},
                            [f for f in self.repaired if f in kept], self.skipped)


def is_vector_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a vector label file by its suffix (:data:`VECTOR_SUFFIXES`)."""
    return Path(path).suffix.lower() in VECTOR_SUFFIXES


def _layer_name(path: Path, layer: str | None) -> tuple[str, bool]:
    """The layer to read and whether messages should name it (the file has several)."""
    import pyogrio
    import pyogrio.errors

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


def read_vector_labels(path: str | os.PathLike, layer: str | None = None,
                       attribute: str | None = None, strict: bool = False) -> VectorLabels:
    """Read a polygon label layer (GeoPackage, GeoJSON, Shapefile) with pyogrio.

    ``layer`` names the layer in a multi-layer file (required when there are several);
    ``attribute`` is the column read along with the geometries (the class column), none
    when labels are binary. Invalid polygons are repaired with ``make_valid`` and their fids
    listed in ``repaired``; with ``strict`` they raise instead. Raises UserError for an
    unreadable file, a missing layer or attribute, a layer without a CRS and non-polygon
    features (points, lines).
    """
    import pyogrio
    import pyogrio.raw

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such label file; check the labels path")
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
    meta, fids, wkb, columns = pyogrio.raw.read(
        path, layer=layer, columns=[] if attribute is None else [attribute], force_2d=True,
        return_fids=True)
    geometries = shapely.from_wkb(wkb) if wkb is not None else np.full(len(fids), None)
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
    return VectorLabels(path, layer if named else None, CRS.from_user_input(meta["crs"]),
                        out[keep], np.asarray(fids)[keep],
                        {k: v[keep] for k, v in attributes.items()}, repaired,
                        int((~keep).sum()))


# Classes -------------------------------------------------------------------------------------

def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def class_indices(labels: VectorLabels, attribute: str | None, n_classes: int,
                  class_names: Sequence[str] | None = None) -> np.ndarray:
    """Each feature's class index (uint8, aligned with ``labels.geometries``).

    No ``attribute``: every polygon is class 1 (binary labels). Otherwise the attribute holds
    integer class indices 0..n_classes-1, or class names found in ``class_names`` (class
    ``i`` is ``class_names[i]``; matched ignoring case and surrounding spaces). ``n_classes``
    counts the label values, background included (2 for a binary model). Raises UserError
    naming a value outside the classes, and the allowed ones, or a feature without a value.
    """
    if attribute is None:
        return np.ones(len(labels), dtype=np.uint8)
    values = labels.attributes[attribute]
    where = f"{labels.where}: attribute {attribute!r}"
    for value, fid in zip(values.tolist(), labels.fids.tolist(), strict=True):
        if _is_null(value):
            raise UserError(f"{where} is empty for feature {fid}; give every polygon a class")
    lookup = ({str(n).strip().casefold(): i for i, n in enumerate(class_names)}
              if class_names else {})
    out = np.empty(len(values), dtype=np.int64)
    bad: list[Any] = []
    for i, value in enumerate(values.tolist()):
        if isinstance(value, str) and lookup and value.strip().casefold() in lookup:
            out[i] = lookup[value.strip().casefold()]
            continue
        number = value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            number = int(value)
        if isinstance(number, (int, float, np.integer, np.floating)) and float(number) == int(
                number) and 0 <= int(number) < n_classes:
            out[i] = int(number)
        elif value not in bad:
            bad.append(value)
    if bad:
        allowed = (f"the class names {_listing(list(class_names))} or the indices "
                   f"0..{n_classes - 1}" if class_names else f"the class indices "
                   f"0..{n_classes - 1} (or class names, when CLASS_NAMES is given)")
        raise UserError(f"{where} has {_listing([repr(v) for v in bad])}, outside the "
                        f"classes; allowed are {allowed}: fix those polygons in QGIS, or "
                        "NCLASSES and CLASS_NAMES in the config")
    return out.astype(np.uint8)


# Grids and reprojection ----------------------------------------------------------------------

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
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(path) as ds:
                plain = ds.crs is None and ds.transform.is_identity
                return cls(Path(path), ds.crs, None if plain else ds.transform, ds.height,
                           ds.width)

    def footprint(self) -> Any:
        """The image's outline as a shapely Polygon in its CRS (exact for rotated grids)."""
        corners = [(0, 0), (self.width, 0), (self.width, self.height), (0, self.height)]
        return shapely.Polygon([self.transform @ c for c in corners])


def require_georeferenced(grid: SceneGrid, labels_path: str | os.PathLike) -> None:
    """Raise UserError unless the image has a CRS and a map transform (vector labels
    cannot be placed on it otherwise)."""
    if grid.crs is None or grid.transform is None:
        missing = "CRS" if grid.crs is None and grid.transform is not None else (
            "transform" if grid.crs is not None else "CRS and transform")
        raise UserError(f"{grid.path}: has no georeferencing ({missing}), so the polygon "
                        f"labels {labels_path} cannot be placed on it; export the image as "
                        "a GeoTIFF with its CRS, or give a raster label instead")


def to_crs(geometries: np.ndarray, src_crs: CRS, dst_crs: CRS) -> np.ndarray:
    """Shapely geometries reprojected from ``src_crs`` to ``dst_crs`` vertex by vertex."""
    src, dst = CRS.from_user_input(src_crs), CRS.from_user_input(dst_crs)
    if src == dst or len(geometries) == 0:
        return geometries

    def move(xy: np.ndarray) -> np.ndarray:
        xs, ys = warp_coords(src, dst, xy[:, 0], xy[:, 1])
        return np.column_stack([xs, ys])

    return shapely.transform(geometries, move)


# Burning -------------------------------------------------------------------------------------

@dataclass
class LabelFacts:
    """What burning one image's labels found, for the command to report.

    ``features`` is the layer's feature count, ``used`` how many overlap the image,
    ``repaired`` how many of those ``make_valid`` repaired, ``class_pixels`` the pixel
    count of each class index present in the label map (background 0 included).
    """

    image: Path
    labels: str
    features: int
    used: int
    repaired: int
    class_pixels: dict[int, int]

    def summary(self) -> str:
        """One line: ``NAME.tif: 12 of 40 polygons from L.gpkg, 2 repaired; class 0 ...``."""
        total = sum(self.class_pixels.values()) or 1
        shares = ", ".join(f"class {k} {100 * v / total:.1f} %"
                           for k, v in sorted(self.class_pixels.items()))
        repaired = f", {self.repaired} invalid repaired" if self.repaired else ""
        return (f"{self.image.name}: {self.used} of {self.features} polygons from "
                f"{self.labels}{repaired}; {shares}")


def _burn_order(classes: np.ndarray, priority: Sequence[int] | None) -> np.ndarray:
    """Feature positions in burning order: layer order, or stably by class priority."""
    if priority is None:
        return np.arange(len(classes))
    rank = {int(c): r for r, c in enumerate(priority)}
    return np.argsort([rank.get(int(c), -1) for c in classes], kind="stable")


def rasterize_classes(geometries: np.ndarray, classes: np.ndarray, grid: SceneGrid,
                      priority: Sequence[int] | None = None) -> np.ndarray:
    """Burn polygons (already in the grid's CRS) with their class indices onto ``grid``.

    Returns an (H, W) uint8 label map, 0 where no polygon covers a pixel centre. Overlaps:
    later features win, or with ``priority`` (class indices, lowest first; classes not
    listed below all listed) the higher-priority class wins.
    """
    order = _burn_order(classes, priority)
    shapes = [(geometries[i], int(classes[i])) for i in order]
    if not shapes:
        return np.zeros((grid.height, grid.width), dtype=np.uint8)
    return rasterize(shapes, out_shape=(grid.height, grid.width), transform=grid.transform,
                     fill=0, dtype=np.uint8, all_touched=False)


def _bounds_text(bounds: Sequence[float]) -> str:
    return "(" + ", ".join(f"{b:.6g}" for b in bounds) + ")"


def burn_labels(labels: VectorLabels, classes: np.ndarray, grid: SceneGrid,
                priority: Sequence[int] | None = None, require_overlap: bool = True
                ) -> tuple[np.ndarray, LabelFacts]:
    """The (H, W) uint8 label map of ``labels`` on an image's grid, and what was found.

    ``classes`` are the features' class indices (:func:`class_indices`). The geometries are
    reprojected to the image's CRS and burnt by :func:`rasterize_classes`. Raises UserError
    for an image without georeferencing and, with ``require_overlap``, for a layer with
    features none of which overlap the image (the label would be all background: a wrong
    CRS or a wrong pairing). An empty layer gives an all-background label.
    """
    require_georeferenced(grid, labels.path)
    geometries = to_crs(labels.geometries, labels.crs, grid.crs)
    overlapping = np.flatnonzero(shapely.intersects(geometries, grid.footprint()))
    if require_overlap and len(labels) and not len(overlapping):
        layer_bounds = shapely.total_bounds(geometries)
        raise UserError(f"{labels.where}: none of its {len(labels)} polygons overlaps "
                        f"{grid.path.name}, whose label would be all background (polygons "
                        f"within {_bounds_text(layer_bounds)}, image "
                        f"{_bounds_text(grid.footprint().bounds)} in {grid.crs}); check the "
                        "layer's CRS and which file belongs to which image")
    label = rasterize_classes(geometries[overlapping], classes[overlapping], grid, priority)
    values, counts = np.unique(label, return_counts=True)
    used_fids = set(labels.fids[overlapping].tolist())
    facts = LabelFacts(grid.path, labels.where, len(labels), len(overlapping),
                       sum(f in used_fids for f in labels.repaired),
                       {int(v): int(c) for v, c in zip(values, counts, strict=True)})
    return label, facts


# Many scenes, one layer ----------------------------------------------------------------------

def features_by_scene(labels: VectorLabels, grids: Sequence[SceneGrid]
                      ) -> dict[Path, np.ndarray]:
    """For one layer covering many scenes: the positions of the features that overlap each
    scene (tested against the scene's footprint in the scene's CRS), keyed by image path.

    Scenes no polygon touches get an empty array (their labels are all background). Raises
    UserError when the layer has features and none overlaps any scene, and for a scene
    without georeferencing.
    """
    by_crs: dict[str, shapely.STRtree] = {}
    found: dict[Path, np.ndarray] = {}
    for grid in grids:
        require_georeferenced(grid, labels.path)
        key = grid.crs.to_wkt()
        if key not in by_crs:
            by_crs[key] = shapely.STRtree(to_crs(labels.geometries, labels.crs, grid.crs))
        hits = by_crs[key].query(grid.footprint(), predicate="intersects")
        found[grid.path] = np.sort(hits)
    if len(labels) and grids and not any(len(v) for v in found.values()):
        raise UserError(f"{labels.where}: none of its {len(labels)} polygons overlaps any of "
                        f"the {len(grids)} images, whose labels would all be background; "
                        "check the layer's CRS and the images folder")
    return found
