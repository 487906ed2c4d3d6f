"""Tests for res_unet.inference.predict: tiling, blending, TTA,
ensembles, strips, thresholds, nodata."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import BAND_MEAN, BAND_STD, TILE, make_config, pixel_model, pixel_prob, write_run

from res_unet import LabelSource, LoadedModel, load_run
from res_unet.config.keys import save_config
from res_unet.core import atomic
from res_unet.core.errors import UserError
from res_unet.data import pairing, report
from res_unet.geo import palette, rasters, tiling, writers
from res_unet.geo.tiling import blend_window, tile_grid
from res_unet.inference import postprocess, predict, scoring, segment
from res_unet.inference.settings import inference_config
from res_unet.models import build_model
from res_unet.seg_images_in_folder import parse_shard

# Fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resunet_binary() -> LoadedModel:
    keras.utils.set_random_seed(1)
    return LoadedModel.from_model(build_model(make_config("model"), BAND_MEAN, BAND_STD))


@pytest.fixture(scope="module")
def resunet_multi() -> LoadedModel:
    keras.utils.set_random_seed(2)
    cfg = make_config("model", NCLASSES=3)
    return LoadedModel.from_model(build_model(cfg, BAND_MEAN, BAND_STD))


@pytest.fixture(scope="module")
def per_pixel() -> LoadedModel:
    return LoadedModel.from_model(pixel_model(), threshold=0.3)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (150, 70, 3), dtype=np.uint8)


def constant_model(value_logit: float) -> LoadedModel:
    inputs = keras.Input((TILE, TILE, 3))
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid", kernel_initializer="zeros",
                                  bias_initializer=keras.initializers.Constant(value_logit))(
        inputs)
    return LoadedModel.from_model(keras.Model(inputs, outputs))


# Tiling and blending -------------------------------------------------------------------------

def blended(models, image, overlap=0.25, window="hann", batch_size=8, tta=False, rot90=False):
    """(H, W, C) probabilities of a whole image in TILE x TILE tiles, blended: the sliding
    window the Segmenter runs in tile mode."""
    return predict.sliding_window(models, (TILE, TILE), overlap, window, batch_size, tta,
                                  rot90).blend(image)


@pytest.mark.parametrize("shape", [(150, 70), (32, 32), (20, 90), (33, 65)])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_tiles_cover_every_pixel(shape, overlap):
    blender = tiling.TileBlender(shape, 1, blend_window((TILE, TILE)), streaming=True)
    rows = []
    for r, c in tile_grid(shape, (TILE, TILE), overlap):
        if r > blender.start:
            rows.append(blender.pop_rows(r))
        blender.add(np.ones((TILE, TILE, 1), np.float32), r, c)
    rows.append(blender.pop_rows(shape[0]))  # raises if a pixel was not covered
    assert np.concatenate(rows).shape == (*shape, 1)


def test_blending_constant_tiles_gives_constant_map(image):
    model = constant_model(0.7)
    expected = 1 / (1 + np.exp(-0.7))
    for window in ("hann", "spline", "flat"):
        prob = blended([model], image, 0.25, window, batch_size=5)
        assert prob.shape == (150, 70, 1)
        np.testing.assert_allclose(prob, expected, rtol=1e-6)


def test_tiled_equals_per_pixel_function(per_pixel, image):
    prob = blended([per_pixel], image, 0.5, "hann", batch_size=7)
    np.testing.assert_allclose(prob, pixel_prob(image), atol=1e-6)


def test_tiled_and_resize_agree_at_target_size(resunet_binary):
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (TILE, TILE, 3), dtype=np.uint8)
    tiled = blended([resunet_binary], img)
    resized = predict.sliding_window([resunet_binary]).resized(img)
    np.testing.assert_allclose(tiled, resized, atol=1e-6)
    seg = predict.Segmenter([resunet_binary], make_config("model"))
    assert seg.mode_for((TILE, TILE)) == "resize"
    assert seg.mode_for((TILE + 1, TILE)) == "tile"


# Test-time augmentation and ensembles --------------------------------------------------------

def test_tta_of_equivariant_model_is_a_no_op(per_pixel, image):
    plain = blended([per_pixel], image)
    for rot90 in (False, True):
        tta = blended([per_pixel], image, tta=True, rot90=rot90)
        np.testing.assert_allclose(tta, plain, atol=1e-6)


def test_tta_averages_spatial_flips(resunet_multi):
    rng = np.random.default_rng(4)
    batch = rng.integers(0, 256, (2, TILE, TILE, 3)).astype(np.float32)
    model = resunet_multi.model
    expected = np.mean([
        model.predict(batch, verbose=0),
        np.flip(model.predict(np.flip(batch, 2), verbose=0), 2),
        np.flip(model.predict(np.flip(batch, 1), verbose=0), 1),
        np.flip(model.predict(np.flip(batch, (1, 2)), verbose=0), (1, 2)),
    ], axis=0)
    got = predict.predict_batch([resunet_multi], batch, tta=True)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)  # averaged, not summed
    assert len(predict.tta_transforms(True, True)) == 8
    assert len(set(predict.tta_transforms(True, True))) == 8


def test_ensemble_of_identical_models_equals_one(resunet_multi, image):
    one = blended([resunet_multi], image)
    two = blended([resunet_multi, resunet_multi], image)
    np.testing.assert_allclose(two, one, atol=1e-6)


def test_ensemble_averages_members():
    a, b = constant_model(1.0), constant_model(-2.0)
    img = np.zeros((40, 40, 3), np.uint8)
    prob = blended([a, b], img)
    expected = (1 / (1 + np.exp(-1.0)) + 1 / (1 + np.exp(2.0))) / 2
    np.testing.assert_allclose(prob, expected, rtol=1e-6)


def test_ensemble_members_must_agree(resunet_binary, resunet_multi):
    with pytest.raises(UserError, match="same classes"):
        predict.Segmenter([resunet_binary, resunet_multi], make_config("model"))


# Memory-bounded strips -----------------------------------------------------------------------

@pytest.mark.parametrize("fixture", ["resunet_binary", "resunet_multi"])
def test_strips_equal_whole_image(fixture, image, request):
    model = request.getfixturevalue(fixture)
    whole = blended([model], image, batch_size=4)
    strips = list(predict.sliding_window([model], (TILE, TILE), 0.25, batch_size=4
                                         ).blend_strips(image))
    assert len(strips) >= 5
    assert [r for r, _ in strips] == list(np.cumsum([0] + [len(p) for _, p in strips])[:-1])
    stacked = np.concatenate([p for _, p in strips])
    assert stacked.shape == whole.shape
    np.testing.assert_allclose(stacked, whole, atol=1e-5)


def test_strip_labels_equal_full_labels(resunet_binary, image):
    cfg = make_config("model", THRESHOLD=0.5, MEDIAN_FILTER_VALUE=2, MIN_OBJECT_AREA=20,
                      MIN_HOLE_AREA=10, OPENING_RADIUS=1)
    full = predict.Segmenter([resunet_binary], cfg)
    strips = predict.Segmenter([resunet_binary], cfg, full_max_values=0)
    assert not full.uses_strips(image.shape[:2]) and strips.uses_strips(image.shape[:2])
    expected = postprocess.postprocess(full.probabilities(image), image, cfg)
    np.testing.assert_array_equal(full.segment(image), expected)
    np.testing.assert_array_equal(strips.segment(image), expected)


def test_strip_otsu_close_to_full_otsu(per_pixel):
    rng = np.random.default_rng(5)
    img = np.clip(rng.normal(128, 40, (120, 90, 3)), 0, 255).astype(np.uint8)
    cfg = make_config("model", THRESHOLD="otsu")
    full = predict.Segmenter([per_pixel], cfg).segment(img)
    strips = predict.Segmenter([per_pixel], cfg, full_max_values=0).segment(img)
    # Otsu's threshold is only defined to a histogram bin; one grey level here is ~1 %.
    assert np.mean(full == strips) > 0.97


def test_otsu_from_histogram_matches_otsu_threshold():
    rng = np.random.default_rng(7)
    prob = np.concatenate([rng.beta(2, 8, 5000), rng.beta(9, 3, 3000)]).reshape(100, 80, 1)
    counts = np.bincount(np.rint(prob.ravel() * 65535).astype(np.int64), minlength=65536)
    expected = postprocess.otsu_threshold(prob.astype(np.float32))
    assert abs(postprocess.otsu_from_histogram(counts) - expected) < 1 / 256
    assert postprocess.otsu_from_histogram(np.bincount([7], minlength=65536)) == 0.5


# Thresholds and nodata -----------------------------------------------------------------------

def test_card_threshold_used_unless_overridden(per_pixel):
    img = np.zeros((TILE, TILE, 3), np.uint8)
    img[..., 0] = np.arange(TILE * TILE).reshape(TILE, TILE) % 256
    prob = pixel_prob(img)[..., 0]
    card = predict.Segmenter([per_pixel], make_config("model"))
    assert card.threshold_setting == 0.3
    np.testing.assert_array_equal(card.segment(img), prob >= 0.3)
    override = predict.Segmenter([per_pixel], make_config("model", THRESHOLD=0.7))
    assert override.threshold_setting == 0.7
    np.testing.assert_array_equal(override.segment(img), prob >= 0.7)
    assert (prob >= 0.3).sum() > (prob >= 0.7).sum()


def test_nodata_pixels_are_255(per_pixel):
    img = np.full((50, 40, 3), 200, np.uint8)
    img[:10, :] = 0
    img[20, 5] = (7, 7, 7)
    seg = predict.Segmenter([per_pixel], make_config("model"))
    label = seg.segment(img, nodata=[0.0, 7.0])
    assert np.all(label[:10] == 255) and label[20, 5] == 255
    assert np.all(label[10:20] == 1)
    strips = predict.Segmenter([per_pixel], make_config("model"), full_max_values=0)
    np.testing.assert_array_equal(strips.segment(img, nodata=[0.0, 7.0]), label)
    meta = rasters.RasterMeta(path=Path("x.tif"), nodata=7.0)
    assert predict.nodata_values(meta, nodata_zero=True) == [7.0, 0.0]


def test_otsu_ignores_nodata(per_pixel):
    # 70 % nodata (p 0.002), 15 % dark (p 0.65), 15 % bright (p 0.97): with the nodata
    # counted, Otsu separates nodata from the rest and calls the dark pixels foreground.
    img = np.zeros((40, 40, 3), np.uint8)
    img[28:34], img[34:] = 140, 200
    cfg = make_config("model", THRESHOLD="otsu")
    assert np.all(predict.Segmenter([per_pixel], cfg).segment(img)[28:34] == 1)
    for limit in (predict.FULL_MAX_VALUES, 0):
        label = predict.Segmenter([per_pixel], cfg, full_max_values=limit).segment(img, [0.0])
        assert np.all(label[:28] == 255)
        assert np.all(label[28:34] == 0) and np.all(label[34:] == 1)


def test_overlay_colours_foreground_only():
    img = np.full((8, 8, 3), 100, np.uint8)
    label = np.zeros((8, 8), np.uint8)
    label[2:6, 2:6] = 1
    label[0, 0] = 255
    out = report.overlay_image(img, label, 2)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    assert tuple(out[0, 7]) == (100, 100, 100) and tuple(out[0, 0]) == (100, 100, 100)
    assert tuple(out[2, 2]) == palette.BINARY_COLOUR  # outline
    assert tuple(out[3, 3]) == (162, 60, 162)  # 0.6 * 100 + 0.4 * colour
    small = report.overlay_image(np.zeros((100, 100, 3), np.uint8),
                                  np.zeros((100, 100), np.uint8), 2, max_pixels=2500)
    assert small.shape == (50, 50, 3)


# Run folders and settings --------------------------------------------------------------------

def test_load_run_and_rebuild(tmp_path):
    keras.utils.set_random_seed(6)
    cfg = make_config("model")
    model = build_model(cfg, BAND_MEAN, BAND_STD)
    run = write_run(tmp_path / "run", model, cfg, threshold=0.42)
    loaded = load_run(run)
    assert loaded.tile_hw == (TILE, TILE) and loaded.threshold == 0.42
    assert loaded.weights == run / "model.keras"
    rebuilt = load_run(run, (64, 64))
    assert rebuilt.model.input_shape[1:3] == (64, 64)
    assert rebuilt.weights == run / "best.weights.h5"
    for a, b in zip(model.get_weights(), rebuilt.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(UserError, match="divisible by 4"):
        load_run(run, (30, 30))


def test_not_a_run_folder(tmp_path):
    with pytest.raises(UserError, match="not a run folder"):
        load_run(tmp_path)
    with pytest.raises(UserError, match="run folder not found"):
        load_run(tmp_path / "missing")


def test_inference_config_layers(tmp_path):
    cfg = make_config("model", EXTRA_BAND_DIRS=["train_bands"], MEDIAN_FILTER_VALUE=3)
    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg, run / "config.json")
    (run / "model_card.json").write_text("{}")
    (run / "best.weights.h5").write_bytes(b"")
    user = tmp_path / "seg.json"
    user.write_text(json.dumps({"TESTTIMEAUG": True, "MAX_EPOCHS": 3, "OTSU_THRESHOLD": True}))
    out = inference_config([run], str(user), {"TILE_OVERLAP": 0.5})
    assert out.TESTTIMEAUG and out.THRESHOLD == "otsu" and out.TILE_OVERLAP == 0.5
    assert out.MAX_EPOCHS == cfg.MAX_EPOCHS and out.MEDIAN_FILTER_VALUE == 3
    assert out.EXTRA_BAND_DIRS == []
    with pytest.raises(UserError, match="TILE_OVERLAP"):
        inference_config([run], None, {"TILE_OVERLAP": 0.9})


def test_parse_shard():
    assert parse_shard(None) == (0, 1)
    assert parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(UserError, match="shard"):
            parse_shard(bad)


def test_segment_folder_strip_path_saves_probabilities(tmp_path, resunet_binary, image):
    from res_unet.geo import rasters

    images = tmp_path / "images"
    writers.write_png(images / "scene.png", image)
    cfg = make_config("model", THRESHOLD=0.5)
    summary = segment.segment_folder(cfg, [resunet_binary], images, tmp_path / "out",
                                     save_probs=True, progress=False, full_max_values=0)
    assert summary["done"] == 1 and summary["failed"] == 0
    probs = np.load(tmp_path / "out" / "scene_probs.npy")
    assert probs.dtype == np.float16 and probs.shape == (150, 70, 1)
    whole = blended([resunet_binary], image, cfg.TILE_OVERLAP, batch_size=cfg.BATCH_SIZE)
    np.testing.assert_allclose(probs.astype(np.float32), whole, atol=1e-3)
    label = rasters.read_label(tmp_path / "out" / "scene_predseg.png")
    np.testing.assert_array_equal(label, (whole[..., 0] >= 0.5).astype(np.uint8))
    # no hidden file but the record of the finished image (.NAME.segmented)
    assert [p.name for p in (tmp_path / "out").iterdir()
            if p.name.startswith(".")] == [".scene.segmented"]


# Working scale (DOWNSAMPLE) ------------------------------------------------------------------

def test_downsample_segmenter_predicts_at_scale_and_interpolates_back(per_pixel):
    """A DOWNSAMPLE=2 model sees the block-mean image; its probabilities come back to the
    full grid by bilinear interpolation, whole or strip by strip."""
    rng = np.random.default_rng(11)
    img = rng.integers(0, 256, (90, 70, 3), dtype=np.uint8)
    model = dataclasses.replace(per_pixel, downsample=2)
    seg = predict.Segmenter([model], make_config("model", THRESHOLD=0.5))
    small = tiling.downsample_image(img, 2)
    expected = tiling.upsample_rows(pixel_prob(small), 2, img.shape[:2])
    prob = seg.probabilities(img)
    assert prob.shape == (90, 70, 1)
    np.testing.assert_allclose(prob, expected, atol=1e-5)
    strips = predict.Segmenter([model], make_config("model", THRESHOLD=0.5), full_max_values=0)
    assert strips.uses_strips(img.shape[:2])
    np.testing.assert_array_equal(strips.segment(img), seg.segment(img))
    np.testing.assert_array_equal(seg.segment(img), expected[..., 0] >= 0.5)


@pytest.mark.parametrize("factor", [2, 3])
@pytest.mark.parametrize("out_h", [1, 7, 64, 95])
def test_upsample_strips_equal_the_whole_map(factor, out_h):
    """Small-scale strips of any sizes, up-sampled as they come, give exactly the
    up-sampling of the whole small map."""
    rng = np.random.default_rng(out_h)
    small_h = -(-out_h // factor)
    small = rng.random((small_h, 9, 2), dtype=np.float32)
    whole = tiling.upsample_rows(small, factor, (out_h, 9 * factor - 1))
    cuts = sorted(set(rng.integers(1, max(small_h, 2), 3).tolist()) | {0, small_h})
    strips = [(a, small[a:b]) for a, b in itertools.pairwise(cuts) if b > a]
    pieces = list(tiling.upsample_strips(strips, factor, small_h, (out_h, 9 * factor - 1)))
    assert [r0 for r0, _ in pieces] == sorted(r0 for r0, _ in pieces)
    np.testing.assert_array_equal(np.concatenate([p for _, p in pieces]), whole)


class CountingRows(tiling.ArrayRows):
    """An in-memory image that records the bands of rows asked of it."""

    def __init__(self, image: np.ndarray) -> None:
        super().__init__(image)
        self.asked: list[tuple[int, int]] = []

    def rows(self, r0: int, r1: int) -> np.ndarray:
        self.asked.append((r0, r1))
        return super().rows(r0, r1).copy()


@pytest.mark.parametrize("downsample", [1, 2])
def test_segmenting_a_row_source_reads_bands_and_equals_the_whole_image(resunet_binary,
                                                                        downsample):
    """A scene read a band of rows at a time (as a GeoTIFF in windows) gives the same label
    map as the image in memory, and no band asked for is taller than a tile (times the
    working scale) or the nodata blocks."""
    rng = np.random.default_rng(21)
    img = rng.integers(0, 256, (600, 90, 3), dtype=np.uint8)
    img[:5] = 0
    model = dataclasses.replace(resunet_binary, downsample=downsample)
    cfg = make_config("model", THRESHOLD=0.5)
    whole = predict.Segmenter([model], cfg).segment(img, nodata=[0.0])
    source = CountingRows(img)
    streamed = predict.Segmenter([model], cfg, full_max_values=0).segment(source, [0.0])
    np.testing.assert_array_equal(streamed, whole)
    # Bands of one tile (times the working scale), an up-sampled strip of about that, or a
    # block of the nodata pass: never the whole image.
    tallest = max(r1 - r0 for r0, r1 in source.asked)
    assert tallest <= max(2 * TILE * downsample, predict.ROW_BLOCK) < len(img)


def test_ensemble_members_must_share_the_working_scale(per_pixel):
    coarse = dataclasses.replace(per_pixel, downsample=2)
    with pytest.raises(UserError, match="DOWNSAMPLE"):
        predict.Segmenter([per_pixel, coarse], make_config("model"))


# Whole validation scenes ---------------------------------------------------------------------

def test_evaluate_scenes_chooses_the_threshold_on_whole_scenes(tiny_dataset, tmp_path):
    """The scene evaluation segments every validation image of the dataset as
    seg_images_in_folder would, and its optimum is the best IoU over the swept thresholds
    computed by hand from the same probabilities. Scoring writes nothing; once the run
    writer records it, the card carries that threshold."""
    from res_unet.data import records
    from res_unet.training import metrics, runwriter
    from res_unet.training.runfolder import ModelCard

    cfg = make_config("model", TARGET_SIZE=[64, 64], TESTTIMEAUG=True)
    run = write_run(tmp_path / "run", pixel_model(gain=0.03, centre=110.0, size=64), cfg,
                    threshold=0.5)
    manifest = records.read_manifest(tiny_dataset)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    result = scoring.evaluate_scenes(run, tiny_dataset, progress=False)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert result is not None and result["images"] == len(manifest.files["validation"])
    assert result["tta"] is True
    labels = LabelSource.of_dataset(manifest)
    pairs = [p for p in labels.pairs(manifest.images_dir)
             if p.image.name in manifest.files["validation"]]
    counts = 0
    for pair in pairs:
        image, _ = pairing.load_image(pair, cfg.N_DATA_BANDS)
        truth, _ = labels.truth(pair, image.shape[:2])
        counts = counts + metrics.threshold_counts(truth, pixel_prob(image, 0.03, 110.0)[..., 0])
    best, ious = metrics.threshold_from_counts(counts)
    assert result["optimal_threshold"] == best
    assert result["scores_at_optimal_threshold"]["iou"][1] == pytest.approx(np.nanmax(ious))
    runwriter.add_scene_evaluation(run, ModelCard.read(run), {"scores": {}}, result)
    card = json.loads((run / "model_card.json").read_text())
    assert card["threshold"] == best and card["threshold_source"] == "whole validation scenes"
    assert card["validation"]["scenes"]["images"] == len(pairs)
    assert json.loads((run / "evaluation.json").read_text())["scenes"]["optimal_threshold"] == best
    assert load_run(run).threshold == best


def test_evaluate_scenes_skips_when_the_images_moved(tiny_dataset, tmp_path, capsys):
    import shutil

    data = tmp_path / "dataset"
    shutil.copytree(tiny_dataset, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["images_dir"] = str(tmp_path / "gone")
    (data / "manifest.json").write_text(json.dumps(manifest))
    cfg = make_config("model", TARGET_SIZE=[64, 64])
    run = write_run(tmp_path / "run", pixel_model(size=64), cfg, threshold=0.4)
    assert scoring.evaluate_scenes(run, data, progress=False) is None
    assert "scene evaluation skipped" in capsys.readouterr().err
    assert json.loads((run / "model_card.json").read_text())["threshold"] == 0.4


def test_truncated_model_files_are_reported_as_damaged(tmp_path):
    keras.utils.set_random_seed(6)
    cfg = make_config("model")
    run = write_run(tmp_path / "run", build_model(cfg, BAND_MEAN, BAND_STD), cfg)
    full = run / "model.keras"
    full.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(UserError, match=r"model\.keras: the file is damaged or truncated"):
        load_run(run)
    weights = run / "best.weights.h5"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError, match=r"best\.weights\.h5: the file is damaged or truncated"):
        load_run(run, (64, 64))


# Runtimes ------------------------------------------------------------------------------------

def test_openvino_runtime_gives_the_tensorflow_masks(resunet_binary, image):
    """INFER_RUNTIME 'openvino' runs the same model: probabilities equal TensorFlow's to
    float rounding, so the masks are the same."""
    pytest.importorskip("openvino")
    cfg = make_config("model", THRESHOLD=0.5, INFER_RUNTIME="tensorflow")
    tf_probs = predict.Segmenter([resunet_binary], cfg).probabilities(image)
    ov_model = dataclasses.replace(resunet_binary, _fn=None)
    ov_segmenter = predict.Segmenter([ov_model], make_config("model", THRESHOLD=0.5,
                                                             INFER_RUNTIME="openvino"))
    assert ov_model.runtime == "openvino"
    np.testing.assert_allclose(ov_segmenter.probabilities(image), tf_probs, atol=1e-4)
    assert resunet_binary.runtime == "tensorflow", "the TensorFlow model was left as it was"


def test_auto_runtime_keeps_openvino_only_where_it_matches_tensorflow(resunet_binary, image,
                                                                     monkeypatch):
    """INFER_RUNTIME 'auto' (the default) runs OpenVINO when it is installed and gives
    TensorFlow's probabilities on a test tile, and says so; a conversion that gives other
    probabilities, or no OpenVINO, leaves TensorFlow running the model, with the reason."""
    pytest.importorskip("openvino")
    from res_unet.inference import openvino as ov_runtime

    assert make_config("model").INFER_RUNTIME == "auto"
    tf_probs = predict.Segmenter([resunet_binary], make_config(
        "model", THRESHOLD=0.5, INFER_RUNTIME="tensorflow")).probabilities(image)
    auto = dataclasses.replace(resunet_binary, _fn=None)
    segmenter = predict.Segmenter([auto], make_config("model", THRESHOLD=0.5))
    assert re.fullmatch(r"openvino \(auto: same probabilities as TensorFlow to \d\.?\d*e-\d+\)",
                        auto.prepare())
    np.testing.assert_allclose(segmenter.probabilities(image), tf_probs, atol=1e-4)

    runner = ov_runtime.openvino_runner

    def off_by_a_tenth(converted, options=None):
        run = runner(converted, options)
        return lambda batch: run(batch) + 0.1

    monkeypatch.setattr(ov_runtime, "openvino_runner", off_by_a_tenth)
    faulty = dataclasses.replace(resunet_binary, _fn=None)
    segmenter = predict.Segmenter([faulty], make_config("model", THRESHOLD=0.5))
    assert faulty.prepare() == ("tensorflow (auto: OpenVINO's probabilities differed from "
                                "TensorFlow's by 0.1 on a test tile)")
    np.testing.assert_array_equal(segmenter.probabilities(image), tf_probs)

    monkeypatch.setattr(ov_runtime.importlib.util, "find_spec", lambda name: None)
    missing = dataclasses.replace(resunet_binary, _fn=None)
    predict.Segmenter([missing], make_config("model"))
    assert missing.prepare() == "tensorflow (auto: OpenVINO is not installed)"
    assert resunet_binary.runtime == "tensorflow"


def _record_compile_configs(ov, monkeypatch) -> list[dict]:
    """The config of every OpenVINO compile_model call from now on (the calls still run)."""
    asked: list[dict] = []
    compile_model = ov.Core.compile_model

    def recording(self, model, device, config=None):
        asked.append(dict(config or {}))
        return compile_model(self, model, device, config or {})

    monkeypatch.setattr(ov.Core, "compile_model", recording)
    return asked


def test_openvino_compiles_in_float32_on_every_cpu(resunet_binary, monkeypatch, image):
    """OpenVINO defaults to bfloat16 on CPUs with native bf16 (AVX512_BF16, AMX), which flips
    pixels at the threshold; the model is compiled with float32 asked for explicitly, so an
    AVX2-only machine checks what a bf16 machine would run."""
    ov = pytest.importorskip("openvino")
    asked = _record_compile_configs(ov, monkeypatch)
    ov_model = dataclasses.replace(resunet_binary, _fn=None)
    predict.Segmenter([ov_model], make_config("model", THRESHOLD=0.5,
                                              INFER_RUNTIME="openvino")).probabilities(image)
    assert asked and all(str(c.get("INFERENCE_PRECISION_HINT")).lower() == "f32" for c in asked)


def test_openvino_bf16_runtime_asks_for_bfloat16(resunet_binary, monkeypatch, image):
    """INFER_RUNTIME 'openvino_bf16' compiles with the bf16 hint (bfloat16 where the CPU has
    bf16 units, float32 elsewhere) and still gives the model's probabilities, to bf16
    rounding."""
    ov = pytest.importorskip("openvino")
    asked = _record_compile_configs(ov, monkeypatch)
    cfg = make_config("model", THRESHOLD=0.5, INFER_RUNTIME="tensorflow")
    tf_probs = predict.Segmenter([resunet_binary], cfg).probabilities(image)
    ov_model = dataclasses.replace(resunet_binary, _fn=None)
    probs = predict.Segmenter([ov_model], make_config(
        "model", THRESHOLD=0.5, INFER_RUNTIME="openvino_bf16")).probabilities(image)
    assert ov_model.runtime == "openvino_bf16"
    assert asked and all(str(c["INFERENCE_PRECISION_HINT"]).lower() == "bf16" for c in asked)
    assert probs.shape == tf_probs.shape and np.abs(probs - tf_probs).max() < 0.05


def test_openvino_runner_options_and_returned_buffers(resunet_multi):
    """The one OpenVINO runner (used by LoadedModel and bench_runtime) compiles float32 unless
    told otherwise, takes extra CPU properties, reports what it compiled, gives TensorFlow's
    probabilities, and returns arrays that the next call does not overwrite."""
    ov = pytest.importorskip("openvino")
    from res_unet.inference.openvino import openvino_runner

    info: dict = {}
    run = openvino_runner(ov.convert_model(resunet_multi.model),
                          {"INFERENCE_NUM_THREADS": 1}, info)
    assert info == {"compiled_precision": "f32", "threads": 1, "requests": 1}
    rng = np.random.default_rng(3)
    first_batch = rng.uniform(0, 255, (2, *resunet_multi.tile_hw, 3)).astype(np.float32)
    second_batch = rng.uniform(0, 255, (2, *resunet_multi.tile_hw, 3)).astype(np.float32)
    first = run(first_batch)
    kept = first.copy()
    second = run(second_batch)
    np.testing.assert_array_equal(first, kept)
    assert first.dtype == np.float32 and first.shape == (2, *resunet_multi.tile_hw, 3)
    np.testing.assert_allclose(second, resunet_multi(second_batch), atol=1e-4)


@pytest.mark.slow
def test_openvino_conversion_is_cached_by_weights_content(tmp_path, monkeypatch, image):
    """The first OpenVINO run converts and keeps the result; later runs of the same weights
    read it (no conversion), a damaged entry is converted again, other weights get their own
    entry, and an unwritable cache only costs time."""
    ov = pytest.importorskip("openvino")
    monkeypatch.setenv("RES_UNET_CACHE_DIR", str(tmp_path / "cache"))
    keras.utils.set_random_seed(7)
    cfg = make_config("model", THRESHOLD=0.5, INFER_RUNTIME="openvino")
    run = write_run(tmp_path / "run", build_model(cfg, BAND_MEAN, BAND_STD), cfg)
    entries = tmp_path / "cache" / "openvino"
    stale = entries / ".0123.99999999@nohost-abc"
    stale.mkdir(parents=True)
    dead = entries / f".0123.{2**22 + 12345}@{atomic._host()}-abc"  # beyond any pid
    dead.mkdir()
    conversions = []
    real_convert = ov.convert_model
    monkeypatch.setattr(ov, "convert_model", lambda m: conversions.append(1) or real_convert(m))

    def probabilities() -> np.ndarray:
        return predict.Segmenter([load_run(run)], cfg).probabilities(image)

    first = probabilities()
    assert len(conversions) == 1
    [entry] = [p for p in entries.iterdir() if not p.name.startswith(".")]
    assert {p.name for p in entry.iterdir()} == {"model.xml", "model.bin", "sha256.json"}
    assert stale.exists(), "another host's temporaries are left alone"
    assert [p.name for p in entries.iterdir() if p.name.startswith(".")] == [stale.name]
    np.testing.assert_array_equal(probabilities(), first)  # float32 kept, not float16
    assert len(conversions) == 1
    (entry / "model.xml").write_text("<net broken")
    np.testing.assert_array_equal(probabilities(), first)
    assert len(conversions) == 2 and (entry / "model.xml").read_text().startswith("<?xml")
    (run / "model.keras").unlink()  # other weights file: its own entry
    probabilities()
    assert len(conversions) == 3 and len([p for p in entries.iterdir()
                                          if not p.name.startswith(".")]) == 2
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("RES_UNET_CACHE_DIR", str(tmp_path / "file"))
    probabilities()
    assert len(conversions) == 4


def test_openvino_runtime_without_the_package_is_one_line(resunet_binary, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "openvino" else real(name, *a))
    model = dataclasses.replace(resunet_binary, _fn=None)
    with pytest.raises(UserError, match=r"pip install 'res_unet\[openvino\]'"):
        predict.Segmenter([model], make_config("model", INFER_RUNTIME="openvino"))
    predict.Segmenter([model], make_config("model", INFER_RUNTIME="auto"))
    assert model.runtime == "tensorflow", "'auto' falls back to TensorFlow"


# TTA views: one model call per batch, the card's views --------------------------------------

def _counting(model: LoadedModel) -> tuple[LoadedModel, list[int]]:
    """A copy of ``model`` that records the batch size of every call."""
    counted = dataclasses.replace(model, runtime="tensorflow", auto=False, _fn=None)
    counted.prepare()
    inner, calls = counted._fn, []
    counted._fn = lambda batch: (calls.append(len(batch)), inner(batch))[1]
    return counted, calls


def test_tta_averages_exactly_the_views_asked_for(resunet_multi):
    """predict_batch averages the named views only (one model call each), mapping each
    prediction back before the mean; the mean is the per-view computation's to 1e-6."""
    batch = np.random.default_rng(5).integers(0, 256, (3, TILE, TILE, 3)).astype(np.float32)
    model, calls = _counting(resunet_multi)
    for rot90, views in ((False, None), (True, None), (False, ["identity", "flip_ud"]),
                         (False, ["flip_lr"]), (False, ["rot180"])):
        transforms = predict.tta_transforms(True, rot90, views)
        calls.clear()
        got = predict.predict_batch([model], batch, tta=True, rot90=rot90, views=views)
        assert calls == [3] * len(transforms)
        expected = np.mean([predict._inverse(resunet_multi(predict._forward(batch, k, flip)),
                                             k, flip) for k, flip in transforms], axis=0)
        np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    flipped = predict.predict_batch([model], batch, tta=True, views=["flip_lr"])
    np.testing.assert_allclose(flipped, resunet_multi(batch[:, :, ::-1])[:, :, ::-1],
                               atol=1e-6, rtol=0)
    calls.clear()
    predict.predict_batch([model, model], batch, tta=False)
    assert calls == [3, 3]  # no TTA: the batch as it is, once per ensemble member


