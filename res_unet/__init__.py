"""res_unet: residual and EfficientNet U-Nets for aerial and satellite image segmentation.

The public API, from a folder of images and labels to segmented scenes::

    import res_unet

    cfg = res_unet.load_config("config/lakes_lite.json")
    res_unet.make_dataset(cfg, "images/", "labels/", "dataset/")      # make_tfrecords
    card = res_unet.train_model(cfg, "dataset/", "run/")               # train_resunet
    res_unet.segment_folder(res_unet.inference_config(["run/"]), ["run/"],
                            "new_images/", "masks/")                   # seg_images_in_folder

and the pieces between them: ``load_dataset`` (a tf.data pipeline of a dataset),
``read_manifest``, ``build_model``, ``load_run`` (a run folder for inference), ``ModelCard``,
``Segmenter`` (one image in memory), ``evaluate_scenes``. Names are imported on first use,
so ``import res_unet`` stays light (TensorFlow loads only when a name that needs it is used).
Errors meant for users are :class:`UserError` (one line naming the file and the fix).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> (module, attribute).
_API = {
    "Config": ("res_unet.config", "Config"),
    "load_config": ("res_unet.config", "load_config"),
    "UserError": ("res_unet.errors", "UserError"),
    "make_dataset": ("res_unet.dataset", "make_dataset"),
    "read_manifest": ("res_unet.records", "read_manifest"),
    "load_dataset": ("res_unet.records", "load_dataset"),
    "build_model": ("res_unet.models", "build_model"),
    "train_model": ("res_unet.train", "train"),
    "ModelCard": ("res_unet.runfolder", "ModelCard"),
    "LoadedModel": ("res_unet.runfolder", "LoadedModel"),
    "load_run": ("res_unet.runfolder", "load_run"),
    "Segmenter": ("res_unet.predict", "Segmenter"),
    "inference_config": ("res_unet.runfolder", "inference_config"),
    "segment_folder": ("res_unet.segment", "segment_folder"),
    "evaluate_scenes": ("res_unet.scoring", "evaluate_scenes"),
}
__all__ = ["__version__", *sorted(_API)]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'res_unet' has no attribute {name!r}")
    module, attribute = _API[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
