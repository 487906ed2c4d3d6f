"""What the three commands share: turning library errors into one-line messages and exit codes."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shutil
import sys
from collections.abc import Callable, Iterator

from res_unet.core import messages, progress
from res_unet.core.errors import UserError


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null (C++ logging bypasses Python's sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with errors as the one ``error:`` line every other mistake gets (exit 2),
    instead of a usage block."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"command line: {message} (see {self.prog} --help)")


# Late operating-system failures that are the machine's, not the program's: one line each.
_OS_FIXES = {
    errno.ENOSPC: "free some space or choose another output folder",
    errno.EDQUOT: "free some of your quota or choose another output folder",
    errno.EACCES: "choose a folder you can write to",
    errno.EPERM: "choose a folder you can write to",
    errno.EROFS: "the file system is read-only; choose another output folder",
}


def select_devices(set_gpu: str) -> None:
    """Apply SET_GPU ('' all, '-1' CPU only, '0,1' ...) before TensorFlow sees the devices."""
    if set_gpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = set_gpu


def quiet_tensorflow() -> None:
    """Import TensorFlow without its C++ start-up chatter.

    TensorFlow 2.21 prints CUDA probe lines ("failed call to cuInit", ...) before its log
    level applies, which reads like an error on every CPU machine. Set TF_CPP_MIN_LOG_LEVEL=0
    to see them; a machine with an NVIDIA driver but no GPU visible to TensorFlow gets a note.
    """
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0" or "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with _stderr_silenced():
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
    if not gpus and shutil.which("nvidia-smi"):
        messages.note("an NVIDIA driver is installed but TensorFlow sees no GPU; install with "
                      "the gpu extra (pip install res_unet[gpu]) or rerun with "
                      "TF_CPP_MIN_LOG_LEVEL=0 to see why")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"a positive number of seconds, not {text!r}")
    return value


def add_progress_arguments(parser: argparse.ArgumentParser) -> None:
    """``--no-progress`` and ``--progress-interval``, the same in every command."""
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--progress-interval", type=_seconds, metavar="SECONDS",
                        help="print a plain progress line every SECONDS instead of a bar "
                             "(default: a bar on a terminal; a line every "
                             f"{progress.LOG_INTERVAL:g} s when stderr is a log file)")


def show_progress(args: argparse.Namespace) -> bool:
    """Apply the progress arguments for the rest of the command; True unless --no-progress."""
    progress.configure(enabled=not args.no_progress, interval=args.progress_interval)
    return not args.no_progress


def run_command(main: Callable[[list[str] | None], int | None],
                argv: list[str] | None = None) -> int:
    """Run a command's ``main``; print UserError as ``error: ...`` and return an exit code.

    0 on success (or what ``main`` returns), 2 on bad input, 130 on Ctrl-C. Outputs are
    written atomically by the library, so an interrupted run leaves no partial file.
    """
    messages.for_command()
    # A command prints its lines itself: not again through a handler some library put on the
    # root logger (logging.warning() at import time installs one), as 'INFO:res_unet:...'.
    propagate, messages.LOGGER.propagate = messages.LOGGER.propagate, False
    try:
        code = main(argv)
    except UserError as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in _OS_FIXES:
            raise
        where = exc.filename or "output"
        print(f"error: {where}: {exc.strerror or os.strerror(exc.errno)}; "
              f"{_OS_FIXES[exc.errno]} (finished outputs are kept, no partial file was left)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: finished outputs are kept, no partial file was left",
              file=sys.stderr)
        return 130
    finally:
        messages.LOGGER.propagate = propagate
    return int(code or 0)
