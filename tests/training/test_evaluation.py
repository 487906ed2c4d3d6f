"""Tests for res_unet.training.evaluation's ranking of validation images by loss (evaluation.json's
``images``, worst first) and the lines training prints about the worst."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import read_examples

from res_unet.data import records
from res_unet.training import losses
from res_unet.training.evaluation import rank_images, worst_images


def test_validation_images_are_listed_worst_first_with_their_loss(trained_run, tiny_dataset):
    cfg, run, _ = trained_run
    images = json.loads((run / "evaluation.json").read_text())["images"]
    manifest = records.read_manifest(tiny_dataset)
    stems = sorted(set(records.example_stems(tiny_dataset, "validation")))
    assert sorted(r["image"] for r in images) == stems
    assert sum(r["examples"] for r in images) == manifest.counts["validation"].examples
    loss_values = [r["loss"] for r in images]
    assert loss_values == sorted(loss_values, reverse=True) and loss_values[-1] > 0
    assert all(0 <= r["mean_iou"] <= 1 and len(r["iou"]) == 2 for r in images)
    # The worst image's loss is the mean of the training loss over its examples.
    worst = images[0]["image"]
    import keras

    model = keras.models.load_model(run / "model.keras", compile=False)
    loss_fn = losses.make_loss(cfg)
    values = []
    for image, label, meta in read_examples(tiny_dataset, "validation"):
        if meta["stem"] == worst:
            x = image[None].astype(np.float32)
            y = label[None, ..., None].astype(np.float32)
            values.append(float(loss_fn(y, model(x, training=False))))
    assert images[0]["loss"] == pytest.approx(np.mean(values), rel=1e-3)


def test_without_a_loss_the_lowest_iou_comes_first_and_the_lines_name_the_worst():
    cm_good = np.array([[90, 0], [0, 10]])
    cm_bad = np.array([[50, 40], [5, 5]])
    rows = rank_images({"a": {"examples": 1, "loss": 0.0, "cm": cm_good},
                        "b": {"examples": 2, "loss": 0.0, "cm": cm_bad}}, None, False)
    assert [r["image"] for r in rows] == ["b", "a"] and rows[0]["loss"] is None
    ranked = rank_images({"a": {"examples": 2, "loss": 1.0, "cm": cm_good},
                          "b": {"examples": 1, "loss": 0.2, "cm": cm_bad}}, None, True)
    assert [(r["image"], r["loss"]) for r in ranked] == [("a", 0.5), ("b", 0.2)]
    text = worst_images(ranked, n=1)
    assert text.splitlines() == [
        "validation images, worst first (label or check these first; all of them in "
        "evaluation.json):", "  a: loss 0.5000, mean IoU 1.000"]
