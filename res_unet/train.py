"""Training and evaluation of a segmentation model on a make_tfrecords dataset.

Why this module is long: the epoch loop, its resume backup, early stopping and the
writing of the run folder share one state (TrainState) and one order of steps that a
resumed run must repeat exactly; split, each part would need the others' internals.

One custom training loop serves every tf.distribute strategy: the default strategy on a CPU or
one GPU, MirroredStrategy over several GPUs, and MultiWorkerMirroredStrategy over several
machines (Keras 3's ``model.fit`` fails under the latter, keras-team/keras#20585). The loop
gives what the usual callbacks give: a warm-up/decay learning-rate schedule, early stopping
with the best weights restored, a best-weights checkpoint, CSV history, TensorBoard, and a
backup that a killed run resumes from. Every output is written atomically.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import platform
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from res_unet import __version__, losses, metrics, records, report, schedule
from res_unet.atomic import (
    atomic_path,
    check_writable,
    clean_stale_temporaries,
    owner_tag,
    usual_mode,
    write_atomic,
    write_csv,
)
from res_unet.config import Config, config_from_dict, save_config
from res_unet.devices import (
    device_description,
    is_chief,
    make_strategy,
    resolve_precision,
    strategy_name,
)
from res_unet.errors import UserError
from res_unet.models import build_model
from res_unet.models.helpers import count_flops, fuse_batchnorm, set_encoder_trainable
from res_unet.progress import progress_bar
from res_unet.runfolder import (
    BACKUP_DIR,
    BEST_WEIGHTS,
    CARD,
    CONFIG,
    CURVES,
    EVALUATION,
    EXAMPLES_FIGURE,
    FULL_MODEL,
    HISTORY,
    LR_FIGURE,
    SAVED_MODEL,
    SNAPSHOT_FILE,
    SNAPSHOT_GLOB,
    STATE_FILE,
    TENSORBOARD_DIR,
    CardInput,
    ModelCard,
    TrainingFacts,
    clear_run_folder,
    load_weights_checked,
    read_finished_card,
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
            optimizer = keras.optimizers.Adam(learning_rate=schedule.learning_rate(0, cfg))
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

    def _make_eval_step(self):
        model, loss_fn, strategy = self.model, self.loss_fn, self.strategy
        n_classes, ignore = self.n_classes, self.cfg.IGNORE_CLASS

        def replica_step(x, y):
            prob = model(x, training=False)
            n = tf.cast(tf.shape(x)[0], tf.float32)
            loss = tf.where(n > 0, loss_fn(y, prob) * n, 0.0)
            return loss, n, metrics.batch_confusion(y, prob, n_classes, ignore)

        @tf.function
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
            self._eval_step = self._make_eval_step()
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


# Run folder ------------------------------------------------------------------------------


def _save_weights(model: keras.Model, path: Path) -> None:
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
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class Backup:
    """Model, optimizer and loop state saved each epoch, so a killed run resumes.

    Uses tf.train.CheckpointManager (which writes the checkpoint before updating its index)
    plus a small JSON state written atomically after it. Non-chief workers of a multi-worker
    run write to a private temp folder, as TensorFlow requires every worker to save.
    """

    def __init__(self, run_dir: Path, trainer: Trainer, chief: bool):
        self.dir = run_dir / BACKUP_DIR if chief else Path(tempfile.mkdtemp(prefix="backup_"))
        self.chief = chief
        self.checkpoint = tf.train.Checkpoint(model=trainer.model, optimizer=trainer.optimizer,
                                              epoch=trainer.epoch_var)
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
        except (tf.errors.OpError, ValueError, TypeError, OSError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"{self.dir}: the backup of the unfinished run is damaged "
                            f"({first[:160]}); pass --overwrite to start this run afresh"
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


# Evaluation -------------------------------------------------------------------------------


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


# Entry point ------------------------------------------------------------------------------


def run_folder_action(run_dir: Path, data_dir: Path, cfg: Config, overwrite: bool) -> str:
    """Decide what training does with ``run_dir``; changes nothing.

    Returns 'new' (no run there yet), 'resume' (a killed run's backup is there), 'evaluate'
    (DO_TRAIN false) or 'overwrite' (a run is there and ``overwrite`` was asked for; see
    :func:`clear_run_folder`). Raises UserError when ``run_dir`` is a file or the dataset
    folder, and when it holds a finished run and ``overwrite`` is false: a finished run is
    never replaced silently.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir}: exists and is not a folder; choose another --out")
    if run_dir.resolve() == data_dir.resolve():
        raise UserError(f"{run_dir}: is the dataset folder; write the run to another --out")
    check_writable(run_dir)
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


# Keys that may change when a killed run resumes: when to stop, what to draw or log, and
# how to segment later. Anything else would train another model on the same weights.
RESUMABLE_KEYS = ("MAX_EPOCHS", "PATIENCE", "MAX_TRAIN_MINUTES", "STEPS_PER_EPOCH",
                  "KEEP_WEIGHTS", "DOPLOT", "TENSORBOARD", "SET_GPU")


