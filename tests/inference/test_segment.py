"""Tests for res_unet.inference.segment's GIS outputs, through seg_images_in_folder: the classes of
every model as polygons (GeoPackage, GeoJSON) and the label and probability GeoTIFFs as
Cloud-Optimized GeoTIFFs; resuming with them."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pyogrio
import pyogrio.raw
import pytest
import rasterio
import shapely
from helpers import make_config, pixel_model, write_run
from rasterio.crs import CRS
from rasterio.transform import from_origin
from rasterio.warp import transform as warp_transform

from res_unet.cli import run_command
from res_unet.geo import rasters, writers
from res_unet.seg_images_in_folder import main

NAMES = ["water", "sand", "forest", "unlabelled"]
TRANSFORM = from_origin(500_000.0, 4_200_000.0, 10.0, 10.0)  # 10 m pixels: 100 m2 each
TILE = 128


def seg(*args: str) -> int:
    return run_command(main, [*map(str, args), "--no-progress"])


def class_model() -> keras.Model:
    """A per-pixel 4-class softmax model: band 0 dark (50) -> water, mid (128) -> sand,
    bright (200) -> forest; band 1 at 255 -> unlabelled (the IGNORE_CLASS)."""
    inputs = keras.Input((TILE, TILE, 3))
    kernel = np.zeros((1, 1, 3, 4), np.float32)
    kernel[0, 0, 0, :3] = [-0.1, 0.0, 0.1]
    kernel[0, 0, 1, 3] = 0.2
    outputs = keras.layers.Conv2D(
        4, 1, activation="softmax", kernel_initializer=keras.initializers.Constant(kernel),
        bias_initializer=keras.initializers.Constant([10.0, 0.0, -15.6, -40.0]))(inputs)
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    cfg = make_config("model", TARGET_SIZE=[TILE, TILE], NCLASSES=4, CLASS_NAMES=NAMES,
                      IGNORE_CLASS=3)
    return write_run(tmp_path_factory.mktemp("runs") / "classes", class_model(), cfg)


def scene() -> tuple[np.ndarray, np.ndarray]:
    """A 600 x 700 RGB scene and the label the class model gives it (255: nodata rows)."""
    image = np.zeros((600, 700, 3), np.uint8)
    image[..., 0] = 50
    image[:, 200:450, 0] = 128
    image[:, 450:, 0] = 200
    image[100:150, 50:120, 1] = 255
    image[300:340, 500:560, 0] = 128  # a sand island in the forest
    image[:5] = 0  # nodata rows
    label = np.select([image[..., 1] == 255, image[..., 0] == 50, image[..., 0] == 128],
                      [3, 0, 1], 2).astype(np.uint8)
    label[:5] = 255
    return image, label


@pytest.fixture
def geotiff(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    image, _ = scene()
    with rasterio.open(folder / "scene.tif", "w", driver="GTiff", height=600, width=700,
                       count=3, dtype="uint8", crs="EPSG:32633", transform=TRANSFORM,
                       nodata=0) as ds:
        ds.write(np.moveaxis(image, -1, 0))
    return folder


def read_polygons(path: Path, layer: str | None = None):
    meta, _, wkb, columns = pyogrio.raw.read(path, layer=layer)
    return meta, shapely.from_wkb(wkb), dict(zip(meta["fields"], columns, strict=True))


@pytest.mark.parametrize("fmt", ["gpkg", "geojson"])
def test_polygons_of_every_class_in_the_scenes_crs(run, geotiff, tmp_path, fmt):
    out = tmp_path / "out"
    assert seg("--model", run, "--images", geotiff, "--out", out, "--vector", fmt) == 0
    _, label = scene()
    np.testing.assert_array_equal(rasters.read_label(out / "scene_predseg.png"), label)
    meta, geometries, fields = read_polygons(out / f"scene_predseg.{fmt}")
    if fmt == "geojson":  # RFC 7946: WGS 84 longitude/latitude (7 decimals, about 1 cm)
        assert CRS.from_user_input(meta["crs"]) == CRS.from_epsg(4326)
        geometries = shapely.transform(geometries, lambda xy: np.column_stack(
            warp_transform("EPSG:4326", "EPSG:32633", xy[:, 0], xy[:, 1])))
        geometries = shapely.set_precision(geometries, 0.1)
    else:
        assert CRS.from_user_input(meta["crs"]) == CRS.from_epsg(32633)
    assert {(int(c), n) for c, n in zip(fields["class"], fields["name"], strict=True)} == {
        (0, "water"), (1, "sand"), (2, "forest")}  # no nodata, no IGNORE_CLASS polygons
    for value in (0, 1, 2):
        pick = fields["class"] == value
        pixels = int((label == value).sum())
        assert int(fields["area_px"][pick].sum()) == pixels
        assert fields["area_m2"][pick].sum() == pytest.approx(pixels * 100.0, rel=1e-9)
        assert shapely.area(geometries[pick]).sum() == pytest.approx(pixels * 100.0, rel=1e-6)
    island = geometries[(fields["class"] == 1) & (fields["area_px"] == 40 * 60)]
    assert len(island) == 1 and island[0].bounds == (505_000.0, 4_196_600.0, 505_600.0,
                                                     4_197_000.0)
    summary = json.loads((out / "segmentation_config.json").read_text())
    assert summary["options"]["vector"] == fmt


def test_one_layer_per_class_and_simplified_polygons_keep_shared_borders(run, geotiff,
                                                                         tmp_path):
    config = tmp_path / "vectors.json"
    config.write_text(json.dumps({"VECTOR_FORMAT": "gpkg", "VECTOR_LAYER_PER_CLASS": True}))
    out = tmp_path / "out"
    assert seg("--model", run, "--images", geotiff, "--out", out, "--config", config,
               "--simplify", "25") == 0
    path = out / "scene_predseg.gpkg"
    layers = sorted(pyogrio.list_layers(path)[:, 0])
    assert layers == ["class_0_water", "class_1_sand", "class_2_forest", "classes"]
    _, geometries, fields = read_polygons(path, layer="classes")
    # Straight class borders survive a 25 m tolerance; the polygons still tile the scene
    # without gaps or overlaps: their union's area is the sum of their areas.
    union = shapely.union_all(geometries)
    assert union.area == pytest.approx(shapely.area(geometries).sum(), rel=1e-9)
    _, label = scene()
    assert union.area == pytest.approx(int((label < 3).sum()) * 100.0, rel=1e-3)
    _, sand, _ = read_polygons(path, layer="class_1_sand")
    assert len(sand) == (fields["class"] == 1).sum()


def test_label_and_probabilities_are_cloud_optimized_geotiffs(run, geotiff, tmp_path):
    out = tmp_path / "out"
    assert seg("--model", run, "--images", geotiff, "--out", out, "--save-probs") == 0
    _, label = scene()
    for name, dtype, count in (("scene_predseg.tif", "uint8", 1),
                               ("scene_probs.tif", "float32", 4)):
        with rasterio.open(out / name) as ds:
            assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG", name
            assert ds.profile["tiled"] and ds.block_shapes == [(512, 512)] * count
            assert ds.overviews(1) == [2]
            assert ds.dtypes == (dtype,) * count
            assert ds.crs == CRS.from_epsg(32633) and ds.transform == TRANSFORM
            pixels = ds.read()
            nodata = ds.nodata
        if count == 1:
            assert nodata == 255
            np.testing.assert_array_equal(pixels[0], label)
        else:
            assert np.isnan(nodata) and np.all(np.isnan(pixels[:, :5]))
            np.testing.assert_array_equal(np.argmax(pixels[:, 5:], axis=0), label[5:])
    assert not [p for p in out.iterdir() if p.name.startswith(".")
                and not p.name.endswith(".segmented")], "only the images' records are hidden"


def test_streamed_label_strips_become_the_same_cog(run, geotiff, tmp_path, monkeypatch):
    """A scene segmented from windows (label strips written as they finish, through a tiled
    temporary) gives the same COG as the scene segmented whole."""
    from res_unet.inference import segment, settings

    cfg = settings.inference_config([run])
    streamed = []
    monkeypatch.setattr(writers, "png_writer", lambda *a, real=writers.png_writer: (
        streamed.append(a[0]), real(*a))[1])
    for out, limit in (("whole", 10**9), ("windows", 0)):
        segment.segment_folder(cfg, [run], geotiff, tmp_path / out, progress=False,
                               full_max_values=limit)
    assert len(streamed) == 1
    with rasterio.open(tmp_path / "whole" / "scene_predseg.tif") as a, \
            rasterio.open(tmp_path / "windows" / "scene_predseg.tif") as b:
        assert b.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and b.overviews(1) == [2]
        assert (a.profile, a.tags(ns="IMAGE_STRUCTURE")) == (b.profile,
                                                             b.tags(ns="IMAGE_STRUCTURE"))
        np.testing.assert_array_equal(a.read(), b.read())
        np.testing.assert_array_equal(a.read(1, out_shape=(300, 350)),
                                      b.read(1, out_shape=(300, 350)))
    assert [p.name for p in (tmp_path / "windows").iterdir() if p.name.startswith(".")] == [
        ".scene.segmented"], "no temporary is left"


def test_label_cogs_carry_the_overlay_colours_and_class_names(run, geotiff, tmp_path):
    """QGIS shows the label COG in the overlays' colours with the class names (whole and
    streamed from windows alike), and names each probability band after its class."""
    from res_unet.geo import palette
    from res_unet.inference import segment, settings

    cfg = settings.inference_config([run])
    for out, limit in (("whole", 10**9), ("windows", 0)):
        segment.segment_folder(cfg, [run], geotiff, tmp_path / out, progress=False,
                               save_probs=out == "whole", full_max_values=limit)
        with rasterio.open(tmp_path / out / "scene_predseg.tif") as ds:
            assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
            colours = ds.colormap(1)
            assert [colours[k] for k in range(4)] == [
                (*map(int, palette.CLASS_COLOURS[k]), 255) for k in range(4)]
            assert colours[255] == (0, 0, 0, 0)  # nodata: transparent
            assert ds.descriptions == (
                "class (0 water, 1 sand, 2 forest, 3 unlabelled; 255 nodata)",)
            assert {k: v for k, v in ds.tags().items() if k.startswith("CLASS_")} == {
                "CLASS_0": "water", "CLASS_1": "sand", "CLASS_2": "forest",
                "CLASS_3": "unlabelled"}
    with rasterio.open(tmp_path / "whole" / "scene_probs.tif") as ds:
        assert ds.descriptions == tuple(f"probability of {n}" for n in NAMES)
    assert not list((tmp_path / "windows").glob("*.aux.xml"))


def test_binary_label_cog_colours_are_the_overlays(tmp_path):
    from res_unet.geo import cog, palette

    description = cog.label_description(["land", "water"], 255)
    assert description.colormap == {0: (0, 0, 0, 255), 1: (*palette.BINARY_COLOUR, 255),
                                    255: (0, 0, 0, 0)}
    assert cog.probability_description(["land", "water"], binary=True).band_names == [
        "probability of water"]


@pytest.mark.parametrize("dtype, nodata", [("int16", -9999), ("float32", float("nan"))])
def test_signed_and_float_scenes_keep_their_nodata_in_every_output(run, tmp_path, dtype,
                                                                   nodata):
    """The class scene stored as int16 with a -9999 collar (float32: NaN) through a model
    trained on uint8: segmented like the uint8 scene, the collar nodata in the label COG
    (255) and the probabilities (NaN), whole and from windows; values above 255 are refused
    naming int16."""
    from res_unet.inference import segment, settings

    image, label = scene()
    stored = image.astype(dtype)
    stored[:5] = nodata
    folder = tmp_path / "images"
    folder.mkdir()
    profile = {"driver": "GTiff", "height": 600, "width": 700, "count": 3, "dtype": dtype,
               "crs": "EPSG:32633", "transform": TRANSFORM, "nodata": nodata}
    with rasterio.open(folder / "scene.tif", "w", **profile) as ds:
        ds.write(np.moveaxis(stored, -1, 0))
    cfg = settings.inference_config([run])
    for out, limit in (("whole", 10**9), ("windows", 0)):
        summary = segment.segment_folder(cfg, [run], folder, tmp_path / out, progress=False,
                                         save_probs=True, full_max_values=limit)
        assert summary["failed"] == 0, summary["failures"]
        with rasterio.open(tmp_path / out / "scene_predseg.tif") as ds:
            assert ds.nodata == 255
            np.testing.assert_array_equal(ds.read(1), label)
        with rasterio.open(tmp_path / out / "scene_probs.tif") as ds:
            probs = ds.read()
            assert np.isnan(probs[:, :5]).all() and not np.isnan(probs[:, 5:]).any()
    if dtype == "int16":
        stored[300, 300, 0] = 300
        with rasterio.open(folder / "scene.tif", "w", **profile) as ds:
            ds.write(np.moveaxis(stored, -1, 0))
        summary = segment.segment_folder(cfg, [run], folder, tmp_path / "big", progress=False)
        assert summary["failed"] == 1
        assert ("scene.tif: int16 image values reach 300, above 255 (the model was trained on "
                "8-bit, uint8, imagery); export it with values 0..255"
                in summary["failures"][0]["error"])


def test_nodata_pixels_are_left_out_of_training_through_ignore_class(tmp_path):
    from res_unet.config.keys import LabelRules
    from res_unet.data.pairing import Pair, load_pair

    stored = np.full((6, 8, 3), 40, np.int16)
    stored[:, :2] = -9999
    with rasterio.open(tmp_path / "s.tif", "w", driver="GTiff", height=6, width=8, count=3,
                       dtype="int16", crs="EPSG:32633", transform=TRANSFORM,
                       nodata=-9999) as ds:
        ds.write(np.moveaxis(stored, -1, 0))
    writers.write_png(tmp_path / "s_label.png", np.ones((6, 8), np.uint8))
    pair = Pair("s", tmp_path / "s.tif", tmp_path / "s_label.png")
    image, label, _ = load_pair(pair, 3, LabelRules(3, {}, ignore_class=2))
    assert image.dtype == np.uint16 and (image[:, :2] == 0).all()
    assert (label[:, :2] == 2).all() and (label[:, 2:] == 1).all()
    _, label, _ = load_pair(pair, 3, LabelRules(3))  # no IGNORE_CLASS: labels as drawn
    assert (label == 1).all()


def test_plain_images_keep_png_outputs_and_polygons_in_pixel_coordinates(run, tmp_path):
    image, label = scene()
    image, label = image[5:105, :300], label[5:105, :300]
    writers.write_png(tmp_path / "images" / "photo.png", image)
    out = tmp_path / "out"
    assert seg("--model", run, "--images", tmp_path / "images", "--out", out,
               "--vector", "gpkg", "--save-probs") == 0
    assert sorted(p.name for p in out.glob("photo_*")) == [
        "photo_overlay.png", "photo_predseg.gpkg", "photo_predseg.png", "photo_probs.npy"]
    info = pyogrio.read_info(out / "photo_predseg.gpkg")
    assert info["crs"] is None
    assert "pixel coordinates, no CRS" in info["layer_metadata"]["DESCRIPTION"]
    _, geometries, fields = read_polygons(out / "photo_predseg.gpkg")
    # x = column, y = -row: the sand columns 200..299 of rows 0..99.
    sand = geometries[fields["class"] == 1]
    assert len(sand) == 1 and sand[0].bounds == (200.0, -100.0, 300.0, 0.0)
    assert np.isnan(fields["area_m2"][fields["class"] == 1][0])  # no CRS: no metres
    assert fields["area_px"][fields["class"] == 1][0] == (label == 1).sum()


def test_binary_geojson_keeps_its_polygons(tmp_path):
    """--geojson of a binary model: the foreground polygons (holes as holes) with class,
    name, area_px and area (square metres), in the scene's CRS."""
    binary = write_run(tmp_path / "binary", pixel_model(), make_config(
        "model", CLASS_NAMES=["land", "water"]), threshold=0.5)
    image = np.full((48, 64, 3), 50, np.uint8)
    image[10:30, 5:25] = 200
    image[15:20, 10:15] = 50  # a hole
    image[40:, 50:] = 200
    folder = tmp_path / "images"
    folder.mkdir()
    with rasterio.open(folder / "scene.tif", "w", driver="GTiff", height=48, width=64,
                       count=3, dtype="uint8", crs="EPSG:32633", transform=TRANSFORM) as ds:
        ds.write(np.moveaxis(image, -1, 0))
    out = tmp_path / "out"
    assert seg("--model", binary, "--images", folder, "--out", out, "--geojson") == 0
    label = rasters.read_label(out / "scene_predseg.png")
    assert np.array_equal(label, (image[..., 0] == 200).astype(np.uint8))

    def on_map(x0, y0, x1, y1):  # a box of pixel corners in map coordinates
        (a, b), (c, d) = TRANSFORM * (x0, y0), TRANSFORM * (x1, y1)
        return shapely.box(min(a, c), min(b, d), max(a, c), max(b, d))

    # the pixel corners of the two bright regions, one with its hole (pixel model: 200 is
    # water at threshold 0.5, 50 land)
    expected = [on_map(5, 10, 25, 30).difference(on_map(10, 15, 15, 20)),
                on_map(50, 40, 64, 48)]
    now = json.loads((out / "scene_predseg.geojson").read_text())
    assert "crs" not in now  # RFC 7946: WGS 84 longitude/latitude
    found = sorted(now["features"], key=lambda f: -f["properties"]["area_px"])
    assert len(found) == 2
    for feature, shape, pixels in zip(found, expected, (400 - 25, 14 * 8), strict=True):
        in_utm = shapely.set_precision(shapely.transform(
            shapely.geometry.shape(feature["geometry"]), lambda xy: np.column_stack(
                warp_transform("EPSG:4326", "EPSG:32633", xy[:, 0], xy[:, 1]))), 0.1)
        assert in_utm.equals(shape)
        assert feature["properties"] == {"class": 1, "name": "water", "area_px": pixels,
                                         "area_m2": pixels * 100.0}


