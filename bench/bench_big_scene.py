"""Benchmark of a scene larger than memory: peak RSS and speed of seg_images_in_folder on a
synthetic RGB GeoTIFF of SIDE x SIDE pixels (default 30000: 2.7 GB of pixels), read and
segmented in windows.

    python bench/bench_big_scene.py [--side 30000] [--model weights/lakes_lite0]
                                    [--work /tmp/big_scene] [--tta] [--out big_scene.json]

The scene (a tiled, deflate-compressed GeoTIFF with a CRS; dark 'lakes' on brighter land
with texture) is written strip by strip into --work and reused when it is already there (it
is never committed). The command runs as a child process exactly as users run it (--no-tta
unless --tta); its peak resident memory is the child's ru_maxrss, so TensorFlow's own
allocations count. Prints JSON: pixels, seconds, Mpx/s, peak RSS, the CPU flags and the
model's forward FLOPs per megapixel (model FLOPs utilisation needs the machine's peak: see
bench/bench_infer.py, run in the same session).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import add_json_out, cpu_flags, write_result

REPO = Path(__file__).resolve().parents[1]


def write_scene(path: Path, side: int, block_rows: int = 1024) -> None:
    """A synthetic RGB scene: smooth dark blobs (water) on textured land, written in strips."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial.tif")
    rng = np.random.default_rng(0)
    cols = np.arange(side, dtype=np.float32)[None, :]
    profile = {"driver": "GTiff", "height": side, "width": side, "count": 3, "dtype": "uint8",
               "crs": "EPSG:32633", "transform": from_origin(5e5, 4.2e6, 1.0, 1.0),
               "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate",
               "BIGTIFF": "YES"}
    with rasterio.open(tmp, "w", **profile) as ds:
        for r0 in range(0, side, block_rows):
            rows = np.arange(r0, min(r0 + block_rows, side), dtype=np.float32)[:, None]
            field = (np.sin(rows / 1300.0) * np.cos(cols / 1700.0)
                     + 0.5 * np.sin((rows + cols) / 2300.0))
            water = field > 0.6
            noise = rng.integers(0, 24, (len(rows), side), dtype=np.uint8)
            red = np.where(water, 20, 110 + noise).astype(np.uint8)
            green = np.where(water, 45, 120 + noise).astype(np.uint8)
            blue = np.where(water, 70, 80 + noise // 2).astype(np.uint8)
            ds.write(np.stack([red, green, blue]), window=Window(0, r0, side, len(rows)))
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=30000)
    parser.add_argument("--model", default=str(REPO / "weights" / "lakes_lite0"))
    parser.add_argument("--work", default="/tmp/big_scene")
    parser.add_argument("--tta", action="store_true")
    parser.add_argument("--out", help="also write the JSON here")
    add_json_out(parser, "big_scene")
    args = parser.parse_args()

    work = Path(args.work)
    scene = work / f"images_{args.side}" / "scene.tif"
    if not scene.exists():
        started = time.perf_counter()
        write_scene(scene, args.side)
        print(f"wrote {scene} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    out = work / f"out_{args.side}"
    command = [sys.executable, "-m", "res_unet.seg_images_in_folder", "--model", args.model,
               "--images", str(scene.parent), "--out", str(out), "--overwrite",
               "--tta" if args.tta else "--no-tta", "--no-progress"]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"seg_images_in_folder failed:\n{result.stderr[-3000:]}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    card = json.loads((Path(args.model) / "model_card.json").read_text())
    size = card["input"]["size"]
    downsample = card["input"].get("downsample", 1)
    pixels = args.side * args.side
    report = {
        "scene": f"{args.side} x {args.side} RGB uint8 GeoTIFF (deflate, 256-px blocks)",
        "megapixels": round(pixels / 1e6, 1),
        "model": args.model, "tta": args.tta, "downsample": downsample,
        "model_gflops_per_megapixel_at_working_scale":
            round(card["flops_per_image"] / (size[0] * size[1]) * 1e6 / 1e9
                  / downsample**2, 2),
        "seconds": round(seconds, 1),
        "mpx_per_second": round(pixels / 1e6 / seconds, 3),
        "peak_rss_gb": round(peak_kb / 2**20, 2),
        "outputs": sorted(p.name for p in out.iterdir()),
        "cpu_flags": cpu_flags(), "cpus": os.cpu_count(),
        "command": " ".join(command),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    write_result(report, args.json_out)


if __name__ == "__main__":
    main()
