"""Benchmark of scenes read over HTTP: one full-resolution lakes scene as a Cloud-Optimized
GeoTIFF (UTM 33N, 10 m), segmented from disk and from a STAC item on a local HTTP server
(Range requests, bytes counted), whole and over an area of interest (a quarter of the
scene), at full resolution and from the COG overview that matches the model's pixel size.

    python bench/bench_remote.py [--model weights/lakes_lite0] [--scene NAME]
                                 [--json-out PATH]

Reports per case: the read alone (scene listing, headers and every row through the
windowed reader, as segmentation reads them: seconds and ground covered per second), then
megapixels read and segmented (an overview read has 64 times fewer at
1/8), the ground covered in full-resolution megapixels and its rate over the wall time of
the call (listing, reads, segmentation, outputs; the model is loaded once, and warmed up
on a first case not reported), the segmentation's own rate, bytes fetched from the server
and their fraction of the file (whose overviews add about a third). Needs
../shared/data/lakes_fullres; no network (the server is local, so the times show GDAL's
request overhead, not an internet link's latency).
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
MODEL_PIXEL_M = 80.0  # what lakes_lite0 sees (40 m scenes at DOWNSAMPLE 2): overview 1/8
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


def run_case(cfg: Any, model: Any, images: Any, out: Path, scene_mpx: float
             ) -> dict[str, Any]:
    """Segment ``images`` with the loaded ``model``: megapixels as read and segmented, the
    ground covered in full-resolution megapixels (``scene_mpx``), and rates over the wall
    time of the call (scene listing, header and pixel reads, segmentation, outputs)."""
    from res_unet.inference import segment

    started = time.perf_counter()
    summary = segment.segment_folder(cfg, [model], images, out, progress=False)
    if summary["done"] != 1:
        raise SystemExit(f"bench_remote: the case failed: {summary['failures']}")
    seconds = time.perf_counter() - started
    return {"megapixels_read": summary["megapixels"], "scene_megapixels": round(scene_mpx, 3),
            "seconds": round(seconds, 2),
            "scene_mpx_per_second": round(scene_mpx / seconds, 3),
            "segmentation_mpx_per_second": summary["mpx_per_second"]}


def read_case(images: Any, scene_mpx: float) -> dict[str, Any]:
    """Only read the scene (listing, headers, every row through the windowed reader, as
    segmentation reads it): seconds and full-resolution megapixels covered per second."""
    from res_unet.geo import rasters
    from res_unet.geo.scenes import scene_folder

    started = time.perf_counter()
    with scene_folder(images, model_pixel_size=MODEL_PIXEL_M if images.overview else None) as found:
        vrt = next(found.folder.glob("*.vrt"))
        with rasters.open_raster_rows(vrt, 3) as rows:
            for r0 in range(0, rows.shape[0], 512):
                rows.rows(r0, r0 + 512)
    seconds = time.perf_counter() - started
    return {"read_seconds": round(seconds, 3),
            "read_scene_mpx_per_second": round(scene_mpx / seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "weights" / "lakes_lite0"))
    parser.add_argument("--scene", default="bulgaria_dospat_s2cloudless_2016")
    add_json_out(parser, "remote")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"bench_remote: {DATA} is absent")

    from range_server import RangeServer

    from res_unet.cli import quiet_tensorflow
    from res_unet.geo import rasters
    from res_unet.geo.scenes import SceneQuery
    from res_unet.inference import runtime, settings

    quiet_tensorflow()
    model_dir = Path(args.model)
    cfg = settings.inference_config([model_dir])
    model = runtime.load_run(model_dir, cfg.TARGET_SIZE)  # loaded once for every case
    cases: list[dict[str, Any]] = []
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
                ("warm_up", SceneQuery(str(tmp / "served" / cog.name), bbox=bbox)),
                ("local_full", SceneQuery(str(tmp / "served" / cog.name), overview=False)),
                ("local_full_overview", SceneQuery(str(tmp / "served" / cog.name))),
                ("http_full", SceneQuery(url, overview=False)),
                ("http_full_overview", SceneQuery(url)),
                ("http_aoi_quarter", SceneQuery(url, bbox=bbox, overview=False)),
                ("http_aoi_quarter_overview", SceneQuery(url, bbox=bbox)),
            ]
            for i, (name, query) in enumerate(plan):
                area = (0.25 if query.bbox else 1.0) * image.shape[0] * image.shape[1] / 1e6
                # A new server path per pass: GDAL's cache of what it fetched stays cold.
                if query.images and query.images.startswith("http"):
                    for alias in (f"r{i}", f"s{i}"):
                        (tmp / "served" / alias).mkdir()
                        (tmp / "served" / alias / cog.name).hardlink_to(cog)
                        (tmp / "served" / alias / "item.json").write_text(json.dumps(item))
                    reading = SceneQuery(server.url(f"r{i}/item.json"), bbox=query.bbox,
                                         overview=query.overview)
                    query = SceneQuery(server.url(f"s{i}/item.json"), bbox=query.bbox,
                                       overview=query.overview)
                else:
                    reading = query
                read = read_case(reading, area)
                before = server.bytes_sent()
                result = {**read, **run_case(cfg, model, query, tmp / f"out_{name}", area)}
                fetched = server.bytes_sent() - before
                remote = query.images.startswith("http")
                if name == "warm_up":  # OpenVINO's first compile, TensorFlow's first call
                    continue
                cases.append({"case": name, **result,
                              "bytes_fetched": fetched if remote else None,
                              "fraction_of_file": round(fetched / size, 4) if remote else None})
                print(cases[-1], flush=True)
        finally:
            server.close()
    write_result({"benchmark": "remote", "model": model_dir.name, "scene": args.scene,
                  "scene_shape": list(image.shape), "scene_pixel_m": PIXEL,
                  "file_bytes": size, "results": cases}, args.json_out)


if __name__ == "__main__":
    main()
