"""make_tfrecords with polygon labels (res_unet.data.pairing + res_unet.data.dataset over
res_unet.geo.vectors): per-image layers and one layer over many scenes, end to end, with
workers, and every bad input as one line before anything is written.

Scenes are 32x32 three-band GeoTIFFs at 2 m in UTM 33N (the fixtures of test_vectors.py);
one tile per scene (FIT_MODE tile, TARGET_SIZE 32), so a dataset label is the burnt label.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pyogrio.raw
import pytest
import rasterio
import shapely
from helpers import read_examples
from rasterio.transform import from_origin
from rasterio.warp import transform as warp_coords
from test_vectors import MARS, PX, UTM, X0, Y0, pixel_box, write_layer

from res_unet.cli import run_command
from res_unet.data import records
from res_unet.geo import vectors
from res_unet.geo.tiling import tile_grid
from res_unet.make_tfrecords import main

CONFIG = {"TARGET_SIZE": [32, 32], "FIT_MODE": "tile", "DO_AUG": False, "DOPLOT": False,
          "VALIDATION_SPLIT": 0.0, "IMS_PER_SHARD": 2, "NCLASSES": 3,
          "CLASS_NAMES": ["background", "water", "sand"], "LABEL_ATTRIBUTE": "kind"}
FAR = X0 + 5000.0  # a scene no polygon reaches


def make_scene(path: Path, x0: float = X0, georeferenced: bool = True) -> Path:
    """A 32x32 three-band uint8 GeoTIFF at 2 m whose top-left corner is (x0, Y0)."""
    pixels = np.random.default_rng(int(x0)).integers(0, 255, (3, 32, 32), dtype=np.uint8)
    profile = {"driver": "GTiff", "height": 32, "width": 32, "count": 3, "dtype": "uint8"}
    if georeferenced:
        profile.update(crs=UTM, transform=from_origin(x0, Y0, PX, PX))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as ds:
            ds.write(pixels)
    return path


def lon_lat(polygon: shapely.Polygon) -> shapely.Polygon:
    """A UTM polygon redrawn in EPSG:4326, as a QGIS project in lon/lat would store it."""
    xs, ys = polygon.exterior.xy
    lon, lat = warp_coords(UTM, "EPSG:4326", list(xs), list(ys))
    return shapely.Polygon(zip(lon, lat, strict=True))


def run(tmp_path: Path, images: Path, labels: Path, *extra: str, out: str = "ds",
        **config) -> int:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**CONFIG, **config}))
    return run_command(main, ["--config", str(path), "--images", str(images), "--labels",
                              str(labels), "--out", str(tmp_path / out), *extra])


def dataset_labels(folder: Path) -> dict[str, np.ndarray]:
    return {meta["stem"]: label for _, label, meta in read_examples(folder, "train")}


# Per-image layers ---------------------------------------------------------------------------

def test_per_image_layers_in_lon_lat_and_class_names_burn_onto_utm_scenes(tmp_path, capsys):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(), labels.mkdir()
    make_scene(images / "a.tif")
    make_scene(images / "b.tif", x0=X0 + 1000)
    # a: drawn in lon/lat; half-pixel margins put pixel centres 1 m inside or outside.
    # A bow tie (invalid, repaired into two triangles) adds class "sand" in a's corner.
    bow_tie = shapely.Polygon([(X0 + 40, Y0 - 40), (X0 + 60, Y0 - 60),
                               (X0 + 60, Y0 - 40), (X0 + 40, Y0 - 60)])
    write_layer(labels / "a.geojson", [lon_lat(pixel_box(2.25, 4.25, 12.25, 10.25)),
                                       lon_lat(bow_tie)],
                crs="EPSG:4326", kind=np.array(["Water", " sand"], dtype=object))
    # b: a square with a hole (background), then sand over part of it (later wins).
    ring = pixel_box(4, 4, 20, 20, x0=X0 + 1000).difference(pixel_box(8, 8, 12, 12,
                                                                        x0=X0 + 1000))
    write_layer(labels / "b.gpkg", [ring, pixel_box(16, 16, 24, 24, x0=X0 + 1000)],
                kind=np.array(["water", "2"], dtype=object))

    assert run(tmp_path, images, labels) == 0

    expected_a = np.zeros((32, 32), np.uint8)
    expected_a[4:10, 2:12] = 1
    expected_b = np.zeros((32, 32), np.uint8)
    expected_b[4:20, 4:20] = 1
    expected_b[8:12, 8:12] = 0
    expected_b[16:24, 16:24] = 2
    got = dataset_labels(tmp_path / "ds")
    np.testing.assert_array_equal(got["b"], expected_b)
    np.testing.assert_array_equal(got["a"][:, :20], expected_a[:, :20])
    sand = got["a"] == 2
    assert sand.sum() > 0 and not sand[:, :20].any()  # the repaired bow tie, in its corner
    out = capsys.readouterr().err
    assert out.count("1 invalid polygon repaired") == 1 and "a.geojson" in out
    manifest = records.read_manifest(tmp_path / "ds")
    assert manifest.label_files["train"] == ["a.geojson", "b.gpkg"]


def test_remap_classes_maps_attribute_values_and_leaves_the_background(tmp_path, capsys):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(), labels.mkdir()
    make_scene(images / "a.tif")
    write_layer(labels / "a.gpkg", [pixel_box(0, 0, 8, 8), pixel_box(8, 8, 16, 16)],
                kind=np.array([7, 1]))
    assert run(tmp_path, images, labels, REMAP_CLASSES={"7": 2}, CLASS_NAMES=[]) == 0
    label = dataset_labels(tmp_path / "ds")["a"]
    assert label[4, 4] == 2 and label[12, 12] == 1 and label[20, 20] == 0
    # The attribute holds 0/1 and the remap shifts them up: uncovered pixels stay class 0
    # (they became class 1 when the remap was applied to the burnt label).
    write_layer(labels / "a.gpkg", [pixel_box(0, 0, 8, 8), pixel_box(8, 8, 16, 16)],
                kind=np.array([0, 1]))
    assert run(tmp_path, images, labels, "--overwrite", REMAP_CLASSES={"0": 1, "1": 2},
               CLASS_NAMES=[]) == 0
    label = dataset_labels(tmp_path / "ds")["a"]
    assert label[4, 4] == 1 and label[12, 12] == 2 and label[20, 20] == 0
    assert np.bincount(label.ravel()).tolist() == [32 * 32 - 128, 64, 64]
    manifest = records.read_manifest(tmp_path / "ds")
    assert manifest.class_pixel_counts == [32 * 32 - 128, 64, 64]
    assert "warning" not in capsys.readouterr().err


def test_a_class_without_pixels_is_warned_about(tmp_path, capsys):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(), labels.mkdir()
    make_scene(images / "a.tif")
    write_layer(labels / "a.gpkg", [pixel_box(0, 0, 8, 8)], kind=np.array(["water"],
                                                                          dtype=object))
    assert run(tmp_path, images, labels) == 0
    err = capsys.readouterr().err
    assert ("warning: class 2 (sand) has no pixels in the training examples, so the model "
            "cannot learn it; check the labels and REMAP_CLASSES") in err


def test_a_shared_layer_is_read_only_over_the_scenes(tmp_path, monkeypatch, three_scenes):
    images, layer = three_scenes
    far = [lon_lat(pixel_box(0, 0, 5, 5, x0=X0 + 20_000 + 100 * i)) for i in range(30)]
    write_layer(layer, far, crs="EPSG:4326", layer="lakes", kind=np.ones(30, int))  # appended
    decoded = []
    real = pyogrio.raw.read
    monkeypatch.setattr(pyogrio.raw, "read", lambda *a, **k: (
        lambda out: decoded.append(len(out[1])) or out)(real(*a, **k)))
    assert run(tmp_path, images, layer, "--layer", "lakes") == 0
    assert decoded == [3], "the 3 polygons over scenes a and b, not the 30 far away"
    assert sorted(dataset_labels(tmp_path / "ds")) == ["a", "b"]


# One layer over many scenes -----------------------------------------------------------------

@pytest.fixture
def three_scenes(tmp_path):
    """Scenes a and b (1 km apart) under one two-layer GeoPackage; c is far from all."""
    images = tmp_path / "images"
    images.mkdir()
    for name, x0 in (("a", X0), ("b", X0 + 1000), ("c", FAR)):
        make_scene(images / f"{name}.tif", x0=x0)
    layer = tmp_path / "survey.gpkg"
    write_layer(layer, [lon_lat(pixel_box(0, 0, 10, 10)),
                        lon_lat(pixel_box(5, 5, 15, 15)),
                        lon_lat(pixel_box(10, 20, 30, 30, x0=X0 + 1000))],
                crs="EPSG:4326", layer="lakes", kind=np.array([1, 2, 1]))
    write_layer(layer, [pixel_box(0, 0, 32, 32, x0=FAR)], layer="roads",
                kind=np.array([2]))
    return images, layer


def test_one_layer_over_many_scenes_leaves_out_the_scenes_it_misses(tmp_path, capsys,
                                                                    three_scenes):
    images, layer = three_scenes
    assert run(tmp_path, images, layer, "--layer", "lakes", DOPLOT=True) == 0

    out = capsys.readouterr().err
    assert ("survey.gpkg (layer lakes): no polygon touches 1 image of 3 (c.tif); left out"
            in out)
    got = dataset_labels(tmp_path / "ds")
    assert sorted(got) == ["a", "b"]
    expected_a = np.zeros((32, 32), np.uint8)
    expected_a[0:10, 0:10] = 1
    expected_a[5:15, 5:15] = 2  # the later feature wins
    expected_b = np.zeros((32, 32), np.uint8)
    expected_b[20:30, 10:30] = 1
    np.testing.assert_array_equal(got["a"], expected_a)
    np.testing.assert_array_equal(got["b"], expected_b)
    manifest = records.read_manifest(tmp_path / "ds")
    assert manifest.files["train"] == ["a.tif", "b.tif"]
    assert manifest.label_files["train"] == ["survey.gpkg (layer lakes)"] * 2
    assert manifest.config["LABEL_LAYER"] == "lakes"
    assert manifest.left_out == ["c.tif"], "the dataset records the scene it left out"
    assert (tmp_path / "ds" / "samples.png").stat().st_size > 0


def test_label_priority_puts_a_class_on_top(tmp_path, three_scenes):
    images, layer = three_scenes
    assert run(tmp_path, images, layer, LABEL_LAYER="lakes", LABEL_PRIORITY=[2, 1]) == 0
    label = dataset_labels(tmp_path / "ds")["a"]
    assert label[7, 7] == 1 and label[12, 12] == 2 and label[2, 2] == 1


def test_a_process_reads_the_layer_once_not_per_scene_or_tile(tmp_path, three_scenes,
                                                              monkeypatch):
    reads = []
    real = vectors.read_vector_labels
    monkeypatch.setattr(vectors, "read_vector_labels",
                        lambda *args, **kwargs: reads.append(args) or real(*args, **kwargs))
    images, layer = three_scenes
    # 16-pixel tiles, several per scene, each scene read in the check pass and when building.
    assert run(tmp_path, images, layer, "--layer", "lakes", TARGET_SIZE=[16, 16]) == 0
    assert len(reads) == 1
    tiles = len(tile_grid((32, 32), (16, 16), CONFIG.get("TILE_OVERLAP", 0.25)))
    assert tiles > 1
    assert records.read_manifest(tmp_path / "ds").counts["train"].examples == 2 * tiles


def test_two_workers_write_the_same_bytes_as_one(tmp_path, three_scenes):
    images, layer = three_scenes
    assert run(tmp_path, images, layer, "--layer", "lakes", out="one") == 0
    assert run(tmp_path, images, layer, "--layer", "lakes", "--workers", "2", out="two") == 0
    one = sorted((tmp_path / "one").glob("*.tfrec"))
    assert one and [p.read_bytes() for p in one] == [
        (tmp_path / "two" / p.name).read_bytes() for p in one]
    assert (records.read_manifest(tmp_path / "one").content_hash
            == records.read_manifest(tmp_path / "two").content_hash)


# Bad input: one line naming the file and the fix, exit 2, nothing written -------------------

def _bad_case(case: str, tmp: Path) -> tuple[Path, Path, dict, list[str], str]:
    images, labels = tmp / "images", tmp / "labels"
    images.mkdir(), labels.mkdir()
    make_scene(images / "a.tif")
    make_scene(images / "b.tif", x0=X0 + 1000)
    write_layer(labels / "a.gpkg", [pixel_box(0, 0, 8, 8)], kind=np.array([1]))
    write_layer(labels / "b.gpkg", [pixel_box(0, 0, 8, 8, x0=X0 + 1000)], kind=np.array([2]))
    config: dict = {}
    flags: list[str] = []
    if case == "layer without a CRS":
        (labels / "b.gpkg").unlink()
        write_layer(labels / "b.gpkg", [pixel_box(0, 0, 8, 8, x0=X0 + 1000)], crs=None,
                    kind=np.array([2]))
        expect = "b.gpkg: the layer has no CRS"
    elif case == "image without georeferencing":
        make_scene(images / "b.tif", georeferenced=False)
        expect = "b.tif: has no georeferencing"
    elif case == "class outside the classes":
        (labels / "b.gpkg").unlink()
        write_layer(labels / "b.gpkg", [pixel_box(0, 0, 8, 8, x0=X0 + 1000)],
                    kind=np.array(["forest"], dtype=object))
        expect = "b.gpkg: attribute 'kind' has 'forest', outside the classes"
    elif case == "layer beside its image":
        (labels / "b.gpkg").unlink()
        write_layer(labels / "b.gpkg", [pixel_box(0, 0, 8, 8)], kind=np.array([2]))
        expect = "b.gpkg: none of its 1 polygons overlaps b.tif"
    elif case == "no attribute for classes":
        config["LABEL_ATTRIBUTE"] = None
        expect = "a.gpkg: polygon labels for NCLASSES=3 need LABEL_ATTRIBUTE"
    elif case == "missing attribute":
        config["LABEL_ATTRIBUTE"] = "class"
        expect = "has no attribute 'class'; its attributes are kind: set LABEL_ATTRIBUTE"
    elif case == "layer not named":
        write_layer(labels / "b.gpkg", [pixel_box(0, 0, 8, 8)], layer="other",
                    kind=np.array([1]))
        expect = "b.gpkg: holds 2 layers (b, other); name the one that holds the labels " \
                 "with LABEL_LAYER"
    elif case == "one layer touching no scene":
        labels = write_layer(tmp / "far.gpkg", [pixel_box(0, 0, 8, 8, x0=FAR)],
                             kind=np.array([1]))
        expect = "far.gpkg: none of its 1 polygons overlaps any of the 2 images"
    elif case == "empty layer of a scene":
        (labels / "b.gpkg").unlink()
        write_layer(labels / "b.gpkg", np.array([], dtype=object), kind=np.array([], int))
        expect = ("b.gpkg: holds no polygon, so the label of b.tif would be all background; "
                  "draw its labels")
    elif case == "GeoJSON that lost its CRS":
        (labels / "b.gpkg").unlink()
        (labels / "b.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
            {"type": "Feature", "properties": {"kind": 2}, "geometry": shapely.geometry.mapping(
                pixel_box(0, 0, 8, 8, x0=X0 + 1000))}]}))
        expect = "b.geojson: coordinates up to (501000, 6.64998e+06, 501016, 6.65e+06) are not " \
                 "longitude/latitude, yet the layer's CRS is EPSG:4326"
    elif case == "layer on Mars":
        (labels / "b.gpkg").unlink()
        write_layer(labels / "b.gpkg", [shapely.box(10, 10, 11, 11)], crs=MARS,
                    kind=np.array([2]))
        expect = "b.gpkg: cannot be reprojected from Mars 2000 to the images' EPSG:32633"
    elif case == "empty shared layer":
        labels = write_layer(tmp / "all.gpkg", np.array([], dtype=object), kind=np.array([], int))
        expect = "all.gpkg: holds no polygon, so the labels of the 2 images would all be " \
                 "background"
    elif case == "one layer over a plain image":
        make_scene(images / "b.tif", georeferenced=False)
        labels = write_layer(tmp / "all.gpkg", [pixel_box(0, 0, 8, 8)], kind=np.array([1]))
        expect = "b.tif: has no georeferencing (CRS and transform), so the polygon labels"
    else:
        raise AssertionError(case)
    return images, labels, config, flags, expect


@pytest.mark.parametrize("case", [
    "layer without a CRS", "image without georeferencing", "class outside the classes",
    "layer beside its image", "no attribute for classes", "missing attribute",
    "layer not named", "one layer touching no scene", "one layer over a plain image",
    "empty layer of a scene", "GeoJSON that lost its CRS", "layer on Mars", "empty shared layer"])
def test_bad_polygon_input_is_one_line_and_nothing_is_written(tmp_path, capsys, case):
    images, labels, config, flags, expect = _bad_case(case, tmp_path)
    assert run(tmp_path, images, labels, *flags, **config) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    # One line per file: both scenes' layers lack the attribute.
    assert len(lines) == (2 if case == "missing attribute" else 1), err
    assert expect in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "ds").exists()
    assert list(tmp_path.rglob("*.tfrec")) == []


def test_binary_layers_beside_their_images_need_no_attribute(tmp_path):
    folder = tmp_path / "scenes"
    folder.mkdir()
    make_scene(folder / "a.tif")
    write_layer(folder / "a.shp", [pixel_box(0, 0, 8, 8), pixel_box(4, 4, 12, 12)],
                kind=np.array([5, 7]))
    assert run(tmp_path, folder, folder, NCLASSES=1, CLASS_NAMES=[], LABEL_ATTRIBUTE=None) == 0
    label = dataset_labels(tmp_path / "ds")["a"]
    assert set(np.unique(label)) == {0, 1} and int(label.sum()) == 64 + 64 - 16
    assert records.read_manifest(tmp_path / "ds").label_files["train"] == ["a.shp"]
