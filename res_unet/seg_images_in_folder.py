"""seg_images_in_folder: segment every image in a folder with one or several trained models.

    seg_images_in_folder --model RUN_DIR [--model RUN_DIR2 ...] --images DIR --out DIR

For each image NAME writes NAME_predseg.png (class indices; 255 = nodata) and NAME_overlay.png
(the image with coloured classes), plus NAME_predseg.tif for (Geo)TIFF inputs (a Cloud-
Optimized GeoTIFF: tiles, overviews, CRS, transform and nodata kept), NAME_probs.npy (or a .tif
COG for TIFF inputs) with --save-probs, and the classes as polygons with --vector:
NAME_predseg.gpkg or .geojson, one feature per region with its class index, name, area_m2 and
area_px, the GeoPackage in the scene's CRS, the GeoJSON in WGS 84 lon/lat (RFC 7946) (plain
images: pixel coordinates x = column, y = -row, no CRS).
Settings come from the run's config.json, then the segmentation keys of --config, then the
flags below. Several --model folders form an ensemble (probabilities averaged). Images whose
outputs exist are skipped (--overwrite redoes them); --shard i/n splits a folder across
processes. With --labels (a folder of label rasters or polygon layers, or one polygon layer
over many scenes) the predictions are scored into scores.csv. Every run ranks its scenes by
how unsure the model is (uncertainty.csv, most uncertain first: label those next) and writes
review.html, a page to look through the scenes offline (--save-uncertainty adds a map per scene).
Exit status: 0 all done, 1 some images failed, 2 bad arguments or inputs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from res_unet.cli import (
    ArgumentParser,
    add_progress_arguments,
    quiet_tensorflow,
    run_command,
    select_devices,
    show_progress,
)
from res_unet.config.keys import key_choices, load_config
from res_unet.core.errors import UserError
from res_unet.geo import scenes


def _threshold(text: str) -> float | str:
    if text.lower() == "otsu":
        return "otsu"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or 'otsu'") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be between 0 and 1 (or 'otsu')")
    return value


def _tile_size(text: str) -> list[int]:
    try:
        sizes = [int(v) for v in text.replace("x", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be ROWS or ROWS,COLS") from None
    if len(sizes) not in (1, 2):
        raise argparse.ArgumentTypeError(f"{text!r} must be ROWS or ROWS,COLS")
    return sizes * 2 if len(sizes) == 1 else sizes


def parse_shard(text: str | None) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n; None -> (0, 1). Raises UserError otherwise."""
    if text is None:
        return 0, 1
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserError(f"command line: --shard {text!r} must look like i/n, e.g. 0/4 "
                        "(0-based index i of n shards)") from None
    if count < 1 or not 0 <= index < count:
        raise UserError(f"command line: --shard {text}: need n >= 1 and 0 <= i < n (0-based); "
                        f"use 0/{max(count, 1)} .. {max(count, 1) - 1}/{max(count, 1)}")
    return index, count


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of seg_images_in_folder."""
    parser = ArgumentParser(prog="seg_images_in_folder", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="RUN_DIR",
                        help="run folder of train_resunet; repeat for an ensemble")
    parser.add_argument("--images", help="images to segment: a folder; one raster by path or URL "
                             "(https:// s3:// gs:// az:// /vsi...); a text file listing paths "
                             "and URLs; or a STAC Item, ItemCollection, Collection or Catalog "
                             "(.json, local or https://)")
    parser.add_argument("--out", required=True, help="folder for the outputs")
    parser.add_argument("--labels", metavar="PATH",
                        help="labels to score the predictions against, as make_tfrecords "
                             "takes them: a folder of label rasters or polygon layers "
                             "(.gpkg .geojson .shp) named like the images, or one polygon "
                             "layer file over many scenes (scenes it does not touch are not "
                             "scored); LABEL_ATTRIBUTE, LABEL_PRIORITY and REMAP_CLASSES come "
                             "from the run's config or --config")
    parser.add_argument("--layer", metavar="NAME",
                        help="with --labels: the layer holding the polygon labels in a file "
                             "with several (LABEL_LAYER)")
    parser.add_argument("--config", help="JSON whose segmentation keys override the run's")
    parser.add_argument("--mode", choices=key_choices("INFER_MODE"), help="INFER_MODE")
    parser.add_argument("--tile-size", type=_tile_size, metavar="ROWS[,COLS]",
                        help="model input / tile size (default: the training TARGET_SIZE)")
    parser.add_argument("--overlap", type=float, help="TILE_OVERLAP, fraction of the tile")
    parser.add_argument("--window", choices=key_choices("BLEND_WINDOW"), help="BLEND_WINDOW")
    parser.add_argument("--batch-size", type=int, help="tiles per batch (BATCH_SIZE)")
    parser.add_argument("--runtime", choices=key_choices("INFER_RUNTIME"),
                        help="what runs the model (INFER_RUNTIME; default auto: OpenVINO "
                             "when installed and it matches TensorFlow, else TensorFlow); "
                             "openvino: pip install 'res_unet[openvino]', about 1.6-2x faster "
                             "on CPUs; openvino_bf16: bfloat16 where the CPU has bf16 units, "
                             "faster again, a few pixels change class")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction,
                        help="test-time augmentation with flips (TESTTIMEAUG)")
    parser.add_argument("--rot90", action=argparse.BooleanOptionalAction,
                        help="with --tta, also 90-degree rotations (TTA_ROT90)")
    parser.add_argument("--threshold", type=_threshold,
                        help="binary threshold: a number or 'otsu' (default: the model card's)")
    parser.add_argument("--crf", action=argparse.BooleanOptionalAction,
                        help="dense CRF refinement (DO_CRF_REFINE)")
    parser.add_argument("--median", type=int, help="MEDIAN_FILTER_VALUE (disk radius)")
    parser.add_argument("--pixel-size", type=float, metavar="METRES",
                        help="metres per pixel of plain (JPEG/PNG) scenes (SCENE_PIXEL_SIZE); "
                             "GeoTIFFs give their own. Scenes are resampled to the model's "
                             "pixel size when it is recorded and differs")
    parser.add_argument("--nodata-zero", action=argparse.BooleanOptionalAction,
                        help="all-zero pixels are nodata (NODATA_ZERO)")
    parser.add_argument("--save-probs", action="store_true",
                        help="also write probabilities (.npy float16, .tif float32)")
    parser.add_argument("--save-uncertainty", action="store_true",
                        help="also write a map of where the model is unsure (normalised "
                             "entropy, 0 sure - 1 unsure): NAME_uncertainty.tif (float32 COG) "
                             "for TIFF scenes, else NAME_uncertainty.png (0-254, 255 nodata)")
    vector = parser.add_mutually_exclusive_group()
    vector.add_argument("--vector", choices=[c for c in key_choices("VECTOR_FORMAT") if c],
                        help="also write the classes as polygons, GeoPackage or GeoJSON "
                             "(VECTOR_FORMAT): every class but nodata and IGNORE_CLASS; "
                             "binary models: the foreground")
    vector.add_argument("--geojson", dest="vector", action="store_const", const="geojson",
                        help="the same as --vector geojson")
    parser.add_argument("--simplify", type=float, metavar="DISTANCE",
                        help="simplify the polygons by this tolerance in map units (metres "
                             "in a projected CRS, pixels for plain images), keeping borders "
                             "between classes shared (VECTOR_SIMPLIFY; default 0: exact "
                             "pixel edges)")
    parser.add_argument("--overwrite", action="store_true", help="redo images already done")
    parser.add_argument("--shard", metavar="i/n", help="only images i, i+n, ... (0-based)")
    scenes.add_arguments(parser)
    add_progress_arguments(parser)
    return parser


# The flags that set config keys, by key (messages about a value name its flag).
FLAGS = {"INFER_MODE": "--mode", "TARGET_SIZE": "--tile-size", "TILE_OVERLAP": "--overlap",
         "BLEND_WINDOW": "--window", "BATCH_SIZE": "--batch-size", "INFER_RUNTIME": "--runtime",
         "TESTTIMEAUG": "--tta", "TTA_ROT90": "--rot90", "THRESHOLD": "--threshold",
         "DO_CRF_REFINE": "--crf", "MEDIAN_FILTER_VALUE": "--median",
         "NODATA_ZERO": "--nodata-zero", "SCENE_PIXEL_SIZE": "--pixel-size",
         "VECTOR_FORMAT": "--vector", "VECTOR_SIMPLIFY": "--simplify", "LABEL_LAYER": "--layer"}


def _overrides(args: argparse.Namespace) -> dict:
    """Config keys set by flags (only the flags given)."""
    given = {key: getattr(args, flag[2:].replace("-", "_")) for key, flag in FLAGS.items()}
    out = {k: v for k, v in given.items() if v is not None}
    if args.rot90:
        out.setdefault("TESTTIMEAUG", True)
    return out


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, segment the folder, print a summary. Returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.images is None and args.stac_search is None:
        parser.error("give --images (a folder, a raster, a list or a STAC catalogue) or "
                     "--stac-search URL --collection NAME")
    show_progress(args)
    if args.layer is not None and args.labels is None:
        parser.error("--layer names the layer of --labels; pass --labels LAYER_FILE too")
    run_config = Path(args.model[0]) / "config.json"
    if run_config.exists():
        # The run's own config: notes on keys of older versions are not the user's to act on.
        select_devices(load_config(run_config, notes=False).SET_GPU)
    quiet_tensorflow()
    from res_unet.inference import segment, settings

    shard = parse_shard(args.shard)
    query = scenes.query_from_args(args)
    cfg = settings.inference_config(args.model, args.config, _overrides(args), FLAGS)
    summary = segment.segment_folder(cfg, args.model, query, args.out,
                                     labels_dir=args.labels, overwrite=args.overwrite,
                                     shard=shard, save_probs=args.save_probs,
                                     progress=not args.no_progress,
                                     save_uncertainty=args.save_uncertainty)
    rate = summary["mpx_per_second"]
    unscored = summary["unscored"]
    print(f"{summary['images']} images: {summary['done']} done, {summary['skipped']} skipped "
          f"(already done), {summary['failed']} failed"
          + (f", {len(unscored)} not scored (label problems)" if unscored else "")
          + f"; {summary['seconds']:.1f} s"
          + (f", {rate:.2f} Mpx/s" if rate else "") + f"; outputs in {summary['out_dir']}")
    for failure in summary["failures"]:
        print(f"  failed: {failure['error']}")
    for problem in unscored:
        print(f"  not scored: {problem['error']}")
    scores = summary.get("scores")
    if scores:
        per_class = ", ".join(f"{name} {_score(v)}"
                              for name, v in zip(cfg.class_names, scores["iou"], strict=True))
        print(f"scores ({summary['scores_file']}): mean IoU {_score(scores['mean_iou'])}, "
              f"IoU {per_class}, pixel accuracy {_score(scores['pixel_accuracy'])}")
    if "uncertainty_file" in summary:
        print(f"what to label next, most uncertain first: {summary['uncertainty_file']}; "
              f"review page: {summary['review_file']}")
    if "examples_file" in summary:
        print(f"examples (image | label | prediction): {summary['examples_file']}")
    return 1 if summary["failed"] or unscored else 0


def cli() -> None:
    """Console-script entry point."""
    sys.exit(run_command(main))


if __name__ == "__main__":
    cli()
