"""Fixtures shared across test modules: a tiny demo dataset built once per session."""

from __future__ import annotations

import os
from pathlib import Path

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


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """12 synthetic 128x128 scenes as 64x64 tiles in a make_tfrecords dataset (binary)."""
    from res_unet.dataset import make_dataset
    from res_unet.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("tiny")
    images, labels = make_demo_dataset(root / "data", 12, (128, 128), seed=3)
    make_dataset(tiny_config(), images, labels, root / "dataset")
    return root / "dataset"
