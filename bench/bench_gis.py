"""Timing of the GIS steps on one large synthetic scene: burning polygon labels, polygonising
every class, resampling to a model's pixel size and writing a COG.

    python bench/bench_gis.py [--height 3500] [--width 4096] [--polygons 2000]
                              [--work /tmp/bench_gis] [--out bench_gis.json]

The scene is a 2 m UTM 33N grid (nothing is read from it but its grid). The label layer holds
``--polygons`` random ellipses (64 vertices each, 10-150 m across, three classes, about a
third overlapping) drawn in EPSG:4326, so reading includes reprojection to the scene CRS.
The class map to polygonise is smooth noise cut into four classes (many irregular regions,
holes included). Prints JSON of seconds per step.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyogrio.raw
import rasterio
import shapely
from rasterio.transform import from_origin
from rasterio.warp import transform as warp_coords
from scipy import ndimage

from res_unet.geo.cog import write_cog
from res_unet.geo.polygons import class_polygons, write_class_polygons
from res_unet.geo.scale import resample_to_pixel_size, restore_scene_grid
from res_unet.geo.vectors import SceneGrid, burn_labels, class_indices, read_vector_labels

X0, Y0, PX = 500_000.0, 6_650_000.0, 2.0


def _layer(path: Path, n: int, height: int, width: int, rng: np.random.Generator) -> Path:
    centres = rng.uniform([X0, Y0 - height * PX], [X0 + width * PX, Y0], (n, 2))
    radii = rng.uniform(5, 75, (n, 2))
    angles = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    polygons = []
    for (cx, cy), (rx, ry) in zip(centres, radii, strict=True):
        xs, ys = cx + rx * np.cos(angles), cy + ry * np.sin(angles)
        lon, lat = warp_coords("EPSG:32633", "EPSG:4326", xs, ys)
        polygons.append(shapely.Polygon(zip(lon, lat, strict=True)))
    pyogrio.raw.write(path, shapely.to_wkb(np.array(polygons, dtype=object)),
                      [rng.integers(1, 4, n)], ["cls"], driver="GPKG",
                      geometry_type="Polygon", crs="EPSG:4326")
    return path


def _timed(results: dict, name: str, fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    results[name] = round(time.perf_counter() - start, 3)
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=3500)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--polygons", type=int, default=2000)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench_gis")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    h, w = args.height, args.width
    scene = args.work / "scene.tif"
    with rasterio.open(scene, "w", driver="GTiff", height=h, width=w, count=1, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(X0, Y0, PX, PX),
                       tiled=True, compress="deflate") as ds:
        ds.write(np.zeros((1, h, w), np.uint8))
    layer = _layer(args.work / "labels.gpkg", args.polygons, h, w, rng)

    results: dict = {"scene": [h, w], "polygons": args.polygons}
    labels = _timed(results, "read_layer_s", read_vector_labels, layer, attribute="cls")
    classes = class_indices(labels, "cls", 4)
    _, facts = _timed(results, "reproject_and_burn_s", burn_labels, labels, classes,
                          SceneGrid.of_file(scene))
    results["burnt_class_pixels"] = facts.class_pixels

    noise = ndimage.gaussian_filter(rng.standard_normal((h, w)).astype(np.float32), 12)
    class_map = np.digitize(noise, np.quantile(noise, [0.25, 0.5, 0.75])).astype(np.uint8)
    polygons = _timed(results, "polygonise_s", class_polygons, class_map,
                      from_origin(X0, Y0, PX, PX), ["a", "b", "c", "d"])
    results["regions"] = len(polygons)
    simple = _timed(results, "polygonise_simplified_4m_s", class_polygons, class_map,
                    from_origin(X0, Y0, PX, PX), ["a", "b", "c", "d"], simplify=4.0)
    results["simplify_only_s"] = round(results["polygonise_simplified_4m_s"]
                                       - results["polygonise_s"], 3)
    results["vertices_plain_simplified"] = [
        int(shapely.get_num_coordinates(polygons.geometries).sum()),
        int(shapely.get_num_coordinates(simple.geometries).sum())]
    _timed(results, "write_gpkg_s", write_class_polygons, args.work / "classes.gpkg", polygons,
           "EPSG:32633")
    _timed(results, "write_geojson_s", write_class_polygons, args.work / "classes.geojson",
           polygons, "EPSG:32633")

    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    for factor in (2.0, 0.5):
        small = _timed(results, f"resample_image_x{factor}_s", resample_to_pixel_size, image,
                       PX, PX * factor)
        _timed(results, f"restore_classes_x{factor}_s", restore_scene_grid,
               (small[..., 0] // 64).astype(np.uint8), (h, w), True)
    _timed(results, "write_cog_classes_s", write_cog, args.work / "classes_cog.tif", class_map,
           "EPSG:32633", from_origin(X0, Y0, PX, PX), nodata=255)
    print(json.dumps(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
