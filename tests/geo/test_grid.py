"""Tests for res_unet.geo.grid: where a raster's pixels lie, read one way for rasters and
polygons, and the quiet opening of plain images."""

from __future__ import annotations

import warnings

import numpy as np
import rasterio
from PIL import Image
from rasterio.transform import from_origin

from res_unet.geo.grid import RasterMeta, SceneGrid, is_georeferenced, map_transform, open_raster
from res_unet.geo.rasters import read_image


def _geotiff(path, nodata=None):
    transform = from_origin(500_000.0, 6_650_000.0, 2.0, 2.0)
    with rasterio.open(path, "w", driver="GTiff", height=5, width=7, count=1, dtype="uint8",
                       crs="EPSG:32633", transform=transform, nodata=nodata) as ds:
        ds.write(np.arange(35, dtype=np.uint8).reshape(1, 5, 7))
    return path, transform


def test_a_plain_image_opens_without_a_warning_and_has_no_grid(tmp_path):
    path = tmp_path / "plain.png"
    Image.fromarray(np.zeros((5, 7, 3), np.uint8)).save(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with open_raster(path) as ds:
            assert map_transform(ds) is None and ds.crs is None
            meta = RasterMeta.of_dataset(path, ds)
        grid = SceneGrid.of_file(path)
    assert [str(w.message) for w in caught] == []
    assert meta == RasterMeta(path=path) and not is_georeferenced(meta)
    assert (grid.crs, grid.transform, grid.height, grid.width) == (None, None, 5, 7)


def test_raster_meta_and_scene_grid_read_the_same_georeferencing(tmp_path):
    path, transform = _geotiff(tmp_path / "geo.tif", nodata=9)
    grid = SceneGrid.of_file(path)
    _, meta = read_image(path)
    assert grid.transform == meta.transform == transform
    assert grid.crs == meta.crs == rasterio.crs.CRS.from_epsg(32633)
    assert (grid.height, grid.width, meta.nodata) == (5, 7, 9.0)
    assert is_georeferenced(meta)
    assert grid.footprint().bounds == (500_000.0, 6_649_990.0, 500_014.0, 6_650_000.0)
