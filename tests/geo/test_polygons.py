"""Tests for res_unet.geo.polygons: every class of a label map as polygons in GeoPackage and
GeoJSON files, read back with pyogrio."""

from __future__ import annotations

import json

import numpy as np
import pyogrio
import pyogrio.raw
import pytest
import shapely
from rasterio.crs import CRS
from rasterio.transform import from_origin
from rasterio.warp import transform

from res_unet.geo.polygons import class_polygons, write_class_polygons

UTM = "EPSG:32633"
TRANSFORM = from_origin(500_000, 6_650_000, 2.0, 2.0)  # 2 m pixels: 4 m2 each
NAMES = ["background", "water", "sand"]


def three_classes() -> np.ndarray:
    """20 x 30: water (1) with a 2 x 2 background hole, sand (2), one nodata pixel (255)."""
    label = np.zeros((20, 30), np.uint8)
    label[2:10, 3:12] = 1
    label[5:7, 6:8] = 0
    label[12:18, 10:25] = 2
    label[0, 0] = 255
    return label


def read_back(path, layer=None):
    meta, _, wkb, columns = pyogrio.raw.read(path, layer=layer)
    fields = dict(zip(meta["fields"], columns, strict=True))
    return meta, shapely.from_wkb(wkb), fields


@pytest.mark.parametrize("suffix", [".gpkg", ".geojson"])
def test_every_class_written_and_read_back(tmp_path, suffix):
    label = three_classes()
    polygons = class_polygons(label, TRANSFORM, NAMES, nodata=255, crs=UTM)
    path = write_class_polygons(tmp_path / f"scene_classes{suffix}", polygons, UTM)

    meta, geometries, fields = read_back(path)
    if suffix == ".geojson":  # RFC 7946: WGS 84 longitude/latitude; areas in square metres
        assert meta["crs"] == "EPSG:4326"
        geometries = shapely.transform(geometries, lambda xy: np.column_stack(
            transform("EPSG:4326", UTM, xy[:, 0], xy[:, 1])))
    else:
        assert meta["crs"] == UTM
    assert sorted(set(fields["class"].tolist())) == [0, 1, 2]
    assert {(int(c), n) for c, n in zip(fields["class"], fields["name"], strict=True)} == {
        (0, "background"), (1, "water"), (2, "sand")}
    # Areas of each class: pixel counts x 4 m2; the hole is its own background polygon.
    for value in (0, 1, 2):
        pick = fields["class"] == value
        expected = float((label == value).sum()) * 4.0
        # GeoJSON: 7 decimals of a degree (RFC 7946's default precision, about 1 cm)
        assert shapely.area(geometries[pick]).sum() == pytest.approx(expected, rel=1e-3)
        assert fields["area_m2"][pick].sum() == pytest.approx(expected, rel=1e-9)
        assert int(fields["area_px"][pick].sum()) == int((label == value).sum())
    water = geometries[fields["class"] == 1][0]
    assert len(water.interiors) == 1
    assert shapely.Polygon(water.interiors[0]).area == pytest.approx(16.0, abs=0.2)
    assert (fields["class"] == 0).sum() == 2  # the outer background and the hole
    assert not list(tmp_path.glob(".*"))  # no temporaries left


def test_one_layer_per_class_in_a_geopackage(tmp_path):
    polygons = class_polygons(three_classes(), TRANSFORM, NAMES, nodata=255)
    path = write_class_polygons(tmp_path / "s.gpkg", polygons, UTM, per_class_layers=True)
    layers = pyogrio.list_layers(path)[:, 0].tolist()
    assert layers == ["classes", "class_0_background", "class_1_water", "class_2_sand"]
    _, geometries, fields = read_back(path, "class_2_sand")
    assert fields["class"].tolist() == [2] and geometries[0].area == 90 * 4.0
    with pytest.raises(ValueError, match="needs a GeoPackage"):
        write_class_polygons(tmp_path / "s.geojson", polygons, UTM, per_class_layers=True)


def test_skipped_classes_nodata_and_pixel_coordinates():
    label = three_classes()
    polygons = class_polygons(label, None, nodata=255, skip_classes=[0])
    assert sorted(polygons.classes.tolist()) == [1, 2]
    assert polygons.names.tolist() == [str(c) for c in polygons.classes]
    sand = polygons.geometries[polygons.classes == 2][0]
    assert sand.bounds == (10.0, 12.0, 25.0, 18.0)  # columns and rows of pixel corners
    assert len(class_polygons(np.full((4, 4), 255, np.uint8), TRANSFORM, nodata=255)) == 0


