"""Fixtures shared across test modules (helpers are in helpers.py): a tiny demo dataset
built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import res_unet  # noqa: F401  (before any test module loads TensorFlow: it sets oneDNN on)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Keep converted models (ov_runtime.cache_dir) out of the user's ~/.cache."""
    os.environ["RES_UNET_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))



@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """12 synthetic 128x128 scenes as 64x64 tiles in a make_tfrecords dataset (binary)."""
    from helpers import make_config

    from res_unet.dataset import make_dataset
    from res_unet.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("tiny")
    images, labels = make_demo_dataset(root / "data", 12, (128, 128), seed=3)
    make_dataset(make_config(), images, labels, root / "dataset")
    return root / "dataset"
