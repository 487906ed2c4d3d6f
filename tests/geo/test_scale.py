"""Tests for res_unet.geo.scale: pixel sizes in metres and resampling between pixel sizes."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from res_unet.core.errors import UserError
from res_unet.geo.scale import (
    needs_resampling,
    pixel_size_m,
    resample_to_pixel_size,
    resampled_shape,
    restore_scene_grid,
)


def write_tif(path, crs, transform, shape=(40, 30)):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver="GTiff", height=shape[0], width=shape[1],
                           count=1, dtype="uint8", crs=crs, transform=transform) as ds:
            ds.write(np.zeros((1, *shape), np.uint8))
    return path


# Pixel size --------------------------------------------------------------------------------

def test_projected_pixel_size_from_the_transform(tmp_path):
    path = write_tif(tmp_path / "utm.tif", "EPSG:32633", from_origin(500000, 6650000, 0.5, 0.25))
    with rasterio.open(path) as ds:
        assert pixel_size_m(ds) == (0.5, 0.25)
    assert pixel_size_m(from_origin(0, 0, 10, 10), crs="EPSG:32633") == (10.0, 10.0)


def test_projected_pixel_size_in_feet_becomes_metres():
    # NAD83 / New York Long Island (ftUS): 1 US survey foot = 1200/3937 m.
    x, y = pixel_size_m(from_origin(0, 0, 3, 3), crs="EPSG:2263")
    assert x == pytest.approx(3 * 1200 / 3937) and y == pytest.approx(3 * 1200 / 3937)


def test_geographic_pixel_size_at_the_scene_centre(tmp_path):
    # 1 arc second at the equator: a * pi / 648000 along the equator, the meridional
    # radius a (1 - e2) times the same angle along the meridian (WGS 84).
    arcsec = 1 / 3600
    x, y = pixel_size_m(from_origin(0, arcsec * 50, arcsec, arcsec), "EPSG:4326", (100, 100))
    e2 = (1 / 298.257223563) * (2 - 1 / 298.257223563)
    assert x == pytest.approx(6378137 * math.pi / 648000, rel=1e-9)  # 30.9224 m
    assert y == pytest.approx(6378137 * (1 - e2) * math.pi / 648000, rel=1e-9)  # 30.7151 m
    # At 60 N a degree of longitude is about half as long.
    path = write_tif(tmp_path / "geo.tif", "EPSG:4326",
                     from_origin(15, 60 + 20 * arcsec, arcsec, arcsec))
    with rasterio.open(path) as ds:
        x60, y60 = pixel_size_m(ds)
    w = math.sqrt(1 - e2 * 0.75)  # sin(60 deg) ** 2 = 3/4
    assert x60 == pytest.approx(6378137 / w * 0.5 * math.pi / 648000, rel=1e-9)  # 15.500 m
    assert y60 == pytest.approx(6378137 * (1 - e2) / w ** 3 * math.pi / 648000, rel=1e-9)


def test_pixel_size_needs_a_crs(tmp_path):
    path = write_tif(tmp_path / "plain.tif", None, from_origin(0, 0, 1, 1))
    with rasterio.open(path) as ds, pytest.raises(UserError, match=r"plain\.tif: has no CRS, "
                                                                    "so its pixel size"):
        pixel_size_m(ds)


def test_needs_resampling_tolerance():
    assert not needs_resampling(0.5, 0.5)
    assert not needs_resampling(0.54, 0.5)       # 8 % off
    assert needs_resampling(0.56, 0.5)           # 12 % off
    assert needs_resampling((0.5, 0.6), 0.5)     # one axis is enough
    assert not needs_resampling(0.6, 0.5, tol=0.25)


# Resampling --------------------------------------------------------------------------------

def test_shrinking_averages_areas_and_keeps_integer_dtype():
    image = np.array([[0, 2, 10, 10],
                      [2, 0, 10, 30],
                      [1, 1, 255, 255],
                      [1, 1, 255, 255]], dtype=np.uint8)
    out = resample_to_pixel_size(image, 1.0, 2.0)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[1, 15], [1, 255]])
    bands = resample_to_pixel_size(np.stack([image, image // 2], -1).astype(np.float32), 1, 2)
    np.testing.assert_allclose(bands[..., 0], [[1, 15], [1, 255]])
    np.testing.assert_allclose(bands[..., 1], [[0.5, 7.5], [0, 127]])


def test_enlarging_is_bilinear():
    ramp = np.tile(np.arange(0, 80, 10, dtype=np.float32), (4, 1))
    out = resample_to_pixel_size(ramp, 2.0, 1.0)
    assert out.shape == (8, 16)
    # Interior pixel centres fall a quarter pixel either side of the old ones.
    np.testing.assert_allclose(out[0, 1:-1], np.arange(2.5, 70, 5), atol=1e-4)
    constant = resample_to_pixel_size(np.full((5, 7, 3), 0.3, np.float32), 2, 1)
    np.testing.assert_allclose(constant, 0.3, atol=1e-6)


@pytest.mark.parametrize("scene_px", [2.0, 0.5])
def test_scene_round_trips_to_its_own_grid(scene_px):
    model_px = 1.0
    shape = (101, 77)  # odd sizes: the model grid's shape is rounded
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    on_model = resample_to_pixel_size(image, scene_px, model_px)
    assert on_model.shape[:2] == resampled_shape(shape, scene_px, model_px)
    assert on_model.shape[:2] == ((202, 154) if scene_px == 2 else (50, 38))

    classes = (on_model[..., 0] // 64).astype(np.uint8)
    back = restore_scene_grid(classes, shape, classes=True)
    assert back.shape == shape and back.dtype == np.uint8
    assert set(np.unique(back)) <= set(np.unique(classes))
    probs = rng.random((*on_model.shape[:2], 3)).astype(np.float32)
    back_p = restore_scene_grid(probs, shape, classes=False)
    assert back_p.shape == (*shape, 3) and back_p.dtype == np.float32
    assert probs.min() - 1e-6 <= back_p.min() and back_p.max() <= probs.max() + 1e-6


@pytest.mark.parametrize("scene_px", [2.0, 0.5])
def test_class_map_round_trip_is_exact_where_the_grids_nest(scene_px):
    # Scene classes in 2 x 2 blocks: a model grid twice as fine (scene_px 2) or twice as
    # coarse (scene_px 0.5) represents them exactly, so the way back must be exact.
    rng = np.random.default_rng(1)
    scene = np.kron(rng.integers(0, 4, (20, 15)), np.ones((2, 2))).astype(np.uint8)
    on_model = restore_scene_grid(scene, resampled_shape(scene.shape, scene_px, 1.0), True)
    np.testing.assert_array_equal(restore_scene_grid(on_model, scene.shape, True), scene)
