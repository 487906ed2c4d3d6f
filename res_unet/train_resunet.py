"""train_resunet: train (or evaluate) a segmentation model on a make_tfrecords dataset.

    train_resunet --config C.json --data DATASET_DIR --out RUN_DIR

Writes best.weights.h5, model.keras, saved_model/, history.csv, curves.png, lr_schedule.png,
val_examples.png, evaluation.json and model_card.json into RUN_DIR. Re-running into a folder
whose run was killed resumes from its backup. Distribution: several GPUs are used with
MirroredStrategy; several machines with MultiWorkerMirroredStrategy when TF_CONFIG describes
the cluster (start the same command on each machine).
"""

from __future__ import annotations

import argparse
import json
import sys

from res_unet.cli import (
    ArgumentParser,
    add_progress_arguments,
    quiet_tensorflow,
    run_command,
    select_devices,
    show_progress,
)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of train_resunet."""
    parser = ArgumentParser(prog="train_resunet", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="JSON config (see config/)")
    parser.add_argument("--data", required=True, help="dataset folder made by make_tfrecords")
    parser.add_argument("--out", required=True, help="run folder for weights and reports")
    parser.add_argument("--epochs", type=int, help="override MAX_EPOCHS")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="evaluate the weights in --out (same as DO_TRAIN=false)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a finished run in --out (by default it is kept and "
                        "training stops; an unfinished run always resumes)")
    parser.add_argument("--no-export", action="store_true",
                        help="skip the TensorFlow SavedModel export (saved_model/)")
    parser.add_argument("--no-scene-eval", action="store_true",
                        help="skip scoring whole validation scenes (and choosing the binary "
                        "threshold on them; the tile-optimal one is kept)")
    add_progress_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, train (or evaluate), print a JSON summary. Returns the exit code."""
    args = build_parser().parse_args(argv)
    show_progress(args)
    from res_unet.config.keys import load_config, with_overrides

    cfg = load_config(args.config)
    overrides = {}
    if args.epochs is not None:
        overrides["MAX_EPOCHS"] = args.epochs
    if args.evaluate_only:
        overrides["DO_TRAIN"] = False
    cfg = with_overrides(cfg, overrides,
                         flags={"MAX_EPOCHS": "--epochs", "DO_TRAIN": "--evaluate-only"})

    select_devices(cfg.SET_GPU)
    quiet_tensorflow()
    from res_unet import workflow

    card = workflow.train_model(cfg, args.data, args.out, progress=not args.no_progress,
                                export_saved_model=not args.no_export, overwrite=args.overwrite,
                                scene_evaluation=not args.no_scene_eval)
    scores = card.validation["scores_at_threshold"] or card.validation["scores"]
    summary = {"run_folder": args.out, "epochs_run": card.training.epochs_run,
               "best_epoch": card.training.best_epoch,
               "averaged_epochs": card.training.averaged_epochs,
               "kept_epoch": card.training.kept_epoch,
               "validation_mean_iou": scores["mean_iou"],
               "validation_iou": dict(zip(card.class_names, scores["iou"], strict=True)),
               "threshold": card.threshold, "train_seconds": card.training.train_seconds}
    scenes = card.validation.get("scenes")  # absent with --no-scene-eval or when skipped
    if scenes is not None:
        best = scenes.get("scores_at_optimal_threshold") or scenes["scores"]
        summary["validation_scenes"] = {
            "images": scenes["images"], "mean_iou": best["mean_iou"],
            "iou": dict(zip(card.class_names, best["iou"], strict=True))}
    print(json.dumps(summary, indent=2))
    return 0


def cli() -> None:
    """Console-script entry point."""
    sys.exit(run_command(main))


if __name__ == "__main__":
    cli()
