"""The training loop: a segmentation model trained on a make_tfrecords dataset.

Why this module is long: the loop and its guards (checks against the dataset, the folder
locks, the schedule and its warm-up note, early stopping, weight averaging, full-disk and
out-of-memory errors) share the loop's state.

One custom training loop serves every tf.distribute strategy: the default strategy on a CPU or
one GPU, MirroredStrategy over several GPUs, and MultiWorkerMirroredStrategy over several
machines (Keras 3's ``model.fit`` fails under the latter, keras-team/keras#20585). The loop
gives what the usual callbacks give: a warm-up/decay learning-rate schedule, early stopping
with the best weights restored, a best-weights checkpoint, CSV history, TensorBoard, and a
backup that a killed run resumes from (:mod:`res_unet.training.resume`). The run ends with the
evaluation on the validation split (:mod:`res_unet.training.evaluation`) and the run folder
(:mod:`res_unet.training.runwriter`), then, when a scorer is given (:mod:`res_unet.workflow`
gives the whole-scene one), the scene evaluation recorded in it. Every output is written
atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import importlib.util
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from res_unet.config.keys import Config, save_config
from res_unet.core import messages
from res_unet.core.atomic import check_output_folder, clean_stale_temporaries, write_csv
from res_unet.core.errors import UserError, first_line
from res_unet.core.folders import check_no_links, folder_lock, reading_lock
from res_unet.core.progress import progress_bar
from res_unet.data import records
from res_unet.models import build_model
from res_unet.models.helpers import fuse_batchnorm, set_encoder_trainable
from res_unet.training import losses, metrics, schedule
from res_unet.training.adam import FusedAdam
from res_unet.training.devices import is_chief, make_strategy, resolve_precision, strategy_name
from res_unet.training.evaluation import evaluate, worst_images
from res_unet.training.resume import (
    Backup,
    Snapshots,
    TrainState,
    check_resume_config,
    run_folder_action,
)
from res_unet.training.runfolder import (
    BACKUP_DIR,
    BEST_WEIGHTS,
    CONFIG,
    HISTORY,
    TENSORBOARD_DIR,
    ModelCard,
    clear_run_folder,
    load_weights_checked,
    read_finished_card,
)
from res_unet.training.runwriter import (
    add_scene_evaluation,
    model_card,
    save_weights,
    write_outputs,
)

# Checks against the dataset ----------------------------------------------------------------


def check_config_against_manifest(cfg: Config, manifest: records.Manifest,
                                  data_dir: Path) -> None:
    """Fail with one line per mismatch between the config and the dataset it trains on."""
    problems = []
    if manifest.n_bands != cfg.N_DATA_BANDS:
        problems.append(f"{data_dir}: the dataset has {manifest.n_bands} bands but "
                        f"N_DATA_BANDS={cfg.N_DATA_BANDS}; set N_DATA_BANDS to "
                        f"{manifest.n_bands} or rebuild the dataset")
    if manifest.n_label_classes != cfg.n_label_classes:
        problems.append(f"{data_dir}: the dataset has {manifest.n_label_classes} label "
                        f"classes but NCLASSES={cfg.NCLASSES} means {cfg.n_label_classes}; "
                        "use the NCLASSES the dataset was made with")
    if list(manifest.target_size) != list(cfg.TARGET_SIZE):
        problems.append(f"{data_dir}: the dataset's examples are {manifest.target_size} but "
                        f"TARGET_SIZE={cfg.TARGET_SIZE}; use the dataset's size or rebuild it")
    if manifest.downsample != cfg.DOWNSAMPLE:
        problems.append(f"{data_dir}: the dataset was made with DOWNSAMPLE="
                        f"{manifest.downsample} but the config says DOWNSAMPLE="
                        f"{cfg.DOWNSAMPLE}; use the dataset's value or rebuild it")
    if manifest.counts["train"].examples == 0 and cfg.DO_TRAIN:
        problems.append(f"{data_dir}: the training split is empty; add images or lower "
                        "VALIDATION_SPLIT")
    if problems:
        raise UserError("\n".join(problems))


def resolve_class_weights(cfg: Config, manifest: records.Manifest) -> list[float] | None:
    """CLASS_WEIGHTS as a list: 'auto' uses the training split's class pixel frequencies."""
    if cfg.CLASS_WEIGHTS == "auto":
        return losses.class_weights_from_frequency(manifest.class_pixel_frequency,
                                                   ignore_class=cfg.IGNORE_CLASS)
    return cfg.CLASS_WEIGHTS


