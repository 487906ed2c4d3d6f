"""Scoring segmentations against labels: per image, per folder, and on a run's whole
validation scenes (:func:`evaluate_scenes`, which also chooses the run's binary threshold where
the model is deployed: on whole scenes, tiled, blended, with the configured TTA).

Scoring returns values and writes nothing into a run folder: :func:`res_unet.workflow.train_model`
hands the scene evaluation to training, whose run writer (:mod:`res_unet.training.runwriter`)
records it in evaluation.json and the model card."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from res_unet.core import messages
from res_unet.core.errors import UserError, first_line
from res_unet.core.progress import progress_bar
from res_unet.data import pairing, records
from res_unet.data.labelsource import LabelSource
from res_unet.inference import postprocess
from res_unet.inference.predict import LABEL_NODATA, Segmenter
from res_unet.inference.runtime import load_run
from res_unet.inference.settings import inference_config
from res_unet.training import metrics

# With labels, the first few scored images are drawn (image | label | prediction), each
# shown at most this many pixels on its longer side.
FIGURE_ROWS = 4
FIGURE_MAX_SIDE = 512


def score_label(label: np.ndarray, truth: np.ndarray, n_classes: int,
                ignore_class: int | None = None) -> np.ndarray:
    """Confusion matrix (n_classes x n_classes int64 pixel counts, rows truth) of a
    predicted (H, W) label map against the true one; nodata predictions and truth pixels of
    ``ignore_class`` (IGNORE_CLASS) are not counted."""
    valid = label != LABEL_NODATA
    return metrics.confusion_matrix(truth[valid], label[valid], n_classes,
                                    ignore_class=ignore_class)


def evaluate_scenes(run_dir: str | os.PathLike, data_dir: str | os.PathLike,
                    progress: bool = True) -> dict[str, Any] | None:
    """Score a run on the whole validation scenes of its dataset, segmented as users run
    seg_images_in_folder (working scale, tiles, blending and the TTA the config enables),
    and for binary models choose the threshold there.

    The validation images are those the dataset manifest lists, read from the folders it
    was built from, at full resolution against their full-resolution labels, which come from
    the label source the manifest records (:meth:`LabelSource.of_dataset`: a folder of
    rasters or polygon layers, or one shared layer with its layer, attribute and rules),
    read as make_tfrecords read them. Writes nothing: returns the scene evaluation (images,
    megapixels, seconds, downsample, tta, tile_overlap and
    :func:`res_unet.training.metrics.evaluation_scores`: the scores and, for binary models,
    ``optimal_threshold`` and the scores there), which
    :func:`res_unet.training.runwriter.add_scene_evaluation` records in the run folder; or
    None (with a notice) when the dataset has no validation split or its source images are
    no longer where they were.
    """
    run_dir = Path(run_dir)
    manifest = records.read_manifest(data_dir)
    names = set(manifest.files["validation"])
    images_dir = Path(manifest.images_dir)
    if not names:
        return None
    cfg = inference_config([run_dir])
    try:
        source = LabelSource.of_dataset(manifest)
        # The dataset's extra-band folders: the run's config is for segmenting new images.
        pairs = [p for p in source.pairs(images_dir, manifest.config.get("EXTRA_BAND_DIRS", []),
                                         untouched=None) if p.image.name in names]
    except UserError as exc:
        messages.status(f"scene evaluation skipped: {first_line(exc, most=None)}")
        return None
    if len(pairs) != len(names):
        messages.status(f"scene evaluation skipped: {len(names) - len(pairs)} validation "
                        f"images are no longer in {images_dir} or no longer labelled by "
                        f"{source.path}")
        return None
    model = load_run(run_dir)
    segmenter = Segmenter([model], cfg)
    n_classes = model.n_classes
    cm = np.zeros((n_classes, n_classes), np.int64)
    sweep = metrics.ThresholdSweep() if model.binary else None
    started = time.perf_counter()
    pixels = 0
    for pair in progress_bar(pairs, enabled=progress):
        image, _ = pairing.load_image(pair, cfg.N_DATA_BANDS, max_pixels=cfg.MAX_IMAGE_PIXELS)
        truth, _ = source.truth(pair, image.shape[:2])
        prob = segmenter.probabilities(image)
        pixels += truth.size
        valid = truth != cfg.IGNORE_CLASS if cfg.IGNORE_CLASS is not None else slice(None)
        if sweep is not None:
            sweep.update(truth[valid], prob[..., 0][valid])
        cm += metrics.confusion_matrix(truth, postprocess.probs_to_label(prob), n_classes,
                                       ignore_class=cfg.IGNORE_CLASS)
    seconds = time.perf_counter() - started
    result: dict[str, Any] = {
        "images": len(pairs), "megapixels": round(pixels / 1e6, 2),
        "seconds": round(seconds, 1), "downsample": segmenter.downsample,
        "tta": cfg.TESTTIMEAUG, "tile_overlap": cfg.TILE_OVERLAP,
        **metrics.evaluation_scores(cm, sweep, cfg.IGNORE_CLASS)}
    return result


def figure_example(pair: pairing.Pair, label: np.ndarray, truth: np.ndarray, n_bands: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, truth, prediction) of a labelled pair (the image read with ``n_bands``
    bands, N_DATA_BANDS), subsampled to FIGURE_MAX_SIDE."""
    image, _ = pairing.load_image(pair, n_bands)
    step = max(1, math.ceil(max(label.shape) / FIGURE_MAX_SIDE))
    return image[::step, ::step], truth[::step, ::step], label[::step, ::step]


def score_row(name: str, cm: np.ndarray, ignore_class: int | None = None) -> dict[str, Any]:
    """One row of scores.csv: pixel count, accuracy, mean and per-class IoU and dice (0-1,
    None where undefined) of a confusion matrix (rows truth), ``ignore_class`` not counted."""
    scores = metrics.scores_from_confusion(cm, ignore_class=ignore_class)
    row: dict[str, Any] = {"image": name, "n_pixels": scores["n_pixels"],
                           "pixel_accuracy": scores["pixel_accuracy"],
                           "mean_iou": scores["mean_iou"], "mean_dice": scores["mean_dice"]}
    row.update({f"iou_{k}": v for k, v in enumerate(scores["iou"])})
    row.update({f"dice_{k}": v for k, v in enumerate(scores["dice"])})
    return row
