"""The one exception type users see: a one-line message that names the file and the fix."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


class UserError(Exception):
    """Bad input from the user (config, files, flags).

    The message is complete and printable as is; command modules print it without a
    traceback and exit with status 2. Several problems may be joined with newlines, one per
    line.
    """


def either(words: Iterable[str]) -> str:
    """Alternatives for a message: 'a', 'a or b', 'a, b or c'."""
    words = list(words)
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def listing(values: Sequence[Any], most: int) -> str:
    """Values for a message: 'a, b, c', at most ``most`` of them, then '... and N more'."""
    shown = ", ".join(str(v) for v in values[:most])
    more = len(values) - most
    return shown + (f", ... and {more} more" if more > 0 else "")


def first_line(exc: BaseException, most: int | None = 200, empty: str | None = None) -> str:
    """The first non-blank line of an exception's message (stripped, at most ``most``
    characters; None: all of it), for a one-line message; ``empty`` (default: the exception's
    type name) when the message is blank."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()[:most]
    return type(exc).__name__ if empty is None else empty
