"""Helpers shared by the test modules (fixtures are in conftest.py): the one config
factory, the shared real-data folder, small synthetic sources and folders, a per-pixel
model and a minimal run folder."""

from __future__ import annotations

import contextlib
from pathlib import Path

import keras
import numpy as np
import pytest

from res_unet.config.keys import Config, config_from_dict, save_config
from res_unet.training.runfolder import CardInput, ModelCard, TrainingFacts

# Real imagery beside the repository (../shared/data); tests that need it skip without it.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

TILE = 32
BAND_MEAN, BAND_STD = [120.0, 110.0, 100.0], [50.0, 45.0, 40.0]

# Config presets; make_config(preset, **overrides) validates one with its overrides.
PRESETS = {
    # Tiny, fast training on the tiny demo dataset (64 px tiles of 128 px scenes).
    "dataset": {
        "TARGET_SIZE": [64, 64], "FIT_MODE": "tile", "TILE_OVERLAP": 0.0,
        "VALIDATION_SPLIT": 0.25, "AUG_COPIES": 1, "IMS_PER_SHARD": 32, "DOPLOT": False,
        "SEED": 1, "MODEL": "resunet", "FILTERS": 4, "DEPTH": 2, "DROPOUT": 0.0,
        "BATCH_SIZE": 8, "MAX_EPOCHS": 2, "PATIENCE": 5, "START_LR": 1e-3, "MAX_LR": 3e-3,
        "MIN_LR": 1e-4, "RAMPUP_EPOCHS": 0, "PRECISION": "float32"},
    # 16 x 16 tile datasets of write_sources images, no augmentation.
    "tiles16": {
        "TARGET_SIZE": [16, 16], "FIT_MODE": "tile", "TILE_OVERLAP": 0.0, "DO_AUG": False,
        "VALIDATION_SPLIT": 0.5, "IMS_PER_SHARD": 4, "DOPLOT": False},
    # A small residual U-Net for inference tests: 32 px input, FILTERS 4, DEPTH 2, 3 bands.
    "model": {
        "TARGET_SIZE": [TILE, TILE], "FILTERS": 4, "DEPTH": 2, "N_DATA_BANDS": 3,
        "NCLASSES": 1, "DROPOUT": 0.0, "BATCH_SIZE": 4},
}


def make_config(preset: str = "dataset", **overrides) -> Config:
    """The one config factory of the tests: a validated Config from a preset of PRESETS."""
    cfg, _ = config_from_dict({**PRESETS[preset], **overrides})
    return cfg


def shared_data(name: str) -> Path:
    """The folder ../shared/data/NAME, or skip the test when it is absent."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"../shared/data/{name} is absent")
    return path


def write_sources(root: Path, dtype: str, bands: int, n_classes: int = 2,
                  shape=(32, 48), n_images: int = 2) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random images (PNG for uint8 RGB, TIFF otherwise) and labels; returns {stem: arrays}."""
    import tifffile

    from res_unet.geo.writers import write_png

    rng = np.random.default_rng(5)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir(parents=True)
    sources = {}
    for i in range(n_images):
        stem = f"src{i}"
        top = 255 if dtype == "uint8" else 65535
        image = rng.integers(0, top + 1, (*shape, bands), dtype=dtype)
        label = rng.integers(0, n_classes, shape, dtype=np.uint8)
        if dtype == "uint8" and bands == 3:
            write_png(root / "images" / f"{stem}.png", image)
        else:
            tifffile.imwrite(root / "images" / f"{stem}.tif", image, photometric="minisblack",
                             planarconfig="contig")
        write_png(root / "labels" / f"{stem}.png", label)
        sources[stem] = (image, label)
    return sources


def expected_tiles(image, label, tile=(16, 16)):
    """The (image, label) tiles a 16 x 16 tile dataset holds for one source, in order."""
    from res_unet.geo.tiling import tile_grid

    return [(image[r:r + tile[0], c:c + tile[1]], label[r:r + tile[0], c:c + tile[1]])
            for r, c in tile_grid(image.shape[:2], tile, 0.0)]


TILE = 32
BAND_MEAN, BAND_STD = [120.0, 110.0, 100.0], [50.0, 45.0, 40.0]


def pixel_model(gain: float = 0.05, centre: float = 128.0, size: int = TILE) -> keras.Model:
    """A per-pixel model p = sigmoid(gain * (band0 - centre)): flip/rotation-equivariant and
    independent of the tile it sees, so tiled prediction must reproduce it exactly."""
    inputs = keras.Input((size, size, 3))
    outputs = keras.layers.Conv2D(
        1, 1, activation="sigmoid",
        kernel_initializer=keras.initializers.Constant(
            np.array([gain, 0.0, 0.0], np.float32).reshape(1, 1, 3, 1)),
        bias_initializer=keras.initializers.Constant(-gain * centre))(inputs)
    return keras.Model(inputs, outputs)


