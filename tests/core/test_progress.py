"""Progress on stderr: a bar on a terminal, plain lines in a log, nothing when turned off."""

from __future__ import annotations

import io
import sys

import pytest

from res_unet.core import progress


@pytest.fixture(autouse=True)
def default_settings():
    progress.configure()
    yield
    progress.configure()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_plain_lines_without_carriage_returns(capsys):
    """stderr not a terminal (capsys): no bar, one line per interval and one at the end."""
    progress.configure(interval=1e-9)
    assert list(progress.progress_bar(range(3), desc="make_tfrecords")) == [0, 1, 2]
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.splitlines()[-1].startswith("make_tfrecords: 100% 3/3 [")
    assert len(err.splitlines()) == 3  # after each step; closing does not repeat the last


def test_the_default_interval_in_a_log_is_30_seconds(capsys):
    with progress.progress_bar(total=5, unit="batch", desc="epoch 1", leave=False) as bar:
        for _ in range(5):
            bar.update(1)
            bar.set_postfix(loss="0.1234")
    assert bar.interval == progress.LOG_INTERVAL == 30.0
    assert capsys.readouterr().err == ""  # a step not kept, faster than 30 s: no line


def test_postfix_and_unknown_total(capsys):
    progress.configure(interval=1e-9)
    bar = progress.progress_bar(total=2, unit="batch", desc="epoch 3", leave=False)
    bar.update(1)
    bar.set_postfix(loss="0.5000")
    bar.update(1)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("epoch 3: 100% 2/2 [") and lines[-1].endswith(", loss=0.5000]")
    assert list(progress.progress_bar(iter("ab"), desc="checking")) == ["a", "b"]
    assert capsys.readouterr().err.splitlines()[-1].startswith("checking: 2image [")


def test_no_progress_draws_nothing(capsys, monkeypatch):
    progress.configure(enabled=False, interval=1e-9)
    assert sum(progress.progress_bar(range(4))) == 6
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert sum(progress.progress_bar(range(4))) == 6
    assert sys.stderr.getvalue() == "" and capsys.readouterr().err == ""


def test_a_terminal_gets_a_bar_and_notes_do_not_break_it(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    for i in progress.progress_bar(range(2), desc="segmenting"):
        if i == 0:
            progress.say("note: written between two bar updates")
    shown = terminal.getvalue()
    assert "\r" in shown and "segmenting: 100%|" in shown
    assert "note: written between two bar updates\n" in shown


def test_an_interval_must_be_positive():
    with pytest.raises(ValueError, match="must be positive"):
        progress.configure(interval=0)
