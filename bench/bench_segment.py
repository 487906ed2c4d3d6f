"""Benchmark of segmentation: speed and peak memory of tiled inference, and the IoU effect of
each post-processing step.

    python bench/bench_segment.py [--model RUN_DIR] [--scenes 3] [--variants plain,tta,crf,strips]
                                  [--out bench_segment.json]

Speed: megapixels per second and peak resident memory (psutil, sampled every 20 ms in a
thread, so TensorFlow's allocations count) of segmenting the full-resolution lakes scenes
(../shared/data/lakes_fullres, ~14 Mpx each) in tile mode: 'plain', 'tta' (4 flips), 'crf'
(dense CRF on the down-sampled grid) and 'strips' (the memory-bounded strip path that images
above FULL_MAX_VALUES take). Without --model an untrained residual U-Net (FILTERS 16, DEPTH 4,
256 x 256) is written to a temp run folder: speed does not depend on training.

Quality (trained --model only): IoU on the lakes validation images (the run's own split,
re-drawn from its VALIDATION_SPLIT, SEED and SPLIT_GROUP_PATTERN) with the card threshold,
then with each post-processing step added alone, then with all of them. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from common import PeakMemory, add_json_out, write_result

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
# Run from a checkout without installing: make the repository's package importable.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
import res_unet  # noqa: E402, F401  (before TensorFlow loads: it turns on the oneDNN kernels)

# Post-processing steps scored one at a time on top of the thresholded prediction.
STEPS = {
    "crf": {"DO_CRF_REFINE": True},
    "median_3": {"MEDIAN_FILTER_VALUE": 3},
    "opening_2": {"OPENING_RADIUS": 2},
    "closing_2": {"CLOSING_RADIUS": 2},
    "min_object_100": {"MIN_OBJECT_AREA": 100},
    "min_hole_100": {"MIN_HOLE_AREA": 100},
}


def untrained_run(run_dir: Path) -> Path:
    """Write a run folder with a random-weight resunet (FILTERS 16, DEPTH 4, 256 x 256)."""
    import keras

    from res_unet.config import config_from_dict, save_config
    from res_unet.models import build_model
    from res_unet.models.helpers import count_flops
    from res_unet.runfolder import CardInput, ModelCard, TrainingFacts

    cfg, _ = config_from_dict({"TARGET_SIZE": [256, 256], "FILTERS": 16, "DEPTH": 4,
                               "N_DATA_BANDS": 3, "NCLASSES": 1, "BATCH_SIZE": 8})
    mean, std = [90.0, 100.0, 90.0], [45.0, 40.0, 40.0]
    keras.utils.set_random_seed(0)
    model = build_model(cfg, mean, std)
    run_dir.mkdir(parents=True, exist_ok=True)
    model.save(run_dir / "model.keras")
    model.save_weights(run_dir / "best.weights.h5")
    save_config(cfg, run_dir / "config.json")
    ModelCard(
        res_unet_version="bench", model=cfg.MODEL, encoder=None,
        parameters=int(model.count_params()), flops_per_image=int(count_flops(model)),
        input=CardInput(size=[256, 256], bands=3, dtype="uint8", band_mean=mean,
                        band_std=std),
        classes=2, class_names=cfg.class_names, binary=True, ignore_class=None,
        threshold=0.5, dataset={},
        training=TrainingFacts(epochs_run=0, best_epoch=0, best_val_loss=None,
                               train_seconds=0.0, images_per_second=None,
                               precision="float32", strategy="untrained", replicas=1),
        validation={}, versions={}, device="", wall_seconds=0.0, files={},
        config=cfg.to_dict()).write(run_dir)
    return run_dir


def bench_speed(run_dir: Path, scenes: int, variants: list[str], batch_size: int | None
                ) -> dict[str, Any]:
    """Mpx/s and peak RSS of each variant over the first ``scenes`` full-resolution scenes."""
    from res_unet import pairing, predict, runfolder
    from res_unet.tiling import tile_origins

    pairs = pairing.find_images(DATA / "lakes_fullres" / "images")[:scenes]
    # Variants start from no TTA and no CRF whatever the run's config says ('plain').
    overrides: dict[str, Any] = {"INFER_MODE": "tile", "TESTTIMEAUG": False,
                                 "DO_CRF_REFINE": False}
    if batch_size:
        overrides["BATCH_SIZE"] = batch_size
    base = runfolder.inference_config([run_dir], None, overrides)
    model = runfolder.load_run(run_dir, base.TARGET_SIZE)
    results: dict[str, Any] = {"scenes": [p.image.name for p in pairs], "variants": {}}
    for variant in variants:
        extra = {"tta": {"TESTTIMEAUG": True}, "crf": {"DO_CRF_REFINE": True}}.get(variant, {})
        cfg = runfolder.inference_config([run_dir], None, {**overrides, **extra})
        segmenter = predict.Segmenter([model], cfg,
                                      full_max_values=0 if variant == "strips"
                                      else predict.FULL_MAX_VALUES)
        per_scene = []
        for pair in pairs:
            image, _ = pairing.load_image(pair, cfg.N_DATA_BANDS)
            with PeakMemory() as memory:
                t0, cpu0 = time.perf_counter(), time.process_time()
                label = segmenter.segment(image)
                seconds = time.perf_counter() - t0
                cpu_seconds = time.process_time() - cpu0
            mpx = image.shape[0] * image.shape[1] / 1e6
            per_scene.append({"image": pair.image.name, "shape": list(image.shape),
                              "seconds": round(seconds, 2),
                              "mpx_per_second": round(mpx / seconds, 3),
                              "cpu_seconds": round(cpu_seconds, 1),
                              "peak_rss_mb": round(memory.peak / 2**20),
                              "rss_before_mb": round(memory.start / 2**20),
                              "foreground_share": round(float(np.mean(label == 1)), 4)})
            print(f"{variant}: {pair.image.name} {mpx:.1f} Mpx in {seconds:.1f} s, peak RSS "
                  f"{memory.peak / 2**20:.0f} MB", file=sys.stderr, flush=True)
        total_mpx = sum(s["shape"][0] * s["shape"][1] for s in per_scene) / 1e6
        total_s = sum(s["seconds"] for s in per_scene)
        total_cpu = sum(s["cpu_seconds"] for s in per_scene)
        results["variants"][variant] = {
            "mpx_per_second": round(total_mpx / total_s, 3),
            # Robust to other processes sharing the cores: megapixels per CPU-second used.
            "mpx_per_cpu_second": round(total_mpx / total_cpu, 3),
            "peak_rss_mb": max(s["peak_rss_mb"] for s in per_scene),
            "tiles_per_scene_pass": len(tile_origins(per_scene[0]["shape"][0],
                                                             cfg.TARGET_SIZE[0],
                                                             cfg.TILE_OVERLAP))
            * len(tile_origins(per_scene[0]["shape"][1], cfg.TARGET_SIZE[1],
                                       cfg.TILE_OVERLAP)),
            "scenes": per_scene}
    results["settings"] = {"tile_size": list(base.TARGET_SIZE), "overlap": base.TILE_OVERLAP,
                           "window": base.BLEND_WINDOW, "batch_size": base.BATCH_SIZE,
                           "crf_max_pixels": base.CRF_MAX_PIXELS}
    return results


def bench_quality(run_dir: Path, max_images: int | None) -> dict[str, Any]:
    """IoU on the run's lakes validation split with each post-processing step."""
    from res_unet import metrics, pairing, postprocess, predict, runfolder
    from res_unet.config import config_from_dict
    from res_unet.split import split_pairs

    cfg = runfolder.inference_config([run_dir], None, {})
    pairs = pairing.find_pairs(DATA / "lakes" / "images", DATA / "lakes" / "labels")
    _, validation = split_pairs(pairs, cfg.VALIDATION_SPLIT, cfg.SEED, cfg.SPLIT_GROUP_PATTERN)
    validation = validation[:max_images] if max_images else validation
    segmenter = predict.Segmenter([runfolder.load_run(run_dir, cfg.TARGET_SIZE)], cfg)
    settings = {"threshold_0.5": {"THRESHOLD": 0.5}, "card_threshold": {"THRESHOLD": None},
                "otsu": {"THRESHOLD": "otsu"},
                **{name: {"THRESHOLD": None, **step} for name, step in STEPS.items()},
                "all_steps": {"THRESHOLD": None,
                              **{k: v for step in STEPS.values() for k, v in step.items()}}}
    base = {**cfg.to_dict(), "DO_CRF_REFINE": False, "MEDIAN_FILTER_VALUE": 0,
            "OPENING_RADIUS": 0, "CLOSING_RADIUS": 0, "MIN_OBJECT_AREA": 0, "MIN_HOLE_AREA": 0}
    configs = {name: config_from_dict({**base, **over})[0] for name, over in settings.items()}
    cms = {name: np.zeros((2, 2), np.int64) for name in settings}
    for pair in validation:
        image, truth, _ = pairing.load_pair(pair, cfg.N_DATA_BANDS, cfg.label_rules)
        prob = segmenter.probabilities(image)
        for name, step_cfg in configs.items():
            label = postprocess.postprocess(prob, image, step_cfg, segmenter.card_threshold)
            cms[name] += metrics.confusion_matrix(truth, label, 2)
    out: dict[str, Any] = {"validation_images": len(validation),
                           "card_threshold": segmenter.card_threshold, "steps": {}}
    for name, cm in cms.items():
        scores = metrics.scores_from_confusion(cm)
        out["steps"][name] = {"water_iou": scores["iou"][1], "mean_iou": scores["mean_iou"],
                              "water_dice": scores["dice"][1],
                              "pixel_accuracy": scores["pixel_accuracy"]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="trained run folder (default: untrained)")
    parser.add_argument("--scenes", type=int, default=3, help="full-resolution scenes to time")
    parser.add_argument("--variants", default="plain,tta,crf,strips")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--quality-images", type=int, help="limit the validation images")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    add_json_out(parser, "segment")
    args = parser.parse_args(argv)
    if not (DATA / "lakes_fullres").is_dir():
        print(f"error: {DATA / 'lakes_fullres'} not found", file=sys.stderr)
        return 2
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.model or untrained_run(Path(tmp) / "untrained_run")
        report: dict[str, Any] = {
            "model": str(args.model) if args.model else "untrained resunet FILTERS 16 DEPTH 4 "
            "TARGET_SIZE 256 (random weights)",
            "machine": {"cpus": os.cpu_count(), "tensorflow": tf.__version__,
                        "load_average": [round(v, 2) for v in os.getloadavg()]},
            "speed": bench_speed(run_dir, args.scenes, args.variants.split(","),
                                 args.batch_size)}
        if args.model:
            report["quality"] = bench_quality(run_dir, args.quality_images)
        else:
            report["quality"] = {"skipped": "no trained --model given; IoU before/after "
                                            "post-processing needs trained weights"}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        from res_unet.atomic import write_atomic

        write_atomic(args.out, text + "\n")
    write_result(report, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
