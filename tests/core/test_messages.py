"""The one channel for notes, warnings and status lines: the ``res_unet`` logger."""

from __future__ import annotations

import json
import logging

import pytest

from res_unet.config.keys import load_config
from res_unet.core import messages


@pytest.fixture
def logger():
    """The res_unet logger, with its level and handlers put back after the test."""
    saved = (messages.LOGGER.level, list(messages.LOGGER.handlers))
    yield messages.LOGGER
    messages.LOGGER.setLevel(saved[0])
    messages.LOGGER.handlers[:] = saved[1]


def upgraded_config(tmp_path):
    """A library call that notes something: a Segmentation Gym key upgraded on load."""
    path = tmp_path / "gym.json"
    path.write_text(json.dumps({"KERNEL": 5, "STRIDE": 2}))
    return load_config(path)


def test_prefixes_levels_and_streams(logger, capsys, caplog):
    caplog.set_level(logging.INFO, logger="res_unet")
    messages.note("a note")
    messages.warn("a warning")
    messages.status("epoch 1/2: loss 0.5")
    assert capsys.readouterr() == ("", "note: a note\nwarning: a warning\nepoch 1/2: loss 0.5\n")
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("res_unet", logging.INFO, "note: a note"),
        ("res_unet", logging.WARNING, "warning: a warning"),
        ("res_unet", logging.INFO, "epoch 1/2: loss 0.5")]


def test_a_library_note_reaches_caplog_and_stderr(logger, tmp_path, capsys, caplog):
    cfg = upgraded_config(tmp_path)
    assert cfg.KERNEL_SIZE == 5
    notes = [r.getMessage() for r in caplog.records if r.name == "res_unet"]
    where = f"note: {tmp_path / 'gym.json'}: "
    assert notes == [where + "KERNEL read as KERNEL_SIZE=5", where + "STRIDE has no effect "
                     "here (down-sampling here is always 2x max-pooling)"]
    assert capsys.readouterr() == ("", "".join(line + "\n" for line in notes))


def test_set_level_silences_a_library_user(logger, tmp_path, capsys, caplog):
    logging.getLogger("res_unet").setLevel(logging.ERROR)
    upgraded_config(tmp_path)
    messages.warn("not shown")
    assert capsys.readouterr() == ("", "")
    assert not [r for r in caplog.records if r.name == "res_unet"]
    logging.getLogger("res_unet").setLevel(logging.WARNING)  # warnings only
    messages.note("not shown")
    messages.warn("shown")
    assert capsys.readouterr().err == "warning: shown\n"


def test_an_application_handler_replaces_the_stderr_printer(logger, capsys):
    class Collect(logging.Handler):
        def __init__(self):
            super().__init__()
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    mine = Collect()
    logger.addHandler(mine)
    messages.note("redirected")
    assert mine.lines == ["note: redirected"]
    assert capsys.readouterr().err == ""


def test_commands_put_the_printer_and_level_back(logger, capsys):
    from res_unet import cli

    logger.setLevel(logging.ERROR)
    logger.removeHandler(messages.STDERR)

    def main(argv):
        messages.note("from a command")
        return 0

    assert cli.run_command(main, []) == 0
    assert capsys.readouterr().err == "note: from a command\n"


def test_a_command_prints_each_line_once_when_the_root_logger_has_a_handler(capsys):
    """A library that calls logging.warning() at import puts a handler on the root logger;
    a command's lines must not come out twice (once as 'INFO:res_unet:...')."""
    import logging
    import sys

    from res_unet.cli import run_command

    root_handler = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(root_handler)
    try:
        def main(argv):
            messages.status("epoch 1/1: loss 0.5")
            return 0

        assert run_command(main, []) == 0
    finally:
        logging.getLogger().removeHandler(root_handler)
    err = capsys.readouterr().err
    assert err.count("epoch 1/1: loss 0.5") == 1, err
    assert messages.LOGGER.propagate  # library users' records still reach their handlers
