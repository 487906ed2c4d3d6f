"""make_tfrecords: build a train/validation TFRecord dataset from image and label folders.

    make_tfrecords --config my.json --images imgs/ --labels labels/ --out dataset/
    make_tfrecords --config my.json --images scenes/ --labels labels.gpkg --layer lakes ...

Images and labels pair up by file stem. Labels may be polygon layers drawn in QGIS: the
image's own NAME.gpkg / .geojson / .shp, or one layer covering many scenes (LABEL_ATTRIBUTE,
LABEL_LAYER and LABEL_PRIORITY in the config say how they become classes). The split is
made first (seeded, grouped by SPLIT_GROUP_PATTERN), then images are fitted to TARGET_SIZE
and the training split is augmented. The output folder gets the shards, manifest.json,
config.json and samples.png.
"""

from __future__ import annotations

import argparse
import sys

from res_unet.cli import (
    ArgumentParser,
    add_progress_arguments,
    quiet_tensorflow,
    run_command,
    show_progress,
)
from res_unet.config.keys import load_config, with_overrides
from res_unet.core import messages
from res_unet.geo import scenes


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of make_tfrecords."""
    parser = ArgumentParser(
        prog="make_tfrecords",
        description="Build a train/validation TFRecord dataset (shards + manifest.json) from a "
                    "folder of images and a folder of label masks with the same file names, "
                    "or polygon labels (GeoPackage, GeoJSON, Shapefile) over GeoTIFF scenes.")
    parser.add_argument("--config", required=True, help="JSON config file (TARGET_SIZE, "
                        "NCLASSES, VALIDATION_SPLIT, FIT_MODE, AUG_* ...)")
    parser.add_argument("--images", help="images: a folder (.jpg .png .tif); one raster by "
                        "path or URL (https:// s3:// gs:// az:// /vsi...); a text file listing "
                        "paths and URLs; or a STAC Item, ItemCollection, Collection or Catalog "
                        "(.json, local or https://)")
    parser.add_argument("--labels", required=True, help="folder of label masks (class index "
                        "per pixel) or polygon layers (.gpkg .geojson .shp), named like the "
                        "images; or one polygon layer file covering many scenes (scenes it "
                        "does not touch are left out, with a note)")
    parser.add_argument("--layer", metavar="NAME", help="the layer holding the polygon labels "
                        "in a file with several (overrides LABEL_LAYER)")
    parser.add_argument("--out", required=True, help="dataset folder to create")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="worker processes (default 1); the output does not depend on it")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing dataset in --out (only once the new one is "
                             "complete)")
    scenes.add_arguments(parser)
    add_progress_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, build the dataset, print a short summary. Returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.images is None and args.stac_search is None:
        parser.error("give --images (a folder, a raster, a list or a STAC catalogue) or "
                     "--stac-search URL --collection NAME")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    show_progress(args)
    # The config first: a typo is reported in a fraction of a second, before TensorFlow.
    cfg = load_config(args.config)
    query = scenes.query_from_args(args)
    if args.layer is not None:
        cfg = with_overrides(cfg, {"LABEL_LAYER": args.layer}, flags={"LABEL_LAYER": "--layer"})
    quiet_tensorflow()
    from res_unet.data import dataset, records

    manifest = dataset.make_dataset(cfg, query, args.labels, args.out,
                                    workers=args.workers, overwrite=args.overwrite)
    print(records.dataset_summary(manifest, args.out))
    warning = records.empty_classes_warning(manifest)
    if warning:
        messages.warn(warning)
    return 0


def cli() -> None:
    """Console-script entry point."""
    sys.exit(run_command(main))


if __name__ == "__main__":
    cli()
