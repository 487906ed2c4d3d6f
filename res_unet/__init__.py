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
``Segmenter`` (one image in memory), ``evaluate_scenes``, ``LabelSource`` (where a folder's
labels come from: label rasters, polygon layers, one shared layer). Names are imported on first use,
so ``import res_unet`` stays light (TensorFlow loads only when a name that needs it is used).
Errors meant for users are :class:`UserError` (one line naming the file and the fix).

Importing res_unet turns on TensorFlow's oneDNN kernels (``TF_ENABLE_ONEDNN_OPTS=1``) unless
that variable is already set. TensorFlow enables them by itself only on CPUs with AVX-512
VNNI/BF16 or AMX; on AVX2 CPUs they train the residual U-Net about 1.8x faster than the
Eigen kernels it uses otherwise (``bench/bench_train.py``). The variable is read when
TensorFlow loads, so import res_unet first (the commands do); set it to 0 to opt out.

It also points Keras' and matplotlib's own folders (``KERAS_HOME``, ``MPLCONFIGDIR``) into
res_unet's cache unless they are set (:mod:`res_unet.core.caches`), so that nothing is written
in the home folder but the cache.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from res_unet.core.caches import keep_library_files_in_cache

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
keep_library_files_in_cache()

__version__ = "0.2.0"

# Public name -> (module, attribute).
_API = {
    "Config": ("res_unet.config.keys", "Config"),
    "load_config": ("res_unet.config.keys", "load_config"),
    "UserError": ("res_unet.core.errors", "UserError"),
    "make_dataset": ("res_unet.data.dataset", "make_dataset"),
    "read_manifest": ("res_unet.data.records", "read_manifest"),
    "load_dataset": ("res_unet.data.records", "load_dataset"),
    "build_model": ("res_unet.models", "build_model"),
    "train_model": ("res_unet.workflow", "train_model"),
    "ModelCard": ("res_unet.training.runfolder", "ModelCard"),
    "LoadedModel": ("res_unet.inference.runtime", "LoadedModel"),
    "load_run": ("res_unet.inference.runtime", "load_run"),
    "Segmenter": ("res_unet.inference.predict", "Segmenter"),
    "inference_config": ("res_unet.inference.settings", "inference_config"),
    "segment_folder": ("res_unet.inference.segment", "segment_folder"),
    "evaluate_scenes": ("res_unet.inference.scoring", "evaluate_scenes"),
    "LabelSource": ("res_unet.data.labelsource", "LabelSource"),
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
