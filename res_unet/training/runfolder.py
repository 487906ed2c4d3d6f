"""The run folder: what train_resunet writes and seg_images_in_folder reads back.

Why this module is long: :class:`LoadedModel` still carries the choice of runtime (TensorFlow,
OpenVINO, 'auto' and its checks) beside the format it is loaded from; that choice belongs in
a runtime module of its own, the next split.

A run folder holds the weights (``best.weights.h5`` and/or ``model.keras``), the config it
was trained with (``config.json``) and a :class:`ModelCard` (``model_card.json``): what the
model takes (size, bands, data type, band statistics, working scale), what it gives
(classes, binary threshold) and how it was made. Training writes it through
:meth:`ModelCard.write`; segmentation reads it through :func:`load_run` (the model) and
:func:`inference_config` (the settings). Neither reaches into the other for file names:
they are the constants below.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras

from res_unet.config.keys import Config, config_from_dict
from res_unet.core.atomic import write_atomic
from res_unet.core.errors import UserError, first_line
from res_unet.core.folders import check_regular_file, loads_json, read_small_text
from res_unet.models import build_model
from res_unet.models.saving import cache_attr_skipsets

cache_attr_skipsets()  # run folders are saved and loaded through Keras' saving

BEST_WEIGHTS = "best.weights.h5"
FULL_MODEL = "model.keras"
SAVED_MODEL = "saved_model"
CONFIG = "config.json"
CARD = "model_card.json"
EVALUATION = "evaluation.json"
HISTORY = "history.csv"
BACKUP_DIR = "backup"
STATE_FILE = "train_state.json"
# In BACKUP_DIR, one file per epoch that AVERAGE_LAST_EPOCHS averages (0-based epoch number).
SNAPSHOT_FILE = "snapshot_{epoch:04d}.npz"
SNAPSHOT_GLOB = "snapshot_*.npz"
CURVES = "curves.png"
LR_FIGURE = "lr_schedule.png"
EXAMPLES_FIGURE = "val_examples.png"
TENSORBOARD_DIR = "tensorboard"
# Everything a training run writes into its folder (what --overwrite removes first).
RUN_FILES = (BEST_WEIGHTS, FULL_MODEL, SAVED_MODEL, BACKUP_DIR, CONFIG, HISTORY, CURVES,
             LR_FIGURE, EXAMPLES_FIGURE, EVALUATION, CARD, TENSORBOARD_DIR)
# Version of the model card's layout; cards without one are version 1. Bump it when the
# layout changes (a field renamed, removed or given another meaning), with an upgrade from
# the version before in _CARD_UPGRADES.
CARD_VERSION = 1
# The flips test-time augmentation can average (a card's ``tta_views`` lists some of them).
TTA_VIEWS = ("identity", "flip_lr", "flip_ud", "rot180")


def read_json(path: Path, what: str = "JSON") -> Any:
    """A JSON file of a run folder (``what``: "model card", "config", for messages); UserError
    naming the file and the fix when unreadable, not a regular file, over
    ``folders.MAX_JSON_BYTES`` or nested too deeply."""
    try:
        return loads_json(read_small_text(path, what), path, what)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read it as JSON ({exc}); restore it from the "
                        "training run or re-run train_resunet --evaluate-only") from None


# The model card ------------------------------------------------------------------------------

@dataclass
class CardInput:
    """What the model takes: tile size, bands, pixel data type and band statistics of the
    raw training pixels (the model standardises with them), and the working scale."""

    size: list[int]
    bands: int
    dtype: str | None
    band_mean: list[float]
    band_std: list[float]
    downsample: int = 1
    # Metres per pixel of what the model sees (training images' pixel size x downsample);
    # None: unknown (plain images without PIXEL_SIZE, or cards written before it existed).
    pixel_size_m: float | None = None


@dataclass
class TrainingFacts:
    """How the weights were trained."""

    epochs_run: int
    best_epoch: int
    best_val_loss: float | None
    train_seconds: float
    images_per_second: float | None
    precision: str
    strategy: str
    replicas: int
    averaged_epochs: list[int] | None = None  # AVERAGE_LAST_EPOCHS: the epochs averaged
    kept_epoch: int | None = None  # KEEP_WEIGHTS 'last': the epoch kept (None: the best)


@dataclass
class ModelCard:
    """``model_card.json``: one typed record per run folder.

    ``threshold`` is the binary threshold segmentation uses by default (None for multiclass
    models); ``threshold_source`` says where it was chosen. ``tta_views``: the flips (names
    of TTA_VIEWS) that flip TTA averages for this model, measured to pay on held-out scenes;
    None (cards without it): all four. ``dataset``, ``validation``, ``versions`` and
    ``files`` are reports (read by people, not by the code).
    """

    res_unet_version: str
    model: str
    encoder: str | None
    parameters: int
    flops_per_image: int
    input: CardInput
    classes: int
    class_names: list[str]
    binary: bool
    ignore_class: int | None
    threshold: float | None
    dataset: dict[str, Any]
    training: TrainingFacts
    validation: dict[str, Any]
    versions: dict[str, str]
    device: str
    wall_seconds: float
    files: dict[str, str]
    config: dict[str, Any]
    threshold_source: str | None = None
    card_version: int = CARD_VERSION
    tta_views: list[str] | None = None

    @property
    def n_outputs(self) -> int:
        """Model output channels: 1 sigmoid for binary models, else one per class."""
        return 1 if self.binary else int(self.classes)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written to ``model_card.json``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Any, source: str = CARD) -> ModelCard:
        """Parse a card; UserError naming ``source`` when it is not one this version reads."""
        fix = "re-run train_resunet --evaluate-only on this folder to rewrite it"
        if not isinstance(raw, dict):
            raise UserError(f"{source}: is not a model card (a JSON object); {fix}")
        version = raw.get("card_version", 1)
        if not isinstance(version, int) or version not in _CARD_UPGRADES:
            raise UserError(f"{source}: written by a newer res_unet (card version {version}; "
                            f"this one reads up to {CARD_VERSION}); upgrade res_unet")
        for step in range(version, CARD_VERSION + 1):
            raw = _CARD_UPGRADES[step](raw)
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            values = {k: v for k, v in raw.items() if k in names}
            values["input"] = CardInput(**raw["input"])
            values["training"] = TrainingFacts(**raw["training"])
            card = cls(**values)
            int(card.input.size[0]), int(card.input.size[1]), int(card.input.bands)
            if len(card.input.band_mean) != card.input.bands or len(
                    card.input.band_std) != card.input.bands:
                raise ValueError("band statistics do not match the band count")
            views = card.tta_views
            if views is not None and (not isinstance(views, list) or not views or any(
                    v not in TTA_VIEWS for v in views) or len(set(views)) != len(views)):
                raise ValueError(f"tta_views must list some of {', '.join(TTA_VIEWS)} once")
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            first = first_line(exc, 120)
            raise UserError(f"{source}: the model card lacks or garbles a field ({first}); "
                            f"{fix}") from None
        return card

    @classmethod
    def read(cls, run_dir: str | os.PathLike) -> ModelCard:
        """The card of a run folder; UserError when it is missing or unreadable."""
        path = Path(run_dir) / CARD
        if not path.exists():  # (a FIFO or device is refused by read_json, naming it)
            raise UserError(f"{path}: not found; pass the folder train_resunet --out wrote")
        return cls.from_dict(read_json(path, "model card"), str(path))

    def write(self, run_dir: str | os.PathLike) -> None:
        """Write ``model_card.json`` into ``run_dir``, atomically."""
        write_atomic(Path(run_dir) / CARD,
                     json.dumps(self.to_dict(), indent=2, default=float))


def _upgrade_card_v1(raw: dict[str, Any]) -> dict[str, Any]:
    """A version-1 card as this release writes version 1: the fields releases of version 1
    added get the value a card without them meant."""
    raw = {"threshold_source": None,  # where the threshold was chosen: not said
           "tta_views": None,  # flip TTA averages all four flips
           **raw, "card_version": 1}
    if isinstance(raw.get("input"), dict):
        raw["input"] = {"downsample": 1,  # trained at full resolution
                        "pixel_size_m": None,  # unknown
                        **raw["input"]}
    if isinstance(raw.get("training"), dict):
        raw["training"] = {"averaged_epochs": None, "kept_epoch": None,  # the best epoch's
                           **raw["training"]}
    return raw


# One upgrade per card version, applied in order from a card's own version up to
# CARD_VERSION: each brings a card written under its version (by any release) to the layout
# this release writes, and (once there is a next version) on to that one.
_CARD_UPGRADES = {1: _upgrade_card_v1}


def read_finished_card(run_dir: Path) -> ModelCard | None:
    """The card of a finished run in ``run_dir``, or None when there is none or it is
    unreadable (for messages that only add detail)."""
    try:
        return ModelCard.read(run_dir)
    except UserError:
        return None


def remove_output(path: Path) -> None:
    """Remove an output file or folder at ``path``; a symbolic link there is removed
    itself, never followed (what it points to is not ours)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def clear_run_folder(run_dir: Path) -> None:
    """Remove every file a training run writes (``RUN_FILES``) from ``run_dir``.

    Everything is checked before anything is removed, and the model card goes first, so a
    folder that cannot be cleared stays a finished run, never a card without weights.
    """
    present = [run_dir / name for name in (CARD, *RUN_FILES) if (run_dir / name).is_symlink()
               or (run_dir / name).exists()]
    for path in present:
        if path.is_dir() and not path.is_symlink() and not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"{path}: cannot be removed (no write permission); fix its "
                            "permissions or choose another --out")
    for path in dict.fromkeys(present):
        remove_output(path)


