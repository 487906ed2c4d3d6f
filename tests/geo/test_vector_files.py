"""Tests for res_unet.geo.vector_files: reading polygon label files, only the features over the
scenes, and every way a file can be wrong as one line.

Fixtures are those of test_vectors.py: 2 m UTM 33N GeoTIFFs and small layers by pyogrio.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import struct
from pathlib import Path

import forked
import numpy as np
import pyogrio.raw
import pytest
import shapely
from rasterio.crs import CRS
from rasterio.transform import from_origin
from rasterio.warp import transform as warp_coords
from test_vectors import MARS, X0, Y0, make_image, pixel_box, write_layer

from res_unet.core.errors import UserError
from res_unet.geo import vector_files
from res_unet.geo.vectors import (
    SceneArea,
    SceneGrid,
    burn_labels,
    class_indices,
    read_vector_labels,
)


def _feature_collection(path: Path, polygons, crs: str | None = None) -> Path:
    """A GeoJSON FeatureCollection written by hand (a ``crs`` member only when given)."""
    collection: dict = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"id": i}, "geometry": shapely.geometry.mapping(p)}
        for i, p in enumerate(polygons)]}
    if crs:
        collection["crs"] = {"type": "name", "properties": {"name": crs}}
    path.write_text(json.dumps(collection))
    return path


def _wkb_polygon(points) -> bytes:
    """A little-endian WKB polygon with one ring, coordinates as given (NaN included)."""
    return (struct.pack("<BII", 1, 3, 1) + struct.pack("<I", len(points))
            + b"".join(struct.pack("<dd", *p) for p in points))


# A GeoJSON that lost its CRS ----------------------------------------------------------------

def test_geojson_in_metres_without_crs_is_refused_before_reprojecting(tmp_path):
    # UTM metres saved without the "crs" member: GDAL reads them as WGS 84 degrees, and
    # reprojecting them to the scene ended in "PROJ: utm: Invalid latitude".
    lost = _feature_collection(tmp_path / "lakes.geojson", [pixel_box(0, 0, 10, 10)])
    grid = SceneGrid.of_file(make_image(tmp_path / "scene.tif"))
    message = (r"lakes\.geojson: coordinates up to \(500000, 6\.6499\d*e\+06, 500020, "
               r"6\.65e\+06\) are not longitude/latitude, yet the layer's CRS is EPSG:4326 "
               r"\(a GeoJSON without a 'crs' member is read as WGS 84\), so the file probably "
               r"lost its CRS; in QGIS set the CRS it was drawn in")
    with pytest.raises(UserError, match=message):
        read_vector_labels(lost)
    # Read over the scene only (nothing matches in degrees): the same line.
    with pytest.raises(UserError, match=message):
        read_vector_labels(lost, within=SceneArea.of_grids([grid]))
    # With its CRS, or in lon/lat, the same file is fine.
    kept = _feature_collection(tmp_path / "kept.geojson", [pixel_box(0, 0, 10, 10)],
                               crs="EPSG:32633")
    assert read_vector_labels(kept).crs.to_epsg() == 32633
    degrees = _feature_collection(tmp_path / "deg.geojson", [shapely.box(14.9, 59.9, 15, 60)])
    assert len(read_vector_labels(degrees)) == 1


# Coordinates that are not numbers -----------------------------------------------------------

@pytest.mark.parametrize("points", [
    [(X0, Y0), (X0 + 20, Y0), (float("nan"), Y0 - 20), (X0, Y0)],
    [(float("nan"), float("nan"))] * 4,
], ids=["one vertex", "every vertex"])
def test_nan_coordinates_name_the_feature(tmp_path, points):
    path = tmp_path / "nan.gpkg"
    pyogrio.raw.write(path, np.array([shapely.to_wkb(pixel_box(0, 0, 5, 5)),
                                      _wkb_polygon(points)], dtype=object), [], [],
                      driver="GPKG", geometry_type="Polygon", crs="EPSG:32633")
    with pytest.raises(UserError, match=r"nan\.gpkg: feature 2 has coordinates that are not "
                                        r"numbers \(NaN or infinite\); fix or delete it in "
                                        "QGIS"):
        read_vector_labels(path)


# Class values -------------------------------------------------------------------------------

def test_infinite_or_nan_class_values_are_one_line(tmp_path):
    layer = write_layer(tmp_path / "l.gpkg", [pixel_box(0, 0, 10, 10), pixel_box(20, 0, 30, 10),
                                              pixel_box(40, 0, 50, 10)],
                        cls=np.array([1.0, np.inf, -np.inf]))
    labels = read_vector_labels(layer, attribute="cls")
    with pytest.raises(UserError, match=r"l\.gpkg: attribute 'cls' has inf, -inf, outside the "
                                        r"classes; allowed are the class indices 0\.\.2"):
        class_indices(labels, "cls", 3)
    nan = write_layer(tmp_path / "nan.gpkg", [pixel_box(0, 0, 10, 10)],
                      cls=np.array([np.nan]))
    with pytest.raises(UserError, match=r"nan\.gpkg: attribute 'cls' is empty for feature 1"):
        class_indices(read_vector_labels(nan, attribute="cls"), "cls", 3)


def test_remap_applies_to_attribute_values_and_is_checked_after(tmp_path):
    layer = write_layer(tmp_path / "l.gpkg", [pixel_box(0, 0, 10, 10), pixel_box(20, 0, 30, 10),
                                              pixel_box(40, 0, 50, 10)],
                        code=np.array([0, 1, -1]))
    labels = read_vector_labels(layer, attribute="code")
    np.testing.assert_array_equal(class_indices(labels, "code", 3, remap={0: 1, 1: 2, -1: 0}),
                                  [1, 2, 0])
    with pytest.raises(UserError, match=r"'code' has 1, outside the classes \(after "
                                        r"REMAP_CLASSES\)"):
        class_indices(labels, "code", 3, remap={0: 1, 1: 5, -1: 0})


# A CRS with no transformation ---------------------------------------------------------------

def test_a_crs_with_no_transformation_to_the_scene_is_one_line(tmp_path):
    layer = write_layer(tmp_path / "mars.gpkg", [shapely.box(10, 10, 11, 11)], crs=MARS)
    grid = SceneGrid.of_file(make_image(tmp_path / "scene.tif"))
    message = (r"mars\.gpkg: cannot be reprojected from Mars 2000 to the images' EPSG:32633 "
               r"\(PROJ knows no transformation between them\); check the layer's CRS")
    labels = read_vector_labels(layer)
    with pytest.raises(UserError, match=message):
        burn_labels(labels, class_indices(labels, None, 2), grid)
    # The scenes cannot be placed on Mars either: the layer is read whole, then refused.
    labels = read_vector_labels(layer, within=SceneArea.of_grids([grid]))
    assert labels.in_layer is None and len(labels) == 1
    with pytest.raises(UserError, match=message):
        burn_labels(labels, class_indices(labels, None, 2), grid)


# Reading only what lies over the scenes -----------------------------------------------------

@pytest.mark.parametrize("suffix", [".gpkg", ".geojson", ".shp"])
def test_only_the_features_over_the_scenes_are_read(tmp_path, monkeypatch, suffix):
    near = [pixel_box(0, 0, 10, 10), pixel_box(55, 40, 70, 45)]  # the second crosses the edge
    far = [pixel_box(0, 0, 5, 5, x0=X0 + 3000 + 100 * i) for i in range(40)]
    layer = write_layer(tmp_path / f"big{suffix}", [far[0], near[0], *far[1:], near[1]],
                        cls=np.arange(42) % 3)
    grid = SceneGrid.of_file(make_image(tmp_path / "scene.tif"))
    decoded = []
    real = pyogrio.raw.read
    monkeypatch.setattr(pyogrio.raw, "read", lambda *a, **k: (
        lambda out: decoded.append(len(out[1])) or out)(real(*a, **k)))

    labels = read_vector_labels(layer, attribute="cls", within=SceneArea.of_grids([grid]))

    assert decoded == [2], "only the two features over the scene leave GDAL"
    assert (len(labels), labels.in_layer, labels.total) == (2, 42, 42)
    assert shapely.equals(labels.geometries[0], near[0])
    label, facts = burn_labels(labels, class_indices(labels, "cls", 3), grid)
    assert label[5, 5] == 1 and label[42, 58] == 2  # classes 1 % 3 and 41 % 3
    assert facts.summary().startswith("scene.tif: 2 of 42 polygons")


def test_scene_area_in_lon_lat_holds_the_scene_with_a_margin_and_no_more():
    grid = SceneGrid(Path("a.tif"), CRS.from_epsg(32633), from_origin(X0, Y0, 2.0, 2.0), 50, 60)
    area = SceneArea.of_grids([grid])
    assert hash(area) == hash(SceneArea.of_grids([grid])), "a cache key"
    in_lon_lat = area.in_crs(CRS.from_epsg(4326))
    # The scene's corners (120 m x 100 m) and points 1 m outside it are inside (2 % margin);
    # a point 200 m away is not.
    xs, ys = [X0, X0 + 120, X0 + 120, X0, X0 - 1, X0 + 200], [Y0, Y0, Y0 - 100, Y0 - 100, Y0,
                                                               Y0]
    lon, lat = warp_coords("EPSG:32633", "EPSG:4326", xs, ys)
    inside = shapely.contains_xy(in_lon_lat, lon, lat)
    assert inside.tolist() == [True] * 5 + [False]
    same_crs = area.in_crs(CRS.from_epsg(32633))  # 2 % of 120 m around the footprint
    assert shapely.contains(same_crs, grid.footprint())
    assert same_crs.area == pytest.approx(shapely.buffer(grid.footprint(), 2.4).area, rel=1e-3)


def test_a_large_geojson_is_refused_with_the_conversion(tmp_path, monkeypatch):
    layer = write_layer(tmp_path / "survey.geojson", [pixel_box(0, 0, 10, 10)])
    monkeypatch.setattr(vector_files, "MAX_GEOJSON_BYTES", 100)
    with pytest.raises(UserError, match=r"survey\.geojson: \d kB of GeoJSON, more than the 0 kB "
                                        r"res_unet reads: GeoJSON has no spatial index.*"
                                        r"ogr2ogr -f GPKG survey\.gpkg survey\.geojson"):
        read_vector_labels(layer)
    gpkg = write_layer(tmp_path / "survey.gpkg", [pixel_box(0, 0, 10, 10)] * 30)
    assert gpkg.stat().st_size > 100 and len(read_vector_labels(gpkg)) == 30


# A GeoPackage with a spatial view, TensorFlow loaded first ----------------------------------

def _with_spatial_view(path: Path) -> Path:
    write_layer(path, [pixel_box(0, 0, 10, 10)], layer="lakes", kind=np.array([1]))
    with sqlite3.connect(path) as db:
        db.execute("CREATE VIEW lakes_view AS SELECT fid AS OGC_FID, geom, kind FROM lakes")
        db.execute("INSERT INTO gpkg_contents (table_name, data_type, identifier, srs_id) "
                   "VALUES ('lakes_view', 'features', 'lakes_view', 32633)")
        db.execute("INSERT INTO gpkg_geometry_columns (table_name, column_name, "
                   "geometry_type_name, srs_id, z, m) VALUES ('lakes_view', 'geom', "
                   "'POLYGON', 32633, 0, 0)")
    db.close()
    return path


def test_a_geopackage_with_a_spatial_view_reads_after_tensorflow(tmp_path):
    # TensorFlow exports an SQLite of its own; pyogrio's GDAL bound to it crashed (SIGSEGV)
    # listing the layers of such a file. A process of its own, TensorFlow imported first
    # (forked from a server that imported it, tests/forked.py; pyogrio is imported after).
    view = _with_spatial_view(tmp_path / "view.gpkg")
    digest = hashlib.sha256(view.read_bytes()).hexdigest()
    script = ("import tensorflow, sys\n"
              "from res_unet.geo import vectors\n"
              "labels = vectors.read_vector_labels(sys.argv[1], layer='lakes_view', "
              "attribute='kind')\n"
              "print(vectors.layer_name(sys.argv[1], 'lakes_view'), len(labels), "
              "labels.attributes['kind'].tolist())\n")
    status, out, err = forked.run(["-c", script, str(view)], timeout=300)
    assert status == 0, err[-2000:]
    assert out.strip() == "lakes_view 1 [1]"
    assert hashlib.sha256(view.read_bytes()).hexdigest() == digest, "never modified"
