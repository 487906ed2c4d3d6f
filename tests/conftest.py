"""Fixtures and helpers shared across test modules: a tiny demo dataset built once per
session, small sources for the dataset and records tests."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

TINY = {
    "TARGET_SIZE": [64, 64], "FIT_MODE": "tile", "TILE_OVERLAP": 0.0, "VALIDATION_SPLIT": 0.25,
    "AUG_COPIES": 1, "IMS_PER_SHARD": 32, "DOPLOT": False, "SEED": 1,
    "MODEL": "resunet", "FILTERS": 4, "DEPTH": 2, "DROPOUT": 0.0, "BATCH_SIZE": 8,
    "MAX_EPOCHS": 2, "PATIENCE": 5, "START_LR": 1e-3, "MAX_LR": 3e-3, "MIN_LR": 1e-4,
    "RAMPUP_EPOCHS": 0, "PRECISION": "float32",
}


def tiny_config(**overrides):
    """A validated Config for tiny, fast models on the tiny demo dataset."""
    from res_unet.config import config_from_dict

    cfg, _ = config_from_dict({**TINY, **overrides})
    return cfg


def make_config(**overrides):
    """A validated Config for 16 x 16 tile datasets of :func:`write_sources` images."""
    from res_unet.config import config_from_dict

    base = {"TARGET_SIZE": [16, 16], "FIT_MODE": "tile", "TILE_OVERLAP": 0.0,
            "DO_AUG": False, "VALIDATION_SPLIT": 0.5, "IMS_PER_SHARD": 4, "DOPLOT": False}
    base.update(overrides)
    return config_from_dict(base)[0]


def write_sources(root: Path, dtype: str, bands: int, n_classes: int = 2,
                  shape=(32, 48), n_images: int = 2) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random images (PNG for uint8 RGB, TIFF otherwise) and labels; returns {stem: arrays}."""
    import tifffile

    from res_unet.imagery import write_png

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
    from res_unet.tiling import tile_grid

    return [(image[r:r + tile[0], c:c + tile[1]], label[r:r + tile[0], c:c + tile[1]])
            for r, c in tile_grid(image.shape[:2], tile, 0.0)]


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """12 synthetic 128x128 scenes as 64x64 tiles in a make_tfrecords dataset (binary)."""
    from res_unet.dataset import make_dataset
    from res_unet.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("tiny")
    images, labels = make_demo_dataset(root / "data", 12, (128, 128), seed=3)
    make_dataset(tiny_config(), images, labels, root / "dataset")
    return root / "dataset"