# The loop -------------------------------------------------------------------------------


@dataclass
class EpochLog:
    """One row of history.csv."""

    epoch: int
    lr: float
    loss: float
    mean_iou: float
    val_loss: float | None  # None without a validation split (empty in history.csv)
    val_mean_iou: float | None
    val_dice: float | None
    seconds: float
    images_per_second: float
    input_wait_fraction: float

    def as_row(self) -> dict[str, Any]:
        return dict(self.__dict__)



class Trainer:
    """Builds the model under a strategy and runs the epoch loop.

    ``fused_batchnorm`` (default) runs training-mode BatchNorm through TensorFlow's fused
    kernel (:func:`res_unet.models.helpers.fuse_batchnorm`: same results, faster on CPUs).
    """

    def __init__(self, cfg: Config, manifest: records.Manifest, strategy: tf.distribute.Strategy,
                 precision: str, fused_batchnorm: bool = True):
        self.cfg = cfg
        self.manifest = manifest
        self.strategy = strategy
        self.precision = precision
        self.n_classes = cfg.n_label_classes
        keras.mixed_precision.set_global_policy(precision)
        keras.utils.set_random_seed(cfg.SEED)
        if cfg.DETERMINISTIC:
            # Process-wide and irreversible: also makes tf.data run stateful maps in order.
            tf.config.experimental.enable_op_determinism()
        with strategy.scope():
            self.model = build_model(cfg, manifest.band_mean, manifest.band_std)
            # How many BatchNorm layers train through the fused kernel (0 when switched off).
            self.fused_batchnorm_layers = fuse_batchnorm(self.model) if fused_batchnorm else 0
            self.loss_fn = losses.make_loss(cfg, resolve_class_weights(cfg, manifest))
            optimizer = FusedAdam(learning_rate=schedule.learning_rate(0, cfg))
            if precision == "mixed_float16":
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            self.optimizer = optimizer
            # Built over every variable up front so that freezing and unfreezing the encoder
            # later only changes which subset receives gradients.
            self.optimizer.build(self.model.trainable_variables)
            self.epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._train_step = None
        self._eval_step = None

    # steps ------------------------------------------------------------------------------

    def _make_train_step(self):
        model, loss_fn, opt, strategy = self.model, self.loss_fn, self.optimizer, self.strategy
        n_classes, ignore = self.n_classes, self.cfg.IGNORE_CLASS
        scaled = isinstance(opt, keras.optimizers.LossScaleOptimizer)

        def replica_step(x, y):
            with tf.GradientTape() as tape:
                prob = model(x, training=True)
                loss = loss_fn(y, prob)
                objective = loss / strategy.num_replicas_in_sync
                if scaled:
                    objective = opt.scale_loss(objective)
            variables = model.trainable_variables
            grads = tape.gradient(objective, variables)
            opt.apply_gradients(zip(grads, variables, strict=True))
            return loss, metrics.batch_confusion(y, prob, n_classes, ignore)

        @tf.function(jit_compile=self.cfg.JIT_COMPILE or None)
        def step(x, y):
            loss, cm = strategy.run(replica_step, args=(x, y))
            return (strategy.reduce("MEAN", loss, axis=None),
                    strategy.reduce("SUM", cm, axis=None))

        return step

    def _make_eval_step(self, element_spec):
        """The validation step, traced once for ``element_spec`` (the distributed dataset's,
        whose batch size is unknown): the last, smaller batch reuses the same graph instead
        of tracing a second one."""
        model, loss_fn, strategy = self.model, self.loss_fn, self.strategy
        n_classes, ignore = self.n_classes, self.cfg.IGNORE_CLASS

        def replica_step(x, y):
            prob = model(x, training=False)
            n = tf.cast(tf.shape(x)[0], tf.float32)
            loss = tf.where(n > 0, loss_fn(y, prob) * n, 0.0)
            return loss, n, metrics.batch_confusion(y, prob, n_classes, ignore)

        @tf.function(input_signature=list(element_spec))
        def step(x, y):
            loss, n, cm = strategy.run(replica_step, args=(x, y))
            return (strategy.reduce("SUM", loss, axis=None), strategy.reduce("SUM", n, axis=None),
                    strategy.reduce("SUM", cm, axis=None))

        return step

    def set_encoder_frozen(self, frozen: bool) -> None:
        """Freeze or unfreeze a pretrained encoder; the step function is rebuilt."""
        set_encoder_trainable(self.model, not frozen)
        self._train_step = None

    # epochs ------------------------------------------------------------------------------

    def train_epoch(self, iterator, steps: int, epoch: int, progress: bool) -> tuple[float,
                                                                                     np.ndarray,
                                                                                     float,
                                                                                     float]:
        """Run ``steps`` training steps; returns (mean loss, confusion, seconds, input wait)."""
        if self._train_step is None:
            self._train_step = self._make_train_step()
        cm = np.zeros((self.n_classes, self.n_classes))
        loss_sum, wait, start = 0.0, 0.0, time.perf_counter()
        bar = progress_bar(total=steps, unit="batch", desc=f"epoch {epoch + 1}",
                           enabled=progress, leave=False)
        for done in range(1, steps + 1):
            t0 = time.perf_counter()
            x, y = next(iterator)
            wait += time.perf_counter() - t0
            loss, batch_cm = self._train_step(x, y)
            loss = float(loss)
            if not math.isfinite(loss):
                fix = "lower MAX_LR" + ("" if self.precision == "float32"
                                        else " or use PRECISION float32")
                raise UserError(f"training diverged (loss {loss}) in epoch {epoch + 1}; {fix}")
            loss_sum += loss
            cm += batch_cm.numpy()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / done:.4f}", refresh=False)
        bar.close()
        return loss_sum / max(steps, 1), cm, time.perf_counter() - start, wait

    def evaluate_loss(self, dataset) -> tuple[float, np.ndarray]:
        """Mean loss and confusion matrix over a (distributed) validation dataset."""
        if self._eval_step is None:
            self._eval_step = self._make_eval_step(dataset.element_spec)
        cm = np.zeros((self.n_classes, self.n_classes))
        loss_sum, count = 0.0, 0.0
        for x, y in dataset:
            loss, n, batch_cm = self._eval_step(x, y)
            loss_sum += float(loss)
            count += float(n)
            cm += batch_cm.numpy()
        return loss_sum / max(count, 1.0), cm


