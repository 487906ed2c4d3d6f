"""What train_resunet does, as one library call: :func:`train_model`.

Training (:mod:`res_unet.training`) comes before inference in the package's layers, so it
cannot segment whole scenes itself; this module, above both, hands it the scene evaluation
(:func:`res_unet.inference.scoring.evaluate_scenes`). The library user and the command then
get the same run folder and model card, and the folder has one writer
(:mod:`res_unet.training.runwriter`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tensorflow as tf

    from res_unet.config.keys import Config
    from res_unet.training.runfolder import ModelCard


def train_model(cfg: Config, data_dir: str | os.PathLike, run_dir: str | os.PathLike, *,
                strategy: tf.distribute.Strategy | None = None, progress: bool = True,
                export_saved_model: bool = True, overwrite: bool = False,
                scene_evaluation: bool = True) -> ModelCard:
    """Train (or, with DO_TRAIN=false, re-evaluate) a model on a make_tfrecords dataset,
    then score it on the dataset's whole validation scenes, as ``train_resunet`` does.

    ``run_dir`` receives what :func:`res_unet.training.train.train` writes (weights,
    model.keras, saved_model/ with ``export_saved_model``, config.json, history.csv, figures,
    evaluation.json, model_card.json); with ``scene_evaluation`` (the command's default;
    ``--no-scene-eval`` turns it off) evaluation.json and the card also hold the scores on
    whole validation scenes and, for a binary model, the threshold chosen there (the card's
    ``threshold``, ``threshold_source`` 'whole validation scenes'). The scenes are scored by
    the process that writes the folder, while it holds the folder's lock. Resuming a killed
    run and ``overwrite`` are as :func:`~res_unet.training.train.train` says. Returns the
    model card as written (for a worker of a multi-worker run, which writes nothing, the
    card without scene scores).
    """
    from res_unet.inference import scoring
    from res_unet.training import train

    def score_scenes(written: Path):
        return scoring.evaluate_scenes(written, data_dir, progress=progress)

    return train.train(cfg, data_dir, run_dir, strategy=strategy, progress=progress,
                       export_saved_model=export_saved_model, overwrite=overwrite,
                       score_scenes=score_scenes if scene_evaluation else None)
