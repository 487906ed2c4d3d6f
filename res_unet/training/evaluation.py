"""Scoring a trained model on the validation split of its dataset (evaluation.json).

The tile-level evaluation that training ends with: scores at 0.5 (binary) or argmax, for a
binary model the threshold that maximises validation IoU, and a few examples to draw.
Whole validation scenes are scored by :mod:`res_unet.inference.scoring`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from res_unet.config.keys import Config
from res_unet.data import records
from res_unet.training import metrics


def evaluate(model: keras.Model, cfg: Config, data_dir: Path, n_examples: int = 6,
             loss_fn: Callable[[Any, Any], Any] | None = None
             ) -> tuple[dict[str, Any], list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Score ``model`` on the validation split of a dataset.

    Returns the evaluation dict (scores at 0.5 / argmax; for binary models also the
    threshold maximising validation IoU and the scores there; ``images``: each validation
    image with its loss under ``loss_fn`` (the mean over its examples) and scores, worst
    first: what to label or check next) and a few (image, label, predicted label) examples
    for plotting.
    """
    n_classes = cfg.n_label_classes
    binary = cfg.NCLASSES == 1
    dataset = records.load_dataset(data_dir, "validation", cfg.BATCH_SIZE, shuffle=False)
    dtype = records.read_manifest(data_dir).dtype

    def forward(x, y):
        """Probabilities, and each example's loss under ``loss_fn`` (zeros without one),
        computed in the graph rather than one eager call per example."""
        prob = tf.cast(model(x, training=False), tf.float32)
        if loss_fn is None:
            return prob, tf.zeros(tf.shape(x)[:1])
        losses = tf.map_fn(lambda pair: tf.cast(loss_fn(pair[0][None], pair[1][None]),
                                                tf.float32),
                           (y, prob), fn_output_signature=tf.float32)
        return prob, losses

    # Traced once: the signature leaves the batch size open for the last, smaller batch.
    predict = tf.function(forward, input_signature=list(dataset.element_spec))
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    sweep = metrics.ThresholdSweep() if binary else None
    examples: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    # The source image of each example, in the order the unshuffled dataset gives them.
    stems = iter(records.example_stems(data_dir, "validation"))
    per_image: dict[str, dict[str, Any]] = {}
    for x, y in dataset:
        prob, example_losses = (t.numpy() for t in predict(x, y))
        y = y.numpy()
        truth = (y[..., 0] >= 0.5).astype(np.uint8) if binary else y.argmax(-1).astype(np.uint8)
        pred = (prob[..., 0] >= 0.5).astype(np.uint8) if binary else prob.argmax(-1).astype(
            np.uint8)
        cm += metrics.confusion_matrix(truth, pred, n_classes, ignore_class=cfg.IGNORE_CLASS)
        if sweep is not None:
            sweep.update(truth, prob[..., 0])
        for i in range(len(prob)):
            image = per_image.setdefault(next(stems), {
                "examples": 0, "loss": 0.0, "cm": np.zeros((n_classes, n_classes), np.int64)})
            image["examples"] += 1
            image["loss"] += float(example_losses[i])
            image["cm"] += metrics.confusion_matrix(truth[i], pred[i], n_classes,
                                                    ignore_class=cfg.IGNORE_CLASS)
        for i in range(min(len(x), n_examples - len(examples))):
            examples.append((np.round(x[i].numpy()).astype(dtype), truth[i], pred[i]))
    result: dict[str, Any] = {"split": "validation", "class_names": cfg.class_names,
                              **metrics.evaluation_scores(cm, sweep, cfg.IGNORE_CLASS),
                              "images": rank_images(per_image, cfg.IGNORE_CLASS,
                                                    loss_fn is not None)}
    if not cm.any():
        result["note"] = ("the dataset has no validation examples (VALIDATION_SPLIT 0 or an "
                          "empty split): no scores; keep a held-out split to measure the model")
    return result, examples


def rank_images(per_image: dict[str, dict[str, Any]], ignore_class: int | None,
                with_loss: bool) -> list[dict[str, Any]]:
    """evaluation.json's ``images``: {stem: {examples, summed loss, confusion matrix}} as rows
    (image, examples, loss (mean over its examples), mean IoU, pixel accuracy, per-class IoU),
    worst first: highest loss, or lowest mean IoU without a loss."""
    rows = []
    for stem, image in per_image.items():
        scores = metrics.scores_from_confusion(image["cm"], ignore_class=ignore_class)
        rows.append({"image": stem, "examples": image["examples"],
                     "loss": image["loss"] / image["examples"] if with_loss else None,
                     "mean_iou": scores["mean_iou"], "pixel_accuracy": scores["pixel_accuracy"],
                     "iou": scores["iou"]})
    if with_loss:
        return sorted(rows, key=lambda r: (-r["loss"], r["image"]))
    return sorted(rows, key=lambda r: (r["mean_iou"] is None, r["mean_iou"] or 0.0, r["image"]))


def worst_images(rows: list[dict[str, Any]], n: int = 5) -> str:
    """The lines training prints: the ``n`` worst validation images of :func:`rank_images`."""
    lines = [f"  {row['image']}: " + ("" if row["loss"] is None else f"loss {row['loss']:.4f}, ")
             + "mean IoU " + ("-" if row["mean_iou"] is None else f"{row['mean_iou']:.3f}")
             for row in rows[:n]]
    return ("validation images, worst first (label or check these first; all of them in "
            "evaluation.json):\n" + "\n".join(lines))