def test_tta_transforms_of_named_views():
    assert predict.tta_transforms(True, False, ["identity", "flip_lr"]) == [(0, False),
                                                                            (0, True)]
    assert predict.tta_transforms(True, False, ["rot180"]) == [(2, False)]
    assert predict.tta_transforms(True, False) == list(predict.FLIP_VIEWS.values())
    assert len(predict.FLIP_VIEWS) == 4
    assert predict.tta_transforms(False, False, ["flip_lr"]) == [(0, False)]
    assert len(predict.tta_transforms(True, True, ["identity"])) == 8  # rot90: all eight
    image = np.random.default_rng(6).integers(0, 256, (1, 5, 7, 2)).astype(np.float32)
    for name, (k, flip) in predict.FLIP_VIEWS.items():  # the names say what they do
        flipped = predict._forward(image, k, flip)
        want = {"identity": image, "flip_lr": image[:, :, ::-1], "flip_ud": image[:, ::-1],
                "rot180": image[:, ::-1, ::-1]}[name]
        np.testing.assert_array_equal(flipped, want)


def _run_with_views(tmp_path: Path, name: str, views: list[str] | None) -> Path:
    cfg = make_config("model", TESTTIMEAUG=True, INFER_RUNTIME="tensorflow")
    run = write_run(tmp_path / name, pixel_model(), cfg)
    card = json.loads((run / "model_card.json").read_text())
    if views is not None:
        card["tta_views"] = views
    (run / "model_card.json").write_text(json.dumps(card))
    return run