def check_resume_config(run_dir: Path, cfg: Config) -> None:
    """Raise UserError naming every changed key when ``cfg`` differs from the config of the
    unfinished run in ``run_dir`` in more than ``RESUMABLE_KEYS`` and segmentation keys."""
    path = run_dir / CONFIG
    try:
        old, _ = config_from_dict(json.loads(path.read_text(encoding="utf-8")),
                                  source=str(path))
    except (OSError, ValueError, UserError):
        raise UserError(f"{path}: the unfinished run's config cannot be read; pass --overwrite "
                        "to start this run afresh") from None
    free = set(RESUMABLE_KEYS) | {f.name for f in dataclasses.fields(Config)
                                  if f.metadata["group"] == "segmentation"}
    changed = [f"{f.name} {getattr(old, f.name)!r} -> {getattr(cfg, f.name)!r}"
               for f in dataclasses.fields(Config)
               if f.name not in free and getattr(old, f.name) != getattr(cfg, f.name)]
    if changed:
        raise UserError(f"{run_dir}: the unfinished run there was started with another config "
                        f"({'; '.join(changed)}); resume with its config.json, or pass "
                        "--overwrite to start afresh")


def train(cfg: Config, data_dir: str | os.PathLike, run_dir: str | os.PathLike, *,
          strategy: tf.distribute.Strategy | None = None, progress: bool = True,
          export_saved_model: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Train (or, with DO_TRAIN=false, evaluate) a model; write the run folder.

    ``data_dir`` is a make_tfrecords dataset; ``run_dir`` receives best.weights.h5,
    model.keras, saved_model/, config.json, history.csv, figures, evaluation.json and
    model_card.json (saved_model/ only with ``export_saved_model``). A run folder with a
    backup/ from a killed run resumes from it; one with a finished run is refused unless
    ``overwrite`` (see :func:`run_folder_action`). Returns the model card.
    """
    data_dir, run_dir = Path(data_dir), Path(run_dir)
    started = time.time()
    action = run_folder_action(run_dir, data_dir, cfg, overwrite)
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
        print(f"--overwrite: removed the previous run in {run_dir}")
    if chief:
        clean_stale_temporaries(run_dir)

    state = TrainState(next_epoch=cfg.INITIAL_EPOCH)
    if cfg.DO_TRAIN:
        if cfg.HOT_START:
            load_weights_checked(model, Path(cfg.INITIAL_WEIGHTS))
        backup = Backup(run_dir, trainer, chief)
        restored = backup.restore()
        if restored is not None:
            state = restored
            print(f"resuming from the backup in {backup.dir}: epoch {state.next_epoch + 1}")
        # Written once every check passed: a refused command leaves the folder as it was.
        if chief:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / CONFIG)
        try:
            state = _fit(trainer, cfg, data_dir, run_dir, state, backup, chief, progress)
        except tf.errors.ResourceExhaustedError:
            raise UserError(f"out of memory at BATCH_SIZE={cfg.BATCH_SIZE} and TARGET_SIZE="
                            f"{cfg.TARGET_SIZE}; lower BATCH_SIZE (or TARGET_SIZE)") from None
        except tf.errors.DataLossError as exc:
            first = (str(exc).strip().splitlines() or ["corrupt record"])[0][:160]
            raise UserError(f"{data_dir}: a shard became unreadable during training ({first});"
                            " rebuild the dataset with make_tfrecords --overwrite, then re-run "
                            "this command to resume") from None
    else:
        load_weights_checked(model, run_dir / BEST_WEIGHTS)
        if chief:
            save_config(cfg, run_dir / CONFIG)

    evaluation, examples = evaluate(model, cfg, data_dir)
    card = _model_card(cfg, manifest, trainer, state, evaluation, time.time() - started)
    previous = read_finished_card(run_dir) if not cfg.DO_TRAIN else None
    if previous is not None:
        # Re-evaluating does not change how the weights were trained: keep those facts.
        card.training, card.wall_seconds = previous.training, previous.wall_seconds
    if chief:
        _write_outputs(run_dir, cfg, trainer, state, evaluation, examples, card,
                       export_saved_model)
        if cfg.DO_TRAIN:
            backup.remove()
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
        print(f"epoch {log.epoch}/{cfg.MAX_EPOCHS}: loss {loss:.4f} iou {log.mean_iou:.3f} | "
              f"{validation} | lr {lr:.2e} | "
              f"{log.images_per_second:.1f} img/s, input wait {100 * wait / seconds:.0f}%",
              flush=True)
        if writer is not None:
            with writer.as_default(step=epoch + 1):
                for key, value in log.as_row().items():
                    if value is not None:
                        tf.summary.scalar(key, value)
        if val_loss < state.best_val_loss:
            state.best_val_loss, state.best_epoch, state.wait = val_loss, epoch + 1, 0
            best_weights = model.get_weights()
            if chief:
                _save_weights(model, run_dir / BEST_WEIGHTS)
        else:
            state.wait += 1
        state.next_epoch = epoch + 1
        if snapshots is not None:
            snapshots.add(epoch, model.get_weights())
        if chief:
            write_csv(run_dir / HISTORY, state.history)
        backup.save(state)
        if state.wait >= cfg.PATIENCE and choose_best:
            print(f"early stopping: no val_loss improvement for {cfg.PATIENCE} epochs; best "
                  f"epoch {state.best_epoch}")
            break
        if cfg.MAX_TRAIN_MINUTES is not None and state.train_seconds >= 60 * cfg.MAX_TRAIN_MINUTES:
            print(f"time budget reached: {state.train_seconds / 60:.1f} of MAX_TRAIN_MINUTES="
                  f"{cfg.MAX_TRAIN_MINUTES} minutes trained; best epoch {state.best_epoch}")
            break
    if snapshots is not None and len(snapshots.epochs) > 1 and _keep_average(
            trainer, snapshots, state, val_dist if choose_best else None):
        if chief:
            _save_weights(model, run_dir / BEST_WEIGHTS)
        return state
    if not choose_best:
        # The model holds the weights of the last epoch trained (a resumed run that had
        # finished its epochs holds them from the backup).
        why = (f"KEEP_WEIGHTS 'last'; best on validation: epoch {state.best_epoch}"
               if has_validation else "no validation split to choose an epoch on")
        print(f"kept the last epoch, {state.next_epoch} ({why})")
        state.kept_epoch = state.next_epoch
        if chief:
            _save_weights(model, run_dir / BEST_WEIGHTS)
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
        print(f"weights averaged over {epochs}")
    else:
        val_loss, val_cm = trainer.evaluate_loss(val_dist)
        val_iou, _ = _iou_and_dice(val_cm, trainer.cfg.IGNORE_CLASS)
        scored = f"weights averaged over {epochs}: val_loss {val_loss:.4f} val_iou {val_iou:.3f}"
        if val_loss > state.best_val_loss:
            print(f"{scored}, not better than best epoch {state.best_epoch} "
                  f"({state.best_val_loss:.4f}); kept the best epoch")
            return False
        print(f"{scored} (best epoch {state.best_epoch}: {state.best_val_loss:.4f}); kept the "
              "average")
        state.best_val_loss = val_loss
    state.averaged_epochs = [e + 1 for e in snapshots.epochs]
    return True


def _model_card(cfg: Config, manifest: records.Manifest, trainer: Trainer, state: TrainState,
                evaluation: dict[str, Any], wall_seconds: float) -> ModelCard:
    history = state.history
    return ModelCard(
        res_unet_version=__version__,
        model=cfg.MODEL,
        encoder=cfg.ENCODER if cfg.MODEL == "efficientnet_unet" else None,
        parameters=int(trainer.model.count_params()),
        flops_per_image=int(count_flops(trainer.model)),
        input=CardInput(size=list(cfg.TARGET_SIZE), bands=cfg.N_DATA_BANDS,
                        dtype=manifest.dtype, band_mean=manifest.band_mean,
                        band_std=manifest.band_std, downsample=cfg.DOWNSAMPLE),
        classes=cfg.n_label_classes,
        class_names=cfg.class_names,
        binary=cfg.NCLASSES == 1,
        ignore_class=cfg.IGNORE_CLASS,
        threshold=evaluation.get("optimal_threshold", 0.5 if cfg.NCLASSES == 1 else None),
        dataset={"content_hash": manifest.content_hash,
                 "counts": manifest.to_dict()["counts"], "fit_mode": cfg.FIT_MODE},
        training=TrainingFacts(
            epochs_run=len(history), best_epoch=state.best_epoch,
            best_val_loss=None if math.isinf(state.best_val_loss)
            or not manifest.counts["validation"].examples else state.best_val_loss,
            train_seconds=round(state.train_seconds, 1),
            images_per_second=round(float(np.mean([h["images_per_second"] for h in history])),
                                    2) if history else None,
            precision=trainer.precision, strategy=strategy_name(trainer.strategy),
            replicas=trainer.strategy.num_replicas_in_sync,
            averaged_epochs=state.averaged_epochs or None,
            kept_epoch=state.kept_epoch if not state.averaged_epochs else None),
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


def _write_outputs(run_dir: Path, cfg: Config, trainer: Trainer, state: TrainState,
                   evaluation: dict[str, Any], examples: list, card: ModelCard,
                   export_saved_model: bool) -> None:
    model = trainer.model
    # Saved uncompiled: the loss is described by the config, and compiling here would create
    # optimizer variables, a collective operation other workers have already left.
    _save_full_model(model, run_dir / FULL_MODEL)
    if export_saved_model:
        _export_saved_model(model, run_dir / SAVED_MODEL)
    write_atomic(run_dir / EVALUATION, json.dumps(evaluation, indent=2, default=float))
    card.write(run_dir)
    if cfg.DOPLOT:
        if state.history:
            report.plot_history(state.history, run_dir / CURVES)
        report.plot_lr_schedule(schedule.lr_curve(cfg, cfg.MAX_EPOCHS), run_dir / LR_FIGURE)
        if examples:
            report.plot_predictions(examples, cfg.n_label_classes, run_dir / EXAMPLES_FIGURE,
                                        class_names=cfg.class_names)
