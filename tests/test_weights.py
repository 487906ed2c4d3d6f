"""The models shipped in weights/ load, segment, and stay small enough for the repository."""

import json
from pathlib import Path

import numpy as np
import pytest

from res_unet import predict
from res_unet.demo import synthesize_scene

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
RUNS = sorted(p for p in WEIGHTS.iterdir() if (p / "model_card.json").exists())


def test_weights_folder_has_models():
    assert RUNS, "weights/ ships at least the lakes model"


@pytest.mark.parametrize("run", RUNS, ids=[p.name for p in RUNS])
def test_shipped_model_is_complete_and_small(run):
    for name in ("model.keras", "best.weights.h5", "config.json", "model_card.json",
                 "README.md"):
        assert (run / name).exists(), name
    size = sum(f.stat().st_size for f in run.iterdir())
    assert size < 30 * 2**20, f"{run.name} is {size / 2**20:.1f} MB; keep shipped models small"
    card = json.loads((run / "model_card.json").read_text())
    assert card["validation"]["scores"]["mean_iou"] > 0.5


@pytest.mark.parametrize("run", RUNS, ids=[p.name for p in RUNS])
def test_shipped_model_segments_an_image(run, tmp_path):
    image, _ = synthesize_scene(np.random.default_rng(0), (300, 420))
    from res_unet.imagery import write_png

    write_png(tmp_path / "in" / "scene.png", image)
    cfg = predict.inference_config([run], None, {})
    summary = predict.segment_folder(cfg, [run], tmp_path / "in", tmp_path / "out",
                                     progress=False)
    assert summary["done"] == 1 and summary["failed"] == 0
    from res_unet.imagery import read_label

    label = read_label(tmp_path / "out" / "scene_predseg.png")
    assert label.shape == (300, 420)
    assert set(np.unique(label)) <= {0, 1}
