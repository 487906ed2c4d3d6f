"""Polygon labels as users draw them in QGIS: read a layer, put it on an image's grid.

A label layer is a GeoPackage, GeoJSON or Shapefile of polygons (:data:`VECTOR_SUFFIXES`),
read by :mod:`res_unet.geo.vector_files` (whose names are re-exported here). Its features
become class indices through one attribute (integer class indices, or class names looked
up in the list of class names), or are all class 1 when no attribute is named (binary
labels). They are reprojected to the image's CRS and burnt onto its grid as an (H, W)
uint8 label map, 0 (background) where no polygon lies.

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
- Classes: REMAP_CLASSES maps the attribute's numeric values (:func:`class_indices`);
  pixels no polygon covers are class 0 whatever the remapping (to give them another class,
  draw a polygon of that class under the others).
- Reprojection moves vertices (``rasterio.warp.transform``, the image CRS being the target);
  edges are not densified, as QGIS draws them when it reprojects on the fly. A CRS with no
  transformation to the image's is one line, not PROJ's traceback.
- Only the features over the scenes are read, when they are known (:class:`SceneArea`,
  pyogrio's ``mask`` filter in the layer's CRS).
- The label of a scene's own file must hold a polygon on the scene: an empty layer, or one
  whose polygons all miss the scene, is refused (a wrong CRS, a wrong pairing, or an
  unlabelled scene that would train as all background).

Pairing images with layers is :mod:`res_unet.data.pairing`'s (``NAME.tif`` takes ``NAME.gpkg``,
``.geojson`` or ``.shp``; or one vector file covers many scenes, and
:func:`features_by_scene` picks each scene's features).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.errors
import rasterio.warp
import shapely
from rasterio._err import CPLE_BaseError
from rasterio.crs import CRS
from rasterio.features import rasterize
from rasterio.warp import transform as warp_coords

from res_unet.core.errors import UserError, first_line, listing
from res_unet.geo.grid import SceneGrid
from res_unet.geo.vector_files import (
    MAX_GEOJSON_BYTES,
    VECTOR_SUFFIXES,
    VectorLabels,
    bounds_text,
    crs_text,
    is_vector_path,
    layer_extent,
    layer_name,
    read_vector_labels,
)

__all__ = ["MAX_GEOJSON_BYTES", "VECTOR_SUFFIXES", "LabelFacts", "SceneArea", "SceneGrid",
           "VectorLabels", "burn_labels", "class_indices", "features_by_scene",
           "is_vector_path", "layer_extent", "layer_name", "rasterize_classes",
           "read_vector_labels", "require_georeferenced", "to_crs"]
_MAX_LISTED = 8


def _listing(values: Sequence[Any]) -> str:
    return listing(values, _MAX_LISTED)


# Classes -------------------------------------------------------------------------------------

def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def class_indices(labels: VectorLabels, attribute: str | None, n_classes: int,
                  class_names: Sequence[str] | None = None,
                  remap: Mapping[int, int] | None = None) -> np.ndarray:
    """Each feature's class index (uint8, aligned with ``labels.geometries``).

    No ``attribute``: every polygon is class 1 (binary labels). Otherwise the attribute holds
    integer class indices 0..n_classes-1, or class names found in ``class_names`` (class
    ``i`` is ``class_names[i]``; matched ignoring case and surrounding spaces). ``remap``
    (REMAP_CLASSES: value -> class) maps the numeric values first, so the attribute may hold
    codes of its own; it never applies to the pixels no polygon covers, which stay class 0.
    ``n_classes`` counts the label values, background included (2 for a binary model).
    Raises UserError naming a value outside the classes (infinite ones included), and the
    allowed ones, or a feature without a value.
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
        if (isinstance(number, (int, float, np.integer, np.floating))
                and math.isfinite(number) and float(number) == int(number)):
            index = int(number)
            index = remap.get(index, index) if remap else index
            if 0 <= index < n_classes:
                out[i] = index
                continue
        if value not in bad:
            bad.append(value)
    if bad:
        allowed = (f"the class names {_listing(list(class_names))} or the indices "
                   f"0..{n_classes - 1}" if class_names else f"the class indices "
                   f"0..{n_classes - 1} (or class names, when CLASS_NAMES is given)")
        remapped = " (after REMAP_CLASSES)" if remap else ""
        raise UserError(f"{where} has {_listing([repr(v) for v in bad])}, outside the "
                        f"classes{remapped}; allowed are {allowed}: fix those polygons in "
                        "QGIS, or NCLASSES, CLASS_NAMES or REMAP_CLASSES in the config")
    return out.astype(np.uint8)