def _iou_and_dice(cm: np.ndarray, ignore_class: int | None) -> tuple[float, float]:
    """Mean IoU and mean dice of a confusion matrix (NaN when no class is present)."""
    scores = metrics.scores_from_confusion(cm, ignore_class=ignore_class)
    return tuple(float("nan") if scores[k] is None else float(scores[k])
                 for k in ("mean_iou", "mean_dice"))


# Entry point ------------------------------------------------------------------------------

# Scores a written run folder on whole scenes: the scene evaluation, or None when it cannot
# (see res_unet.inference.scoring.evaluate_scenes).
ScoreScenes = Callable[[Path], dict[str, Any] | None]


def train(cfg: Config, data_dir: str | os.PathLike, run_dir: str | os.PathLike, *,
          strategy: tf.distribute.Strategy | None = None, progress: bool = True,
          export_saved_model: bool = True, overwrite: bool = False,
          score_scenes: ScoreScenes | None = None) -> ModelCard:
    """Train (or, with DO_TRAIN=false, evaluate) a model; write the run folder.

    ``data_dir`` is a make_tfrecords dataset; ``run_dir`` receives best.weights.h5,
    model.keras, saved_model/, config.json, history.csv, figures, evaluation.json and
    model_card.json (saved_model/ only with ``export_saved_model``). A run folder with a
    backup/ from a killed run resumes from it; one with a finished run is refused unless
    ``overwrite`` (see :func:`run_folder_action`). ``score_scenes`` scores the written run
    folder on whole scenes (:func:`res_unet.workflow.train_model` passes the inference's
    :func:`~res_unet.inference.scoring.evaluate_scenes`, which training may not import): it
    runs on the process that writes the folder, while the folder is still locked, and what
    it returns is recorded by :func:`add_scene_evaluation`. Returns the model card as
    written.
    """
    data_dir, run_dir = Path(data_dir), Path(run_dir)
    # Before the lock creates the folder, as the other commands do.
    check_output_folder(run_dir, "run", [("dataset", data_dir)])
    # One training per run folder; the other workers of a multi-worker run write nothing there.
    lock = folder_lock(run_dir, "train_resunet") if is_chief() else contextlib.nullcontext()
    with lock, reading_lock(data_dir, "train_resunet", writing=run_dir):
        try:
            return _train(cfg, data_dir, run_dir, strategy, progress, export_saved_model,
                          overwrite, score_scenes)
        except tf.errors.OpError as exc:
            # TensorFlow reports a full disk (checkpoints, SavedModel) as its own error.
            if _NO_SPACE not in str(exc):
                raise
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(run_dir)) from None


