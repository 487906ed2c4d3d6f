"""Cross-validate a training recipe over named groups (tiles, lakes); prints JSON.

    python bench/cross_validate.py --config config/dubai_lite.json \\
        --data ../shared/data/dubai --folds tile1,tile2 tile4,tile5 tile6,tile7 \\
        --out /tmp/cv_dubai

For each fold: build the dataset with those groups held out (VALIDATION_GROUPS), train the
config as train_resunet does, then segment the fold's whole validation scenes at full
resolution as seg_images_in_folder does (tiles, blending, the config's TTA) and score them
(``res_unet.inference.scoring.evaluate_scenes``). The result gives each fold's scores and the pooled
scores of all folds' confusion matrices together: every image is scored once, by the model
that never saw its group. Folds already finished in ``--out`` are read, not retrained; a fold
killed part-way resumes from its run folder. Run by hand, one at a time.

The held-out groups are what each fold is scored on, so they must not choose its weights:
folds train with ``KEEP_WEIGHTS`` 'last' (the last epoch, or the AVERAGE_LAST_EPOCHS
average; no early stopping), unless ``--set '{"KEEP_WEIGHTS": "best"}'`` asks for the
best epoch on the held-out groups (optimistic: selection on the test fold).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import res_unet  # noqa: E402,F401  (before TensorFlow: turns on oneDNN)
from res_unet.cli import run_command  # noqa: E402
from res_unet.config.keys import Config, config_from_dict, load_config  # noqa: E402
from res_unet.core.errors import UserError  # noqa: E402

FOLDS_FIX = ("a fold is the comma-separated names of the groups it holds out (of "
             "SPLIT_GROUP_PATTERN, or file stems), e.g. --folds tile1,tile2 tile4,tile5")


def fold_config(path: Path, groups: list[str], overrides: dict):
    """The config at ``path`` with ``overrides`` and ``groups`` held out for validation."""
    values = load_config(path).to_dict()
    values["KEEP_WEIGHTS"] = "last"
    values.update(overrides)
    values.update({"VALIDATION_GROUPS": groups, "DOPLOT": False})
    return config_from_dict(values, source=f"{path} + fold {','.join(groups)}")[0]


def parse_overrides(text: str) -> dict:
    """The --set argument as a dict; UserError naming it unless it is a JSON object."""
    example = 'e.g. --set \'{"KEEP_WEIGHTS": "best"}\''
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"--set {text!r}: not JSON ({exc.msg}); give a JSON object of config "
                        f"keys with double-quoted names, {example}") from None
    if not isinstance(value, dict):
        raise UserError(f"--set {text!r}: a JSON {type(value).__name__}, not an object; give "
                        f"a JSON object of config keys, {example}")
    return value


def parse_folds(folds: list[str]) -> list[list[str]]:
    """Each --folds argument as its list of group names; UserError for an empty fold or
    group name, or a path given as a fold."""
    parsed = []
    for i, fold in enumerate(folds, 1):
        groups = [g.strip() for g in fold.split(",")]
        if not fold.strip() or "" in groups:
            raise UserError(f"--folds: fold {i} ({fold!r}) is empty or has an empty group "
                            f"name; {FOLDS_FIX}")
        paths = [g for g in groups if "/" in g or os.sep in g or Path(g).exists()]
        if paths:
            raise UserError(f"--folds: {paths[0]!r} is a path, not a group name; {FOLDS_FIX} "
                            "(the data folder goes in --data)")
        parsed.append(groups)
    return parsed


def check_folds(cfg: Config, data: Path, folds: list[list[str]]) -> None:
    """UserError naming the first fold group that matches no group of the images in
    ``data`` (listing those that exist), or a fold that holds out every group."""
    from res_unet.data.pairing import find_pairs
    from res_unet.data.split import group_pairs

    pairs = find_pairs(data / "images", data / "labels", cfg.USEMASK, cfg.EXTRA_BAND_DIRS)
    known = [g for g in group_pairs(pairs, cfg.SPLIT_GROUP_PATTERN) if not g.startswith("\0")]
    what = (f"SPLIT_GROUP_PATTERN {cfg.SPLIT_GROUP_PATTERN!r}" if cfg.SPLIT_GROUP_PATTERN
            else "the file stems (no SPLIT_GROUP_PATTERN)")
    shown = ", ".join(known[:12]) + (", ..." if len(known) > 12 else "")
    for groups in folds:
        missing = [g for g in groups if g not in known]
        if missing:
            raise UserError(f"--folds: {missing[0]!r} matches no group of {what} in "
                            f"{data / 'images'}; use the groups there: {shown or 'none'}")
        if len(set(groups)) >= len(known):
            raise UserError(f"--folds: {','.join(groups)} holds out every group, leaving "
                            "nothing to train on; name fewer groups per fold")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True,
                        help="folder with images/ and labels/")
    parser.add_argument("--folds", nargs="+", required=True,
                        help="one argument per fold: its held-out groups, comma-separated")
    parser.add_argument("--out", type=Path, required=True, help="work folder")
    parser.add_argument("--set", default="{}",
                        help="JSON object of config keys that override --config")
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.set)
    folds = parse_folds(args.folds)
    configs = [fold_config(args.config, groups, overrides) for groups in folds]
    check_folds(configs[0], args.data, folds)

    import numpy as np

    from res_unet.data import records
    from res_unet.data.dataset import make_dataset
    from res_unet.training import devices, metrics
    from res_unet.training.runfolder import EVALUATION, ModelCard, read_json
    from res_unet.workflow import train_model

    rows, pooled = [], None
    for groups, cfg in zip(folds, configs, strict=True):
        name = "-".join(groups)
        data_dir, run_dir = args.out / f"{name}-data", args.out / name
        started = time.time()
        evaluation = read_json(run_dir / EVALUATION) if (run_dir / EVALUATION).is_file() else {}
        with contextlib.redirect_stdout(sys.stderr):
            if "scenes" not in evaluation:
                if not (data_dir / records.MANIFEST).is_file():
                    make_dataset(cfg, args.data / "images", args.data / "labels", data_dir,
                                 workers=2)
                train_model(cfg, data_dir, run_dir, progress=False, export_saved_model=False)
                evaluation = read_json(run_dir / EVALUATION)
        scenes = evaluation["scenes"]["scores"]
        training = ModelCard.read(run_dir).training
        cm = np.asarray(scenes["confusion_matrix"], np.int64)
        pooled = cm if pooled is None else pooled + cm
        row = {"fold": groups, "images": evaluation["scenes"]["images"],
               "tta": evaluation["scenes"]["tta"],
               "train_seconds": training.train_seconds, "best_epoch": training.best_epoch,
               "kept_epoch": training.kept_epoch, "averaged_epochs": training.averaged_epochs,
               "wall_seconds": round(time.time() - started, 1),
               "mean_iou": scenes["mean_iou"],
               "iou": dict(zip(cfg.class_names, scenes["iou"], strict=True)),
               "pixel_accuracy": scenes["pixel_accuracy"]}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    scores = metrics.scores_from_confusion(pooled, ignore_class=cfg.IGNORE_CLASS)
    fold_means = [r["mean_iou"] for r in rows]
    print(json.dumps({
        "benchmark": "cross-validation over groups, whole scenes", "config": str(args.config),
        "overrides": overrides, "keep_weights": cfg.KEEP_WEIGHTS,
        "device": devices.device_description(), "folds": rows,
        "mean_of_fold_mean_iou": float(np.mean(fold_means)),
        "pooled": {"mean_iou": scores["mean_iou"],
                   "iou": dict(zip(cfg.class_names, scores["iou"], strict=True)),
                   "pixel_accuracy": scores["pixel_accuracy"]}}, indent=2, default=float))


if __name__ == "__main__":
    sys.exit(run_command(main))
