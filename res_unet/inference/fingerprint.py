"""What made a segmentation folder, so that a re-run never mixes results: the output
fingerprint (every model's weights, tile size, scale, threshold, TTA and the settings that
change outputs), recorded for the folder in ``segmentation_config.json`` and, digested, for
each finished image in a hidden ``.NAME.segmented`` beside its outputs; the check before
resuming into a folder. :mod:`res_unet.inference.segment` writes them."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from res_unet.config.keys import Config
from res_unet.config.reference import key_group, keys_added_after, keys_with
from res_unet.core.errors import UserError
from res_unet.inference.predict import Segmenter
from res_unet.inference.runtime import LoadedModel
from res_unet.training.runfolder import read_json

SEGMENTATION_CONFIG = "segmentation_config.json"
# Beside the outputs of image NAME, once they are all written: the digest of the output
# fingerprint that made them, so that a re-run skips only images made with its own settings.
IMAGE_RECORD = ".{stem}.segmented"

# The settings that change what a finished image's outputs hold (the key roles say which), in
# the order the fingerprint's first version wrote them: segmentation keys, then the others.
_SETTINGS = sorted(keys_with("affects_outputs"), key=lambda k: key_group(k) != "segmentation")
# The fingerprint came with res_unet 0.1.0: keys added later are recorded only when not at
# their defaults, so that folders made before they existed still match.
_ADDED_LATER = {k: getattr(Config(), k) for k in _SETTINGS if k in keys_added_after("0.1.0")}


def output_fingerprint(models: Sequence[LoadedModel], segmenter: Segmenter,
                       cfg: Config) -> dict[str, Any]:
    """What the outputs of a segmentation depend on: every model's weights (SHA-256 of their
    values), the tile size, scale, threshold, TTA and the segmentation settings (polygon
    settings when not at their defaults)."""
    digests = []
    for member in models:
        hasher = hashlib.sha256()
        for array in member.model.get_weights():
            hasher.update(np.ascontiguousarray(array).tobytes())
        digests.append(hasher.hexdigest())
    values = cfg.to_dict()
    settings = {k: values[k] for k in _SETTINGS
                if not (k in _ADDED_LATER and values[k] == _ADDED_LATER[k])}
    fingerprint = {"weights": digests, "tile_size": list(segmenter.tile_hw),
                   "downsample": segmenter.downsample, "threshold": segmenter.threshold_setting,
                   "tta_transforms": len(segmenter.transforms),
                   "settings": settings}
    # Keys added later are recorded only when they change something: old folders match.
    if cfg.INFER_RUNTIME == "openvino_bf16" or any(m.runtime == "openvino_bf16" for m in models):
        fingerprint["precision"] = "bfloat16"
    if segmenter.pixel_size_m is not None:  # scenes are brought to the model's pixel size
        fingerprint["pixel_size"] = segmenter.pixel_size_m
    return fingerprint


def check_resumable(out_dir: Path, fingerprint: dict[str, Any], outputs: str) -> None:
    """Refuse to resume into ``out_dir`` when its outputs (files matching the glob
    ``outputs``) were made by other models or settings (or by a version that did not record
    them): skipping those images would mix two results and score the old masks as if the
    new model made them."""
    if not any(out_dir.glob(outputs)):
        return
    try:
        previous = read_json(out_dir / SEGMENTATION_CONFIG)["fingerprint"]
    except (UserError, KeyError, TypeError):  # (unreadable, not a file, too large or deep)
        previous = None
    if previous == fingerprint:
        return
    if previous is None:
        what = "by a run that recorded no model (or an older res_unet)"
    else:
        # Over the keys of both: an entry recorded only when set may be on either side.
        changed = [k for k in {**previous, **fingerprint}
                   if previous.get(k) != fingerprint.get(k)]
        if "settings" in changed:
            changed.remove("settings")
            old, new = previous.get("settings", {}), fingerprint["settings"]
            changed += [k for k in {**old, **new} if old.get(k) != new.get(k)]
        what = "with other " + ", ".join("model weights" if k == "weights" else k
                                          for k in changed)
    raise UserError(f"{out_dir}: holds segmentations made {what}; choose another --out, or "
                    "pass --overwrite to redo every image with this model")


def made_with(paths: dict[str, Path], record: Path) -> str | None:
    """The fingerprint digest the outputs ``paths`` of one image were made with (from its
    ``record``, written last); None when an output or the record is missing or unreadable."""
    try:
        return (read_json(record)["fingerprint"] if record.is_file()
                and all(p.is_file() for p in paths.values()) else None)
    except (UserError, KeyError, TypeError):
        return None