# Grids and reprojection ----------------------------------------------------------------------

def require_georeferenced(grid: SceneGrid, labels_path: str | os.PathLike) -> None:
    """Raise UserError unless the image has a CRS and a map transform (vector labels
    cannot be placed on it otherwise)."""
    if grid.crs is None or grid.transform is None:
        missing = "CRS" if grid.crs is None and grid.transform is not None else (
            "transform" if grid.crs is not None else "CRS and transform")
        raise UserError(f"{grid.path}: has no georeferencing ({missing}), so the polygon "
                        f"labels {labels_path} cannot be placed on it; export the image as "
                        "a GeoTIFF with its CRS, or give a raster label instead")


def to_crs(geometries: np.ndarray, src_crs: CRS, dst_crs: CRS, where: str | None = None
           ) -> np.ndarray:
    """Shapely geometries reprojected from ``src_crs`` to ``dst_crs`` vertex by vertex.

    Raises UserError (naming ``where``, the layer) when PROJ knows no transformation
    between the two or a vertex cannot be placed in ``dst_crs``."""
    src, dst = CRS.from_user_input(src_crs), CRS.from_user_input(dst_crs)
    if src == dst or len(geometries) == 0:
        return geometries

    def move(xy: np.ndarray) -> np.ndarray:
        xs, ys = warp_coords(src, dst, xy[:, 0], xy[:, 1])
        return np.column_stack([xs, ys])

    problem = None
    try:
        moved = shapely.transform(geometries, move)
        if not np.isfinite(shapely.get_coordinates(moved)).all():
            problem = "some vertices fall outside the area where that CRS is defined"
    except CPLE_BaseError as exc:
        text = first_line(exc, most=None)
        problem = ("PROJ knows no transformation between them"
                   if "Cannot find coordinate operations" in text else f"PROJ: {text[:120]}")
    if problem:
        raise UserError(f"{where or 'the polygon labels'}: cannot be reprojected from "
                        f"{crs_text(src)} to the images' {crs_text(dst)} ({problem}); "
                        "check the layer's CRS in QGIS (Layer > Set CRS of Layer) or "
                        "reproject it there to the images' CRS (Vector > Data Management "
                        "Tools > Reproject Layer)")
    return moved


@dataclass(frozen=True)
class SceneArea:
    """Where some scenes lie, for reading only the label features over them: per scene CRS
    (WKT), the union of the scenes' footprints (WKB). Small, hashable and picklable."""

    parts: tuple[tuple[str, bytes], ...]

    @classmethod
    def of_grids(cls, grids: Iterable[SceneGrid]) -> SceneArea:
        """The area of the georeferenced ``grids`` (the others are left out)."""
        by_crs: dict[str, list[Any]] = {}
        for grid in grids:
            if grid.crs is not None and grid.transform is not None:
                by_crs.setdefault(grid.crs.to_wkt(), []).append(grid.footprint())
        return cls(tuple((wkt, shapely.to_wkb(shapely.union_all(footprints)))
                         for wkt, footprints in sorted(by_crs.items())))

    def in_crs(self, crs: CRS) -> Any | None:
        """The area as one geometry in ``crs`` with a margin of 2 % (a superset: features
        are tested exactly on each scene's grid later), or None when it cannot be placed
        there reliably (no transformation; across the antimeridian or near a pole)."""
        pieces = []
        for wkt, wkb in self.parts:
            parts = shapely.get_parts(shapely.from_wkb(wkb))
            bounds = shapely.bounds(parts)
            size = np.maximum(bounds[:, 2] - bounds[:, 0], bounds[:, 3] - bounds[:, 1])
            parts = shapely.segmentize(parts, np.maximum(size / 32, 1e-9))
            try:
                moved = to_crs(parts, CRS.from_wkt(wkt), crs)
            except UserError:
                return None
            bounds = shapely.bounds(moved)
            size = np.maximum(bounds[:, 2] - bounds[:, 0], bounds[:, 3] - bounds[:, 1])
            if crs.is_geographic and (size.max(initial=0) > 180
                                      or np.abs(bounds[:, [1, 3]]).max(initial=0) > 85):
                return None
            pieces.append(shapely.buffer(moved, 0.02 * size + 1e-9))
        return shapely.union_all(np.concatenate(pieces)) if pieces else None


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


