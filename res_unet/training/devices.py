"""The machine: the GPUs TensorFlow sees, the CPU's bfloat16 units, the distribution
strategy, the numeric precision, and which process writes the run folder.

One CPU or GPU uses the default strategy, several GPUs MirroredStrategy, several machines
(TF_CONFIG) MultiWorkerMirroredStrategy. PRECISION 'auto' reads the CPU flags: bfloat16 only
where the CPU has native bf16 units (elsewhere it is emulated and several times slower).
Segmentation's INFER_RUNTIME 'auto' asks :func:`visible_gpus` too (res_unet.training.runfolder).
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import tensorflow as tf

from res_unet.config.keys import Config
from res_unet.core import messages


def make_strategy() -> tf.distribute.Strategy:
    """MultiWorkerMirrored when TF_CONFIG names several workers, Mirrored over several GPUs,
    else the default strategy (one CPU or GPU)."""
    cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    if len(cluster.get("worker", [])) > 1:
        return tf.distribute.MultiWorkerMirroredStrategy()
    if visible_gpus() > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def strategy_name(strategy: tf.distribute.Strategy) -> str:
    """The public name of a strategy (MultiWorkerMirroredStrategy's class has another)."""
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return "MultiWorkerMirroredStrategy"
    return type(strategy).__name__


def visible_gpus() -> int:
    """How many GPUs TensorFlow sees (after SET_GPU / CUDA_VISIBLE_DEVICES)."""
    return len(tf.config.list_logical_devices("GPU"))


def cpu_supports_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU has native bfloat16 matrix units (AMX or AVX512-BF16), from the flags
    in ``cpuinfo``; False where that file cannot be read (not Linux)."""
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(cfg: Config) -> str:
    """The Keras dtype policy for PRECISION; 'auto' picks by hardware.

    float16 on a CPU is emulated and unusably slow, so it is only chosen for GPUs.
    """
    if cfg.PRECISION != "auto":
        if cfg.PRECISION == "mixed_float16" and not visible_gpus():
            messages.note("PRECISION mixed_float16 without a GPU is very slow; consider "
                          "mixed_bfloat16 or float32")
        return cfg.PRECISION
    if visible_gpus():
        return "mixed_float16"
    return "mixed_bfloat16" if cpu_supports_bf16() else "float32"


def device_description() -> str:
    """A short description of the compute device, for the model card."""
    gpus = visible_gpus()
    if gpus:
        return f"{gpus} GPU(s)"
    name = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def is_chief() -> bool:
    """Whether this process writes the run folder: the chief, or worker 0 when no chief is
    named, or the only process when TF_CONFIG is absent."""
    tf_config = json.loads(os.environ.get("TF_CONFIG", "{}"))
    task = tf_config.get("task", {})
    if not task:
        return True
    if task.get("type") == "chief":
        return True
    return (task.get("type") == "worker" and task.get("index", 0) == 0
            and "chief" not in tf_config.get("cluster", {}))