def pixel_prob(image: np.ndarray, gain: float = 0.05, centre: float = 128.0) -> np.ndarray:
    """What :func:`pixel_model` predicts, (H, W, 1) float32."""
    z = gain * (image[..., :1].astype(np.float64) - centre)
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)


def write_run(run_dir: Path, model: keras.Model, cfg: Config, threshold: float | None = 0.5
              ) -> Path:
    """A minimal run folder as train_resunet writes it: model.keras, best.weights.h5,
    config.json and model_card.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    model.save(run_dir / "model.keras")
    model.save_weights(run_dir / "best.weights.h5")
    save_config(cfg, run_dir / "config.json")
    ModelCard(
        res_unet_version="test", model=cfg.MODEL, encoder=None,
        parameters=model.count_params(), flops_per_image=0,
        input=CardInput(size=list(cfg.TARGET_SIZE), bands=cfg.N_DATA_BANDS, dtype="uint8",
                        band_mean=BAND_MEAN, band_std=BAND_STD),
        classes=cfg.n_label_classes, class_names=cfg.class_names, binary=cfg.NCLASSES == 1,
        ignore_class=None, threshold=threshold if cfg.NCLASSES == 1 else None, dataset={},
        training=TrainingFacts(epochs_run=1, best_epoch=1, best_val_loss=None,
                               train_seconds=0.0, images_per_second=None,
                               precision="float32", strategy="test", replicas=1),
        validation={}, versions={}, device="test", wall_seconds=0.0, files={},
        config=cfg.to_dict()).write(run_dir)
    return run_dir


def random_u8(shape, seed: int = 0) -> np.ndarray:
    """A seeded random uint8 array of ``shape``."""
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def make_folders(tmp_path: Path, image_names, label_names) -> tuple[Path, Path]:
    """Images and labels folders holding tiny 4x5 PNG/JPEG/TIFF files with the given names."""
    from PIL import Image

    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for name in image_names:
        Image.fromarray(random_u8((4, 5, 3))).save(images / name)
    for name in label_names:
        Image.fromarray(np.zeros((4, 5), np.uint8)).save(labels / name)
    return images, labels


def folder_listing(folder: Path) -> list[str]:
    """The names in ``folder``, sorted."""
    return sorted(p.name for p in folder.iterdir())


def parse_example(record: bytes) -> tuple[np.ndarray, np.ndarray, dict]:
    """One dataset record (records.serialize_example) back as numpy: (image (H, W, B) uint,
    label (H, W) uint8, meta {stem, row, col, copy}), read field by field, independently of
    the tf.data decoding of records.load_dataset."""
    import tensorflow as tf

    feature = tf.train.Example.FromString(record).features.feature

    def one(name: str):
        f = feature[name]
        return f.int64_list.value[0] if f.HasField("int64_list") else f.bytes_list.value[0]

    h, w, b = one("height"), one("width"), one("bands")
    dtype = np.dtype(one("dtype").decode()).newbyteorder("<")
    image = np.frombuffer(one("image"), dtype=dtype).reshape(h, w, b).astype(dtype.name)
    label = np.frombuffer(one("label"), dtype=np.uint8).reshape(h, w).copy()
    meta = {"stem": one("stem").decode(), "row": one("row"), "col": one("col"),
            "copy": one("copy")}
    return image, label, meta


def read_examples(dataset_dir: Path, split: str) -> list[tuple[np.ndarray, np.ndarray, dict]]:
    """Every example of a dataset's split in shard order (:func:`parse_example`)."""
    import tensorflow as tf

    from res_unet.data.records import read_manifest

    manifest = read_manifest(dataset_dir)
    files = [str(Path(dataset_dir) / s.file) for s in manifest.shards[split]]
    records = tf.data.TFRecordDataset(tf.constant(files, dtype=tf.string),
                                      compression_type=manifest.compression or "")
    return [parse_example(record) for record in records.as_numpy_iterator()]


@contextlib.contextmanager
def functions_eager(eager: bool = True):
    """Run tf.function bodies eagerly inside (when ``eager``); process-wide, so restored.

    For tests of what training does between steps (resuming, averaging, keeping weights,
    freezing, refusing): a tiny model's few steps run eagerly in less time than tracing
    them takes. The traced path stays tested where it is the subject: the shared
    ``trained_run``, test_training_reduces_the_loss, the user's path and every command
    started as a process."""
    import tensorflow as tf

    tf.config.run_functions_eagerly(eager)
    try:
        yield
    finally:
        tf.config.run_functions_eagerly(False)
