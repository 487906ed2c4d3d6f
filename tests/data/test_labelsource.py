"""Tests for res_unet.data.labelsource: one label source (label rasters, per-scene polygon layers,
one shared layer) for make_tfrecords, the training-time scene evaluation and
seg_images_in_folder --labels, and polygon labels end to end through the three commands.

Scenes are 64x64 three-band GeoTIFFs in UTM 33N (EPSG:32633), 1 km apart, at 2 m (one at
1 m); the labels are boxes drawn in UTM and stored in longitude/latitude (EPSG:4326), as a
QGIS project in lon/lat keeps them. Band 0 is bright inside the boxes and dark outside, with
one bright stripe no polygon covers, so predictions are good but not perfect. Each scene's
true label is computed here by the pixel-centre rule, independently of res_unet.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pyogrio.raw
import pytest
import rasterio
import shapely
from helpers import make_config, pixel_model, pixel_prob, write_run
from rasterio.transform import from_origin
from rasterio.warp import transform as warp_coords

from res_unet import LabelSource
from res_unet.cli import run_command
from res_unet.config.keys import config_from_dict
from res_unet.data import records
from res_unet.geo import rasters, writers
from res_unet.inference import scoring
from res_unet.training import metrics

UTM = "EPSG:32633"
X0, Y0 = 500_000.0, 6_650_000.0
SIZE = 64
# Scene name -> (x of its left edge, pixel size, boxes (xmin, ymin, xmax, ymax) in metres
# from the scene's top-left corner, y down). "far" is 20 km from every polygon.
SCENES = {
    "a": (X0, 2.0, [(10, 10, 60, 50)]),
    "b": (X0 + 1000, 2.0, [(40, 20, 100, 80), (0, 100, 30, 128)]),
    "c": (X0 + 2000, 2.0, [(64, 64, 128, 128)]),
    "d": (X0 + 3000, 2.0, [(20, 30, 90, 70)]),
    "e": (X0 + 4000, 2.0, [(0, 0, 50, 40), (80, 80, 120, 110)]),
    "fine": (X0 + 5000, 1.0, [(8, 8, 40, 30)]),  # 1 m: another pixel size than the others
    "far": (X0 + 20000, 2.0, []),
}
BRIGHT, DARK = 200, 50


def utm_box(name: str, box: tuple[float, float, float, float]) -> shapely.Polygon:
    x0 = SCENES[name][0]
    xmin, ymin, xmax, ymax = box
    return shapely.box(x0 + xmin, Y0 - ymax, x0 + xmax, Y0 - ymin)


def lon_lat(polygon: shapely.Polygon) -> shapely.Polygon:
    xs, ys = polygon.exterior.xy
    lon, lat = warp_coords(UTM, "EPSG:4326", list(xs), list(ys))
    return shapely.Polygon(zip(lon, lat, strict=True))


def scene_truth(name: str) -> np.ndarray:
    """The scene's label by the pixel-centre rule: 1 where a pixel centre is in a box."""
    _, px, boxes = SCENES[name]
    centres = (np.arange(SIZE) + 0.5) * px
    truth = np.zeros((SIZE, SIZE), np.uint8)
    for xmin, ymin, xmax, ymax in boxes:
        rows = (centres > ymin) & (centres < ymax)
        cols = (centres > xmin) & (centres < xmax)
        truth[np.ix_(rows, cols)] = 1
    return truth


def write_scene(path: Path, name: str) -> np.ndarray:
    """The scene's GeoTIFF; returns its pixels (H, W, 3)."""
    x0, px, _ = SCENES[name]
    rng = np.random.default_rng(len(name) + int(x0) % 97)
    pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    truth = scene_truth(name)
    pixels[..., 0] = np.where(truth == 1, BRIGHT, DARK) + rng.integers(-20, 21, truth.shape)
    pixels[:, 3, 0] = BRIGHT  # a bright stripe no polygon covers: false positives
    with rasterio.open(path, "w", driver="GTiff", height=SIZE, width=SIZE, count=3,
                       dtype="uint8", crs=UTM, transform=from_origin(x0, Y0, px, px)) as ds:
        ds.write(np.moveaxis(pixels, -1, 0))
    return pixels


def write_layer(path: Path, geometries: list, layer: str | None = None, **fields) -> None:
    """A polygon layer in EPSG:4326 (GeoPackage or GeoJSON by suffix)."""
    driver = {".gpkg": "GPKG", ".geojson": "GeoJSON"}[path.suffix]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pyogrio.raw.write(path, shapely.to_wkb(np.array(geometries, dtype=object)),
                          [np.asarray(v) for v in fields.values()], list(fields),
                          layer=layer, driver=driver, geometry_type="Unknown",
                          crs="EPSG:4326", append=path.exists() and layer is not None)


