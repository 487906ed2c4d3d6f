"""What each config key is, read from its declaration in :class:`res_unet.config.keys.Config`:
the keys of a role (:func:`keys_with`; the roles are :data:`res_unet.config.keys.ROLES`), the
keys a version did not know yet (:func:`keys_added_after`), and the config reference,
docs/config.md (:func:`reference_markdown`).

Modules that treat keys by what they are (resuming a run, the settings of a segmentation, the
output fingerprint) ask here instead of keeping lists of key names.
"""

from __future__ import annotations

import dataclasses
import json
import typing

from res_unet.config.keys import FIRST_VERSION, ROLES, Config
from res_unet.config.values import type_name

_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def keys_with(role: str) -> tuple[str, ...]:
    """The config keys that have ``role`` (one of :data:`res_unet.config.keys.ROLES`), in
    declaration order."""
    if role not in ROLES:
        raise ValueError(f"unknown key role {role!r}; use one of {', '.join(ROLES)}")
    return tuple(name for name, f in _FIELDS.items() if role in f.metadata["roles"])


def key_group(name: str) -> str:
    """The group of config key ``name`` ('data', 'training', 'segmentation' ...)."""
    return _FIELDS[name].metadata["group"]


def key_since(name: str) -> str:
    """The res_unet version config key ``name`` was added in, e.g. '0.2.0'."""
    return _FIELDS[name].metadata["since"]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def keys_added_after(version: str) -> tuple[str, ...]:
    """The config keys added in a version later than ``version`` (e.g. '0.1.0'), in
    declaration order: a file written by that version holds none of them."""
    return tuple(name for name in _FIELDS if _version(key_since(name)) > _version(version))


# How the reference marks a key's roles, after its meaning.
_ROLE_MARKS = {"inference": "segmentation --config", "resumable": "resume may change"}


def reference_markdown() -> str:
    """The config reference (docs/config.md): a table per group, every key, type, default,
    meaning, and what else it is (roles, the version that added it)."""
    hints = typing.get_type_hints(Config)
    out: list[str] = []
    group = None
    for f in dataclasses.fields(Config):
        meta = f.metadata
        if meta["group"] != group:
            group = meta["group"]
            out += ["", f"#### {group.capitalize()}", "", "| key | type | default | meaning |",
                    "| --- | --- | --- | --- |"]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        marks = [mark for role, mark in _ROLE_MARKS.items() if role in meta["roles"]]
        if "inference" in meta["roles"] and "affects_outputs" not in meta["roles"]:
            marks.append("segmented images kept")
        if _version(meta["since"]) > _version(FIRST_VERSION):
            marks.append(f"new in {meta['since']}")
        meaning = meta["doc"].replace("|", "\\|") + (f" *({'; '.join(marks)})*" if marks else "")
        out.append(f"| `{f.name}` | {type_name(hints[f.name]).replace('|', 'or')} | "
                   f"`{json.dumps(default)}` | {meaning} |")
    return "\n".join(out).strip() + "\n"

