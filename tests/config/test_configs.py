"""Every example config in config/ works: it loads, builds its model, trains a step on a
dataset made with it and segments a tile, so no shipped config can break unnoticed.

Each config runs the three steps in full (make_dataset, train(), segment_folder), in one
of two ways (chosen at run time from the configs, so a new config lands in a group):
- the first config of each *traced group* runs them as a user's command does, its
  training, validation and prediction steps traced by tf.function;
- the others train with TensorFlow functions run eagerly (tf.config.run_functions_eagerly):
  the same model, loss, optimizer, precision and numbers, without the seconds of tracing
  a graph their group's first config has traced (segmenting stays traced: eager
  prediction of every tile is slower than tracing it once).
A traced group is what the traced training step is built from (:func:`traced_group`): the
architecture (MODEL), the precision PRECISION resolves to here, and the keys that change
the step itself (FREEZE_ENCODER_EPOCHS, JIT_COMPILE). The loss terms are not: every term
and their weighted sum, binary, multiclass and with an ignored class, is traced and
compared with its eager value in tests/training/test_losses.py. Nor is the ENCODER of an
efficientnet_unet: the training step is the same code for every encoder, and each encoder
of the registry is built, traced for prediction, saved, reloaded and converted in
tests/models/test_encoders.py (tracing B0's training step here took 60-170 s on 2 cores).
Keys of the data
(FIT_MODE, DOWNSAMPLE, splits, augmentation), the encoder's starting weights and HOT_START
change no graph: every config runs them through its own make_dataset and train().

Each config keeps its own keys except what makes it small and self-contained:
TARGET_SIZE (the architecture's smallest tile), BATCH_SIZE 2, one step of one epoch
(MAX_EPOCHS = INITIAL_EPOCH + 1, STEPS_PER_EPOCH 1), DOPLOT off, no SavedModel export, scenes
of one tile (TARGET_SIZE x DOWNSAMPLE pixels: tiling and stitching several tiles are tested
in tests/geo and tests/inference), one scene segmented (of the 4 the dataset is made of), and
- INFER_RUNTIME 'tensorflow': OpenVINO ('auto', the default, and what several configs
  set) is tested on the user's path, float32 and bfloat16 runs, with OpenVINO present and
  absent, in tests/test_user_path.py; here it would add a conversion per config,
- ENCODER_WEIGHTS null for EfficientNet B0..B7 ('imagenet' there is a download; Lite's
  'imagenet' is read offline from its package and kept when that is installed),
- INITIAL_WEIGHTS of HOT_START configs: a weights file of the same architecture written
  here (the configs name a first run's runs/... folder).
PRECISION stays as the configs set it ('auto' in several)."""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import functions_eager

from res_unet.config.keys import Config, config_from_dict, load_config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"
CONFIGS = sorted(CONFIG_DIR.glob("*.json"))
BAND_MEAN, BAND_STD = [110.0, 110.0, 100.0], [50.0, 45.0, 40.0]

pytestmark = pytest.mark.slow  # a dataset, a training step and a segmentation per config


def test_every_config_is_listed():
    assert len(CONFIGS) >= 10 and (CONFIG_DIR / "lakes_resunet.json") in CONFIGS


def traced_group(cfg: Config) -> tuple:
    """What the traced training step of ``cfg`` is built from, its loss terms aside (they
    are traced in tests/training/test_losses.py)."""
    from res_unet.training.devices import resolve_precision

    return (cfg.MODEL, resolve_precision(cfg), cfg.FREEZE_ENCODER_EPOCHS > 0, cfg.JIT_COMPILE)


@functools.cache
def traced_configs() -> frozenset[Path]:
    """The first config (by name) of each traced group: those train and segment traced."""
    first: dict[tuple, Path] = {}
    for path in CONFIGS:
        first.setdefault(traced_group(load_config(path)), path)
    return frozenset(first.values())


def test_traced_groups_cover_each_architecture_and_precision():
    """Each architecture and precision of the configs is traced by one of them."""
    traced = traced_configs()
    assert 1 < len(traced) < len(CONFIGS)
    shipped = [load_config(p) for p in CONFIGS]
    assert set(map(traced_group, shipped)) == {traced_group(load_config(p)) for p in traced}
    assert {c.MODEL for c in shipped} == {c.MODEL for c in map(load_config, traced)}