# Weights ---------------------------------------------------------------------------------------

def check_intact(path: Path) -> None:
    """Raise UserError when a .keras (zip) or .h5 file cannot be read as such (truncated,
    corrupt): a damaged file, not weights of another model; a FIFO or device is refused
    before it is opened (reading one would hang or never end)."""
    check_regular_file(path, "weights file")
    try:
        if path.suffix == ".keras":
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            reason = None if bad is None else f"its part {bad} is corrupt"
        else:
            import h5py

            with h5py.File(path, "r"):
                reason = None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        reason = first_line(exc, 160)
    if reason is not None:
        raise UserError(f"{path}: the file is damaged or truncated ({reason}); restore it from "
                        "a copy, or retrain (a killed run resumes from its backup)")


def load_weights_checked(model: keras.Model, path: Path) -> None:
    """Load a .weights.h5 or .keras file into ``model``; a damaged file or weights of
    another model are each one clear line."""
    if not path.exists():
        raise UserError(f"{path}: weights file not found; pass the best.weights.h5 or "
                        "model.keras of a training run")
    check_intact(path)
    try:
        with warnings.catch_warnings():
            # Keras warns once per layer it cannot match; the error that follows says it.
            warnings.simplefilter("ignore")
            if path.suffix == ".keras":
                source = keras.models.load_model(path, compile=False)
                model.set_weights(source.get_weights())
            else:
                model.load_weights(path)
    except (ValueError, KeyError, OSError, TypeError) as exc:
        # (TypeError: a .keras file whose layers Keras cannot rebuild.)
        first = first_line(exc)
        raise UserError(f"{path}: these weights do not fit the model built from the config "
                        f"({first}); use the config the weights were trained with") from None


