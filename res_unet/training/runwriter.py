"""Writing a training run's folder: weights, the full model, the SavedModel, the card.

The file names and the card's format live in :mod:`res_unet.training.runfolder`; this module fills
them from plain values (the config, the model, the dataset manifest, the training facts,
the evaluation and the history rows, and the whole-scene evaluation that inference computes
for :func:`res_unet.workflow.train_model`). It is the run folder's only writer; every file is
written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from res_unet import __version__
from res_unet.config.keys import Config
from res_unet.core.atomic import atomic_path, owner_tag, usual_mode, write_atomic
from res_unet.data import records, report
from res_unet.models.helpers import count_flops
from res_unet.training import schedule
from res_unet.training.devices import device_description
from res_unet.training.runfolder import (
    BEST_WEIGHTS,
    CONFIG,
    CURVES,
    EVALUATION,
    EXAMPLES_FIGURE,
    FULL_MODEL,
    LR_FIGURE,
    SAVED_MODEL,
    CardInput,
    ModelCard,
    TrainingFacts,
    remove_output,
)


def save_weights(model: keras.Model, path: Path) -> None:
    """The model's weights (a .weights.h5 file), atomically."""
    with atomic_path(path) as tmp:
        model.save_weights(tmp)


def _save_full_model(model: keras.Model, path: Path) -> None:
    with atomic_path(path) as tmp:
        model.save(tmp)


def _export_saved_model(model: keras.Model, path: Path) -> None:
    """Keras ``model.export`` (TensorFlow SavedModel for serving) into ``path``, atomically."""
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{owner_tag()}-",
                                suffix=".tmp"))
    tmp.chmod(usual_mode(directory=True))
    try:
        model.export(str(tmp), verbose=False)
        remove_output(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def model_card(cfg: Config, manifest: records.Manifest, model: keras.Model,
               training: TrainingFacts, evaluation: dict[str, Any],
               wall_seconds: float) -> ModelCard:
    """The card of a trained ``model``: what it takes and predicts (from ``cfg`` and the
    dataset's ``manifest``), how it was trained, its validation scores (``evaluation``, as
    :func:`res_unet.training.evaluation.evaluate` returns it) and the run's wall time in seconds."""
    return ModelCard(
        res_unet_version=__version__,
        model=cfg.MODEL,
        encoder=cfg.ENCODER if cfg.MODEL == "efficientnet_unet" else None,
        parameters=int(model.count_params()),
        flops_per_image=int(count_flops(model)),
        input=CardInput(size=list(cfg.TARGET_SIZE), bands=cfg.N_DATA_BANDS,
                        dtype=manifest.dtype, band_mean=manifest.band_mean,
                        band_std=manifest.band_std, downsample=cfg.DOWNSAMPLE,
                        pixel_size_m=manifest.pixel_size_m),
        classes=cfg.n_label_classes,
        class_names=cfg.class_names,
        binary=cfg.NCLASSES == 1,
        ignore_class=cfg.IGNORE_CLASS,
        threshold=evaluation.get("optimal_threshold", 0.5 if cfg.NCLASSES == 1 else None),
        dataset={"content_hash": manifest.content_hash,
                 "counts": manifest.to_dict()["counts"], "fit_mode": cfg.FIT_MODE},
        training=training,
        validation={"scores": evaluation["scores"],
                    "scores_at_threshold": evaluation.get("scores_at_optimal_threshold")},
        versions={"python": platform.python_version(), "tensorflow": tf.__version__,
                  "keras": keras.__version__, "numpy": np.__version__},
        device=device_description(),
        wall_seconds=round(wall_seconds, 1),
        files={"weights": BEST_WEIGHTS, "model": FULL_MODEL, "saved_model": SAVED_MODEL,
               "config": CONFIG},
        config=cfg.to_dict(),
    )


def write_outputs(run_dir: Path, cfg: Config, model: keras.Model, history: list[dict[str, Any]],
                  evaluation: dict[str, Any], examples: list, card: ModelCard,
                  export_saved_model: bool) -> None:
    """Everything a finished run adds to ``run_dir``: model.keras, saved_model/ (with
    ``export_saved_model``), evaluation.json, model_card.json and, with DOPLOT, the figures
    (``history``: the rows of history.csv; ``examples``: (image, label, prediction) triples)."""
    # Saved uncompiled: the loss is described by the config, and compiling here would create
    # optimizer variables, a collective operation other workers have already left.
    _save_full_model(model, run_dir / FULL_MODEL)
    if export_saved_model:
        _export_saved_model(model, run_dir / SAVED_MODEL)
    write_atomic(run_dir / EVALUATION, json.dumps(evaluation, indent=2, default=float))
    card.write(run_dir)
    if cfg.DOPLOT:
        if history:
            report.plot_history(history, run_dir / CURVES)
        report.plot_lr_schedule(schedule.lr_curve(cfg, cfg.MAX_EPOCHS), run_dir / LR_FIGURE)
        if examples:
            report.plot_predictions(examples, cfg.n_label_classes, run_dir / EXAMPLES_FIGURE,
                                        class_names=cfg.class_names)


def add_scene_evaluation(run_dir: Path, card: ModelCard, evaluation: dict[str, Any],
                         scenes: dict[str, Any]) -> ModelCard:
    """Record a whole-scene evaluation (``scenes``, as
    :func:`res_unet.inference.scoring.evaluate_scenes` returns it) in a written run folder:
    under ``scenes`` in evaluation.json (``evaluation``: the tile evaluation written with the
    run) and in the card's ``validation`` (without the threshold sweep); for binary models the
    scene-optimal threshold becomes the card's, so segmentation uses it by default.
    evaluation.json is written first and the card last, each atomically. Returns the card
    written."""
    card = dataclasses.replace(card, validation={
        **card.validation, "scenes": {k: v for k, v in scenes.items() if k != "threshold_sweep"}})
    if "optimal_threshold" in scenes:
        card.threshold = scenes["optimal_threshold"]
        card.threshold_source = "whole validation scenes"
    write_atomic(run_dir / EVALUATION,
                 json.dumps({**evaluation, "scenes": scenes}, indent=2, default=float))
    card.write(run_dir)
    return card
