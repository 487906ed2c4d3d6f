"""Training throughput of a model on this machine; prints JSON.

    python bench/bench_train.py [--model resunet|efficientnet_unet] [--encoder lite0]
                                [--size 256] [--batch 8] [--steps 20] [--filters 16]
                                [--precisions float32 mixed_bfloat16] [--dropout 0.1]
                                [--no-confusion] [--keras-batchnorm]
                                [--optimizers fused keras] [--inter-op N] [--intra-op N]

For each precision (and optimizer): the seconds from the first call of the training step
to its result (tracing the step into a graph, then one step), images/s of the real training
step (res_unet.training.train.Trainer, the same code train_resunet runs) on random data held
in memory, the model's forward FLOPs per image, training FLOPs (3x forward: forward + two
backward matmuls per layer), achieved GFLOP/s, model FLOPs utilisation against the float32 /
bfloat16 matmul peak measured here, and peak RSS.
The switches isolate overheads: ``--no-confusion`` drops the per-step confusion matrix (the
training IoU), ``--dropout 0`` the dropout layers, ``--keras-batchnorm`` runs BatchNorm
as Keras's separate ops instead of TensorFlow's fused kernel (the default in training,
``res_unet.models.helpers.fuse_batchnorm``), ``--optimizers fused keras`` measures the
training's Adam (res_unet.training.adam.FusedAdam, one kernel per variable) beside Keras'
own Adam in the same run, ``--inter-op`` / ``--intra-op`` set
TensorFlow's thread pools. Run by hand on an otherwise idle machine; CI does not time anything.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import res_unet  # noqa: F401  (before TensorFlow loads: it turns on the oneDNN kernels)

# isort: split
import keras
import numpy as np
import tensorflow as tf
from common import add_json_out, cpu_flags, matmul_peak, onednn_enabled, write_result

from res_unet.config.keys import config_from_dict
from res_unet.models.helpers import count_flops
from res_unet.training import train as training
from res_unet.training.devices import cpu_supports_bf16, device_description
from res_unet.training.train import Trainer


def bench_precision(precision: str, size: int, batch: int, steps: int, filters: int,
                    depth: int, model: str = "resunet", encoder: str = "B0",
                    dropout: float = 0.1, fused_batchnorm: bool = True,
                    optimizer: str = "fused") -> dict:
    cfg, _ = config_from_dict({"TARGET_SIZE": [size, size], "BATCH_SIZE": batch,
                               "MODEL": model, "ENCODER": encoder, "DROPOUT": dropout,
                               "FILTERS": filters, "DEPTH": depth, "PRECISION": precision,
                               "MAX_LR": 1e-3, "START_LR": 1e-3, "RAMPUP_EPOCHS": 0})
    # The manifest fields the Trainer reads; no dataset is built for this benchmark.
    manifest = SimpleNamespace(band_mean=[100.0] * 3, band_std=[50.0] * 3,
                               class_pixel_frequency=[0.8, 0.2])
    fused_adam = training.FusedAdam
    if optimizer == "keras":  # the Trainer builds this name's optimizer
        training.FusedAdam = keras.optimizers.Adam
    try:
        trainer = Trainer(cfg, manifest, tf.distribute.get_strategy(), precision,
                          fused_batchnorm)
    finally:
        training.FusedAdam = fused_adam
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (batch * 4, size, size, 3)).astype("float32")
    y = (rng.uniform(size=(batch * 4, size, size, 1)) > 0.8).astype("float32")
    iterator = iter(tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(batch)
                    .prefetch(2))
    next(iterator)  # the input pipeline's start is not the step's
    start = time.perf_counter()
    trainer.train_epoch(iterator, 1, 0, progress=False)  # trace + the first step
    first_step = time.perf_counter() - start
    trainer.train_epoch(iterator, 2, 0, progress=False)  # warm up
    _, _, seconds, wait = trainer.train_epoch(iterator, steps, 1, progress=False)
    images_per_second = steps * batch / seconds
    keras.mixed_precision.set_global_policy("float32")
    flops_forward = count_flops(trainer.model)
    return {"precision": precision, "optimizer": type(trainer.optimizer).__name__,
            "first_step_seconds": round(first_step, 2),
            "images_per_second": round(images_per_second, 2),
            "megapixels_per_second": round(images_per_second * size * size / 1e6, 3),
            "step_seconds": round(seconds / steps, 4),
            "input_wait_fraction": round(wait / seconds, 4),
            "forward_gflops_per_image": round(flops_forward / 1e9, 3),
            "train_gflops_per_image": round(3 * flops_forward / 1e9, 3),
            "achieved_gflops_per_second": round(3 * flops_forward * images_per_second / 1e9, 1),
            "parameters": int(trainer.model.count_params())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resunet")
    parser.add_argument("--encoder", default="B0")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--filters", type=int, default=16)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--precisions", nargs="+", default=["float32", "mixed_bfloat16"])
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--no-confusion", action="store_true")
    parser.add_argument("--keras-batchnorm", action="store_true",
                        help="Keras's own BatchNorm ops instead of the fused kernel")
    parser.add_argument("--optimizers", nargs="+", default=["fused"], choices=["fused", "keras"],
                        help="the training's FusedAdam, and/or Keras' own Adam")
    parser.add_argument("--inter-op", type=int, default=0, help="0: TensorFlow's default")
    parser.add_argument("--intra-op", type=int, default=0, help="0: TensorFlow's default")
    add_json_out(parser, "train")
    args = parser.parse_args()
    tf.config.threading.set_inter_op_parallelism_threads(args.inter_op)
    tf.config.threading.set_intra_op_parallelism_threads(args.intra_op)
    if args.no_confusion:
        from res_unet.training import metrics

        metrics.batch_confusion = lambda y, prob, n, *a, **k: tf.zeros((n, n), tf.float64)
    peaks = {"float32": matmul_peak(tf.float32), "mixed_bfloat16": matmul_peak(tf.bfloat16)}
    results = []
    for precision in args.precisions:
        for optimizer in args.optimizers:
            row = bench_precision(precision, args.size, args.batch, args.steps, args.filters,
                                  args.depth, args.model, args.encoder, args.dropout,
                                  not args.keras_batchnorm, optimizer)
            peak = peaks.get(precision, peaks["float32"])
            row["matmul_peak_gflops_per_second"] = round(peak, 1)
            row["mfu"] = round(row["achieved_gflops_per_second"] / peak, 4)
            results.append(row)
    report = {
        "benchmark": "train_resunet step", "model": args.model,
        "encoder": args.encoder if args.model == "efficientnet_unet" else None,
        "device": device_description(),
        "cpu_bf16": cpu_supports_bf16(), "tensorflow": tf.__version__,
        "cpu_flags": cpu_flags(), "onednn": onednn_enabled(),
        "size": args.size, "batch": args.batch, "filters": args.filters, "depth": args.depth,
        "dropout": args.dropout, "confusion_per_step": not args.no_confusion,
        "fused_batchnorm": not args.keras_batchnorm,
        "inter_op": args.inter_op, "intra_op": args.intra_op,
        "results": results,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    write_result(report, args.json_out, peaks["float32"])
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