def check_run_folder(run_dir: Path) -> None:
    """Raise UserError unless ``run_dir`` holds a card, a config and weights."""
    fix = ("pass the folder train_resunet --out wrote (with model_card.json, config.json and "
           f"{BEST_WEIGHTS} or {FULL_MODEL})")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: run folder not found; {fix}")
    missing = [n for n in (CARD, CONFIG) if not (run_dir / n).exists()]
    if not (run_dir / BEST_WEIGHTS).is_file() and not (run_dir / FULL_MODEL).is_file():
        missing.append(f"{BEST_WEIGHTS} or {FULL_MODEL}")
    if missing:
        raise UserError(f"{run_dir}: not a run folder (no {', '.join(missing)}); {fix}")


def run_config(run_dir: str | os.PathLike) -> Config:
    """The config a run folder was trained with (its config.json)."""
    run_dir = Path(run_dir)
    check_run_folder(run_dir)
    cfg, _ = config_from_dict(read_json(run_dir / CONFIG, "config"),
                              source=str(run_dir / CONFIG))
    return cfg


def load_model(run_dir: str | os.PathLike, tile_hw: Sequence[int] | None = None
               ) -> tuple[keras.Model, ModelCard, Path, tuple[int, int]]:
    """The Keras model of a run folder, its card, the file its weights came from and the input
    size (rows, cols) it was built for.

    ``tile_hw`` is the input size wanted; default the model card's. At that size
    ``model.keras`` is loaded as saved (compile=False); at another size the model is rebuilt
    from config.json and the card's band statistics, and ``best.weights.h5`` loaded. Raises
    UserError when ``run_dir`` is not a run folder, its files are damaged, or ``tile_hw`` does
    not suit the architecture.
    """
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    card = ModelCard.read(run_dir)
    spec = card.input
    size = (int(spec.size[0]), int(spec.size[1]))
    want = (int(tile_hw[0]), int(tile_hw[1])) if tile_hw is not None else size
    full, weights = run_dir / FULL_MODEL, run_dir / BEST_WEIGHTS
    if want == size and full.is_file():
        check_intact(full)
        try:
            model = keras.models.load_model(full, compile=False)
        except (ValueError, OSError, KeyError, TypeError) as exc:
            first = first_line(exc)
            raise UserError(f"{full}: cannot load the model ({first}); restore the file "
                            "or delete it to use best.weights.h5") from None
        source = full
    else:
        try:
            # The run's weights replace any pretrained encoder: never read (or download) it.
            model = build_model(dataclasses.replace(cfg, ENCODER_WEIGHTS=None), spec.band_mean,
                                spec.band_std, input_shape=(*want, spec.bands))
        except ValueError as exc:
            raise UserError(f"{run_dir}: cannot build the model for {want[0]}x{want[1]} tiles "
                            f"({exc}); pick a tile size divisible by "
                            f"{cfg.downsampling_factor}") from None
        source = weights if weights.is_file() else full
        load_weights_checked(model, source)
    if int(model.output_shape[-1]) != card.n_outputs or int(model.input_shape[-1]) != spec.bands:
        raise UserError(f"{source}: the model takes {model.input_shape[-1]} bands and gives "
                        f"{model.output_shape[-1]} outputs but {run_dir / CARD} says "
                        f"{spec.bands} and {card.n_outputs}; use the files of one training run")
    return model, card, source, want


