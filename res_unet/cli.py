"""What the three commands share: turning library errors into one-line messages and exit codes."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from res_unet.errors import UserError


def quiet_tensorflow() -> None:
    """Silence TensorFlow's C++ start-up chatter (CUDA probes, oneDNN notices)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def run_command(main: Callable[[list[str] | None], int | None],
                argv: list[str] | None = None) -> int:
    """Run a command's ``main``; print UserError as ``error: ...`` and return an exit code.

    0 on success (or what ``main`` returns), 2 on bad input, 130 on Ctrl-C. Outputs are
    written atomically by the library, so an interrupted run leaves no partial file.
    """
    try:
        code = main(argv)
    except UserError as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished outputs are kept, no partial file was left",
              file=sys.stderr)
        return 130
    return int(code or 0)