def test_resume_with_polygons_skips_finished_images(run, geotiff, tmp_path, capsys):
    out = tmp_path / "out"
    image, _ = scene()
    writers.write_png(geotiff / "photo.png", image[5:69, :64])
    assert seg("--model", run, "--images", geotiff, "--out", out, "--vector", "gpkg") == 0
    capsys.readouterr()
    assert seg("--model", run, "--images", geotiff, "--out", out, "--vector", "gpkg") == 0
    assert "0 done, 2 skipped" in capsys.readouterr().out
    (out / "scene_predseg.gpkg").unlink()
    assert seg("--model", run, "--images", geotiff, "--out", out, "--vector", "gpkg") == 0
    assert "1 done, 1 skipped" in capsys.readouterr().out
    assert (out / "scene_predseg.gpkg").is_file()
    # The same file name with other polygons in it: refused, naming the setting.
    assert seg("--model", run, "--images", geotiff, "--out", out, "--vector", "gpkg",
               "--simplify", "5") == 2
    assert "with other VECTOR_SIMPLIFY" in capsys.readouterr().err
    # Another format is another file: added to the finished images.
    assert seg("--model", run, "--images", geotiff, "--out", out, "--vector", "geojson") == 0
    assert "2 done, 0 skipped" in capsys.readouterr().out
    assert seg("--model", run, "--images", geotiff, "--out", out) == 0
    assert "0 done, 2 skipped" in capsys.readouterr().out