def test_segmenter_averages_the_views_the_model_card_lists(tmp_path, image):
    listed = _run_with_views(tmp_path, "listed", ["identity", "flip_ud"])
    old = _run_with_views(tmp_path, "old", None)  # a card written before the field
    assert load_run(old).card.tta_views is None
    model = load_run(listed)
    assert model.card.tta_views == ["identity", "flip_ud"]
    cfg = inference_config([listed])
    segmenter = predict.Segmenter([model], cfg)
    assert segmenter.transforms == [(0, False), (2, True)]
    counted, calls = _counting(model)
    model._fn = counted._fn  # segmenter.models[0] is model
    prob = segmenter.probabilities(image)
    np.testing.assert_allclose(prob, pixel_prob(image), atol=1e-6)
    tiles = len(tile_grid(image.shape[:2], segmenter.tile_hw, cfg.TILE_OVERLAP))
    assert sum(calls) == 2 * tiles  # each tile under two views
    assert predict.Segmenter([load_run(old)], cfg).transforms == list(
        predict.FLIP_VIEWS.values())
    # Members that disagree (or a member without the field) average all four flips.
    assert len(predict.Segmenter([model, load_run(old)], cfg).transforms) == 4
    no_tta = dataclasses.replace(cfg, TESTTIMEAUG=False)
    assert predict.Segmenter([model], no_tta).transforms == [(0, False)]


