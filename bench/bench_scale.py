"""Benchmark of scenes at the sensor's pixel size: the same lakes scenes at full resolution
(about 10 m per pixel) and at the scale the shipped model was trained on (1024-px versions,
about 40 m), as GeoTIFFs, segmented by seg_images_in_folder with default settings.

    python bench/bench_scale.py [--model weights/lakes_lite0] [--runtime auto]
                                [--plain] [--json-out PATH]

Writes the scenes of ../shared/data/lakes_fullres (and the same names from
../shared/data/lakes) into a temp folder as GeoTIFFs in UTM 33N at 10 m and 40 m, runs the
command on each set with --labels, and reports per set: water IoU (scores.csv), source
megapixels per second of the whole command (its wall time, start-up included) and of the
segmentation itself (the command's own busy-time figure), and the peak resident memory of
the command (sampled every 50 ms). ``--plain`` adds the full-resolution scenes as plain JPEGs
(no pixel size: segmented as they come at the model's DOWNSAMPLE, as before pixel sizes
were recorded), for the comparison.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import add_json_out, write_result

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def write_geotiffs(images: Path, labels: Path, out: Path, pixel: float) -> Path:
    """GeoTIFF copies (UTM 33N, ``pixel`` metres) of the JPEG images, labels alongside."""
    import rasterio
    from rasterio.transform import from_origin

    from res_unet.geo import rasters

    (out / "images").mkdir(parents=True)
    (out / "labels").mkdir()
    for path in sorted(images.glob("*.jpg")):
        image, _ = rasters.read_image(path)
        with rasterio.open(out / "images" / f"{path.stem}.tif", "w", driver="GTiff",
                           height=image.shape[0], width=image.shape[1], count=image.shape[2],
                           dtype="uint8", crs="EPSG:32633", tiled=True, compress="deflate",
                           transform=from_origin(5e5, 4.2e6, pixel, pixel)) as dst:
            dst.write(np.moveaxis(image, -1, 0))
        shutil.copy(labels / f"{path.stem}.png", out / "labels" / f"{path.stem}.png")
    return out


def run_set(model: Path, folder: Path, out: Path, extra: list[str]) -> dict[str, Any]:
    """Run seg_images_in_folder on ``folder``; its figures."""
    command = [sys.executable, "-m", "res_unet.seg_images_in_folder", "--model", str(model),
               "--images", str(folder / "images"), "--labels", str(folder / "labels"),
               "--out", str(out), "--no-progress", *extra]
    import psutil

    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    watched, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(stderr[-2000:])
    summary = json.loads((out / "segmentation_config.json").read_text())
    with open(out / "scores.csv") as fh:
        rows = {row["image"]: row for row in csv.DictReader(fh)}
    images = sorted((folder / "images").iterdir())
    from res_unet.geo import rasters

    mpx = sum(np.prod(rasters.read_image(p)[0].shape[:2]) for p in images) / 1e6
    busy = next((line for line in stdout.splitlines() if "Mpx/s" in line), "")
    return {
        "images": len(images), "megapixels": round(float(mpx), 2),
        "water_iou": round(float(rows["ALL"]["iou_1"]), 4),
        "water_iou_per_scene": {k: round(float(v["iou_1"]), 4) for k, v in rows.items()
                                if k != "ALL"},
        "seconds": round(seconds, 1),
        "source_mpx_per_second": round(float(mpx) / seconds, 3),
        "command_line": busy.strip(),
        "peak_rss_mb": round(peak / 2**20),
        "fingerprint_pixel_size": summary["fingerprint"].get("pixel_size"),
        "runtime": summary["config"]["INFER_RUNTIME"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "weights" / "lakes_lite0"))
    parser.add_argument("--runtime", help="INFER_RUNTIME (default: the model's config)")
    parser.add_argument("--plain", action="store_true",
                        help="also the full-resolution scenes as plain JPEGs (no pixel size)")
    add_json_out(parser, "scale")
    args = parser.parse_args()
    if not (DATA / "lakes_fullres" / "images").is_dir():
        raise SystemExit(f"{DATA / 'lakes_fullres'}: not found; this benchmark needs "
                         "../shared/data beside the repository")
    extra = ["--runtime", args.runtime] if args.runtime else []
    report: dict[str, Any] = {"benchmark": "scale", "model": Path(args.model).name,
                              "sets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        full = write_geotiffs(DATA / "lakes_fullres" / "images",
                              DATA / "lakes_fullres" / "labels", root / "full_10m", 10.0)
        names = {p.stem for p in (full / "images").iterdir()}
        small_src = root / "small_src"
        (small_src / "images").mkdir(parents=True)
        (small_src / "labels").mkdir()
        for name in names:
            shutil.copy(DATA / "lakes" / "images" / f"{name}.jpg", small_src / "images")
            shutil.copy(DATA / "lakes" / "labels" / f"{name}.png", small_src / "labels")
        small = write_geotiffs(small_src / "images", small_src / "labels", root / "small_40m",
                               40.0)
        sets = {"1024px_geotiff_40m": small, "fullres_geotiff_10m": full}
        if args.plain:
            plain = root / "fullres_plain"
            shutil.copytree(DATA / "lakes_fullres", plain)
            sets["fullres_plain_jpeg"] = plain
        for name, folder in sets.items():
            result = run_set(Path(args.model), folder, root / f"out_{name}", extra)
            report["sets"][name] = result
            print(f"{name}: water IoU {result['water_iou']:.3f}, "
                  f"{result['source_mpx_per_second']:.2f} source Mpx/s "
                  f"({result['seconds']:.1f} s)", file=sys.stderr, flush=True)
    sets = report["sets"]
    report["fullres_speed_ratio"] = round(sets["fullres_geotiff_10m"]["source_mpx_per_second"]
                                          / sets["1024px_geotiff_40m"]["source_mpx_per_second"],
                                          2)
    write_result(report, args.json_out)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
