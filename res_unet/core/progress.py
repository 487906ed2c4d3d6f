"""Progress on stderr, the same for every command.

A terminal gets a bar refreshed every second. A log file (stderr not a terminal), or any
run given ``--progress-interval SECONDS``, gets a plain line instead (``make_tfrecords: 25%
120/480 [01:05<03:15, 1.84image/s]``) every 30 seconds or every SECONDS, and never a
carriage return, so batch logs hold one readable line per interval. ``--no-progress``
draws nothing. The commands set this once with :func:`configure`: it is a preference of
the process, like the logging level, not an argument of each library function (whose
``progress`` flag can still turn a bar off).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

LOG_INTERVAL = 30.0  # seconds between plain lines when stderr is not a terminal

_settings: dict[str, Any] = {"enabled": True, "interval": None}


def configure(enabled: bool = True, interval: float | None = None) -> None:
    """Set how progress is shown from now on: ``enabled`` False draws nothing; ``interval``
    (seconds) prints a plain line that often instead of a bar; None: a bar on a terminal,
    a line every LOG_INTERVAL seconds otherwise."""
    if interval is not None and not interval > 0:
        raise ValueError(f"progress interval must be positive, got {interval}")
    _settings.update(enabled=enabled, interval=interval)


class LineProgress:
    """Progress as a plain line on stderr every ``interval`` seconds (and when it ends):
    the log-file stand-in of a tqdm bar, with the parts of its interface res_unet uses."""

    def __init__(self, items: Iterable[Any] | None, total: int | None, unit: str,
                 desc: str | None, enabled: bool, interval: float, leave: bool) -> None:
        self.items, self.unit, self.desc = items, unit, desc or "progress"
        if total is None and hasattr(items, "__len__"):
            total = len(items)  # type: ignore[arg-type]
        self.total, self.enabled, self.interval, self.leave = total, enabled, interval, leave
        self.n, self.postfix, self.printed = 0, "", None
        self.start = self.last = time.monotonic()
        self.closed = False

    def __iter__(self) -> Iterator[Any]:
        try:
            for item in self.items or ():
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more steps; print a line when ``interval`` seconds have passed."""
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._print(now)

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        """Values shown after the rate (``loss=0.1234``), like tqdm's."""
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        """Print the last line (for a kept bar, or one that printed lines before) unless
        it is the line printed last."""
        if not self.closed:
            self.closed = True
            if (self.leave or self.printed is not None) and self.printed != self.n:
                self._print(time.monotonic())

    def _print(self, now: float) -> None:
        if not self.enabled:
            return
        self.printed = self.n
        from tqdm import tqdm

        line = tqdm.format_meter(self.n, self.total, now - self.start, unit=self.unit,
                                 prefix=self.desc, postfix=self.postfix or None,
                                 bar_format="{l_bar}{r_bar}" if self.total else None, ncols=0)
        sys.stderr.write(" ".join(line.split()) + "\n")
        sys.stderr.flush()


def progress_bar(items: Iterable[Any] | None = None, *, total: int | None = None,
                 unit: str = "image", desc: str | None = None, enabled: bool = True,
                 leave: bool = True) -> Any:
    """A tqdm bar over ``items`` (or a manual one of ``total`` steps) on stderr, shown as
    :func:`configure` says (a bar, plain lines, or nothing)."""
    from tqdm import tqdm

    enabled = enabled and _settings["enabled"]
    interval = _settings["interval"]
    if interval is None and not sys.stderr.isatty():
        interval = LOG_INTERVAL
    if interval is None:
        return tqdm(items, total=total, unit=unit, desc=desc, leave=leave,
                    disable=not enabled, file=sys.stderr, mininterval=1.0)
    return LineProgress(items, total, unit, desc, enabled, interval, leave)


def say(message: str) -> None:
    """Print one line on stderr without breaking a progress bar that is being drawn.

    Library code speaks through :mod:`res_unet.core.messages`, which writes with this."""
    if _settings["interval"] is None and sys.stderr.isatty():
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)
    else:  # no bar is drawn: a plain line (tqdm.write would add carriage returns)
        print(message, file=sys.stderr, flush=True)
