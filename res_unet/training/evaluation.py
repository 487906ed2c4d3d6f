"""Scoring a trained model on the validation split of its dataset (evaluation.json).

The tile-level evaluation that training ends with: scores at 0.5 (binary) or argmax, for a
binary model the threshold that maximises validation IoU, and a few examples to draw.
Whole validation scenes are scored by :mod:`res_unet.inference.scoring`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from res_unet.config.keys import Config
from res_unet.data import records
from res_unet.training import metrics


def evaluate(model: keras.Model, cfg: Config, data_dir: Path, n_examples: int = 6
             ) -> tuple[dict[str, Any], list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Score ``model`` on the validation split of a dataset.

    Returns the evaluation dict (scores at 0.5 / argmax; for binary models also the
    threshold maximising validation IoU and the scores there) and a few (image, label,
    predicted label) examples for plotting.
    """
    n_classes = cfg.n_label_classes
    binary = cfg.NCLASSES == 1
    dataset = records.load_dataset(data_dir, "validation", cfg.BATCH_SIZE, shuffle=False)
    dtype = records.read_manifest(data_dir).dtype
    predict = tf.function(lambda x: tf.cast(model(x, training=False), tf.float32))
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    sweep = metrics.ThresholdSweep() if binary else None
    examples: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for x, y in dataset:
        prob = predict(x).numpy()
        y = y.numpy()
        truth = (y[..., 0] >= 0.5).astype(np.uint8) if binary else y.argmax(-1).astype(np.uint8)
        pred = (prob[..., 0] >= 0.5).astype(np.uint8) if binary else prob.argmax(-1).astype(
            np.uint8)
        cm += metrics.confusion_matrix(truth, pred, n_classes, ignore_class=cfg.IGNORE_CLASS)
        if sweep is not None:
            sweep.update(truth, prob[..., 0])
        for i in range(min(len(x), n_examples - len(examples))):
            examples.append((np.round(x[i].numpy()).astype(dtype), truth[i], pred[i]))
    result: dict[str, Any] = {"split": "validation", "class_names": cfg.class_names,
                              **metrics.evaluation_scores(cm, sweep, cfg.IGNORE_CLASS)}
    if not cm.any():
        result["note"] = ("the dataset has no validation examples (VALIDATION_SPLIT 0 or an "
                          "empty split): no scores; keep a held-out split to measure the model")
    return result, examples
