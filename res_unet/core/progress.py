"""Progress bars and one-line notes on stderr, the same for every command.

A terminal gets a bar refreshed every second; a log file (stderr not a terminal) gets a line
every 30 seconds at most, so batch jobs do not fill their logs with bar updates.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any


def progress_bar(items: Iterable[Any] | None = None, *, total: int | None = None,
                 unit: str = "image", desc: str | None = None, enabled: bool = True,
                 leave: bool = True) -> Any:
    """A tqdm bar over ``items`` (or a manual one of ``total`` steps) on stderr."""
    from tqdm import tqdm

    return tqdm(items, total=total, unit=unit, desc=desc, leave=leave, disable=not enabled,
                file=sys.stderr, mininterval=1.0 if sys.stderr.isatty() else 30.0)


def say(message: str) -> None:
    """Print one line on stderr without breaking a progress bar that is being drawn."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)
