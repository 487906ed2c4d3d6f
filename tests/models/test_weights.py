"""The models shipped in weights/ load, segment, stay small, and keep their stated accuracy
on held-out real scenes (skipped when ../shared/data is absent)."""

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import shared_data

import res_unet
from res_unet.data import pairing
from res_unet.data.split import split_pairs
from res_unet.demo import synthesize_scene
from res_unet.geo import rasters, writers
from res_unet.inference import predict, runtime, scoring, segment, settings
from res_unet.training import metrics

WEIGHTS = Path(__file__).resolve().parents[2] / "weights"
RUNS = sorted(p for p in WEIGHTS.iterdir() if (p / "model_card.json").exists())
# shipped model -> (shared data folder, scenes scored here, score, lowest value). The scenes
# are the model's own validation split; a model trained on every image (VALIDATION_SPLIT 0,
# like dubai_lite0) has none, and is then checked on a spread of all the scenes (seen in
# training: this guards the shipped file, its README gives the recipe's held-out figure).
# The bounds sit below what these subsets scored at shipping and far above an untrained
# model's.
REAL_DATA_CHECKS = {
    "lakes_lite0": ("lakes", 6, "water_iou", 0.85),
    "dubai_lite0": ("dubai", 4, "mean_iou", 0.42),
}


def test_weights_folder_has_models():
    assert {"lakes_lite0", "dubai_lite0"} <= {p.name for p in RUNS}


@pytest.mark.parametrize("run", RUNS, ids=[p.name for p in RUNS])
def test_shipped_model_is_complete_and_small(run):
    for name in ("model.keras", "config.json", "model_card.json", "README.md"):
        assert (run / name).exists(), name
    size = sum(f.stat().st_size for f in run.iterdir())
    assert size < 30 * 2**20, f"{run.name} is {size / 2**20:.1f} MB; keep shipped models small"
    card = json.loads((run / "model_card.json").read_text())
    if card["config"]["VALIDATION_SPLIT"] > 0:
        assert card["validation"]["scores"]["mean_iou"] > 0.5
    else:  # trained on every image: no held-out figure, and none made up
        assert card["validation"]["scores"]["mean_iou"] is None
        assert "held out" in (run / "README.md").read_text()


@pytest.mark.parametrize("run", RUNS, ids=[p.name for p in RUNS])
def test_shipped_model_segments_an_image(run, tmp_path):
    image, _ = synthesize_scene(np.random.default_rng(0), (300, 420))
    writers.write_png(tmp_path / "in" / "scene.png", image)
    cfg = settings.inference_config([run], None, {"TESTTIMEAUG": False})
    summary = segment.segment_folder(cfg, [run], tmp_path / "in", tmp_path / "out",
                                     progress=False)
    assert summary["done"] == 1 and summary["failed"] == 0
    label = rasters.read_label(tmp_path / "out" / "scene_predseg.png")
    assert label.shape == (300, 420)
    card = json.loads((run / "model_card.json").read_text())
    assert set(np.unique(label)) <= set(range(card["classes"]))


@pytest.mark.parametrize("name", sorted(REAL_DATA_CHECKS))
def test_shipped_model_on_held_out_real_scenes(name):
    """A few real scenes (its own validation split when it has one), segmented as users run
    it: the score stays near what it was at shipping."""
    folder, count, score, lowest = REAL_DATA_CHECKS[name]
    source = shared_data(folder)
    run = WEIGHTS / name
    cfg = settings.inference_config([run])
    labels = res_unet.LabelSource.from_config(source / "labels", cfg)
    pairs = labels.pairs(source / "images")
    _, validation = split_pairs(pairs, cfg.VALIDATION_SPLIT, cfg.SEED, cfg.SPLIT_GROUP_PATTERN)
    validation = validation or pairs
    segmenter = predict.Segmenter([runtime.load_run(run)], cfg)
    n = segmenter.n_classes
    cm = np.zeros((n, n), np.int64)
    for pair in validation[::max(1, len(validation) // count)][:count]:
        image, _ = pairing.load_image(pair, cfg.N_DATA_BANDS)
        truth, _ = labels.truth(pair, image.shape[:2])
        cm += scoring.score_label(segmenter.segment(image), truth, n, cfg.IGNORE_CLASS)
    scores = metrics.scores_from_confusion(cm, ignore_class=cfg.IGNORE_CLASS)
    value = scores["iou"][1] if score == "water_iou" else scores["mean_iou"]
    assert value >= lowest, scores


def test_lakes_default_path_averages_the_flips_its_card_lists():
    """seg_images_in_folder --model weights/lakes_lite0 without flags runs TTA over the two
    flips its card lists (measured on its held-out scenes: bench_segment.py --default-path),
    not all four."""
    run = WEIGHTS / "lakes_lite0"
    cfg = settings.inference_config([run])  # no flags: the run's TESTTIMEAUG
    model = runtime.load_run(run)
    assert model.card.tta_views == ["identity", "flip_lr"]
    segmenter = predict.Segmenter([model], cfg)
    assert cfg.TESTTIMEAUG and segmenter.transforms == [(0, False), (0, True)]