def small_config(path: Path, tmp_path: Path) -> dict:
    """The config of ``path`` with the changes listed in the module docstring."""
    from res_unet.models.encoders.efficientnet_lite import PACKAGES

    cfg = load_config(path)  # the file as shipped validates
    values = cfg.to_dict()
    factor = cfg.downsampling_factor
    values.update(TARGET_SIZE=[max(32, factor)] * 2, BATCH_SIZE=2, DOPLOT=False,
                  MAX_EPOCHS=cfg.INITIAL_EPOCH + 1, STEPS_PER_EPOCH=1,
                  INFER_RUNTIME="tensorflow")
    if cfg.MODEL == "efficientnet_unet" and cfg.ENCODER_WEIGHTS == "imagenet" and (
            cfg.ENCODER not in PACKAGES or importlib.util.find_spec(PACKAGES[cfg.ENCODER])
            is None):
        values["ENCODER_WEIGHTS"] = None
    if cfg.HOT_START:
        from res_unet.models import build_model

        first, _ = config_from_dict({**values, "HOT_START": False, "ENCODER_WEIGHTS": None})
        weights = tmp_path / "first_run.weights.h5"
        build_model(first, BAND_MEAN, BAND_STD).save_weights(weights)
        values["INITIAL_WEIGHTS"] = str(weights)
    return values


def write_sources(root: Path, n_classes: int, size: int) -> tuple[Path, Path]:
    """4 RGB scenes and their labels, named to fit both SPLIT_GROUP_PATTERNs of the
    configs ('^(tile\\d+)' and '^(.*)_s2cloudless'); labels hold every class."""
    from res_unet.geo.writers import write_png

    rng = np.random.default_rng(3)
    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True)
    labels.mkdir()
    classes = max(2, n_classes)
    for i in range(4):
        label = (np.arange(size * size).reshape(size, size) * 7 // 5 + i) % classes
        image = rng.integers(0, 80, (size, size, 3)) + (label[..., None] * 160 // classes)
        write_png(images / f"tile{i}_s2cloudless.png", image.astype(np.uint8))
        write_png(labels / f"tile{i}_s2cloudless.png", label.astype(np.uint8))
    return images, labels


# Eager functions leave tf.data's traced (as wanted); TensorFlow warns that they do.
@pytest.mark.filterwarnings("ignore:Even though the `tf.config.experimental_run_functions")
@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_builds_trains_a_step_and_segments_a_tile(path, tmp_path):
    from res_unet.data.dataset import make_dataset
    from res_unet.inference.segment import segment_folder
    from res_unet.inference.settings import inference_config
    from res_unet.training.devices import resolve_precision
    from res_unet.training.runfolder import ModelCard
    from res_unet.training.train import train

    values = small_config(path, tmp_path)
    cfg, _ = config_from_dict(values, source=str(path))
    size = cfg.TARGET_SIZE[0] * cfg.DOWNSAMPLE  # one tile a scene: the steps, fewest pixels
    images, labels = write_sources(tmp_path / "sources", cfg.NCLASSES, size)
    make_dataset(cfg, images, labels, tmp_path / "dataset")
    eager = path not in traced_configs()
    try:
        with functions_eager(eager):
            card = train(cfg, tmp_path / "dataset", tmp_path / "run", progress=False,
                         export_saved_model=False)
    finally:
        keras.mixed_precision.set_global_policy("float32")  # PRECISION 'auto' may set it
    assert card.training.epochs_run == 1
    assert card.training.precision == resolve_precision(cfg)
    assert ModelCard.read(tmp_path / "run").classes == cfg.n_label_classes

    seg_cfg = inference_config([tmp_path / "run"])
    assert seg_cfg.INFER_RUNTIME == values["INFER_RUNTIME"] == "tensorflow"
    scene = tmp_path / "scene"  # one scene: the dataset needed 4 to split
    scene.mkdir()
    (scene / "tile0_s2cloudless.png").write_bytes((images / "tile0_s2cloudless.png").read_bytes())
    summary = segment_folder(seg_cfg, [tmp_path / "run"], scene, tmp_path / "masks",
                             progress=False)
    assert summary["done"] == 1 and summary["failed"] == 0
    from res_unet.geo.rasters import read_label

    mask = read_label(tmp_path / "masks" / "tile0_s2cloudless_predseg.png")
    assert mask.shape == (size, size)
    assert set(np.unique(mask)) <= set(range(cfg.n_label_classes))
    written = json.loads((tmp_path / "masks" / "segmentation_config.json").read_text())
    assert written["classes"] == cfg.n_label_classes
