"""The settings to segment with: a run's config, then the segmentation keys of a --config,
then command-line flags (:func:`inference_config`)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from res_unet.config.keys import Config, config_from_dict, load_config
from res_unet.config.upgrade import upgrade_keys
from res_unet.core.errors import UserError
from res_unet.training.runfolder import read_json, run_config

# Config keys a segmentation --config may set; everything else comes from the run folder.
INFERENCE_KEYS = (
    *(f.name for f in dataclasses.fields(Config) if f.metadata["group"] == "segmentation"),
    "TILE_OVERLAP", "BATCH_SIZE", "USEMASK", "REMAP_CLASSES", "EXTRA_BAND_DIRS", "SET_GPU",
    "LABEL_ATTRIBUTE", "LABEL_LAYER", "LABEL_PRIORITY",  # reading --labels
)


def inference_config(run_dirs: Sequence[str | os.PathLike], config_path: str | None = None,
                     overrides: dict[str, Any] | None = None) -> Config:
    """The settings to segment with: the first run's config.json, then the segmentation keys
    (``INFERENCE_KEYS``) set in ``config_path``, then ``overrides`` (command-line flags).

    EXTRA_BAND_DIRS of the run describe its training images, so they are dropped unless
    ``config_path`` names the new images' extra-band folders. Raises UserError for invalid
    values, naming the source.
    """
    if not run_dirs:
        raise UserError("command line: no --model given; pass a run folder of train_resunet")
    values = run_config(run_dirs[0]).to_dict()
    values["EXTRA_BAND_DIRS"] = []
    if config_path is not None:
        user = load_config(config_path)
        raw, _ = upgrade_keys(read_json(Path(config_path), "config"), str(config_path))
        values.update({k: getattr(user, k) for k in raw if k in INFERENCE_KEYS})
    values.update(overrides or {})
    cfg, _ = config_from_dict(values, source="command line")
    return cfg