@pytest.mark.parametrize("views", [[], ["identity", "mirror"], ["flip_lr", "flip_lr"], "flip_lr"])
def test_model_card_with_bad_tta_views_is_one_line(tmp_path, views):
    run = _run_with_views(tmp_path, "bad", views)
    with pytest.raises(UserError, match=r"model_card.json: .*tta_views must list some of "
                                        r"identity, flip_lr, flip_ud, rot180"):
        load_run(run)


def test_resume_refuses_a_folder_segmented_with_other_tta_views(tmp_path, image):
    """The views averaged are part of what made the masks: a folder segmented with all four
    flips is not finished with the two a card lists (the fingerprint counts the views)."""
    writers.write_png(tmp_path / "images" / "scene.png", image)
    old = _run_with_views(tmp_path, "old", None)
    cfg = inference_config([old])
    summary = segment.segment_folder(cfg, [old], tmp_path / "images", tmp_path / "out",
                                     progress=False)
    assert summary["done"] == 1
    written = json.loads((tmp_path / "out" / "segmentation_config.json").read_text())
    assert written["tta_transforms"] == 4
    listed = _run_with_views(tmp_path, "listed", ["identity", "flip_lr"])
    with pytest.raises(UserError, match=r"out: holds segmentations made with other "
                                        r"(model weights, )?tta_transforms"):
        segment.segment_folder(inference_config([listed]), [listed], tmp_path / "images",
                               tmp_path / "out", progress=False)
    summary = segment.segment_folder(inference_config([listed]), [listed],
                                     tmp_path / "images", tmp_path / "out2", progress=False)
    written = json.loads((tmp_path / "out2" / "segmentation_config.json").read_text())
    assert summary["done"] == 1 and written["tta_transforms"] == 2
