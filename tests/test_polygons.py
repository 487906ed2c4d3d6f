"""Tests for res_unet.polygons: every class of a label map as polygons in GeoPackage and
GeoJSON files, read back with pyogrio."""

from __future__ import annotations

import numpy as np
import pyogrio
import pyogrio.raw
import pytest
import shapely
from rasterio.transform import from_origin

from res_unet.polygons import class_polygons, write_class_polygons

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
    polygons = class_polygons(label, TRANSFORM, NAMES, nodata=255)
    path = write_class_polygons(tmp_path / f"scene_classes{suffix}", polygons, UTM)

    meta, geometries, fields = read_back(path)
    assert meta["crs"] == UTM
    assert sorted(set(fields["class"].tolist())) == [0, 1, 2]
    assert {(int(c), n) for c, n in zip(fields["class"], fields["name"], strict=True)} == {
        (0, "background"), (1, "water"), (2, "sand")}
    # Areas of each class: pixel counts x 4 m2; the hole is its own background polygon.
    for value in (0, 1, 2):
        pick = fields["class"] == value
        expected = float((label == value).sum()) * 4.0
        assert shapely.area(geometries[pick]).sum() == pytest.approx(expected, rel=1e-9)
        assert fields["area"][pick].sum() == pytest.approx(expected, rel=1e-9)
        assert int(fields["area_px"][pick].sum()) == int((label == value).sum())
    water = geometries[fields["class"] == 1][0]
    assert len(water.interiors) == 1 and shapely.Polygon(water.interiors[0]).area == 16.0
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
