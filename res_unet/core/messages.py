"""The one channel for what res_unet says along the way: notes, warnings and status lines.

The rule:

- **stdout carries the command's result only**: the summary printed when a command ends
  (make_tfrecords' dataset summary, train_resunet's JSON, seg_images_in_folder's counts and
  scores), so ``train_resunet ... > summary.json`` keeps valid JSON. The command modules
  print it themselves.
- **Everything said along the way goes through this module**, and so to stderr: ``note(text)``
  (``note: text``, something the user may want to act on), ``warn(text)``
  (``warning: text``, the output may not be what they expect) and ``status(text)`` (a line
  as it is: an epoch's scores, ``resuming from ...``, ``runtime: ...``). Errors are not
  messages: the library raises ``UserError`` and ``cli.run_command`` prints ``error: ...``.

Every message is a record of the ``logging`` logger ``"res_unet"`` (notes and status lines
at INFO, warnings at WARNING) whose text is exactly the line a user sees, prefix included.
By default res_unet prints them on stderr itself (through the progress bar's writer, so a
bar being drawn is not broken), so a library user sees what a command user sees. A library
user can

- silence them: ``logging.getLogger("res_unet").setLevel(logging.ERROR)``
  (``logging.WARNING`` keeps the warnings);
- redirect them: add a handler to the ``"res_unet"`` logger (the default printer then
  steps aside), or remove the printer (``logging.getLogger("res_unet").removeHandler(
  res_unet.core.messages.STDERR)``) and let the records reach the root logger's handlers
  (they always propagate, so ``caplog`` and ``logging.basicConfig`` set-ups see them).

The commands call :func:`for_command` (in ``cli.run_command``), which puts the printer
back and the level at INFO, so a command always shows its notes.
"""

from __future__ import annotations

import logging

from res_unet.core.progress import say

LOGGER = logging.getLogger("res_unet")


class _StderrPrinter(logging.Handler):
    """Prints each record's text on stderr as it is, unless the application has given the
    ``res_unet`` logger a handler of its own."""

    def emit(self, record: logging.LogRecord) -> None:
        if any(h is not self for h in LOGGER.handlers):
            return
        try:
            say(record.getMessage())
        except Exception:
            self.handleError(record)


STDERR = _StderrPrinter()


def _install() -> None:
    if STDERR not in LOGGER.handlers:
        LOGGER.addHandler(STDERR)
    if LOGGER.level == logging.NOTSET:
        LOGGER.setLevel(logging.INFO)


_install()


def for_command() -> None:
    """Set the channel up for a command: notes, warnings and status lines on stderr."""
    _install()
    LOGGER.setLevel(logging.INFO)


def note(text: str) -> None:
    """Say something the user may want to act on: ``note: text`` (INFO)."""
    LOGGER.info("note: %s", text)


def warn(text: str) -> None:
    """Say that the output may not be what the user expects: ``warning: text`` (WARNING)."""
    LOGGER.warning("warning: %s", text)


def status(text: str) -> None:
    """Say how the work goes, one line as it is (INFO): an epoch's scores, a resume, a
    runtime chosen, a file skipped."""
    LOGGER.info("%s", text)
