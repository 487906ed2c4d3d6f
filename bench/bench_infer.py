"""Inference throughput of the models on this machine (the forward pass alone); prints JSON.

    python bench/bench_infer.py [--size 384] [--batch 8] [--batches 6]
                                [--precisions float32 mixed_bfloat16]

For each model (residual U-Net FILTERS 8 and 16, EfficientNet-Lite0 U-Net) and precision:
images/s and megapixels/s of ``model(x, training=False)`` in a tf.function on random tiles,
forward FLOPs per image, achieved GFLOP/s and model FLOPs utilisation against the matmul
peak measured in the same run, and peak RSS. Tiling, blending and I/O are left out (see
bench_segment.py for whole scenes). Run by hand on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import res_unet  # noqa: F401  (before TensorFlow loads: it turns on the oneDNN kernels)

# isort: split
import keras
import numpy as np
import tensorflow as tf
from common import add_json_out, matmul_peak, onednn_enabled, write_result

from res_unet.config.keys import config_from_dict
from res_unet.models import build_model
from res_unet.models.helpers import count_flops
from res_unet.training.devices import cpu_supports_bf16, device_description

MODELS = {
    "resunet FILTERS 8": {"MODEL": "resunet", "FILTERS": 8},
    "resunet FILTERS 16": {"MODEL": "resunet", "FILTERS": 16},
    "lite0 U-Net": {"MODEL": "efficientnet_unet", "ENCODER": "lite0"},
}


def bench_model(keys: dict, precision: str, size: int, batch: int, batches: int) -> dict:
    """Forward-pass figures of one model at one precision."""
    cfg, _ = config_from_dict({"TARGET_SIZE": [size, size], **keys})
    keras.mixed_precision.set_global_policy("float32")
    flops = count_flops(build_model(cfg, [100.0] * 3, [50.0] * 3))
    keras.mixed_precision.set_global_policy(precision)
    model = build_model(cfg, [100.0] * 3, [50.0] * 3)
    keras.mixed_precision.set_global_policy("float32")
    step = tf.function(lambda x: tf.cast(model(x, training=False), tf.float32))
    x = tf.constant(np.random.default_rng(0).uniform(0, 255, (batch, size, size, 3)),
                    tf.float32)
    step(x).numpy()
    step(x).numpy()
    start = time.perf_counter()
    for _ in range(batches):
        out = step(x)
    out.numpy()
    seconds = time.perf_counter() - start
    images_per_second = batches * batch / seconds
    return {"precision": precision, "images_per_second": round(images_per_second, 2),
            "megapixels_per_second": round(images_per_second * size * size / 1e6, 3),
            "forward_gflops_per_image": round(flops / 1e9, 3),
            "achieved_gflops_per_second": round(flops * images_per_second / 1e9, 1),
            "parameters": int(model.count_params())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--precisions", nargs="+", default=["float32", "mixed_bfloat16"])
    add_json_out(parser, "infer")
    args = parser.parse_args()
    peaks = {"float32": matmul_peak(tf.float32), "mixed_bfloat16": matmul_peak(tf.bfloat16)}
    rows = []
    for name, keys in MODELS.items():
        for precision in args.precisions:
            row = {"model": name, **bench_model(keys, precision, args.size, args.batch,
                                                args.batches)}
            row["matmul_peak_gflops_per_second"] = round(peaks[precision], 1)
            row["mfu"] = round(row["achieved_gflops_per_second"] / peaks[precision], 4)
            rows.append(row)
    report = {
        "benchmark": "forward pass", "device": device_description(),
        "cpu_bf16": cpu_supports_bf16(), "onednn": onednn_enabled(),
        "tensorflow": tf.__version__, "size": args.size,
        "batch": args.batch, "results": rows,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    write_result(report, args.json_out, peaks["float32"])
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
