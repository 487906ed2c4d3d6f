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

``--default-path`` instead benchmarks what ``seg_images_in_folder --model weights/lakes_lite0``
does without flags (INFER_RUNTIME auto, the run's TTA, the card's views) on the 1024-px lakes
scenes held out from that model's training (its split by lake), writing
``bench/results/default_path.json``:
- the IoU of every subset of the four TTA flips on all held-out scenes, and on the two halves
  of the held-out lakes (so that a choice made on one half can be checked on the other);
- INT8 post-training quantisation (``--int8``, needs ``pip install nncf``): calibrated on
  tiles of the training scenes, its IoU against float32 with the same views;
- speed: ``segment.segment_folder`` (read, predict, write: the command's per-scene loop) over
  ``--lakes-scenes`` held-out scenes per variant, the variants interleaved in ``--rounds``
  rounds whose order rotates, the float32 matmul peak measured at the start and the end of
  the same run; Mpx/s, MFU (model FLOPs of the tiles x views run / seconds / peak), peak RSS,
  water IoU, and Mpx/s per GFLOP/s of peak against Segmentation Gym's (GYM).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from common import RESULTS, PeakMemory, add_json_out, matmul_peak, write_result

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

    from res_unet.config.keys import config_from_dict, save_config
    from res_unet.models import build_model
    from res_unet.models.helpers import count_flops
    from res_unet.training.runfolder import CardInput, ModelCard, TrainingFacts

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
    from res_unet.data import pairing
    from res_unet.geo.tiling import tile_origins
    from res_unet.inference import predict, runtime, settings

    pairs = pairing.find_images(DATA / "lakes_fullres" / "images")[:scenes]
    # Variants start from no TTA and no CRF whatever the run's config says ('plain').
    overrides: dict[str, Any] = {"INFER_MODE": "tile", "TESTTIMEAUG": False,
                                 "DO_CRF_REFINE": False}
    if batch_size:
        overrides["BATCH_SIZE"] = batch_size
    base = settings.inference_config([run_dir], None, overrides)
    model = runtime.load_run(run_dir, base.TARGET_SIZE)
    results: dict[str, Any] = {"scenes": [p.image.name for p in pairs], "variants": {}}
    for variant in variants:
        extra = {"tta": {"TESTTIMEAUG": True}, "crf": {"DO_CRF_REFINE": True}}.get(variant, {})
        cfg = settings.inference_config([run_dir], None, {**overrides, **extra})
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
    from res_unet.config.keys import config_from_dict
    from res_unet.data import pairing
    from res_unet.data.split import split_pairs
    from res_unet.inference import postprocess, predict, runtime, settings
    from res_unet.training import metrics

    cfg = settings.inference_config([run_dir], None, {})
    pairs = pairing.find_pairs(DATA / "lakes" / "images", DATA / "lakes" / "labels")
    _, validation = split_pairs(pairs, cfg.VALIDATION_SPLIT, cfg.SEED, cfg.SPLIT_GROUP_PATTERN)
    validation = validation[:max_images] if max_images else validation
    segmenter = predict.Segmenter([runtime.load_run(run_dir, cfg.TARGET_SIZE)], cfg)
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


# The default path ----------------------------------------------------------------------------

# Segmentation Gym's default (each scene resized to 256 px), measured side by side with
# res_unet by bench/bench_vs_gym.py in an earlier session (issue 31): 40 lakes scenes at
# 1024 px on a 2-core AVX-512 machine whose float32 matmul peak was 427 GFLOP/s.
GYM = {"mpx_per_second": 1.81, "matmul_fp32_gflops": 427.0,
       "source": "bench/bench_vs_gym.py, 40 lakes scenes at 1024 px, earlier session"}
DEFAULT_MODEL = REPO / "weights" / "lakes_lite0"


def held_out_pairs(run_dir: Path) -> tuple[list[Any], list[Any]]:
    """(training, validation) lakes pairs of the run's own split by lake."""
    from res_unet.data import pairing
    from res_unet.data.split import split_pairs
    from res_unet.training import runfolder

    cfg = runfolder.run_config(run_dir)
    pairs = pairing.find_pairs(DATA / "lakes" / "images", DATA / "lakes" / "labels")
    return split_pairs(pairs, cfg.VALIDATION_SPLIT, cfg.SEED, cfg.SPLIT_GROUP_PATTERN)


def with_views(model: Any, views: Sequence[str] | None) -> Any:
    """A shallow copy of a LoadedModel whose card lists ``views`` (None: all four flips)."""
    out = copy.copy(model)
    out.card = dataclasses.replace(model.card, tta_views=None if views is None else list(views))
    return out


def lake_of(stem: str) -> str:
    return stem.split("_s2cloudless")[0]


def view_subsets(model: Any, cfg: Any, pairs: list[Any], runner: Any = None
                 ) -> dict[str, Any]:
    """Water IoU at the card threshold of every non-empty subset of the four flips, on
    ``pairs`` and on the two halves of their lakes (alternate lakes in sorted order).

    Each flip's blended probability map is computed once; a subset's map is their mean
    (blending and up-sampling are linear, so it equals predicting with that subset)."""
    from res_unet.data import pairing
    from res_unet.inference import postprocess, predict
    from res_unet.training import metrics
    from res_unet.training.runfolder import TTA_VIEWS

    lakes = sorted({lake_of(p.stem) for p in pairs})
    half = {lake: i % 2 for i, lake in enumerate(lakes)}
    subsets = [c for r in range(1, 5) for c in itertools.combinations(TTA_VIEWS, r)]
    cms = {(s, h): np.zeros((2, 2), np.int64) for s in subsets for h in ("all", 0, 1)}
    segmenters = {}
    for view in TTA_VIEWS:
        member = with_views(model, [view])
        segmenters[view] = predict.Segmenter([member], cfg)
        if runner is not None:  # after Segmenter, whose use_runtime would drop it
            member.runtime, member.auto, member._fn = "openvino", False, runner
    for pair in pairs:
        image, truth, _ = pairing.load_pair(pair, cfg.N_DATA_BANDS, cfg.label_rules)
        probs = {v: segmenters[v].probabilities(image) for v in TTA_VIEWS}
        for subset in subsets:
            prob = np.mean([probs[v] for v in subset], axis=0)
            label = postprocess.postprocess(prob, image, cfg, segmenters[subset[0]].card_threshold)
            cm = metrics.confusion_matrix(truth, label, 2)
            cms[(subset, "all")] += cm
            cms[(subset, half[lake_of(pair.stem)])] += cm
    rows = []
    for subset in subsets:
        iou = {str(h): round(metrics.scores_from_confusion(cms[(subset, h)])["iou"][1], 5)
               for h in ("all", 0, 1)}
        rows.append({"views": list(subset), "n_views": len(subset), "water_iou": iou["all"],
                     "water_iou_half_a": iou["0"], "water_iou_half_b": iou["1"]})
    return {"images": len(pairs), "lakes": len(lakes), "threshold": cfg.THRESHOLD
            or model.threshold, "subsets": rows}


def calibration_tiles(model: Any, cfg: Any, pairs: list[Any], count: int) -> list[np.ndarray]:
    """``count`` model-input tiles (1, h, w, B) float32 of training scenes at the working
    scale, spread over the scenes (the tiles segmentation predicts)."""
    from res_unet.data import pairing
    from res_unet.geo.tiling import as_rows, downsample_image, extract_tile, tile_grid

    tiles = []
    for pair in pairs:
        image, _ = pairing.load_image(pair, cfg.N_DATA_BANDS)
        small = downsample_image(image, model.downsample)
        for r, c in tile_grid(small.shape[:2], model.tile_hw, cfg.TILE_OVERLAP):
            tiles.append(extract_tile(as_rows(small).rows(0, small.shape[0]), r, c,
                                      model.tile_hw)[None].astype(np.float32))
    step = max(1, len(tiles) // count)
    return tiles[::step][:count]


def int8_runner(model: Any, tiles: list[np.ndarray], info: dict[str, Any],
                saved: Path | None = None) -> Any:
    """OpenVINO INT8 (NNCF post-training quantisation, calibrated on ``tiles``) of the
    model: a batch -> probabilities call like LoadedModel's. ``saved``: an .xml file the
    quantised model is read from when it exists, else written to (quantising takes
    minutes)."""
    import nncf

    from res_unet.inference.openvino import converted_model, import_openvino, openvino_runner

    ov = import_openvino()
    facts = None if saved is None else saved.with_suffix(".json")
    if saved is not None and saved.is_file():
        quantized = ov.Core().read_model(saved)
        if facts is not None and facts.is_file():  # how it was quantised
            info.update(json.loads(facts.read_text()))
    else:
        start = time.perf_counter()
        quantized = nncf.quantize(converted_model(model.model), nncf.Dataset(tiles),
                                  subset_size=len(tiles))
        info["quantize_seconds"] = round(time.perf_counter() - start, 1)
        info["calibration_tiles"] = len(tiles)
        if saved is not None:
            ov.save_model(quantized, saved, compress_to_fp16=False)
            facts.write_text(json.dumps(info))
    info["nncf"] = nncf.__version__
    return openvino_runner(quantized, {}, info)


def stacked_predict_batch(models: Sequence[Any], batch: np.ndarray, tta: bool = False,
                          rot90: bool = False, views: Sequence[str] | None = None
                          ) -> np.ndarray:
    """predict.predict_batch with the views stacked into one model call of N x views tiles
    (the 'stacked' variant: measured, not kept)."""
    from res_unet.inference import predict

    batch = np.asarray(batch, dtype=np.float32)
    transforms = predict.tta_transforms(tta, rot90 and batch.shape[1] == batch.shape[2], views)
    n, total = len(batch), None
    stacked = np.concatenate([predict._forward(batch, k, flip) for k, flip in transforms])
    for model in models:
        probs = model(stacked)
        for i, (k, flip) in enumerate(transforms):
            prob = predict._inverse(probs[i * n:(i + 1) * n], k, flip)
            total = prob.copy() if total is None else np.add(total, prob, out=total)
    total /= len(models) * len(transforms)
    return total


@contextlib.contextmanager
def patched(module: Any, name: str, value: Any) -> Iterator[None]:
    before = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, before)


def parse_variant(text: str) -> dict[str, Any]:
    """'default', 'before' (all four flips, whatever the card lists), 'stacked' (the views
    as one model call), 'no_tta', 'tensorflow', 'views=identity+flip_lr', 'int8',
    'tile=512', 'batch=16', 'streams=2', 'threads=1', 'latency' / 'throughput' (OpenVINO's
    PERFORMANCE_HINT; with 'throughput' or streams > 1 the runner keeps one request in flight
    per stream) (joined with ':') -> its settings."""
    spec: dict[str, Any] = {"name": text}
    for part in text.split(":"):
        key, _, value = part.partition("=")
        if key == "views":
            spec["views"] = value.split("+")
        elif key in ("batch", "streams", "threads", "tile"):
            spec[key] = int(value)
        elif key in ("before", "stacked", "no_tta", "int8", "default", "tensorflow"):
            spec[key] = True
        elif key in ("latency", "throughput"):
            spec["hint"] = key.upper()
        else:
            raise SystemExit(f"unknown variant part {part!r} in {text!r}")
    return spec


def default_path_speed(run_dir: Path, pairs: list[Any], variants: list[str], rounds: int,
                       work: Path, int8: Any = None) -> dict[str, Any]:
    """Per variant: median Mpx/s over ``rounds`` interleaved runs of segment_folder over
    ``pairs`` (copied into ``work``), with MFU, peak RSS and water IoU."""
    from res_unet.geo.tiling import downsampled_shape, tile_grid
    from res_unet.inference import predict, runtime, segment, settings

    folders = {}
    for name, chosen in (("scenes", pairs), ("warmup", pairs[:1])):
        folders[name] = work / name / "images", work / name / "labels"
        for folder in folders[name]:
            folder.mkdir(parents=True)
        for pair in chosen:
            shutil.copy(pair.image, folders[name][0] / pair.image.name)
            shutil.copy(pair.label, folders[name][1] / pair.label.name)
    base_cfg = settings.inference_config([run_dir])  # no flags: the default path
    loaded = runtime.load_run(run_dir, base_cfg.TARGET_SIZE)
    shapes = [segment.rasters.read_image(p.image)[0].shape[:2] for p in pairs]
    specs = [parse_variant(v) for v in variants]
    sized: dict[int, Any] = {}  # the model loaded at other tile sizes
    flops_per_pixel = loaded.card.flops_per_image / (loaded.tile_hw[0] * loaded.tile_hw[1])
    results: dict[str, list[dict[str, Any]]] = {s["name"]: [] for s in specs}
    for r in range(-1, rounds):  # round -1: warm-up on one scene (compilation), not recorded
        images, labels = folders["warmup" if r < 0 else "scenes"]
        order = specs[r % len(specs):] + specs[:r % len(specs)] if r >= 0 else specs
        for spec in order:
            overrides: dict[str, Any] = {"DOPLOT": False}
            if spec.get("no_tta"):
                overrides["TESTTIMEAUG"] = False
            if "batch" in spec:
                overrides["BATCH_SIZE"] = spec["batch"]
            if spec.get("tensorflow"):
                overrides["INFER_RUNTIME"] = "tensorflow"
            source = loaded
            if "tile" in spec:
                overrides["TARGET_SIZE"] = [spec["tile"], spec["tile"]]
                source = sized.setdefault(spec["tile"], runtime.load_run(
                    run_dir, (spec["tile"], spec["tile"])))
            model = with_views(source, spec["views"]) if "views" in spec else (
                with_views(source, None) if spec.get("before") else copy.copy(source))
            if spec.get("int8"):
                overrides["INFER_RUNTIME"] = "openvino"
                model.runtime, model.auto, model._fn = "openvino", False, int8
            elif "streams" in spec or "threads" in spec or "hint" in spec:
                from res_unet.inference.openvino import converted_model, openvino_runner

                opts: dict[str, Any] = {"PERFORMANCE_HINT": spec.get("hint", "LATENCY")}
                if "streams" in spec or "hint" not in spec:
                    opts["NUM_STREAMS"] = spec.get("streams", 1)
                if "threads" in spec:
                    opts["INFERENCE_NUM_THREADS"] = spec["threads"]
                overrides["INFER_RUNTIME"] = "openvino"
                model.runtime, model.auto = "openvino", False
                converted = converted_model(model.model, model.openvino_cache())
                model._fn = openvino_runner(converted, opts)
            else:
                model._fn = None
            cfg = settings.inference_config([run_dir], None, overrides)
            out = work / f"out_{spec['name'].replace('=', '-').replace(':', '_')}_{r + 1}"
            step = (patched(predict, "predict_batch", stacked_predict_batch)
                    if spec.get("stacked") else contextlib.nullcontext())
            with step, PeakMemory() as memory:
                t0 = time.process_time()
                summary = segment.segment_folder(cfg, [model], images, out, labels_dir=labels,
                                                 progress=False)
                cpu = time.process_time() - t0
            segmenter = predict.Segmenter([model], cfg)
            tiles = sum(len(tile_grid(downsampled_shape(s, segmenter.downsample),
                                      segmenter.tile_hw, cfg.TILE_OVERLAP))
                        for s in shapes)
            if r >= 0:
                results[spec["name"]].append({
                    "mpx_per_second": summary["mpx_per_second"],
                    "seconds": round(summary["megapixels"] / summary["mpx_per_second"], 2),
                    "cpu_seconds": round(cpu, 1), "megapixels": summary["megapixels"],
                    "water_iou": round(summary["scores"]["iou"][1], 5),
                    "peak_rss_mb": round(memory.peak / 2**20),
                    "views": len(segmenter.transforms), "tiles": tiles,
                    # the card's FLOPs are for its tile size; convolutions scale with pixels
                    "model_flops": tiles * len(segmenter.transforms) * flops_per_pixel
                    * segmenter.tile_hw[0] * segmenter.tile_hw[1],
                    "runtime": model.runtime})
            shutil.rmtree(out, ignore_errors=True)
            print(f"  {spec['name']} round {r}: {summary['mpx_per_second']} Mpx/s, water IoU "
                  f"{summary['scores']['iou'][1]:.4f}", file=sys.stderr, flush=True)
    k = loaded.downsample
    working = sum(np.prod(downsampled_shape(s, k)) for s in shapes)
    tiles = sum(len(tile_grid(downsampled_shape(s, k), loaded.tile_hw, base_cfg.TILE_OVERLAP))
                for s in shapes)
    return {"flops_per_tile": loaded.card.flops_per_image, "runs": results,
            "tile_pixels_per_working_pixel": round(
                tiles * loaded.tile_hw[0] * loaded.tile_hw[1] / working, 3),
            "tiles": tiles, "overlap": base_cfg.TILE_OVERLAP}


def default_path(args: argparse.Namespace) -> dict[str, Any]:
    """The default-path report: view subsets, INT8, interleaved speed, against Gym."""
    from res_unet.inference import runtime, settings

    os.environ.setdefault("RES_UNET_CACHE_DIR", tempfile.mkdtemp(prefix="bench_ov_cache_"))
    run_dir = args.model or DEFAULT_MODEL
    peak_start = matmul_peak()
    train, held_out = held_out_pairs(run_dir)
    cfg = settings.inference_config([run_dir], None, {"DOPLOT": False})
    loaded = runtime.load_run(run_dir, cfg.TARGET_SIZE)
    report: dict[str, Any] = {
        "benchmark": "default segmentation path", "model": str(run_dir.relative_to(REPO))
        if run_dir.is_relative_to(REPO) else str(run_dir),
        "card_tta_views": loaded.card.tta_views, "gym": GYM,
        "load_average_start": [round(v, 2) for v in os.getloadavg()]}
    if not args.skip_views:
        print("view subsets (float32)", file=sys.stderr, flush=True)
        report["views_float32"] = view_subsets(loaded, cfg, held_out)
    for size in args.views_tiles:
        print(f"view subsets (float32, {size}-px tiles)", file=sys.stderr, flush=True)
        sized_cfg = settings.inference_config([run_dir], None, {"DOPLOT": False,
                                                                 "TARGET_SIZE": [size, size]})
        report[f"views_float32_tile{size}"] = view_subsets(
            runtime.load_run(run_dir, (size, size)), sized_cfg, held_out)
    int8 = None
    if args.int8:
        info: dict[str, Any] = {}
        saved = args.int8_model
        tiles = ([] if saved and saved.is_file() else
                 calibration_tiles(loaded, cfg, train, args.int8_tiles))
        int8 = int8_runner(loaded, tiles, info, saved)
        report["int8"] = info
        if not args.skip_views:
            print("view subsets (int8)", file=sys.stderr, flush=True)
            report["views_int8"] = view_subsets(loaded, cfg, held_out, runner=int8)
    if args.variants:
        with tempfile.TemporaryDirectory(prefix="bench_default_") as tmp:
            speed = default_path_speed(run_dir, held_out[:args.lakes_scenes],
                                       args.variants.split(","), args.rounds, Path(tmp), int8)
        peak_end = matmul_peak()
        peak = statistics.median([peak_start, peak_end])
        gym_ratio = GYM["mpx_per_second"] / GYM["matmul_fp32_gflops"]
        rows = []
        for name, runs in speed["runs"].items():
            mpx = statistics.median(r["mpx_per_second"] for r in runs)
            seconds = statistics.median(r["seconds"] for r in runs)
            flops = runs[0]["model_flops"]
            rows.append({
                "variant": name, "runtime": runs[0]["runtime"], "views": runs[0]["views"],
                "mpx_per_second": round(mpx, 3),
                "mpx_per_second_runs": [r["mpx_per_second"] for r in runs],
                "mfu": round(flops / seconds / 1e9 / peak, 4) if flops else None,
                "mpx_per_cpu_second": round(statistics.median(
                    r["megapixels"] / r["cpu_seconds"] for r in runs), 3),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                "water_iou": runs[0]["water_iou"],
                "mpx_per_s_per_gflops": round(mpx / peak, 6),
                "vs_gym_per_unit_of_peak": round(mpx / peak / gym_ratio, 3)})
        report.update({"scenes": held_out[:args.lakes_scenes] and
                       [p.image.name for p in held_out[:args.lakes_scenes]],
                       "rounds": args.rounds, "matmul_fp32_gflops_start": round(peak_start, 1),
                       "matmul_fp32_gflops_end": round(peak_end, 1),
                       "matmul_fp32_gflops": round(peak, 1), "results": rows})
        from common import cpu_flags

        notes = [f"Tiles: the {len(report['scenes'])} scenes need {speed['tiles']} tiles of "
                 f"{loaded.tile_hw[0]} px at the working scale (1/{loaded.downsample}), "
                 f"{speed['tile_pixels_per_working_pixel']} model-input pixels per working "
                 "pixel. A 1024-px scene is 450-512 px there, so 2 tiles per axis whatever "
                 f"TILE_OVERLAP ({speed['overlap']}) says: the overlap costs nothing more on "
                 "these scenes (it does on large ones)."]
        if not {"avx512_bf16", "amx_bf16"} & set(cpu_flags()):
            notes.append("OpenVINO bfloat16 (openvino_bf16, and the auto choice of it) is not "
                         "measured: this CPU has no bf16 units (avx512_bf16 / amx_bf16), "
                         "where OpenVINO computes in float32 whatever it is asked.")
        report["notes"] = notes
    report["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="trained run folder (default: untrained)")
    parser.add_argument("--scenes", type=int, default=3, help="full-resolution scenes to time")
    parser.add_argument("--variants", default="plain,tta,crf,strips")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--quality-images", type=int, help="limit the validation images")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--default-path", action="store_true",
                        help="benchmark the default path on held-out lakes scenes instead "
                             "(bench/results/default_path.json)")
    parser.add_argument("--lakes-scenes", type=int, default=12,
                        help="--default-path: held-out scenes per timed variant")
    parser.add_argument("--rounds", type=int, default=2, help="--default-path: timed rounds")
    parser.add_argument("--default-variants", dest="variants",
                        default="before,default,no_tta",
                        help="--default-path: comma-separated variants, each ':'-joined parts "
                             "of before (one model call per view), default, no_tta, "
                             "tensorflow, views=A+B, int8, batch=N, streams=N, threads=N, "
                             "latency, throughput; "
                             "'' skips timing")
    parser.add_argument("--int8", action="store_true",
                        help="--default-path: also try NNCF INT8 (pip install nncf)")
    parser.add_argument("--int8-tiles", type=int, default=120,
                        help="--int8: calibration tiles from the training scenes")
    parser.add_argument("--int8-model", type=Path, metavar="XML",
                        help="--int8: read the quantised model from here when it exists, "
                             "else write it here")
    parser.add_argument("--views-tiles", type=int, nargs="*", default=[], metavar="N",
                        help="--default-path: also the view subsets with the model rebuilt "
                             "for N-px tiles")
    parser.add_argument("--skip-views", action="store_true",
                        help="--default-path: skip the IoU of the view subsets")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data",
                        help="the shared data folder (default ../shared/data)")
    add_json_out(parser, "segment")
    args = parser.parse_args(argv)
    globals()["DATA"] = args.data
    if args.default_path:
        if not (args.data / "lakes").is_dir():
            print(f"error: {args.data / 'lakes'} not found", file=sys.stderr)
            return 2
        report = default_path(args)
        json_out = (str(RESULTS / "default_path.json")
                    if args.json_out == str(RESULTS / "segment.json") else args.json_out)
        text = json.dumps(report, indent=2)
        print(text)
        if args.out:
            args.out.write_text(text + "\n")
        write_result(report, json_out, report.get("matmul_fp32_gflops"))
        return 0
    if not (args.data / "lakes_fullres").is_dir():
        print(f"error: {args.data / 'lakes_fullres'} not found", file=sys.stderr)
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
        from res_unet.core.atomic import write_atomic

        write_atomic(args.out, text + "\n")
    write_result(report, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
