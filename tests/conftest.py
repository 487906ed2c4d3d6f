"""Fixtures shared across test modules (helpers are in helpers.py): a tiny demo dataset and
one short training run on it, each built once per session (once per xdist worker)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import res_unet  # noqa: F401  (before any test module loads TensorFlow: it sets oneDNN on)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    # pytest-xdist workers share the CPU: one intra-op thread each instead of one per core.
    # Only this process: the commands the tests start keep TensorFlow's default.
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: tens of seconds (commands killed and re-run in subprocesses, several "
        "TensorFlow processes); make test runs them, pytest -m 'not slow' leaves them out")


def pytest_collection_modifyitems(config, items):
    """Slow tests first: under xdist they then run beside the many short ones instead of
    leaving one worker busy at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


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


@pytest.fixture(scope="session")
def trained_run(tiny_dataset, tmp_path_factory):
    """(config, run folder, model card) of one short training run on ``tiny_dataset``
    (3 epochs, figures, SavedModel export). Shared: tests copy the folder before changing it,
    except evaluate-only re-runs, which rewrite the same evaluation."""
    from helpers import make_config

    from res_unet import train

    cfg = make_config(MAX_EPOCHS=3, DOPLOT=True)
    run = tmp_path_factory.mktemp("trained_run") / "run"
    card = train.train(cfg, tiny_dataset, run, progress=False)
    return cfg, run, card