def test_simplification_keeps_neighbouring_classes_sharing_their_border(tmp_path):
    # A staircase border between water and sand: one step per pixel.
    rows, cols = np.mgrid[0:40, 0:40]
    label = np.where(cols > rows, 1, 2).astype(np.uint8)
    plain = class_polygons(label, TRANSFORM, NAMES)
    simple = class_polygons(label, TRANSFORM, NAMES, simplify=3.0)

    vertices = shapely.get_num_coordinates
    assert vertices(simple.geometries).sum() < vertices(plain.geometries).sum() / 5
    assert shapely.coverage_is_valid(simple.geometries)  # no overlaps between classes
    union = shapely.union_all(simple.geometries)
    assert union.area == pytest.approx(40 * 40 * 4.0) and len(union.interiors) == 0  # no gaps
    assert simple.area_px.tolist() == plain.area_px.tolist()  # counted before simplifying
    path = write_class_polygons(tmp_path / "s.geojson", simple, UTM)
    assert pyogrio.read_info(path)["features"] == 2


def test_existing_file_is_replaced(tmp_path):
    path = tmp_path / "s.gpkg"
    write_class_polygons(path, class_polygons(three_classes(), TRANSFORM, NAMES, nodata=255),
                         UTM)
    write_class_polygons(path, class_polygons(np.ones((3, 3), np.uint8), TRANSFORM, NAMES), UTM)
    assert pyogrio.read_info(path)["features"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.gpkg"]


def test_areas_are_square_metres_in_every_crs(tmp_path):
    """area_m2 is ground area whatever the CRS: the whole WGS 84 ellipsoid in 1-degree pixels
    is its known surface (510 065 621.724 km2); a 0.01-degree cell at 60 N is the same in
    EPSG:4326 and in Web Mercator (whose planar area is 4x too large there); UTM and feet
    CRSs give planar square metres; no CRS gives null."""
    world = class_polygons(np.ones((180, 360), np.uint8), from_origin(-180, 90, 1, 1),
                           crs="EPSG:4326")
    assert world.area_m2.sum() == pytest.approx(510_065_621_724_088, rel=1e-9)
    # 0.01 x 0.01 degree at 60 N: integral of M N cos(lat) over the cell, by quadrature
    a, f = 6378137.0, 1 / 298.257223563
    e2 = f * (2 - f)
    lat = np.radians(np.linspace(60, 60.01, 100_001))
    element = a * a * (1 - e2) * np.cos(lat) / (1 - e2 * np.sin(lat) ** 2) ** 2
    cell = np.radians(0.01) * np.trapezoid(element, lat)
    geo = class_polygons(np.ones((1, 1), np.uint8), from_origin(15, 60.01, 0.01, 0.01),
                         crs="EPSG:4326")
    assert geo.area_m2.tolist() == [pytest.approx(cell, rel=1e-9)]
    (x0, x1), (y0, y1) = transform("EPSG:4326", "EPSG:3857", [15, 15.01], [60, 60.01])
    web = class_polygons(np.ones((1, 1), np.uint8), from_origin(x0, y1, x1 - x0, y1 - y0),
                         crs=CRS.from_epsg(3857))
    assert web.area_m2.tolist() == [pytest.approx(cell, rel=1e-6)]
    assert shapely.area(web.geometries[0]) > 3.9 * cell
    assert class_polygons(three_classes(), TRANSFORM, crs=UTM).area_m2.sum() == 600 * 4.0
    feet = class_polygons(np.ones((2, 2), np.uint8), from_origin(0, 0, 10, 10),
                          crs="EPSG:2263")  # NY Long Island, US survey feet
    assert feet.area_m2.tolist() == [pytest.approx(400 * 0.3048006096 ** 2, rel=1e-6)]
    for suffix in (".gpkg", ".geojson"):
        path = write_class_polygons(tmp_path / f"g{suffix}", geo, "EPSG:4326")
        _, _, fields = read_back(path)
        assert "area" not in fields and fields["area_m2"].tolist() == [
            pytest.approx(cell, rel=1e-9)]
    plain = write_class_polygons(tmp_path / "plain.geojson",
                                 class_polygons(np.ones((2, 2), np.uint8)), None)
    assert '"area_m2": null' in plain.read_text()


def test_geojson_is_rfc7946_and_the_geopackage_keeps_the_scenes_crs(tmp_path):
    polygons = class_polygons(three_classes(), TRANSFORM, NAMES, nodata=255, crs=UTM)
    gpkg = write_class_polygons(tmp_path / "s.gpkg", polygons, UTM)
    geojson = write_class_polygons(tmp_path / "s.geojson", polygons, UTM)
    assert read_back(gpkg)[0]["crs"] == UTM
    text = json.loads(geojson.read_text())
    assert "crs" not in text  # no legacy crs member: RFC 7946 is WGS 84 lon/lat
    lon, lat = transform(UTM, "EPSG:4326", [500_000 + 30 * 2.0], [6_650_000 - 20 * 2.0])
    corners = np.array([c for f in text["features"] for ring in f["geometry"]["coordinates"]
                        for c in ring])
    assert corners[:, 0].max() == pytest.approx(lon[0], abs=1e-7)
    assert corners[:, 1].min() == pytest.approx(lat[0], abs=1e-7)
    assert 14 < corners[:, 0].min() < 16 and 59 < corners[:, 1].max() < 61
