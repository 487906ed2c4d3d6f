"""Train/validation split of source images, made before any augmentation or tiling.

The split is a pure function of the file stems, the validation share and the seed, so the
same folder always gives the same split whatever order the files are listed in. Related
images (the same lake in several years, parts of the same tile) can be kept on one side with
a regex group pattern: validation then measures how the model does on places it never saw.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from res_unet.core import messages
from res_unet.core.errors import UserError

if TYPE_CHECKING:
    from res_unet.data.pairing import Pair


def group_key(stem: str, pattern: re.Pattern[str] | None) -> str | None:
    """The group a file stem belongs to: the pattern's first capture group, or its whole match.

    Returns None when the stem does not match (the caller makes it a group of its own) and the
    stem itself when there is no pattern.
    """
    if pattern is None:
        return stem
    match = pattern.search(stem)
    if match is None:
        return None
    if match.re.groups and match.group(1) is not None:
        return match.group(1)
    return match.group(0)


def group_pairs(pairs: Sequence[Pair], group_pattern: str | None) -> dict[str, list[Pair]]:
    """Group pairs by :func:`group_key`; stems that do not match are groups of their own.

    Returns {group name: pairs sorted by stem}, ordered by group name. Prints one warning with
    the number of unmatched stems, since a wrong pattern silently turns grouping off.
    """
    pattern = re.compile(group_pattern) if group_pattern else None
    groups: dict[str, list[Pair]] = {}
    unmatched = []
    for pair in sorted(pairs, key=lambda p: p.stem):
        key = group_key(pair.stem, pattern)
        if key is None:
            unmatched.append(pair.stem)
            # A NUL cannot occur in a file name, so these keys never collide with real groups.
            key = f"\0{pair.stem}"
        groups.setdefault(key, []).append(pair)
    if unmatched:
        messages.warn(f"{len(unmatched)} of {len(pairs)} file names do not match "
                      f"SPLIT_GROUP_PATTERN {group_pattern!r} (e.g. {unmatched[0]!r}); each is "
                      "its own group in the train/validation split")
    return dict(sorted(groups.items()))


def split_pairs(pairs: Sequence[Pair], validation_split: float, seed: int,
                group_pattern: str | None = None,
                validation_groups: Sequence[str] = ()) -> tuple[list[Pair], list[Pair]]:
    """Split pairs into (train, validation) by group, deterministically from ``seed``.

    ``validation_split`` in [0, 1) is the target share of source images in validation; whole
    groups are assigned, so the share is met as closely as the group sizes allow. Validation
    gets at least one group and training keeps at least one when ``validation_split > 0``.
    ``validation_groups``, when given, names the held-out groups instead (the share and seed
    are then not used). Both lists are sorted by stem; the result does not depend on the
    order of ``pairs``. Raises UserError when a split is asked for but all images form a
    single group, or when a named group has no images or would leave none for training.
    """
    if not 0 <= validation_split < 1:
        raise UserError(f"VALIDATION_SPLIT={validation_split} must be in [0, 1)")
    groups = group_pairs(pairs, group_pattern)
    if validation_groups:
        return _split_named(groups, validation_groups, group_pattern)
    if validation_split == 0 or not pairs:
        return sorted(pairs, key=lambda p: p.stem), []
    if len(groups) < 2:
        what = (f"all {len(pairs)} images fall in one group of SPLIT_GROUP_PATTERN "
                f"{group_pattern!r}" if group_pattern and len(pairs) > 1
                else f"there is only {len(pairs)} image")
        raise UserError(f"VALIDATION_SPLIT={validation_split} needs at least two groups of "
                        f"images but {what}; add images, fix the pattern or set "
                        "VALIDATION_SPLIT to 0")
    names = list(groups)
    order = np.random.default_rng(seed).permutation(len(names))
    target = validation_split * len(pairs)
    validation: list[str] = []
    n_validation = 0
    for i in order:
        size = len(groups[names[i]])
        # Take a group only if it brings the validation count closer to the target.
        if abs(n_validation + size - target) < abs(n_validation - target):
            validation.append(names[i])
            n_validation += size
    if not validation:
        validation.append(min((names[i] for i in order), key=lambda n: len(groups[n])))
    if len(validation) == len(names):
        validation.pop()
    chosen = set(validation)
    train = [p for name in names if name not in chosen for p in groups[name]]
    val = [p for name in names if name in chosen for p in groups[name]]
    return sorted(train, key=lambda p: p.stem), sorted(val, key=lambda p: p.stem)


def _split_named(groups: dict[str, list[Pair]], names: Sequence[str],
                 group_pattern: str | None) -> tuple[list[Pair], list[Pair]]:
    """(train, validation) with the groups ``names`` in validation; UserError naming the
    groups that exist when one is missing, or when nothing would be left to train on."""
    missing = [n for n in names if n not in groups]
    if missing:
        known = [g for g in groups if not g.startswith("\0")]
        shown = ", ".join(known[:12]) + (", ..." if len(known) > 12 else "")
        what = (f"the groups of SPLIT_GROUP_PATTERN {group_pattern!r}" if group_pattern
                else "the file stems")
        raise UserError(f"VALIDATION_GROUPS names {', '.join(map(repr, missing))}, not among "
                        f"{what} ({shown or 'none'}); fix the names or the pattern")
    chosen = set(names)
    if len(chosen) == len(groups):
        raise UserError("VALIDATION_GROUPS holds out every group, leaving nothing to train "
                        "on; name fewer groups")
    train = [p for name, ps in groups.items() if name not in chosen for p in ps]
    val = [p for name, ps in groups.items() if name in chosen for p in ps]
    return sorted(train, key=lambda p: p.stem), sorted(val, key=lambda p: p.stem)
