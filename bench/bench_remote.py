"""Benchmark of scenes read over HTTP: one full-resolution lakes scene as a Cloud-Optimized
GeoTIFF (UTM 33N, 10 m), segmented from disk and from a STAC item on a local HTTP server
(Range requests, bytes counted), whole and over an area of interest (a quarter of the
scene), at full resolution and from the COG overview that matches the model's pixel size.

    python bench/bench_remote.py [--model weights/lakes_lite0] [--scene NAME]
                                 [--json-out PATH]

Reports per case: source megapixels segmented (as read: an overview read has fewer), the
segmentation's Mpx/s (its own busy time), wall seconds, bytes fetched from the server and
their fraction of the file. Needs ../shared/data/lakes_fullres; no network (the server is
local, so the times show GDAL's request overhead, not an internet link's latency).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import add_json_out, write_result

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "lakes_fullres"
for path in (REPO, REPO / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

PIXEL = 10.0
ORIGIN = (5e5, 4.2e6)


def write_cog(image: np.ndarray, path: Path) -> Path:
    """``image`` (H, W, 3) uint8 as a COG in UTM 33N at PIXEL metres (512 px tiles,
    average overviews, as public Sentinel-2 COGs are laid out)."""
    import rasterio
    from rasterio.transform import from_origin

    with rasterio.open(path, "w", driver="COG", height=image.shape[0], width=image.shape[1],
                       count=3, dtype="uint8", crs="EPSG:32633", BLOCKSIZE=512,
                       COMPRESS="DEFLATE", OVERVIEW_RESAMPLING="AVERAGE",
                       transform=from_origin(*ORIGIN, PIXEL, PIXEL)) as ds:
        ds.write(np.moveaxis(image, -1, 0))
    return path


def quarter_bbox(height: int, width: int) -> tuple[float, float, float, float]:
    """W,S,E,N (degrees) inside the scene's top-left quarter."""
    from rasterio.warp import transform_bounds

    left, top = ORIGIN
    return transform_bounds("EPSG:32633", "EPSG:4326", left + 50, top - height * PIXEL / 2
                            + 50, left + width * PIXEL / 2 - 50, top - 50)


def run_case(cfg: Any, model: Path, images: Any, out: Path) -> dict[str, Any]:
    from res_unet import segment

    started = time.perf_counter()
    summary = segment.segment_folder(cfg, [model], images, out, progress=False)
    if summary["done"] != 1:
        raise SystemExit(f"bench_remote: the case failed: {summary['failures']}")
    return {"megapixels": summary["megapixels"], "mpx_per_second": summary["mpx_per_second"],
            "seconds": round(time.perf_counter() - started, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "weights" / "lakes_lite0"))
    parser.add_argument("--scene", default="bulgaria_dospat_s2cloudless_2016")
    add_json_out(parser, "remote")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"bench_remote: {DATA} is absent")

    from range_server import RangeServer

    from res_unet import rasters, runfolder
    from res_unet.cli import quiet_tensorflow
    from res_unet.geo.scenes import SceneQuery

    quiet_tensorflow()
    model = Path(args.model)
    cfg = runfolder.inference_config([model])
    cases: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "served").mkdir()
        image, _ = rasters.read_image(DATA / "images" / f"{args.scene}.jpg")
        cog = write_cog(image, tmp / "served" / f"{args.scene}.tif")
        size = cog.stat().st_size
        bbox = quarter_bbox(*image.shape[:2])
        server = RangeServer(tmp / "served")
        try:
            item = {"type": "Feature", "stac_version": "1.0.0", "id": args.scene,
                    "geometry": None, "properties": {"datetime": "2016-07-01T00:00:00Z"},
                    "links": [], "assets": {"visual": {
                        "href": f"./{cog.name}", "roles": ["data"],
                        "type": "image/tiff; application=geotiff; profile=cloud-optimized"}}}
            (tmp / "served" / "item.json").write_text(json.dumps(item))
            url = server.url("item.json")
            plan = [
                ("local_full", SceneQuery(str(tmp / "served" / cog.name), overview=False)),
                ("local_full_overview", SceneQuery(str(tmp / "served" / cog.name))),
                ("http_full", SceneQuery(url, overview=False)),
                ("http_full_overview", SceneQuery(url)),
                ("http_aoi_quarter", SceneQuery(url, bbox=bbox, overview=False)),
                ("http_aoi_quarter_overview", SceneQuery(url, bbox=bbox)),
            ]
            for i, (name, query) in enumerate(plan):
                # A new server path per case: GDAL's cache of what it fetched stays cold.
                if query.images and query.images.startswith("http"):
                    alias = f"c{i}"
                    (tmp / "served" / alias).mkdir()
                    (tmp / "served" / alias / cog.name).hardlink_to(cog)
                    (tmp / "served" / alias / "item.json").write_text(json.dumps(item))
                    query = SceneQuery(server.url(f"{alias}/item.json"), bbox=query.bbox,
                                       overview=query.overview)
                before = server.bytes_sent()
                result = run_case(cfg, model, query, tmp / f"out_{name}")
                fetched = server.bytes_sent() - before
                remote = query.images.startswith("http")
                cases[name] = {**result, "bytes_fetched": fetched if remote else None,
                               "fraction_of_file": round(fetched / size, 4) if remote else None}
                print(name, cases[name], flush=True)
        finally:
            server.close()
    write_result({"benchmark": "remote", "model": model.name, "scene": args.scene,
                  "scene_shape": list(image.shape), "scene_pixel_m": PIXEL,
                  "file_bytes": size, "cases": cases}, args.json_out)


if __name__ == "__main__":
    main()