@dataclasses.dataclass
class Survey:
    """The scenes and their labels in each form a user may have them."""

    images: Path  # every scene, "far" included
    layer: Path  # survey.gpkg: layer "lakes" (the labels) and layer "roads" (decoy)
    geojson: Path  # a folder of NAME.geojson, one per labelled scene
    rasters: Path  # a folder of NAME.png: the burnt labels, computed here
    pixels: dict[str, np.ndarray]

    @property
    def labelled(self) -> list[str]:
        return [name for name in SCENES if SCENES[name][2]]


@pytest.fixture(scope="module")
def survey(tmp_path_factory) -> Survey:
    root = tmp_path_factory.mktemp("survey")
    images, geojson, raster = root / "images", root / "geojson", root / "rasters"
    for folder in (images, geojson, raster):
        folder.mkdir()
    pixels, lakes = {}, []
    for name, (_, _, boxes) in SCENES.items():
        pixels[name] = write_scene(images / f"{name}.tif", name)
        polygons = [lon_lat(utm_box(name, box)) for box in boxes]
        lakes += polygons
        if polygons:
            write_layer(geojson / f"{name}.geojson", polygons, kind=np.ones(len(polygons)))
            writers.write_png(raster / f"{name}.png", scene_truth(name))
    layer = root / "survey.gpkg"
    write_layer(layer, lakes, layer="lakes", kind=np.ones(len(lakes), np.int32))
    # A decoy layer over "far": read it by mistake and the scores change.
    write_layer(layer, [lon_lat(utm_box("far", (0, 0, 128, 128)))], layer="roads",
                kind=np.array([1], np.int32))
    return Survey(images, layer, geojson, raster, pixels)


def read_scores(path: Path) -> dict[str, dict[str, str]]:
    with open(path) as fh:
        return {row["image"]: row for row in csv.DictReader(fh)}


def hand_scores(truths: dict[str, np.ndarray], predictions: dict[str, np.ndarray]
                ) -> dict[str, tuple[int, float, float]]:
    """Per scene and ALL: (pixels, foreground IoU, background IoU) computed here."""
    out = {}
    total = np.zeros((2, 2), np.int64)
    for name, truth in truths.items():
        pred = predictions[name]
        cm = np.array([[np.sum((truth == t) & (pred == p)) for p in (0, 1)] for t in (0, 1)])
        total += cm
        out[name] = cm
    out["ALL"] = total

    def ious(cm: np.ndarray) -> tuple[int, float, float]:
        fg = cm[1, 1] / (cm[1, 1] + cm[0, 1] + cm[1, 0])
        bg = cm[0, 0] / (cm[0, 0] + cm[0, 1] + cm[1, 0])
        return int(cm.sum()), float(fg), float(bg)

    return {k: ious(v) for k, v in out.items()}


def assert_scores(scores: dict[str, dict[str, str]], expected: dict) -> None:
    assert set(scores) == set(expected)
    for name, (pixels, fg, bg) in expected.items():
        row = scores[name]
        assert int(row["n_pixels"]) == pixels, name
        assert float(row["iou_1"]) == pytest.approx(fg, abs=1e-6), name
        assert float(row["iou_0"]) == pytest.approx(bg, abs=1e-6), name


# seg_images_in_folder --labels, every kind of source ------------------------------------------

def seg(*args) -> int:
    from res_unet.seg_images_in_folder import main

    return run_command(main, [*map(str, args), "--no-progress"])


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory) -> Path:
    """A binary run whose model is p = sigmoid(0.05 (band0 - 128)), threshold 0.5."""
    return write_run(tmp_path_factory.mktemp("pixel") / "run", pixel_model(),
                     make_config("model"), threshold=0.5)


def pixel_predictions(survey: Survey, names) -> dict[str, np.ndarray]:
    return {n: (pixel_prob(survey.pixels[n])[..., 0] >= 0.5).astype(np.uint8) for n in names}


