"""Tests for res_unet.geo.vectors: polygon label layers read, reprojected and burnt onto images.

Fixtures are made here: 2 m UTM 33N GeoTIFFs (EPSG:32633, near 60 N 15 E) and small
polygon layers written with pyogrio.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pyogrio
import pyogrio.raw
import pytest
import rasterio
import shapely
from rasterio.transform import from_origin
from rasterio.warp import transform as warp_coords

from res_unet.config.keys import LabelRules
from res_unet.core.errors import UserError
from res_unet.data.pairing import PolygonRules, burn_pair_label, find_pairs, prepare_label
from res_unet.geo.vectors import (
    SceneGrid,
    VectorLabels,
    burn_labels,
    class_indices,
    features_by_scene,
    rasterize_classes,
    read_vector_labels,
    to_crs,
)

UTM = "EPSG:32633"
X0, Y0, PX = 500_000.0, 6_650_000.0, 2.0  # top-left corner and pixel size of scene A (m)
# A CRS PROJ has no transformation to or from any Earth CRS.
MARS = ('GEOGCS["Mars 2000",DATUM["D_Mars_2000",SPHEROID["Mars_2000_IAU_IAG",3396190.0,'
        '169.89444722361179]],PRIMEM["Greenwich",0],UNIT["Decimal_Degree",0.0174532925199433]]')


def make_image(path: Path, x0: float = X0, y0: float = Y0, shape=(50, 60),
               crs: str | None = UTM, georeferenced: bool = True) -> Path:
    """A one-band uint8 GeoTIFF at 2 m pixels whose top-left corner is (x0, y0)."""
    profile = {"driver": "GTiff", "height": shape[0], "width": shape[1], "count": 1,
               "dtype": "uint8"}
    if georeferenced:
        profile.update(crs=crs, transform=from_origin(x0, y0, PX, PX))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as ds:
            ds.write(np.zeros((1, *shape), np.uint8))
    return path


def write_layer(path: Path, geometries, crs: str | None = UTM, layer: str | None = None,
                **fields) -> Path:
    """A polygon layer (GeoPackage, GeoJSON or Shapefile by suffix) with attribute columns."""
    driver = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".shp": "ESRI Shapefile"}[path.suffix]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "'crs' was not provided"
        pyogrio.raw.write(path, shapely.to_wkb(np.array(geometries, dtype=object)),
                          [np.asarray(v) for v in fields.values()], list(fields),
                          layer=layer, driver=driver, geometry_type="Unknown", crs=crs,
                          append=path.exists() and layer is not None)
    return path


def pixel_box(col0: float, row0: float, col1: float, row1: float, x0=X0, y0=Y0):
    """A rectangle given in pixel columns and rows of the scene at (x0, y0), in UTM metres."""
    return shapely.box(x0 + col0 * PX, y0 - row1 * PX, x0 + col1 * PX, y0 - row0 * PX)


def burn(tmp_path, layer_path, attribute=None, n_classes=2, class_names=None, **kwargs):
    image = make_image(tmp_path / "scene.tif")
    labels = read_vector_labels(layer_path, attribute=attribute)
    classes = class_indices(labels, attribute, n_classes, class_names)
    return burn_labels(labels, classes, SceneGrid.of_file(image), **kwargs)


# Reprojection -------------------------------------------------------------------------------

def test_square_drawn_in_lon_lat_burns_where_expected_on_a_utm_image(tmp_path):
    # Half-pixel margins: pixel centres lie 1 m inside or outside every edge.
    square = pixel_box(20.25, 10.25, 40.25, 30.25)
    xs, ys = square.exterior.xy
    lon, lat = warp_coords(UTM, "EPSG:4326", list(xs), list(ys))
    assert 14.9 < min(lon) < 15.1 and 59.9 < min(lat) < 60.1
    layer = write_layer(tmp_path / "lakes.geojson", [shapely.Polygon(zip(lon, lat, strict=True))],
                        crs="EPSG:4326")

    label, facts = burn(tmp_path, layer)

    expected = np.zeros((50, 60), np.uint8)
    expected[10:30, 20:40] = 1
    assert label.dtype == np.uint8 and label.shape == (50, 60)
    np.testing.assert_array_equal(label, expected)
    assert facts.class_pixels == {0: 3000 - 400, 1: 400}
    assert (facts.features, facts.used, facts.repaired) == (1, 1, 0)
    assert read_vector_labels(layer).crs.to_epsg() == 4326


def test_to_crs_moves_vertices_and_back():
    square = np.array([pixel_box(0, 0, 10, 10)], dtype=object)
    there = to_crs(square, UTM, "EPSG:4326")
    assert shapely.bounds(there)[0, 0] == pytest.approx(15.0, abs=0.01)
    back = to_crs(there, "EPSG:4326", UTM)
    np.testing.assert_allclose(shapely.get_coordinates(back), shapely.get_coordinates(square),
                               atol=1e-6)
    assert to_crs(square, UTM, UTM) is square


# Classes ------------------------------------------------------------------------------------

def test_integer_class_attribute(tmp_path):
    layer = write_layer(tmp_path / "l.gpkg", [pixel_box(0, 0, 10, 10), pixel_box(20, 0, 30, 10),
                                              pixel_box(40, 0, 50, 10)],
                        cls=np.array([2, 1, 0]))
    label, facts = burn(tmp_path, layer, "cls", n_classes=3)
    assert label[5, 5] == 2 and label[5, 25] == 1 and label[5, 45] == 0
    assert facts.class_pixels == {0: 3000 - 200, 1: 100, 2: 100}


def test_class_names_match_ignoring_case_and_spaces(tmp_path):
    layer = write_layer(tmp_path / "l.gpkg", [pixel_box(0, 0, 10, 10), pixel_box(20, 0, 30, 10),
                                              pixel_box(40, 0, 50, 10)],
                        kind=np.array(["Water", " sand", "2"], dtype=object))
    labels = read_vector_labels(layer, attribute="kind")
    classes = class_indices(labels, "kind", 3, ["background", "water", "sand"])
    np.testing.assert_array_equal(classes, [1, 2, 2])
    assert classes.dtype == np.uint8


def test_no_attribute_means_every_polygon_is_class_1(tmp_path):
    layer = write_layer(tmp_path / "l.shp", [pixel_box(0, 0, 10, 10), pixel_box(20, 0, 30, 10)],
                        cls=np.array([5, 7]))
    label, _ = burn(tmp_path, layer)
    assert set(np.unique(label)) == {0, 1} and int(label.sum()) == 200


def test_class_outside_the_classes_names_the_value_and_the_allowed_ones(tmp_path):
    layer = write_layer(tmp_path / "l.gpkg", [pixel_box(0, 0, 10, 10), pixel_box(20, 0, 30, 10)],
                        cls=np.array([1, 5]), kind=np.array(["water", "forest"], dtype=object))
    with pytest.raises(UserError, match=r"l\.gpkg: attribute 'cls' has 5, outside the classes; "
                                        r"allowed are the class indices 0\.\.2"):
        burn(tmp_path, layer, "cls", n_classes=3)
    with pytest.raises(UserError, match=r"'kind' has 'forest', outside the classes; allowed "
                                        r"are the class names background, water, sand"):
        burn(tmp_path, layer, "kind", n_classes=3, class_names=["background", "water", "sand"])


def test_a_polygon_without_a_class_value_is_named(tmp_path):
    layer = write_layer(tmp_path / "l.gpkg", [pixel_box(0, 0, 10, 10), pixel_box(20, 0, 30, 10)],
                        kind=np.array(["water", None], dtype=object))
    with pytest.raises(UserError, match=r"attribute 'kind' is empty for feature 2; give every "
                                        "polygon a class"):
        burn(tmp_path, layer, "kind", n_classes=2, class_names=["bg", "water"])


# Geometry rules ----------------------------------------------------------------------------

def test_holes_stay_background(tmp_path):
    ring = pixel_box(10, 10, 30, 30)
    donut = shapely.Polygon(ring.exterior.coords, [pixel_box(15, 15, 25, 25).exterior.coords])
    label, facts = burn(tmp_path, write_layer(tmp_path / "l.gpkg", [donut]))
    assert label[12, 12] == 1 and label[20, 20] == 0
    assert int(label.sum()) == 400 - 100 and facts.class_pixels[1] == 300


def test_overlaps_later_features_win_or_explicit_priority(tmp_path):
    first, second = pixel_box(0, 0, 20, 20), pixel_box(10, 10, 30, 30)
    layer = write_layer(tmp_path / "l.gpkg", [first, second], cls=np.array([1, 2]))
    label, _ = burn(tmp_path, layer, "cls", n_classes=3)
    assert label[15, 15] == 2 and label[5, 5] == 1 and label[25, 25] == 2

    swapped = write_layer(tmp_path / "s.gpkg", [second, first], cls=np.array([2, 1]))
    label, _ = burn(tmp_path, swapped, "cls", n_classes=3)
    assert label[15, 15] == 1

    # Priority, lowest first: class 1 on top of class 2 whatever the layer order.
    label, _ = burn(tmp_path, layer, "cls", n_classes=3, priority=[2, 1])
    assert label[15, 15] == 1 and int((label == 1).sum()) == 400


def test_rasterize_classes_without_shapes_is_background():
    grid = SceneGrid(Path("x.tif"), rasterio.crs.CRS.from_user_input(UTM),
                     from_origin(X0, Y0, PX, PX), 4, 5)
    out = rasterize_classes(np.array([], dtype=object), np.array([], np.uint8), grid)
    assert out.shape == (4, 5) and out.dtype == np.uint8 and not out.any()


def test_invalid_polygons_are_repaired_and_counted(tmp_path):
    # A bow-tie (self-intersecting ring) as a slip of the mouse in QGIS draws it.
    a, b = (X0 + 20, Y0 - 20), (X0 + 60, Y0 - 60)
    bowtie = shapely.Polygon([a, (b[0], a[1]), (a[0], b[1]), b, a])
    assert not shapely.is_valid(bowtie)
    layer = write_layer(tmp_path / "l.gpkg", [bowtie, pixel_box(40, 40, 45, 45)])
    labels = read_vector_labels(layer)
    assert labels.repaired == [1] and all(shapely.is_valid(labels.geometries))
    assert shapely.area(labels.geometries[0]) == pytest.approx(800.0)  # two 400 m2 triangles
    label, facts = burn(tmp_path, layer)
    assert facts.repaired == 1 and "1 invalid repaired" in facts.summary()
    assert label[15, 20] == 1 and label[20, 15] == 0  # the left and top triangles' insides
    with pytest.raises(UserError, match=r"l\.gpkg: feature 1 is an invalid polygon "
                                        r"\(Self-intersection.*Fix Geometries"):
        read_vector_labels(layer, strict=True)


# Bad inputs --------------------------------------------------------------------------------

def test_layer_without_crs(tmp_path):
    shp = write_layer(tmp_path / "nocrs.shp", [pixel_box(0, 0, 10, 10)], crs=None)
    with pytest.raises(UserError, match=r"nocrs\.shp: the layer has no CRS.*Set CRS of Layer"):
        read_vector_labels(shp)
    gpkg = write_layer(tmp_path / "nocrs.gpkg", [pixel_box(0, 0, 10, 10)], crs=None)
    with pytest.raises(UserError, match=r"nocrs\.gpkg: the layer has no CRS"):
        read_vector_labels(gpkg)


def test_image_without_georeferencing(tmp_path):
    image = make_image(tmp_path / "plain.tif", georeferenced=False)
    labels = read_vector_labels(write_layer(tmp_path / "l.gpkg", [pixel_box(0, 0, 10, 10)]))
    with pytest.raises(UserError, match=r"plain\.tif: has no georeferencing \(CRS and "
                                        r"transform\), so the polygon labels .*l\.gpkg cannot"):
        burn_labels(labels, class_indices(labels, None, 2), SceneGrid.of_file(image))


def test_layer_that_overlaps_no_image_would_be_all_background(tmp_path):
    far = pixel_box(0, 0, 10, 10, x0=X0 + 10_000)
    layer = write_layer(tmp_path / "l.gpkg", [far])
    with pytest.raises(UserError, match=r"l\.gpkg: none of its 1 polygons overlaps scene\.tif, "
                                        r"whose label would be all background .*check the "
                                        "layer's CRS"):
        burn(tmp_path, layer)
    label, facts = burn(tmp_path, layer, require_overlap=False)
    assert not label.any() and facts.used == 0


def test_missing_attribute_layer_and_unreadable_files(tmp_path):
    layer = write_layer(tmp_path / "l.gpkg", [pixel_box(0, 0, 10, 10)], layer="lakes",
                        cls=np.array([1]))
    write_layer(layer, [pixel_box(0, 0, 10, 10)], layer="roads", cls=np.array([1]))
    with pytest.raises(UserError, match=r"l\.gpkg: holds 2 layers \(lakes, roads\); name the "):
        read_vector_labels(layer)
    with pytest.raises(UserError, match=r"has no layer 'rivers'; its layers are lakes, roads"):
        read_vector_labels(layer, layer="rivers")
    with pytest.raises(UserError, match=r"l\.gpkg \(layer lakes\): has no attribute 'class'; "
                                        "its attributes are cls"):
        read_vector_labels(layer, layer="lakes", attribute="class")
    assert len(read_vector_labels(layer, layer="roads", attribute="cls")) == 1
    # QGIS keeps layer styles in a table without geometry: not a label layer.
    styled = write_layer(tmp_path / "styled.gpkg", [pixel_box(0, 0, 10, 10)], layer="lakes")
    pyogrio.raw.write(styled, None, [np.array(["<qml/>"], dtype=object)], ["styleQML"],
                      layer="layer_styles", driver="GPKG", append=True)
    assert len(read_vector_labels(styled)) == 1
    (tmp_path / "junk.gpkg").write_text("not a geopackage")
    with pytest.raises(UserError, match=r"junk\.gpkg: cannot be read as a vector layer"):
        read_vector_labels(tmp_path / "junk.gpkg")
    with pytest.raises(UserError, match=r"none\.gpkg: no such label file"):
        read_vector_labels(tmp_path / "none.gpkg")


def test_points_and_lines_are_refused(tmp_path):
    layer = write_layer(tmp_path / "l.gpkg", [pixel_box(0, 0, 10, 10),
                                              shapely.LineString([(X0, Y0), (X0 + 9, Y0 - 9)])])
    with pytest.raises(UserError, match=r"feature 2 is a LineString, not a polygon"):
        read_vector_labels(layer)


# Many scenes, one layer; pairing -----------------------------------------------------------

def _subset(labels: VectorLabels, indices: np.ndarray) -> VectorLabels:
    """The features of ``labels`` at ``indices`` (positions, not fids), everything else kept."""
    kept = set(labels.fids[indices].tolist())
    return dataclasses.replace(
        labels, geometries=labels.geometries[indices], fids=labels.fids[indices],
        attributes={k: v[indices] for k, v in labels.attributes.items()},
        repaired=[f for f in labels.repaired if f in kept])


def test_one_layer_over_several_scenes(tmp_path):
    # Scenes A and B side by side (120 m wide each), C 5 km away, D in lon/lat over A's
    # top-left corner (10 x 10 pixels of 5e-5 degrees, about 28 m x 56 m).
    grid_a = SceneGrid.of_file(make_image(tmp_path / "a.tif"))
    grid_b = SceneGrid.of_file(make_image(tmp_path / "b.tif", x0=X0 + 120))
    grid_c = SceneGrid.of_file(make_image(tmp_path / "c.tif", x0=X0 + 5000))
    lon, lat = warp_coords(UTM, "EPSG:4326", [X0], [Y0])
    d = tmp_path / "d.tif"
    with rasterio.open(d, "w", driver="GTiff", height=10, width=10, count=1, dtype="uint8",
                       crs="EPSG:4326", transform=from_origin(lon[0], lat[0], 5e-5, 5e-5)) as ds:
        ds.write(np.zeros((1, 10, 10), np.uint8))
    grid_d = SceneGrid.of_file(d)
    polygons = [pixel_box(5, 5, 15, 15),          # in A only (and D: A's top-left corner)
                pixel_box(55, 5, 65, 15),         # across the A/B border
                pixel_box(20, 20, 30, 30, x0=X0 + 120),  # in B only
                pixel_box(0, 0, 5, 5, x0=X0 + 9000)]     # in no scene
    labels = read_vector_labels(write_layer(tmp_path / "all.gpkg", polygons,
                                            cls=np.array([1, 2, 1, 2])), attribute="cls")

    found = features_by_scene(labels, [grid_a, grid_b, grid_c, grid_d])

    assert {p.name: v.tolist() for p, v in found.items()} == {
        "a.tif": [0, 1], "b.tif": [1, 2], "c.tif": [], "d.tif": [0]}
    classes = class_indices(labels, "cls", 3)
    idx = found[grid_b.path]
    label_b, facts = burn_labels(_subset(labels, idx), classes[idx], grid_b)
    assert facts.used == 2 and facts.class_pixels[2] == 50 and facts.class_pixels[1] == 100
    assert label_b[10, 2] == 2 and label_b[25, 25] == 1

    far = read_vector_labels(write_layer(tmp_path / "far.gpkg", polygons[3:]))
    with pytest.raises(UserError, match=r"far\.gpkg: none of its 1 polygons overlaps any of "
                                        r"the 3 images, whose labels would all be background"):
        features_by_scene(far, [grid_a, grid_b, grid_c])


def test_polygon_layers_pair_with_their_images_by_name_or_one_file_covers_all(tmp_path):
    """The polygon pairing of pairing.find_pairs: NAME.gpkg/.geojson/.shp with NAME.tif,
    one label file per image, or one layer file for every scene."""
    images, folder = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    folder.mkdir()
    for name in ("scene1", "scene2"):
        make_image(images / f"{name}.tif")
    rules = PolygonRules()
    one = write_layer(folder / "scene1.gpkg", [pixel_box(0, 0, 1, 1)])
    write_layer(folder / "scene2.geojson", [pixel_box(0, 0, 1, 1)])
    write_layer(folder / "scene2.shp", [pixel_box(0, 0, 1, 1)])
    with pytest.raises(UserError, match=r"several label files share a name \(scene2\.geojson "
                                        r"& scene2\.shp\); keep one file per name"):
        find_pairs(images, folder, polygons=rules)
    for path in folder.glob("scene2.*"):
        if path.suffix != ".geojson":
            path.unlink()
    assert [(p.image.name, p.label.name) for p in find_pairs(images, folder, polygons=rules)
            ] == [("scene1.tif", "scene1.gpkg"), ("scene2.tif", "scene2.geojson")]
    make_image(images / "scene3.tif")
    with pytest.raises(UserError, match=r"1 image without a label .*\(scene3\.tif\)"):
        find_pairs(images, folder, polygons=rules)
    shared = find_pairs(images, one, polygons=rules)
    assert [p.label for p in shared] == [one] * 3 and all(p.shared_label for p in shared)


def test_a_pairs_layer_reads_classifies_and_burns_in_one_call(tmp_path):
    image = make_image(tmp_path / "scene.tif")
    layer = write_layer(tmp_path / "scene.gpkg", [pixel_box(0, 0, 10, 10),
                                                  pixel_box(20, 0, 30, 10)],
                        kind=np.array(["sand", "water"], dtype=object))
    rules = PolygonRules(attribute="kind", n_classes=3, nclasses=3,
                         class_names=("background", "water", "sand"))
    [pair] = find_pairs(tmp_path, tmp_path, polygons=rules)
    assert pair.image == image
    label, facts = burn_pair_label(pair, rules)
    assert label[5, 5] == 2 and label[5, 25] == 1
    assert facts.summary() == ("scene.tif: 2 of 2 polygons from " + str(layer)
                               + "; class 0 93.3 %, class 1 3.3 %, class 2 3.3 %")


def test_remap_reaches_the_polygons_values_not_the_uncovered_pixels(tmp_path):
    make_image(tmp_path / "scene.tif")
    write_layer(tmp_path / "scene.gpkg", [pixel_box(0, 0, 10, 10), pixel_box(20, 0, 30, 10)],
                code=np.array([0, 1]))
    rules = PolygonRules(attribute="code", n_classes=3, nclasses=3, remap=((0, 1), (1, 2)))
    [pair] = find_pairs(tmp_path, tmp_path, polygons=rules)
    label, facts = burn_pair_label(pair, rules)
    assert (label[5, 5], label[5, 25], label[30, 30]) == (1, 2, 0)
    assert facts.class_pixels == {0: 3000 - 200, 1: 100, 2: 100}
    # The label rules' remap is not applied a second time to a polygon label.
    checked = prepare_label(label, LabelRules(3, {"0": 1, "1": 2}), pair.label)
    np.testing.assert_array_equal(checked, label)