_NO_SPACE = "No space left on device"


def _train(cfg: Config, data_dir: Path, run_dir: Path, strategy: tf.distribute.Strategy | None,
           progress: bool, export_saved_model: bool, overwrite: bool,
           score_scenes: ScoreScenes | None) -> ModelCard:
    """The body of :func:`train`, run while ``run_dir`` is locked and ``data_dir`` read."""
    started = time.time()
    action = run_folder_action(run_dir, cfg, overwrite)
    if cfg.TENSORBOARD and importlib.util.find_spec("tensorboard") is None:
        raise UserError("TENSORBOARD=true needs the tensorboard package: pip install "
                        "res_unet[tensorboard] (or set TENSORBOARD to false)")
    manifest = records.read_manifest(data_dir)
    check_config_against_manifest(cfg, manifest, data_dir)
    records.verify_shards(data_dir, manifest)
    strategy = strategy or make_strategy()
    if (cfg.MAX_TRAIN_MINUTES is not None and cfg.DO_TRAIN
            and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)):
        # Each worker times itself: they could disagree on the last epoch and hang.
        raise UserError("MAX_TRAIN_MINUTES cannot be used with several worker machines "
                        "(TF_CONFIG); set MAX_EPOCHS instead")
    chief = is_chief()
    precision = resolve_precision(cfg)
    # Saved weights replace the encoder's pretrained ones: don't read (or download) those.
    build_cfg = cfg if cfg.DO_TRAIN and not cfg.HOT_START else dataclasses.replace(
        cfg, ENCODER_WEIGHTS=None)
    if action == "resume":
        check_resume_config(run_dir, cfg)
    trainer = Trainer(build_cfg, manifest, strategy, precision)
    model = trainer.model
    if action == "overwrite" and chief:
        clear_run_folder(run_dir)
        messages.status(f"--overwrite: removed the previous run in {run_dir}")
    if chief:
        clean_stale_temporaries(run_dir)
        check_no_links(run_dir / BACKUP_DIR, run_dir / TENSORBOARD_DIR)  # TF writes by name

    state = TrainState(next_epoch=cfg.INITIAL_EPOCH)
    if cfg.DO_TRAIN:
        if note := schedule.warmup_note(cfg):
            messages.status(note)
        if cfg.HOT_START:
            load_weights_checked(model, Path(cfg.INITIAL_WEIGHTS))
        backup = Backup(run_dir, model, trainer.optimizer, trainer.epoch_var, chief)
        restored = backup.restore()
        if restored is not None:
            state = restored
            messages.status(f"resuming from the backup in {backup.dir}: "
                            f"epoch {state.next_epoch + 1}")
        # Written once every check passed: a refused command leaves the folder as it was.
        if chief:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / CONFIG)
        try:
            state = _fit(trainer, cfg, data_dir, run_dir, state, backup, chief, progress)
        except tf.errors.ResourceExhaustedError as exc:
            if _NO_SPACE in str(exc):
                raise
            raise UserError(f"out of memory at BATCH_SIZE={cfg.BATCH_SIZE} and TARGET_SIZE="
                            f"{cfg.TARGET_SIZE}; lower BATCH_SIZE (or TARGET_SIZE)") from None
        except tf.errors.DataLossError as exc:
            first = first_line(exc, 160, empty="corrupt record")
            raise UserError(f"{data_dir}: a shard became unreadable during training ({first});"
                            " rebuild the dataset with make_tfrecords --overwrite, then re-run "
                            "this command to resume") from None
    else:
        load_weights_checked(model, run_dir / BEST_WEIGHTS)
        if chief:
            save_config(cfg, run_dir / CONFIG)

    evaluation, examples = evaluate(model, cfg, data_dir, loss_fn=losses.make_loss(
        cfg, resolve_class_weights(cfg, manifest)))
    if evaluation["images"]:
        messages.status(worst_images(evaluation["images"]))
    facts = state.training_facts(manifest.counts["validation"].examples > 0, precision,
                                 strategy_name(strategy), strategy.num_replicas_in_sync)
    card = model_card(cfg, manifest, model, facts, evaluation, time.time() - started)
    previous = read_finished_card(run_dir) if not cfg.DO_TRAIN else None
    if previous is not None:
        # Re-evaluating does not change how the weights were trained: keep those facts.
        card.training, card.wall_seconds = previous.training, previous.wall_seconds
    if chief:
        write_outputs(run_dir, cfg, model, state.history, evaluation, examples, card,
                      export_saved_model)
        if cfg.DO_TRAIN:
            backup.remove()
        if score_scenes is not None and (scenes := score_scenes(run_dir)) is not None:
            card = add_scene_evaluation(run_dir, card, evaluation, scenes)
    elif cfg.DO_TRAIN:
        backup.remove()
    return card


