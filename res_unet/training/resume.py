"""Resuming a killed training run: its loop state, its backup and its weight snapshots.

A run folder whose training was killed holds ``backup/``: the model, optimizer and epoch
variables (a TensorFlow checkpoint), the loop state (:class:`TrainState`, JSON) and, with
AVERAGE_LAST_EPOCHS, the weights of the last epochs (:class:`Snapshots`). Re-running the
same command resumes from it, once :func:`run_folder_action` has decided what to do with
the folder and :func:`check_resume_config` has made sure the config still describes the
same training. The backup is given the model, optimizer and epoch variable to save and
restore; it knows nothing of the loop that runs them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from res_unet.config.keys import Config, config_from_dict
from res_unet.config.reference import keys_with
from res_unet.core.atomic import atomic_path, write_atomic
from res_unet.core.errors import UserError, first_line
from res_unet.training.runfolder import (
    BACKUP_DIR,
    CARD,
    CONFIG,
    SNAPSHOT_FILE,
    SNAPSHOT_GLOB,
    STATE_FILE,
    TrainingFacts,
    read_finished_card,
    read_json,
)

# What to do with a run folder ------------------------------------------------------------


def run_folder_action(run_dir: Path, cfg: Config, overwrite: bool) -> str:
    """Decide what training does with ``run_dir``; changes nothing.

    Returns 'new' (no run there yet), 'resume' (a killed run's backup is there), 'evaluate'
    (DO_TRAIN false) or 'overwrite' (a run is there and ``overwrite`` was asked for; see
    :func:`res_unet.training.runfolder.clear_run_folder`). Raises UserError when it holds a
    finished run and ``overwrite`` is false: a finished run is never replaced silently.
    (:func:`res_unet.training.train.train` has checked the folder itself,
    :func:`res_unet.core.atomic.check_output_folder`.)
    """
    if not cfg.DO_TRAIN:
        return "evaluate"
    finished = (run_dir / CARD).is_file()
    killed = (run_dir / BACKUP_DIR / STATE_FILE).is_file()
    if overwrite and (finished or killed):
        return "overwrite"
    if killed:
        return "resume"
    if finished:
        card = read_finished_card(run_dir)
        what = (f" (best epoch {card.training.best_epoch} of {card.training.epochs_run})"
                if card else "")
        raise UserError(f"{run_dir}: holds a finished training run{what}; choose another "
                        "--out, or pass --overwrite to replace it")
    return "new"


def check_resume_config(run_dir: Path, cfg: Config) -> None:
    """Raise UserError naming every changed key when ``cfg`` differs from the config of the
    unfinished run in ``run_dir`` in keys other than the resumable ones
    (``keys_with("resumable")``: limits, reports, devices and segmentation settings)."""
    path = run_dir / CONFIG
    try:
        old, _ = config_from_dict(read_json(path, "config"), source=str(path))
    except (OSError, ValueError, UserError):
        raise UserError(f"{path}: the unfinished run's config cannot be read; pass --overwrite "
                        "to start this run afresh") from None
    free = set(keys_with("resumable"))
    changed = [f"{f.name} {getattr(old, f.name)!r} -> {getattr(cfg, f.name)!r}"
               for f in dataclasses.fields(Config)
               if f.name not in free and getattr(old, f.name) != getattr(cfg, f.name)]
    if changed:
        raise UserError(f"{run_dir}: the unfinished run there was started with another config "
                        f"({'; '.join(changed)}); resume with its config.json, or pass "
                        "--overwrite to start afresh")


# The backup ------------------------------------------------------------------------------


@dataclass
class TrainState:
    """What a resumed run needs besides the model and optimizer variables."""

    next_epoch: int = 0
    best_val_loss: float = math.inf
    best_epoch: int = -1
    wait: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    averaged_epochs: list[int] = field(default_factory=list)
    kept_epoch: int | None = None  # KEEP_WEIGHTS 'last': the epoch whose weights were kept

    def training_facts(self, has_validation: bool, precision: str, strategy: str,
                       replicas: int) -> TrainingFacts:
        """The model card's account of how the weights were trained (``strategy``: its
        name, ``replicas``: how many devices trained in sync)."""
        history = self.history
        return TrainingFacts(
            epochs_run=len(history), best_epoch=self.best_epoch,
            best_val_loss=None if math.isinf(self.best_val_loss) or not has_validation
            else self.best_val_loss,
            train_seconds=round(self.train_seconds, 1),
            images_per_second=round(float(np.mean([h["images_per_second"] for h in history])),
                                    2) if history else None,
            precision=precision, strategy=strategy, replicas=replicas,
            averaged_epochs=self.averaged_epochs or None,
            kept_epoch=self.kept_epoch if not self.averaged_epochs else None)


class Backup:
    """Model, optimizer and loop state saved each epoch, so a killed run resumes.

    Uses tf.train.CheckpointManager (which writes the checkpoint before updating its index)
    plus a small JSON state written atomically after it. Non-chief workers of a multi-worker
    run write to a private temp folder, as TensorFlow requires every worker to save.
    """

    def __init__(self, run_dir: Path, model: keras.Model, optimizer: keras.optimizers.Optimizer,
                 epoch: tf.Variable, chief: bool):
        self.dir = run_dir / BACKUP_DIR if chief else Path(tempfile.mkdtemp(prefix="backup_"))
        self.chief = chief
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch)
        self.manager = tf.train.CheckpointManager(self.checkpoint, str(self.dir), max_to_keep=1)

    def restore(self) -> TrainState | None:
        """The loop state of a killed run with model and optimizer restored, or None when
        there is no backup. Raises UserError when the backup cannot be read."""
        state_path = self.dir / STATE_FILE
        if not self.manager.latest_checkpoint or not state_path.exists():
            return None
        try:
            self.checkpoint.restore(self.manager.latest_checkpoint).expect_partial()
            state = TrainState(**json.loads(state_path.read_text()))
        except (tf.errors.OpError, ValueError, TypeError, OSError, IndexError) as exc:
            # (A truncated checkpoint data file raises IndexError "Read less bytes ...".)
            first = first_line(exc, 160)
            raise UserError(f"{self.dir}: the backup of the unfinished run is damaged "
                            f"({first}); pass --overwrite to start this run afresh"
                            ) from None
        if int(self.checkpoint.epoch.numpy()) != state.next_epoch:
            return None
        return state

    def save(self, state: TrainState) -> None:
        self.checkpoint.epoch.assign(state.next_epoch)
        self.manager.save()
        write_atomic(self.dir / STATE_FILE, json.dumps(state.__dict__, default=float))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class Snapshots:
    """The weights at the end of the last ``keep`` epochs, for AVERAGE_LAST_EPOCHS.

    On the chief each epoch's weights are also written to the backup folder (one file per
    epoch, so an epoch costs one model's worth of writing whatever ``keep`` is), so that a
    killed and resumed run averages the same epochs as one that was never interrupted.
    """

    def __init__(self, keep: int, folder: Path | None):
        self.keep = keep
        self.folder = folder
        self.epochs: list[int] = []
        self.weights: list[list[np.ndarray]] = []

    def _saved(self) -> dict[int, Path]:
        """The snapshot files in the backup folder, by epoch."""
        if self.folder is None or not self.folder.is_dir():
            return {}
        found = {}
        for path in self.folder.glob(SNAPSHOT_GLOB):
            number = path.stem.rpartition("_")[2]
            if number.isdigit():
                found[int(number)] = path
        return found

    def restore(self, next_epoch: int) -> None:
        """Read the saved snapshots of epochs before ``next_epoch`` (those a resumed run
        has already trained)."""
        saved = self._saved()
        for epoch in sorted(e for e in saved if e < next_epoch)[-self.keep:]:
            path = saved[epoch]
            try:
                with np.load(path) as arrays:
                    weights = [arrays[f"w{j}"] for j in range(int(arrays["n_arrays"]))]
            except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
                raise UserError(f"{path}: a weight snapshot of the unfinished run is damaged "
                                f"({type(exc).__name__}); pass --overwrite to start this run "
                                "afresh") from None
            self.epochs.append(epoch)
            self.weights.append(weights)

    def add(self, epoch: int, weights: list[np.ndarray]) -> None:
        """Keep the weights at the end of ``epoch`` (0-based), dropping the oldest."""
        self.epochs = [*self.epochs, epoch][-self.keep:]
        self.weights = [*self.weights, [np.array(w) for w in weights]][-self.keep:]
        if self.folder is None:
            return
        path = self.folder / SNAPSHOT_FILE.format(epoch=epoch)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, n_arrays=len(weights), **{f"w{j}": w for j, w in enumerate(weights)})
        for old, old_path in self._saved().items():
            if old not in self.epochs:
                old_path.unlink(missing_ok=True)

    def average(self) -> list[np.ndarray]:
        """The element-wise mean of the kept snapshots; integer variables (counters, seeds)
        are taken from the newest."""
        return [np.mean(np.stack(ws), axis=0).astype(ws[-1].dtype)
                if np.issubdtype(ws[-1].dtype, np.floating) else ws[-1]
                for ws in zip(*self.weights, strict=True)]