def burn_labels(labels: VectorLabels, classes: np.ndarray, grid: SceneGrid,
                priority: Sequence[int] | None = None, require_overlap: bool = True
                ) -> tuple[np.ndarray, LabelFacts]:
    """The (H, W) uint8 label map of ``labels`` on an image's grid, and what was found.

    ``classes`` are the features' class indices (:func:`class_indices`). The geometries are
    reprojected to the image's CRS and burnt by :func:`rasterize_classes`. Raises UserError
    for an image without georeferencing, a CRS with no transformation to the image's and,
    with ``require_overlap``, for a layer without polygons or whose polygons all miss the
    image (the label would be all background: a wrong CRS or a wrong pairing); without it,
    those give an all-background label.
    """
    require_georeferenced(grid, labels.path)
    geometries = to_crs(labels.geometries, labels.crs, grid.crs, labels.where)
    overlapping = np.flatnonzero(shapely.intersects(geometries, grid.footprint()))
    if require_overlap and not labels.total:
        raise UserError(f"{labels.where}: holds no polygon, so the label of "
                        f"{grid.path.name} would be all background; draw its labels (a "
                        "class-0 polygon over the scene marks it as background on purpose), "
                        "or check that this is the scene's file")
    if require_overlap and not len(overlapping):
        raise UserError(f"{labels.where}: none of its {labels.total} polygons overlaps "
                        f"{grid.path.name}, whose label would be all background (polygons "
                        f"within {bounds_text(_extent_in(labels, geometries, grid.crs))}, "
                        f"image {bounds_text(grid.footprint().bounds)} in "
                        f"{crs_text(grid.crs)}); check the layer's CRS and which file "
                        "belongs to which image")
    label = rasterize_classes(geometries[overlapping], classes[overlapping], grid, priority)
    values, counts = np.unique(label, return_counts=True)
    used_fids = set(labels.fids[overlapping].tolist())
    facts = LabelFacts(grid.path, labels.where, labels.total, len(overlapping),
                       sum(f in used_fids for f in labels.repaired),
                       {int(v): int(c) for v, c in zip(values, counts, strict=True)})
    return label, facts


def _extent_in(labels: VectorLabels, geometries: np.ndarray, crs: CRS) -> Sequence[float]:
    """The bounds of a layer's polygons in ``crs`` (``geometries``: those read, already
    there); read from the file when none was read (only those over the scenes are)."""
    if len(geometries):
        return shapely.total_bounds(geometries)
    extent = layer_extent(labels.path, labels.layer)
    try:
        return rasterio.warp.transform_bounds(labels.crs, crs, *extent)
    except CPLE_BaseError:
        return extent


# Many scenes, one layer ----------------------------------------------------------------------

def features_by_scene(labels: VectorLabels, grids: Sequence[SceneGrid]
                      ) -> dict[Path, np.ndarray]:
    """For one layer covering many scenes: the positions of the features that overlap each
    scene (tested against the scene's footprint in the scene's CRS), keyed by image path.

    Scenes no polygon touches get an empty array (their labels are all background). Raises
    UserError when the layer holds no polygon or none overlaps any scene, and for a scene
    without georeferencing.
    """
    by_crs: dict[str, shapely.STRtree] = {}
    found: dict[Path, np.ndarray] = {}
    for grid in grids:
        require_georeferenced(grid, labels.path)
        key = grid.crs.to_wkt()
        if key not in by_crs:
            by_crs[key] = shapely.STRtree(to_crs(labels.geometries, labels.crs, grid.crs,
                                                 labels.where))
        hits = by_crs[key].query(grid.footprint(), predicate="intersects")
        found[grid.path] = np.sort(hits)
    if grids and not labels.total:
        raise UserError(f"{labels.where}: holds no polygon, so the labels of the "
                        f"{len(grids)} images would all be background; save the label "
                        "polygons into it, or pass the layer that holds them")
    if grids and not any(len(v) for v in found.values()):
        raise UserError(f"{labels.where}: none of its {labels.total} polygons overlaps any "
                        f"of the {len(grids)} images, whose labels would all be background; "
                        "check the layer's CRS and the images folder")
    return found