def test_seg_labels_shared_layer_scores_each_touched_scene_as_its_burnt_raster(
        survey, pixel_run, tmp_path, capsys):
    """--labels survey.gpkg --layer lakes: every scene is segmented; those the layer touches
    are scored exactly as against their burnt rasters (computed here); "far", which no
    polygon touches, is segmented but not scored, with a note, and the run succeeds."""
    out = tmp_path / "out"
    assert seg("--model", pixel_run, "--images", survey.images, "--labels", survey.layer,
               "--layer", "lakes", "--out", out) == 0
    captured = capsys.readouterr()
    assert "no polygon touches 1 image of 7 (far.tif); segmented but not scored" in (
        captured.err)
    assert "7 done, 0 skipped (already done), 0 failed;" in captured.out
    assert (out / "far_predseg.png").is_file()
    names = survey.labelled
    expected = hand_scores({n: scene_truth(n) for n in names},
                           pixel_predictions(survey, names))
    scores = read_scores(out / "scores.csv")
    assert_scores(scores, expected)
    # Sane, and not perfect: the stripe is a false positive in every scene.
    assert 0.5 < float(scores["ALL"]["iou_1"]) < 1.0
    # The same scenes against the label rasters: the same scores, to the last digit.
    raster_out = tmp_path / "raster_out"
    images = tmp_path / "labelled"
    images.mkdir()
    for name in names:
        shutil.copy(survey.images / f"{name}.tif", images)
    assert seg("--model", pixel_run, "--images", images, "--labels", survey.rasters,
               "--out", raster_out) == 0
    assert (raster_out / "scores.csv").read_text() == (out / "scores.csv").read_text()


def test_seg_labels_folder_of_geojson_per_scene(survey, pixel_run, tmp_path, capsys):
    images = tmp_path / "labelled"
    images.mkdir()
    for name in survey.labelled:
        shutil.copy(survey.images / f"{name}.tif", images)
    out = tmp_path / "out"
    assert seg("--model", pixel_run, "--images", images, "--labels", survey.geojson,
               "--out", out) == 0
    names = survey.labelled
    assert_scores(read_scores(out / "scores.csv"), hand_scores(
        {n: scene_truth(n) for n in names}, pixel_predictions(survey, names)))
    assert "not scored" not in capsys.readouterr().err


