"""One config value on its own: does it fit its key's type, range and choices?

:func:`check_value` is the one check every value passes, whether it comes from a config file
(:func:`res_unet.config.keys.config_from_dict`) or from a command-line flag
(:func:`res_unet.config.keys.with_overrides`); the rules between keys are
:mod:`res_unet.config.rules`'.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Mapping
from typing import Any


def type_name(tp: Any) -> str:
    """A field annotation as users read it: ``list[int]``, ``float | None``."""
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _matches(value: Any, tp: Any) -> bool:
    """Whether a JSON value fits a field's annotation (ints accepted where floats are)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            _matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    return False


def _normalise_loss(value: Any) -> Any:
    """'dice+focal' -> {'dice': 1.0, 'focal': 1.0}; dicts pass through."""
    if isinstance(value, str):
        return {term.strip().lower(): 1.0 for term in value.split("+") if term.strip()}
    return value


def _check_ranges(name: str, value: Any, meta: Mapping[str, Any], source: str) -> list[str]:
    problems = []
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        shown = ", ".join("null" if c is None else repr(c) for c in choices)
        return [f"{source}: {name}={value!r} is not one of {shown}"]
    values = value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if not math.isfinite(v):
            problems.append(f"{source}: {name}={value} is not a finite number")
            break
        lo, hi = meta.get("lo"), meta.get("hi")
        valid = f" (valid: {lo:g} to {hi:g})" if lo is not None and hi is not None else ""
        if lo is not None and v < lo:
            problems.append(f"{source}: {name}={value} is below the minimum {lo}{valid}")
            break
        if hi is not None and v > hi:
            problems.append(f"{source}: {name}={value} is above the maximum {hi}{valid}")
            break
    return problems


def check_value(name: str, value: Any, tp: Any, meta: Mapping[str, Any],
                source: str) -> tuple[Any, list[str]]:
    """Check one value of key ``name`` (annotation ``tp``, field metadata ``meta``: lo, hi,
    choices) and bring it to the key's type (ints to floats where floats are declared, a loss
    name like 'dice+focal' to its weights).

    Returns the value and the problems, one line each naming ``source`` (empty when valid).
    """
    if name == "LOSS":
        value = _normalise_loss(value)
    if not _matches(value, tp):
        return value, [f"{source}: {name} must be {type_name(tp)}, got {value!r}"]
    if tp is float or (typing.get_origin(tp) is not None and float in typing.get_args(tp)
                       and isinstance(value, int) and not isinstance(value, bool)):
        value = float(value) if isinstance(value, int) else value
    if name == "LOSS":
        value = {k: float(v) for k, v in value.items()}
    if name == "CLASS_WEIGHTS" and isinstance(value, list):
        value = [float(v) for v in value]
    return value, _check_ranges(name, value, meta, source)
