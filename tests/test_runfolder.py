"""The run-folder format (res_unet/runfolder.py): reading model cards, configs and weights
that are not what they should be."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from helpers import make_config, pixel_model, write_run

from res_unet.errors import UserError
from res_unet.runfolder import CARD, ModelCard, load_run, load_weights_checked


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("runs") / "run", pixel_model(),
                     make_config("model"), threshold=0.5)


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


def test_a_model_card_nested_thousands_deep_is_one_line(run, tmp_path):
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    (copy / CARD).write_text('{"card_version": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(UserError) as info:
        ModelCard.read(copy)
    assert str(info.value) == (
        f"{copy / CARD}: nested too deeply to be a model card (lists or objects inside each "
        "other thousands of times); pass the right file")


def test_a_fifo_or_device_as_card_config_or_weights_is_refused(run, tmp_path, no_hang):
    """A FIFO would hang the command reading it, /dev/zero would never end: refused before
    reading, one line each (the model card, the run's config, HOT_START weights)."""
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    (copy / CARD).unlink()
    os.mkfifo(copy / CARD)
    with pytest.raises(UserError, match=f"{copy / CARD}: is a FIFO \\(named pipe\\), not a "
                                        "model card file"):
        ModelCard.read(copy)
    (copy / CARD).unlink()
    (copy / CARD).symlink_to("/dev/zero")
    with pytest.raises(UserError, match="is a device, not a model card file"):
        load_run(copy)
    fifo = tmp_path / "weights.weights.h5"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match=f"{fifo}: is a FIFO \\(named pipe\\), not a weights "
                                        "file; pass the weights file itself"):
        load_weights_checked(pixel_model(), fifo)
