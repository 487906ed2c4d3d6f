"""Compare training recipes at equal CPU time on the shared real data; prints JSON.

    python bench/compare_recipes.py --dataset lakes --minutes 6 --out /tmp/compare
    python bench/compare_recipes.py --dataset dubai --minutes 6 --out /tmp/compare

For each recipe: build its dataset (make_tfrecords), train it for the same training time
(MAX_TRAIN_MINUTES; validation excluded), then segment the whole validation scenes at full
resolution as seg_images_in_folder does (tiles, blending, no TTA, no CRF) and score them
(``res_unet.inference.scoring.evaluate_scenes``). Binary scores are given at 0.5 and at the
scene-optimal threshold. The recipes differ from the shipped configs only in the keys listed
in ``RECIPES``. Needs ../shared/data (see its README); run by hand, one at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from res_unet.config.keys import config_from_dict, load_config  # noqa: E402

DATA = REPO.parent / "shared" / "data"

# dataset -> recipe name -> (base config, overrides)
RECIPES = {
    "lakes": {
        "resunet (lakes_resunet.json)": ("config/lakes_resunet.json", {}),
        # Gym's parameter count (6.2 M) two ways: Gym's depth and wider, or deeper and narrower.
        "resunet F13 K7 D4 (lakes_resunet.json)": (
            "config/lakes_resunet.json",
            {"FILTERS": 13, "KERNEL_SIZE": 7, "DEPTH": 4, "STEPS_PER_EPOCH": 30}),
        "resunet F6 K7 D5 (lakes_resunet.json)": (
            "config/lakes_resunet.json",
            {"FILTERS": 6, "KERNEL_SIZE": 7, "DEPTH": 5, "STEPS_PER_EPOCH": 30}),
        "lite0 random, DOWNSAMPLE 2": ("config/lakes_lite.json", {"ENCODER_WEIGHTS": None}),
        "lite0 ImageNet, DOWNSAMPLE 1": ("config/lakes_lite.json", {"DOWNSAMPLE": 1}),
        "lite0 ImageNet, DOWNSAMPLE 2": ("config/lakes_lite.json", {}),
    },
    "dubai": {
        "resunet (dubai_resunet.json)": ("config/dubai_resunet.json", {}),
        "lite0 random": ("config/dubai_lite.json", {"ENCODER_WEIGHTS": None}),
        "lite0 ImageNet": ("config/dubai_lite.json", {}),
    },
}
# Keys that change the dataset: recipes sharing them share one.
DATASET_KEYS = ("TARGET_SIZE", "FIT_MODE", "DOWNSAMPLE", "TILE_OVERLAP", "AUG_COPIES",
                "EMPTY_TILE_KEEP", "MIN_FOREGROUND_FRACTION", "NCLASSES", "SEED")


def recipe_config(base: str, overrides: dict, minutes: float):
    """The recipe's config: the base config, its overrides, the time budget, no TTA."""
    values = load_config(REPO / base).to_dict()
    values.update(overrides)
    values.update({"MAX_TRAIN_MINUTES": minutes, "MAX_EPOCHS": 1000, "PATIENCE": 1000,
                   "TESTTIMEAUG": False, "DOPLOT": False})
    return config_from_dict(values, source=f"{base} + {overrides}")[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(RECIPES), required=True)
    parser.add_argument("--minutes", type=float, default=6.0,
                        help="training time of every recipe")
    parser.add_argument("--out", type=Path, required=True, help="work folder")
    parser.add_argument("--recipes", nargs="*", help="names of recipes to run (default all)")
    args = parser.parse_args()

    from res_unet.data import records
    from res_unet.data.dataset import make_dataset
    from res_unet.training import devices
    from res_unet.workflow import train_model

    source = DATA / args.dataset
    if not source.is_dir():
        sys.exit(f"{source}: shared data not found")
    rows = []
    for name, (base, overrides) in RECIPES[args.dataset].items():
        if args.recipes and name not in args.recipes:
            continue
        cfg = recipe_config(base, overrides, args.minutes)
        key = "-".join(str(getattr(cfg, k)) for k in DATASET_KEYS).replace(" ", "")
        digest = hashlib.sha256(key.encode()).hexdigest()[:8]
        data_dir = args.out / f"{args.dataset}-dataset-{digest}"
        if not (data_dir / records.MANIFEST).is_file():
            with contextlib.redirect_stdout(sys.stderr):
                make_dataset(cfg, source / "images", source / "labels", data_dir, workers=2)
        run_dir = args.out / f"{args.dataset}-{name.split(' (')[0].replace(', ', '-')}"
        run_dir = run_dir.with_name(run_dir.name.replace(" ", "_"))
        started = time.time()
        # The library's progress lines go to stderr: stdout carries only the JSON result.
        with contextlib.redirect_stdout(sys.stderr):
            card = train_model(cfg, data_dir, run_dir, progress=False, export_saved_model=False)
        scenes = card.validation.get("scenes")
        assert scenes is not None
        row = {"recipe": name, "config": base, "overrides": overrides,
               "parameters": card.parameters,
               "train_seconds": card.training.train_seconds,
               "epochs": card.training.epochs_run,
               "best_epoch": card.training.best_epoch,
               "images_per_second": card.training.images_per_second,
               "wall_seconds": round(time.time() - started, 1),
               "scene_scores": {"mean_iou": scenes["scores"]["mean_iou"],
                                "iou": dict(zip(card.class_names, scenes["scores"]["iou"],
                                                strict=True))}}
        if "optimal_threshold" in scenes:
            best = scenes["scores_at_optimal_threshold"]
            row["scene_threshold"] = scenes["optimal_threshold"]
            row["scene_scores_at_threshold"] = {
                "mean_iou": best["mean_iou"],
                "iou": dict(zip(card.class_names, best["iou"], strict=True))}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "recipes at equal training time", "dataset": args.dataset,
                      "minutes": args.minutes, "device": devices.device_description(),
                      "results": rows}, indent=2))


if __name__ == "__main__":
    main()