def test_geojson_and_vector_flags_exclude_each_other(run, geotiff, tmp_path, capsys):
    assert seg("--model", run, "--images", geotiff, "--out", tmp_path / "out", "--geojson",
               "--vector", "gpkg") == 2
    assert "not allowed with argument --geojson" in capsys.readouterr().err


# Resuming after shards of another model ----------------------------------------------------

def test_a_shard_overwritten_with_another_model_leaves_no_mix(tmp_path, capsys):
    """Model A segments a folder; --shard 1/2 --overwrite with model B redoes half of it. A
    plain run of B then redoes the other half (A's masks are never skipped as B's), and the
    folder equals one segmented by B alone; A may no longer resume there."""
    images = tmp_path / "images"
    for k in range(4):
        image = np.full((32, 40, 3), 50, np.uint8)
        image[:, : 8 + 6 * k] = 200  # bright (model A's foreground) on the left
        writers.write_png(images / f"s{k}.png", image)
    model_a = write_run(tmp_path / "A", pixel_model(), make_config("model"), threshold=0.5)
    model_b = write_run(tmp_path / "B", pixel_model(gain=-0.05), make_config("model"),
                        threshold=0.5)
    out, clean = tmp_path / "out", tmp_path / "clean"
    assert seg("--model", model_a, "--images", images, "--out", out) == 0
    assert seg("--model", model_b, "--images", images, "--out", out, "--shard", "1/2",
               "--overwrite") == 0
    capsys.readouterr()
    assert seg("--model", model_b, "--images", images, "--out", out) == 0
    assert "4 images: 2 done, 2 skipped" in capsys.readouterr().out
    assert seg("--model", model_b, "--images", images, "--out", clean) == 0

    def masks(folder: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(folder.glob("*_predseg.png"))}

    assert len(masks(out)) == 4 and masks(out) == masks(clean)
    assert all(np.all(rasters.read_label(out / f"s{k}_predseg.png")[:, 8 + 6 * k:] == 1)
               for k in range(4)), "B marks the dark part"
    capsys.readouterr()
    assert seg("--model", model_b, "--images", images, "--out", out) == 0
    assert "4 images: 0 done, 4 skipped" in capsys.readouterr().out
    assert seg("--model", model_a, "--images", images, "--out", out) == 2
    assert "holds segmentations made with other model weights" in capsys.readouterr().err


def test_every_shard_overwritten_with_another_model_gives_its_folder(tmp_path, capsys):
    """The array-job way to redo a folder with a new model: every shard with --overwrite.
    Then a plain run of the new model skips everything and the masks are its own."""
    images = tmp_path / "images"
    for k in range(3):
        image = np.full((32, 32, 3), 50, np.uint8)
        image[: 4 + 8 * k] = 200
        writers.write_png(images / f"s{k}.png", image)
    model_a = write_run(tmp_path / "A", pixel_model(), make_config("model"), threshold=0.5)
    model_b = write_run(tmp_path / "B", pixel_model(gain=-0.05), make_config("model"),
                        threshold=0.5)
    out = tmp_path / "out"
    assert seg("--model", model_a, "--images", images, "--out", out) == 0
    for shard in ("0/2", "1/2"):
        assert seg("--model", model_b, "--images", images, "--out", out, "--shard", shard,
                   "--overwrite") == 0
    capsys.readouterr()
    assert seg("--model", model_b, "--images", images, "--out", out) == 0
    assert "3 images: 0 done, 3 skipped" in capsys.readouterr().out
    for k in range(3):
        assert np.all(rasters.read_label(out / f"s{k}_predseg.png")[4 + 8 * k:] == 1)
