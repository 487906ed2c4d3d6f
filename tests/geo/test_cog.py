"""Tests for res_unet.geo.cog: class maps and probabilities as Cloud-Optimized GeoTIFFs."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from res_unet.geo.cog import write_cog

UTM = "EPSG:32633"
TRANSFORM = from_origin(500_000, 6_650_000, 2.0, 2.0)


def test_class_map_cog_is_tiled_with_nearest_overviews(tmp_path):
    label = (np.add.outer(np.arange(600) // 7, np.arange(700) // 11) % 4).astype(np.uint8)
    label[:10, :10] = 255
    path = write_cog(tmp_path / "scene_predseg.tif", label, UTM, TRANSFORM, nodata=255,
                     blocksize=256)
    with rasterio.open(path) as ds:
        assert ds.driver == "GTiff" and ds.dtypes == ("uint8",) and ds.count == 1
        assert ds.block_shapes == [(256, 256)] and ds.profile["tiled"]
        assert ds.overviews(1) == [2, 4]  # down to one 256 px tile
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert ds.tags(ns="IMAGE_STRUCTURE")["COMPRESSION"] == "DEFLATE"
        assert ds.crs.to_epsg() == 32633 and ds.transform == TRANSFORM and ds.nodata == 255
        np.testing.assert_array_equal(ds.read(1), label)
        overview = ds.read(1, out_shape=(150, 175))  # served from the 1/4 overview
    # Nearest neighbour: only existing class values, no averages between classes.
    assert set(np.unique(overview)) <= {0, 1, 2, 3, 255}
    np.testing.assert_array_equal(overview[5:, 5:], label[::4, ::4][5:, 5:])
    assert not [p for p in tmp_path.iterdir() if p.name != "scene_predseg.tif"]


def test_probability_cog_keeps_float32_bands_and_averages_overviews(tmp_path):
    rng = np.random.default_rng(0)
    probs = rng.random((512, 512, 3)).astype(np.float32)
    path = write_cog(tmp_path / "probs.tif", probs, UTM, TRANSFORM, classes=False,
                     blocksize=256)
    with rasterio.open(path) as ds:
        assert ds.dtypes == ("float32",) * 3 and ds.block_shapes == [(256, 256)] * 3
        assert ds.overviews(1) == [2]
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        np.testing.assert_array_equal(np.moveaxis(ds.read(), 0, -1), probs)
        half = ds.read(out_shape=(3, 256, 256))
    means = probs.reshape(256, 2, 256, 2, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(np.moveaxis(half, 0, -1), means, atol=1e-6)


def test_bad_shapes_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"a class map is \(H, W\)"):
        write_cog(tmp_path / "x.tif", np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ValueError, match="non-empty"):
        write_cog(tmp_path / "x.tif", np.zeros((0, 4), np.uint8))