def test_seg_labels_layer_needs_its_name_and_says_so_in_one_line(survey, pixel_run, tmp_path,
                                                                capsys):
    assert seg("--model", pixel_run, "--images", survey.images, "--labels", survey.layer,
               "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{survey.layer}: holds 2 layers (lakes, roads)" in err and "LABEL_LAYER" in err


def test_label_keys_are_neutral_in_the_segmentation_fingerprint(survey, pixel_run, tmp_path):
    """Scoring with other label settings re-scores the finished masks, never redoes them."""
    out = tmp_path / "out"
    images = tmp_path / "one"
    images.mkdir()
    shutil.copy(survey.images / "a.tif", images)
    assert seg("--model", pixel_run, "--images", images, "--out", out) == 0
    assert seg("--model", pixel_run, "--images", images, "--labels", survey.layer,
               "--layer", "lakes", "--out", out) == 0
    assert float(read_scores(out / "scores.csv")["a"]["iou_1"]) > 0.5


# The label source and the manifest ------------------------------------------------------------

def polygon_config(**overrides):
    values = {**make_config("model").to_dict(), "FIT_MODE": "tile", "DO_AUG": False,
              "DOPLOT": False, "VALIDATION_SPLIT": 0.4, "IMS_PER_SHARD": 8,
              "LABEL_ATTRIBUTE": "kind", "LABEL_LAYER": "lakes", "SEED": 2, **overrides}
    cfg, _ = config_from_dict(values)
    return cfg


@pytest.fixture(scope="module")
def layer_dataset(survey, tmp_path_factory) -> Path:
    """A make_tfrecords dataset of the survey's scenes from the shared layer (32 px tiles)."""
    from res_unet.data.dataset import make_dataset

    out = tmp_path_factory.mktemp("layer_dataset") / "ds"
    make_dataset(polygon_config(), survey.images, survey.layer, out)
    return out


def test_manifest_records_the_shared_layer_and_the_scene_evaluation_reads_it_back(
        survey, layer_dataset):
    manifest = records.read_manifest(layer_dataset)
    assert manifest.left_out == ["far.tif"]
    record = manifest.label_source
    assert record["kind"] == "layer" and record["path"] == str(survey.layer.resolve())
    assert (record["layer"], record["LABEL_ATTRIBUTE"], record["NCLASSES"]) == (
        "lakes", "kind", 1)
    source = LabelSource.of_dataset(manifest)
    assert source.shared_layer and source.polygons.layer == "lakes"
    # A dataset made before the manifest kept its source: the same, from its labels path and
    # building config.
    older = LabelSource.of_dataset(dataclasses.replace(manifest, label_source=None))
    assert older == source
    pairs = source.pairs(manifest.images_dir, untouched=None)
    assert [p.image.name for p in pairs] == sorted(
        manifest.files["train"] + manifest.files["validation"])
    truth, facts = source.truth(pairs[0], (SIZE, SIZE))
    np.testing.assert_array_equal(truth, scene_truth(pairs[0].stem))
    assert facts is not None and facts.used == len(SCENES[pairs[0].stem][2])


def test_scene_evaluation_of_a_dataset_from_a_shared_layer_chooses_the_threshold_on_scenes(
        layer_dataset, survey, tmp_path, capsys):
    """Before, it stopped at "survey.gpkg: is a file, not a folder"; now it segments each
    validation scene and chooses the threshold against its burnt polygons (hand-computed
    here from the same probabilities)."""
    manifest = records.read_manifest(layer_dataset)
    names = [Path(n).stem for n in manifest.files["validation"]]
    assert names
    run = write_run(tmp_path / "run", pixel_model(gain=0.03, centre=110.0),
                    make_config("model", TESTTIMEAUG=False), threshold=0.5)
    result = scoring.evaluate_scenes(run, layer_dataset, progress=False)
    assert "skipped" not in capsys.readouterr().err
    assert result is not None and result["images"] == len(names)
    counts = sum(metrics.threshold_counts(scene_truth(n), pixel_prob(
        survey.pixels[n], 0.03, 110.0)[..., 0]) for n in names)
    best, _ = metrics.threshold_from_counts(counts)
    assert result["optimal_threshold"] == best


def test_scene_evaluation_of_per_scene_geojson_labels(survey, tmp_path, capsys):
    """Before: "no labels (.jpg, .jpeg, .png, .tif, .tiff) in this folder"."""
    from res_unet.data.dataset import make_dataset

    images = tmp_path / "labelled"
    images.mkdir()
    for name in survey.labelled:
        shutil.copy(survey.images / f"{name}.tif", images)
    make_dataset(polygon_config(LABEL_LAYER=None), images, survey.geojson, tmp_path / "ds")
    run = write_run(tmp_path / "run", pixel_model(), make_config("model"), threshold=0.5)
    result = scoring.evaluate_scenes(run, tmp_path / "ds", progress=False)
    assert "skipped" not in capsys.readouterr().err
    names = [Path(n).stem for n in records.read_manifest(tmp_path / "ds").files["validation"]]
    expected = hand_scores({n: scene_truth(n) for n in names},
                           pixel_predictions(survey, names))["ALL"]
    assert result["images"] == len(names)
    assert result["scores"]["n_pixels"] == expected[0]
    assert result["scores"]["iou"][1] == pytest.approx(expected[1], abs=1e-9)


# Polygon labels end to end --------------------------------------------------------------------

@pytest.mark.slow
def test_polygon_labels_end_to_end_through_the_three_commands(survey, tmp_path, capsys):
    """make_tfrecords --labels survey.gpkg --layer lakes, train_resunet (which chooses the
    threshold on whole validation scenes), seg_images_in_folder --labels survey.gpkg: the
    scores equal scoring the written masks against the burnt rasters, here by hand; the
    1 m scene is segmented at the model's 2 m and scored on its own 1 m grid."""
    from res_unet.make_tfrecords import main as make_tfrecords
    from res_unet.train_resunet import main as train_resunet

    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "TARGET_SIZE": [32, 32], "FIT_MODE": "tile", "VALIDATION_SPLIT": 0.4, "SEED": 2,
        "LABEL_ATTRIBUTE": "kind", "MODEL": "resunet", "FILTERS": 4, "DEPTH": 2,
        "BATCH_SIZE": 8, "MAX_EPOCHS": 3, "RAMPUP_EPOCHS": 0, "START_LR": 3e-3,
        "MAX_LR": 3e-3, "DOPLOT": False, "PRECISION": "float32"}))
    data, run, out = tmp_path / "ds", tmp_path / "run", tmp_path / "out"
    assert run_command(make_tfrecords, ["--config", str(config), "--images", str(survey.images),
                                        "--labels", str(survey.layer), "--layer", "lakes",
                                        "--out", str(data)]) == 0
    assert run_command(train_resunet, ["--config", str(config), "--data", str(data), "--out",
                                       str(run), "--no-progress", "--no-export"]) == 0
    assert "scene evaluation skipped" not in capsys.readouterr().err
    validation = records.read_manifest(data).files["validation"]
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert evaluation["scenes"]["images"] == len(validation)
    card = json.loads((run / "model_card.json").read_text())
    assert card["threshold_source"] == "whole validation scenes"
    assert card["threshold"] == evaluation["scenes"]["optimal_threshold"]

    assert seg("--model", run, "--images", survey.images, "--labels", survey.layer,
               "--layer", "lakes", "--out", out) == 0
    printed = capsys.readouterr().err
    assert "far.tif); segmented but not scored" in printed
    names = survey.labelled
    predictions = {n: rasters.read_label(out / f"{n}_predseg.png") for n in names}
    assert all(p.shape == (SIZE, SIZE) and set(np.unique(p)) <= {0, 1}
               for p in predictions.values())
    scores = read_scores(out / "scores.csv")
    assert_scores(scores, hand_scores({n: scene_truth(n) for n in names}, predictions))
    for row in scores.values():
        assert 0.0 <= float(row["pixel_accuracy"]) <= 1.0
    assert "fine" in scores and int(scores["fine"]["n_pixels"]) == SIZE * SIZE


