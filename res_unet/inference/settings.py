"""The settings to segment with: a run's config, then the segmentation keys of a --config,
then command-line flags (:func:`inference_config`)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from res_unet.config.keys import Config, config_from_dict, load_config, with_overrides
from res_unet.config.reference import keys_with
from res_unet.config.upgrade import upgrade_keys
from res_unet.core.errors import UserError
from res_unet.training.runfolder import read_json, run_config

# Config keys a segmentation --config may set; everything else comes from the run folder.
INFERENCE_KEYS = keys_with("inference")


def inference_config(run_dirs: Sequence[str | os.PathLike], config_path: str | None = None,
                     overrides: Mapping[str, Any] | None = None,
                     flags: Mapping[str, str] | None = None) -> Config:
    """The settings to segment with: the first run's config.json, then the segmentation keys
    (``INFERENCE_KEYS``) set in ``config_path``, then ``overrides`` (command-line flags; see
    :func:`res_unet.config.keys.with_overrides`, ``flags`` names them in messages).

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
    cfg, _ = config_from_dict(values, source=str(config_path or run_dirs[0]))
    return with_overrides(cfg, overrides or {}, flags=flags)