def _fit(trainer: Trainer, cfg: Config, data_dir: Path, run_dir: Path, state: TrainState,
         backup: Backup, chief: bool, progress: bool) -> TrainState:
    """The epoch loop: schedule, train, validate, early stopping, checkpoints, backup."""
    strategy, model = trainer.strategy, trainer.model
    manifest = trainer.manifest
    n_train = manifest.counts["train"].examples
    steps = cfg.STEPS_PER_EPOCH or max(1, math.ceil(n_train / cfg.BATCH_SIZE))
    train_ds = records.load_dataset(data_dir, "train", cfg.BATCH_SIZE, shuffle=True, flips=True,
                                    repeat=True, cache=True, seed=cfg.SEED,
                                    color=cfg.AUG_COLOR)
    val_ds = records.load_dataset(data_dir, "validation", cfg.BATCH_SIZE, shuffle=False,
                                  cache=True)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    train_dist = strategy.experimental_distribute_dataset(train_ds.with_options(options))
    val_dist = strategy.experimental_distribute_dataset(val_ds.with_options(options))
    iterator = iter(train_dist)
    writer = tf.summary.create_file_writer(str(run_dir / TENSORBOARD_DIR)) \
        if cfg.TENSORBOARD and chief else None
    has_validation = manifest.counts["validation"].examples > 0
    # Without a validation split there is nothing to choose an epoch on (the training loss
    # would pick the most overfitted one): no early stopping, the last weights are kept.
    choose_best = cfg.KEEP_WEIGHTS == "best" and has_validation
    best_weights = None
    snapshots = None
    if cfg.AVERAGE_LAST_EPOCHS > 1:
        snapshots = Snapshots(cfg.AVERAGE_LAST_EPOCHS, backup.dir if chief else None)
        snapshots.restore(state.next_epoch)

    for epoch in range(state.next_epoch, cfg.MAX_EPOCHS):
        frozen = epoch < cfg.FREEZE_ENCODER_EPOCHS
        if cfg.FREEZE_ENCODER_EPOCHS and (epoch == state.next_epoch or
                                          epoch == cfg.FREEZE_ENCODER_EPOCHS):
            trainer.set_encoder_frozen(frozen)
        lr = schedule.learning_rate(epoch, cfg)
        trainer.optimizer.learning_rate.assign(lr)
        loss, cm, seconds, wait = trainer.train_epoch(iterator, steps, epoch, progress)
        val_loss, val_cm = trainer.evaluate_loss(val_dist) if has_validation else (loss, cm)
        train_iou, _ = _iou_and_dice(cm, cfg.IGNORE_CLASS)
        val_iou, val_dice = _iou_and_dice(val_cm, cfg.IGNORE_CLASS)
        log = EpochLog(epoch=epoch + 1, lr=lr, loss=loss, mean_iou=train_iou,
                       val_loss=val_loss if has_validation else None,
                       val_mean_iou=val_iou if has_validation else None,
                       val_dice=val_dice if has_validation else None,
                       seconds=seconds,
                       images_per_second=steps * cfg.BATCH_SIZE / seconds,
                       input_wait_fraction=wait / seconds)
        state.history.append(log.as_row())
        state.train_seconds += seconds
        # Without a validation split history.csv leaves the val_ columns empty and the
        # line says so; val_loss is then the training loss, which only names the reported
        # best epoch (choose_best is False: the last weights are kept).
        validation = (f"val_loss {val_loss:.4f} val_iou {val_iou:.3f}"
                      if has_validation else "no validation split")
        messages.status(f"epoch {log.epoch}/{cfg.MAX_EPOCHS}: loss {loss:.4f} "
                        f"iou {log.mean_iou:.3f} | {validation} | lr {lr:.2e} | "
                        f"{log.images_per_second:.1f} img/s, "
                        f"input wait {100 * wait / seconds:.0f}%")
        if writer is not None:
            with writer.as_default(step=epoch + 1):
                for key, value in log.as_row().items():
                    if value is not None:
                        tf.summary.scalar(key, value)
        if val_loss < state.best_val_loss:
            state.best_val_loss, state.best_epoch, state.wait = val_loss, epoch + 1, 0
            best_weights = model.get_weights()
            if chief:
                save_weights(model, run_dir / BEST_WEIGHTS)
        else:
            state.wait += 1
        state.next_epoch = epoch + 1
        if snapshots is not None:
            snapshots.add(epoch, model.get_weights())
        if chief:
            write_csv(run_dir / HISTORY, state.history)
        backup.save(state)
        if state.wait >= cfg.PATIENCE and choose_best:
            messages.status(f"early stopping: no val_loss improvement for {cfg.PATIENCE} "
                            f"epochs; best epoch {state.best_epoch}")
            break
        if cfg.MAX_TRAIN_MINUTES is not None and state.train_seconds >= 60 * cfg.MAX_TRAIN_MINUTES:
            messages.status(f"time budget reached: {state.train_seconds / 60:.1f} of "
                            f"MAX_TRAIN_MINUTES={cfg.MAX_TRAIN_MINUTES} minutes trained; "
                            f"best epoch {state.best_epoch}")
            break
    if snapshots is not None and len(snapshots.epochs) > 1 and _keep_average(
            trainer, snapshots, state, val_dist if choose_best else None):
        if chief:
            save_weights(model, run_dir / BEST_WEIGHTS)
        return state
    if not choose_best:
        # The model holds the weights of the last epoch trained (a resumed run that had
        # finished its epochs holds them from the backup).
        why = (f"KEEP_WEIGHTS 'last'; best on validation: epoch {state.best_epoch}"
               if has_validation else "no validation split to choose an epoch on")
        messages.status(f"kept the last epoch, {state.next_epoch} ({why})")
        state.kept_epoch = state.next_epoch
        if chief:
            save_weights(model, run_dir / BEST_WEIGHTS)
        return state
    # Restore the best weights, as early stopping promises. Each worker kept its own copy
    # (they are identical across workers); a resumed run without a new best reads the file.
    if best_weights is not None:
        model.set_weights(best_weights)
    elif (run_dir / BEST_WEIGHTS).exists():
        model.load_weights(run_dir / BEST_WEIGHTS)
    return state


