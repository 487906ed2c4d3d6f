"""The rules between config keys: what no single key's type or range can say (a tile size
the architecture cannot divide, rates out of order, class lists of the wrong length, a
shard prefix that would leave the output folder ...). :func:`res_unet.config.keys.config_from_dict`
applies them after every key on its own is valid.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from res_unet.config.registry import LOSS_TERMS, MODELS
from res_unet.core.errors import UserError, either
from res_unet.core.folders import check_plain_name

if TYPE_CHECKING:
    from res_unet.config.keys import Config


def check_consistency(c: Config, source: str) -> list[str]:
    """Problems (one line each, naming ``source``) between keys of a validated ``c``:
    sizes that do not fit the architecture, rates out of order, class lists of the wrong
    length, names that would leave the output folder, and so on."""
    p = []
    architecture = MODELS[c.MODEL]
    if len(c.TARGET_SIZE) != 2:
        p.append(f"{source}: TARGET_SIZE must be [rows, cols], got {c.TARGET_SIZE}")
    else:
        f = c.downsampling_factor
        if any(s % f for s in c.TARGET_SIZE):
            keys = ", ".join(f"{k}={getattr(c, k)}" for k in architecture.downsampling_keys)
            p.append(f"{source}: TARGET_SIZE {c.TARGET_SIZE} is not divisible by {f}, the "
                     f"down-sampling factor of MODEL '{c.MODEL}'"
                     + (f" with {keys}" if keys else "")
                     + f"; use e.g. {[max(f, round(s / f) * f) for s in c.TARGET_SIZE]}")
    if c.MIN_LR > c.MAX_LR:
        p.append(f"{source}: MIN_LR={c.MIN_LR} is larger than MAX_LR={c.MAX_LR}")
    if c.START_LR > c.MAX_LR:
        p.append(f"{source}: START_LR={c.START_LR} is larger than MAX_LR={c.MAX_LR}")
    if c.KERNEL_SIZE % 2 == 0:
        p.append(f"{source}: KERNEL_SIZE={c.KERNEL_SIZE} must be odd (e.g. {c.KERNEL_SIZE + 1})")
    unknown_terms = [t for t in c.LOSS if t not in LOSS_TERMS]
    if unknown_terms:
        p.append(f"{source}: LOSS terms {unknown_terms} unknown; use {', '.join(LOSS_TERMS)}")
    elif not any(w > 0 for w in c.LOSS.values()):
        p.append(f"{source}: LOSS needs at least one term with a positive weight")
    if isinstance(c.CLASS_WEIGHTS, str) and c.CLASS_WEIGHTS != "auto":
        p.append(f"{source}: CLASS_WEIGHTS='{c.CLASS_WEIGHTS}' must be 'auto', a list or null")
    if isinstance(c.CLASS_WEIGHTS, list):
        if len(c.CLASS_WEIGHTS) != c.n_label_classes:
            p.append(f"{source}: CLASS_WEIGHTS has {len(c.CLASS_WEIGHTS)} values but there are "
                     f"{c.n_label_classes} classes (background first)")
        if any(w < 0 for w in c.CLASS_WEIGHTS):
            p.append(f"{source}: CLASS_WEIGHTS must not be negative")
    if c.CLASS_NAMES and len(c.CLASS_NAMES) != c.n_label_classes:
        p.append(f"{source}: CLASS_NAMES has {len(c.CLASS_NAMES)} names but there are "
                 f"{c.n_label_classes} classes (binary: background then foreground)")
    if c.IGNORE_CLASS is not None and c.IGNORE_CLASS >= c.n_label_classes:
        p.append(f"{source}: IGNORE_CLASS={c.IGNORE_CLASS} is not a class (0.."
                 f"{c.n_label_classes - 1})")
    if c.IGNORE_CLASS is not None and c.NCLASSES == 1:
        p.append(f"{source}: IGNORE_CLASS needs a multiclass model (NCLASSES > 1); for binary "
                 "labels map the value to ignore to 0 with REMAP_CLASSES")
    bad_priority = [k for k in c.LABEL_PRIORITY if not 0 <= k < c.n_label_classes]
    if bad_priority or len(set(c.LABEL_PRIORITY)) != len(c.LABEL_PRIORITY):
        p.append(f"{source}: LABEL_PRIORITY {c.LABEL_PRIORITY} must list classes 0.."
                 f"{c.n_label_classes - 1}, each at most once")
    if isinstance(c.THRESHOLD, str) and c.THRESHOLD != "otsu":
        p.append(f"{source}: THRESHOLD='{c.THRESHOLD}' must be a number, 'otsu' or null")
    if isinstance(c.THRESHOLD, (int, float)) and not 0 < c.THRESHOLD < 1:
        p.append(f"{source}: THRESHOLD={c.THRESHOLD} must be between 0 and 1")
    if c.VECTOR_LAYER_PER_CLASS and c.VECTOR_FORMAT == "geojson":
        p.append(f"{source}: VECTOR_LAYER_PER_CLASS needs VECTOR_FORMAT 'gpkg' (a GeoJSON file "
                 "holds one layer); use gpkg or drop VECTOR_LAYER_PER_CLASS")
    for k, v in c.REMAP_CLASSES.items():
        if not k.lstrip("-").isdigit():
            p.append(f"{source}: REMAP_CLASSES key '{k}' must be a label value like \"3\"")
        elif v < 0 or v > 255:
            p.append(f"{source}: REMAP_CLASSES maps {k} to {v}; values must be 0..255")
    if architecture.encoders and c.ENCODER not in architecture.encoders:
        p.append(f"{source}: ENCODER '{c.ENCODER}' does not fit MODEL '{c.MODEL}'; use "
                 f"{either(repr(e) for e in architecture.encoders)}")
    if architecture.encoders and c.FREEZE_ENCODER_EPOCHS and not c.ENCODER_WEIGHTS:
        p.append(f"{source}: FREEZE_ENCODER_EPOCHS needs pretrained ENCODER_WEIGHTS (a file or "
                 "'imagenet'); freezing a random encoder only slows training")
    if c.HOT_START and not c.INITIAL_WEIGHTS:
        p.append(f"{source}: HOT_START needs INITIAL_WEIGHTS, the weights file to start from")
    if c.SPLIT_GROUP_PATTERN:
        import re
        try:
            re.compile(c.SPLIT_GROUP_PATTERN)
        except re.error as exc:
            p.append(f"{source}: SPLIT_GROUP_PATTERN is not a valid regex ({exc})")
    try:
        check_plain_name(c.ROOT_STRING, f"{source}: ROOT_STRING")
    except UserError as exc:
        p.append(str(exc))
    if c.LABEL_LAYER == "":
        p.append(f"{source}: LABEL_LAYER is empty; name the layer that holds the labels, or "
                 "leave it out (null) to read a file's only layer")
    if c.VALIDATION_GROUPS and len(set(c.VALIDATION_GROUPS)) != len(c.VALIDATION_GROUPS):
        p.append(f"{source}: VALIDATION_GROUPS names a group twice; list each once")
    return p


