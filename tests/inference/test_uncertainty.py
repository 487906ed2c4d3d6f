"""Tests for res_unet.inference.uncertainty: the per-scene figures against hand-computed
values, strip by strip as a whole, and through seg_images_in_folder (uncertainty.csv, the
images' records, --save-uncertainty maps as PNG and float32 COG, TTA disagreement)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import keras
import numpy as np
import pytest
import rasterio
from helpers import make_config, pixel_model, write_run
from rasterio.transform import from_origin

from res_unet.cli import run_command
from res_unet.geo import writers
from res_unet.inference.uncertainty import (
    FIGURES,
    HEADLINE,
    VIEW_STEP,
    UncertaintySums,
    ViewDisagreement,
    pixel_entropy,
    rank_rows,
    spearman,
    uncertainty_file,
)
from res_unet.seg_images_in_folder import main


def h2(p: float) -> float:
    """Binary entropy in bits."""
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def test_binary_figures_match_hand_computed_values():
    prob = np.array([[[0.5], [1.0]], [[0.0], [0.8]]], np.float32)
    sums = UncertaintySums(1, threshold=0.5)
    pixel = sums.add(0, prob)
    np.testing.assert_allclose(pixel, [[1.0, 0.0], [0.0, h2(0.8)]], atol=1e-5)
    figures = sums.figures()
    assert figures["pixels"] == 4
    assert figures["entropy"] == pytest.approx((1 + h2(0.8)) / 4, abs=1e-5)
    assert figures["low_confidence"] == pytest.approx(2 / 4)  # 0.5 and 0.8 are below 0.9
    assert figures["margin"] == pytest.approx((1 + 0 + 0 + 0.4) / 4, abs=1e-6)
    # Predicted water: p = 0.5, 1.0, 0.8 (3 px, sum 2.3); land: the 0.0 pixel (1 px, 1.0).
    # Water: 2.3 / (3 + 0) ; land: 1.0 / (1 + 0.5 + 0.2).
    expected = 1 - (2.3 / 3 + 1.0 / 1.7) / 2
    assert figures["expected_error"] == pytest.approx(expected, abs=1e-6)
    assert figures["uncertainty"] == figures[HEADLINE]
    assert figures["disagreement"] is None  # one view


def test_nodata_pixels_are_left_out_and_marked_nan():
    prob = np.array([[[np.nan], [0.5], [np.nan]]], np.float32)
    sums = UncertaintySums(1)
    pixel = sums.add(0, prob)
    assert np.isnan(pixel[0, 0]) and np.isnan(pixel[0, 2]) and pixel[0, 1] == pytest.approx(1)
    assert sums.figures()["pixels"] == 1 and sums.figures()["entropy"] == pytest.approx(1)
    empty = UncertaintySums(1)
    empty.add(0, np.full((2, 2, 1), np.nan, np.float32))
    assert empty.figures()["uncertainty"] is None and empty.figures()["pixels"] == 0


def test_multiclass_entropy_is_normalised_and_sure_maps_score_zero():
    uniform = np.full((2, 3, 4), 0.25, np.float32)
    np.testing.assert_allclose(pixel_entropy(uniform), 1.0, atol=1e-6)
    onehot = np.zeros((2, 3, 4), np.float32)
    onehot[..., 2] = 1
    sums = UncertaintySums(4, ignore_class=3)
    sums.add(0, onehot)
    figures = sums.figures()
    assert figures["entropy"] == pytest.approx(0, abs=1e-6)
    assert figures["low_confidence"] == 0 and figures["margin"] == pytest.approx(0)
    assert figures["expected_error"] == pytest.approx(0)
    # The ignored class never counts, even when predicted everywhere.
    ignored = np.zeros((1, 2, 4), np.float32)
    ignored[..., 3] = 1
    sums = UncertaintySums(4, ignore_class=3)
    sums.add(0, ignored)
    assert sums.expected_iou() == [None, None, None, None]


def test_strips_give_the_figures_of_the_whole_scene_and_the_thumbnail():
    prob = np.random.default_rng(3).dirichlet([1, 1, 1], (37, 29)).astype(np.float32)
    whole = UncertaintySums(3, thumb_step=4)
    whole.add(0, prob)
    strips = UncertaintySums(3, thumb_step=4)
    for r0 in (0, 10, 23):
        strips.add(r0, prob[r0:{0: 10, 10: 23, 23: 37}[r0]])
    for key, value in whole.figures().items():
        assert strips.figures()[key] == pytest.approx(value, rel=1e-6), key
    np.testing.assert_allclose(strips.thumbnail, pixel_entropy(prob)[::4, ::4], atol=1e-6)
    assert strips.thumbnail.shape == (10, 8)


def test_view_disagreement_counts_pixels_whose_classes_differ():
    a = np.array([[[[0.9], [0.1]], [[0.6], [0.2]]]], np.float32)  # (1, 2, 2, 1)
    b = np.array([[[[0.8], [0.7]], [[0.4], [0.1]]]], np.float32)
    # Every VIEW_STEP-th row and column is compared: blocks of that size are one sample.
    a, b = (np.repeat(np.repeat(v, VIEW_STEP, 1), VIEW_STEP, 2) for v in (a, b))
    views = ViewDisagreement(threshold=0.5)
    views.add([a, b])
    views.add([a])  # one view: nothing to compare
    assert (views.differ, views.pixels) == (2, 4)
    sums = UncertaintySums(1, views=views)  # a new scene starts the count again
    assert (views.differ, views.pixels) == (0, 0)
    views.add([a, b, a])
    sums.add(0, a[0, ::VIEW_STEP, ::VIEW_STEP])
    assert sums.figures()["disagreement"] == pytest.approx(0.5)


def test_rank_rows_puts_the_most_uncertain_first_and_unknown_last():
    rows = [{"image": "b.png", "uncertainty": 0.2, "entropy": 0.1},
            {"image": "a.png", "uncertainty": None},
            {"image": "c.png", "uncertainty": 0.7, "entropy": 0.3}]
    ranked = rank_rows(rows)
    assert [r["image"] for r in ranked] == ["c.png", "b.png", "a.png"]
    assert list(ranked[0]) == ["image", "uncertainty", *FIGURES]
    assert ranked[0]["entropy"] == 0.3 and ranked[0]["margin"] is None
    assert uncertainty_file((0, 1)) == "uncertainty.csv"
    assert uncertainty_file((1, 3)) == "uncertainty_shard1of3.csv"


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1)
    # Ties take their mean rank: x ranks (0, 1.5, 1.5, 3) against (0, 1, 2, 3).
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)
    assert spearman([1, 1, 1], [1, 2, 3]) is None and spearman([1, 2], [1, 2]) is None


# Through seg_images_in_folder --------------------------------------------------------------

def seg(*args) -> int:
    return run_command(main, [*map(str, args), "--no-progress"])


def lopsided_model(size: int = 32) -> keras.Model:
    """p = sigmoid(0.05 * (band0 - 128) + 0.05 * (x - 16)): a ramp across each tile, so a
    left-right flip changes its answer (the TTA views disagree) near band0 = 128."""
    inputs = keras.Input((size, size, 3))
    ramp = keras.ops.reshape(keras.ops.linspace(-0.8, 0.8, size), (1, 1, size, 1))
    z = (inputs[..., :1] - 128.0) * 0.05 + ramp
    return keras.Model(inputs, keras.ops.sigmoid(z))


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("runs") / "pixel", pixel_model(),
                     make_config("model"))


def scenes(folder: Path) -> dict[str, np.ndarray]:
    """Three plain scenes: sure (far from 128), unsure (at 128) and in between."""
    folder.mkdir(parents=True)
    out = {}
    for name, value in (("sure", 250), ("unsure", 128), ("middle", 150)):
        image = np.full((40, 50, 3), value, np.uint8)
        writers.write_png(folder / f"{name}.png", image)
        out[name] = image
    return out


def test_segmenting_ranks_scenes_in_uncertainty_csv_and_records_them(pixel_run, tmp_path):
    scenes(tmp_path / "images")
    out = tmp_path / "out"
    assert seg("--model", pixel_run, "--images", tmp_path / "images", "--out", out,
               "--save-uncertainty") == 0
    with open(out / "uncertainty.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["image", "uncertainty", *FIGURES]
    assert [r["image"] for r in rows] == ["unsure.png", "middle.png", "sure.png"]
    assert float(rows[0]["entropy"]) == pytest.approx(1.0, abs=1e-4)  # p = 0.5 everywhere
    # sigmoid(0.05 * 122) = 0.9978: sure, below the 0.9 level nowhere.
    assert float(rows[2]["low_confidence"]) == 0 and float(rows[0]["low_confidence"]) == 1
    assert rows[0]["disagreement"] == ""  # no TTA: one view
    record = json.loads((out / ".unsure.segmented").read_text())
    assert record["uncertainty"]["uncertainty"] == pytest.approx(float(rows[0]["uncertainty"]))
    # The maps: 8-bit PNG, 0-1 as 0-254.
    unsure = np.asarray(__import__("PIL.Image").Image.open(out / "unsure_uncertainty.png"))
    assert unsure.shape == (40, 50) and unsure.dtype == np.uint8 and (unsure == 254).all()
    # A second run skips every scene and ranks them from their records.
    (out / "uncertainty.csv").unlink()
    assert seg("--model", pixel_run, "--images", tmp_path / "images", "--out", out,
               "--save-uncertainty") == 0
    with open(out / "uncertainty.csv") as fh:
        again = list(csv.DictReader(fh))
    assert again == rows


def test_geotiff_scenes_get_a_float32_uncertainty_cog(pixel_run, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    image = np.full((3, 60, 70), 150, np.uint8)
    image[:, :, :10] = 0  # nodata columns
    with rasterio.open(folder / "scene.tif", "w", driver="GTiff", height=60, width=70,
                       count=3, dtype="uint8", crs="EPSG:32633", nodata=0,
                       transform=from_origin(500_000.0, 4_200_000.0, 10.0, 10.0)) as ds:
        ds.write(image)
    out = tmp_path / "out"
    assert seg("--model", pixel_run, "--images", folder, "--out", out,
               "--save-uncertainty") == 0
    with rasterio.open(out / "scene_uncertainty.tif") as ds:
        assert ds.dtypes == ("float32",) and ds.crs.to_epsg() == 32633
        assert ds.transform == from_origin(500_000.0, 4_200_000.0, 10.0, 10.0)
        assert "LAYOUT" in ds.tags(ns="IMAGE_STRUCTURE") or ds.profile.get("tiled")
        values = ds.read(1)
    assert np.isnan(values[:, :10]).all()
    np.testing.assert_allclose(values[:, 10:], h2(1 / (1 + math.exp(-0.05 * 22))),
                               atol=1e-4)


def test_tta_views_that_disagree_are_counted(tmp_path):
    run = write_run(tmp_path / "run", lopsided_model(), make_config("model"))
    folder = tmp_path / "images"
    folder.mkdir()
    writers.write_png(folder / "flat.png", np.full((32, 32, 3), 128, np.uint8))
    out = tmp_path / "out"
    assert seg("--model", run, "--images", folder, "--out", out, "--tta") == 0
    with open(out / "uncertainty.csv") as fh:
        row = next(csv.DictReader(fh))
    # At band0 = 128 the class follows the ramp: a mirrored view flips every column's class.
    assert float(row["disagreement"]) == pytest.approx(1.0)
    assert seg("--model", run, "--images", folder, "--out", tmp_path / "no_tta",
               "--no-tta") == 0
    with open(tmp_path / "no_tta" / "uncertainty.csv") as fh:
        assert next(csv.DictReader(fh))["disagreement"] == ""
