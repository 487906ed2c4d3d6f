"""Fixtures shared across test modules (helpers are in helpers.py): a tiny demo dataset and
one short training run on it, each built once per session (once per xdist worker)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Under pytest-xdist (make test: 2 workers) the workers share the CPU; TensorFlow's default of
# one intra-op thread per core in each would oversubscribe it. Set before TensorFlow starts;
# the commands the tests start inherit it.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")

import res_unet  # noqa: F401  (before any test module loads TensorFlow: it sets oneDNN on)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: tens of seconds (commands killed and re-run in subprocesses, several "
        "TensorFlow processes); make test runs them, pytest -m 'not slow' leaves them out")


# Session (or module) fixtures that take seconds to build: under --dist loadgroup (make test)
# the tests using one run in one worker, so it is built once, not in each. A parametrized
# one (test_user_path's user_run: one training per precision) makes a group per parameter,
# so its runs are trained side by side, each once. The module fixtures of EfficientNet models
# (test_encoders' built, test_models' effnet and pretrained_b0: seconds each) are grouped too:
# spread over both workers, each would be built in both.
SHARED_FIXTURES = ("trained_run", "user_run", "built", "effnet", "pretrained_b0")
# Set on grouped tests that pytest-xdist left ungrouped (see pytest_collection_finish).
_UNGROUPED = pytest.StashKey[bool]()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Put the tests of each fixture of SHARED_FIXTURES in an xdist group of its name (and
    parameter, for a parametrized fixture)."""
    for item in items:
        for name in SHARED_FIXTURES:
            if name in getattr(item, "fixturenames", ()):
                params = getattr(getattr(item, "callspec", None), "params", {})
                group = f"{name}[{params[name]}]" if name in params else name
                item.add_marker(pytest.mark.xdist_group(group))


def pytest_collection_finish(session):
    """Under ``--dist loadgroup``, note the grouped tests pytest-xdist did not tag: their
    group would be spread over the workers, each building the group's fixtures again, and
    the suite would only be slower, never failing (pytest-xdist#1386). They fail instead,
    in :func:`pytest_runtest_setup`, naming the fix."""
    config = session.config
    if not (hasattr(config, "workerinput") and config.getvalue("loadgroup")):
        return
    for item in session.items:
        if item.get_closest_marker("xdist_group") and "@" not in item.nodeid:
            item.stash[_UNGROUPED] = True


def pytest_runtest_setup(item):
    if item.stash.get(_UNGROUPED, False):
        pytest.fail(f"pytest-xdist's --dist loadgroup does not group tests under pytest "
                    f"{pytest.__version__} (pytest-xdist#1386); install the pytest that "
                    "setup.cfg names (pip install -e '.[test]'), or run make test "
                    "TEST_WORKERS=0", pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Keep converted models (ov_runtime.cache_dir) out of the user's ~/.cache, in one cache
    for the run that the xdist workers share, as commands run side by side share a user's
    (entries are renamed into place whole): a shipped model converted for one test is read
    by the next, whichever worker runs it. Tests of the cache itself set their own."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker's basetemp: a folder of the run's
        root = root.parent
    cache = root / "cache"
    cache.mkdir(exist_ok=True)
    os.environ["RES_UNET_CACHE_DIR"] = str(cache)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """12 synthetic 128x128 scenes as 64x64 tiles in a make_tfrecords dataset (binary)."""
    from helpers import make_config

    from res_unet.data.dataset import make_dataset
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

    from res_unet.training import train

    cfg = make_config(MAX_EPOCHS=3, DOPLOT=True)
    run = tmp_path_factory.mktemp("trained_run") / "run"
    card = train.train(cfg, tiny_dataset, run, progress=False)
    return cfg, run, card


@pytest.fixture
def eager():
    """tf.function bodies run eagerly during the test (helpers.functions_eager says when)."""
    from helpers import functions_eager

    with functions_eager():
        yield


@pytest.fixture
def no_hang():
    """Fail (instead of hanging) a call that blocks more than 10 s (SIGALRM interrupts it)."""
    import signal

    def alarm(*_):
        raise TimeoutError("blocked for 10 s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