def test_scene_evaluation_reads_the_datasets_extra_bands(tmp_path, capsys):
    """The run's config drops EXTRA_BAND_DIRS (they describe its training images); the scene
    evaluation reads the dataset's own, so a 3 + 1 band dataset is scored, not refused."""
    import keras

    from res_unet.data.dataset import make_dataset

    images, labels, nir = tmp_path / "images", tmp_path / "labels", tmp_path / "nir"
    rng = np.random.default_rng(3)
    for k in range(4):
        image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        writers.write_png(images / f"s{k}.png", image)
        band = rng.integers(0, 256, (32, 32), dtype=np.uint8)
        writers.write_png(nir / f"s{k}.png", band)
        writers.write_png(labels / f"s{k}.png", (band > 128).astype(np.uint8))
    cfg = make_config("model", N_DATA_BANDS=4, EXTRA_BAND_DIRS=[str(nir)], FIT_MODE="tile",
                      DO_AUG=False, DOPLOT=False, VALIDATION_SPLIT=0.5, IMS_PER_SHARD=8)
    make_dataset(cfg, images, labels, tmp_path / "ds")
    # p = sigmoid(0.05 (nir - 128)): the extra band decides.
    inputs = keras.Input((32, 32, 4))
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid", kernel_initializer=(
        keras.initializers.Constant(np.array([0, 0, 0, 0.05], np.float32).reshape(1, 1, 4, 1))),
        bias_initializer=keras.initializers.Constant(-0.05 * 128))(inputs)
    run = write_run(tmp_path / "run", keras.Model(inputs, outputs), cfg, threshold=0.5)
    card = json.loads((run / "model_card.json").read_text())
    card["input"].update(band_mean=[120.0] * 4, band_std=[50.0] * 4)
    (run / "model_card.json").write_text(json.dumps(card))
    result = scoring.evaluate_scenes(run, tmp_path / "ds", progress=False)
    assert "skipped" not in capsys.readouterr().err
    assert result is not None and result["images"] == 2
    assert result["scores"]["iou"][1] > 0.95


def test_a_new_kind_of_label_source_is_one_registration(tmp_path, monkeypatch):
    """A kind registered in LABEL_KINDS reads --labels paths it takes, for pairs, scenes and
    the manifest's record, with nothing else changed; other paths keep their kinds."""
    from helpers import make_folders

    from res_unet.data import labelsource

    images, labels = make_folders(tmp_path, ["a.png", "b.png", "c.png"],
                                  ["a.png", "b.png", "c.png"])
    asked = []

    def every_other(source, images_dir, extra_band_dirs, untouched):
        asked.append(Path(images_dir))
        found = LabelSource.from_config(labels, source.cfg).pairs(images_dir)
        return found[::2]

    kind = labelsource.LabelKind("every other", lambda path: path.name == "every_other",
                                 every_other, all_scenes=True)
    monkeypatch.setattr(labelsource, "LABEL_KINDS", (kind, *labelsource.LABEL_KINDS))
    assert LabelSource.from_config(labels, make_config("dataset")).kind.name == "folder"
    source = LabelSource.from_config(tmp_path / "every_other", make_config("dataset"))
    assert source.kind is kind and not source.shared_layer
    assert [p.stem for p in source.pairs(images)] == ["a", "c"]
    # all_scenes: every scene is segmented, the unlabelled ones without a label
    assert [(p.stem, p.label is not None) for p in source.scenes(images)] == [
        ("a", True), ("b", False), ("c", True)]
    assert source.record()["kind"] == "every other" and source.record()["layer"] is None
    assert asked == [images, images]