def _keep_average(trainer: Trainer, snapshots: Snapshots, state: TrainState,
                  val_dist) -> bool:
    """Load the average of the snapshots into the model and keep it when its validation
    loss is at most the best epoch's (always, without a validation split). Returns whether
    it was kept; when not, the model holds the average and the caller restores the best."""
    trainer.model.set_weights(snapshots.average())
    epochs = f"epochs {snapshots.epochs[0] + 1}-{snapshots.epochs[-1] + 1}"
    if val_dist is None:
        messages.status(f"weights averaged over {epochs}")
    else:
        val_loss, val_cm = trainer.evaluate_loss(val_dist)
        val_iou, _ = _iou_and_dice(val_cm, trainer.cfg.IGNORE_CLASS)
        scored = f"weights averaged over {epochs}: val_loss {val_loss:.4f} val_iou {val_iou:.3f}"
        if val_loss > state.best_val_loss:
            messages.status(f"{scored}, not better than best epoch {state.best_epoch} "
                            f"({state.best_val_loss:.4f}); kept the best epoch")
            return False
        messages.status(f"{scored} (best epoch {state.best_epoch}: "
                        f"{state.best_val_loss:.4f}); kept the average")
        state.best_val_loss = val_loss
    state.averaged_epochs = [e + 1 for e in snapshots.epochs]
    return True
