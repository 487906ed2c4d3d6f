"""Tiling, resize-and-pad and tile blending, checked on tiny arrays by hand."""

import json

import numpy as np
import pytest

from res_unet.geo import tiling
from res_unet.geo.tiling import (
    FitInfo,
    TileBlender,
    blend_window,
    extract_tile,
    resize_to_fit,
    tile_grid,
    tile_origins,
    undo_fit,
)

# tile_origins / tile_grid -------------------------------------------------------------------


@pytest.mark.parametrize(("length", "tile", "overlap", "expected"), [
    (10, 4, 0.0, [0, 4, 6]),      # last tile aligned to the end
    (8, 4, 0.0, [0, 4]),          # exact fit, no extra tile
    (4, 4, 0.0, [0]),
    (3, 4, 0.0, [0]),             # shorter than the tile: one padded tile
    (1, 256, 0.5, [0]),
    (10, 4, 0.5, [0, 2, 4, 6]),   # stride 2
    (9, 4, 0.5, [0, 2, 4, 5]),
    (10, 4, 0.25, [0, 3, 6]),     # round(4 * 0.25) = 1 -> stride 3
    (5, 2, 0.9, [0, 1, 2, 3]),    # stride never below 1
])
def test_tile_origins_examples(length, tile, overlap, expected):
    assert tile_origins(length, tile, overlap) == expected


@pytest.mark.parametrize("overlap", [-0.1, 1.0])
def test_tile_origins_rejects_bad_overlap(overlap):
    with pytest.raises(ValueError, match="overlap"):
        tile_origins(10, 4, overlap)


@pytest.mark.parametrize(("shape", "tile", "overlap"), [
    ((37, 23), (8, 6), 0.3), ((5, 3), (8, 8), 0.25), ((101, 64), (64, 64), 0.5)])
def test_tile_grid_covers_every_pixel_within_bounds(shape, tile, overlap):
    count = np.zeros(shape, dtype=int)
    grid = tile_grid(shape, tile, overlap)
    for r0, c0 in grid:
        assert r0 >= 0 and c0 >= 0
        assert r0 + tile[0] <= max(shape[0], tile[0]) and c0 + tile[1] <= max(shape[1], tile[1])
        count[r0:r0 + tile[0], c0:c0 + tile[1]] += 1
    assert count.min() >= 1
    assert grid == sorted(grid)  # row-major


def test_tile_grid_without_overlap_covers_exactly_once():
    count = np.zeros((16, 18), dtype=int)
    grid = tile_grid((16, 18), (8, 6), 0.0)
    assert grid == [(0, 0), (0, 6), (0, 12), (8, 0), (8, 6), (8, 12)]
    for r0, c0 in grid:
        count[r0:r0 + 8, c0:c0 + 6] += 1
    assert np.all(count == 1)


# extract_tile --------------------------------------------------------------------------------


def test_extract_tile_in_bounds_is_a_copy_of_the_slice():
    a = np.arange(7 * 9 * 2, dtype=np.uint16).reshape(7, 9, 2)
    tile = extract_tile(a, 2, 3, (4, 5))
    np.testing.assert_array_equal(tile, a[2:6, 3:8])
    assert tile.dtype == np.uint16
    tile[0, 0] = 999
    assert a[2, 3, 0] != 999


def test_extract_tile_reflect_pads_past_the_edge():
    a = np.arange(12).reshape(3, 4)  # rows [0..3], [4..7], [8..11]
    tile = extract_tile(a, 1, 2, (4, 4))
    # rows 1, 2, then reflected 1, 0; cols 2, 3, then reflected 2, 1
    expected = np.array([[6, 7, 6, 5], [10, 11, 10, 9], [6, 7, 6, 5], [2, 3, 2, 1]])
    np.testing.assert_array_equal(tile, expected)
    np.testing.assert_array_equal(extract_tile(a, 0, 0, (5, 6)),
                                  np.pad(a, ((0, 2), (0, 2)), mode="reflect"))


def test_extract_tile_much_smaller_array_and_negative_origin():
    a = np.array([[1, 2]], dtype=np.uint8)
    np.testing.assert_array_equal(extract_tile(a, 0, 0, (3, 5)), [[1, 2, 1, 2, 1]] * 3)
    np.testing.assert_array_equal(extract_tile(a, -1, -1, (2, 4)), [[2, 1, 2, 1]] * 2)
    b = np.arange(3)[None, :, None].repeat(2, axis=2)  # (1, 3, 2)
    tile = extract_tile(b, 0, 0, (2, 8))
    assert tile.shape == (2, 8, 2)
    np.testing.assert_array_equal(tile[0, :, 0], [0, 1, 2, 1, 0, 1, 2, 1])


# resize_to_fit / undo_fit -------------------------------------------------------------------


def test_resize_to_fit_keeps_aspect_and_reflect_pads_centred():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)
    fitted, info = resize_to_fit(image, (16, 16), order=1)
    assert fitted.shape == (16, 16, 3) and fitted.dtype == np.uint8
    assert info == FitInfo((20, 40), (8, 16), (16, 16), pad_top=4, pad_left=0)
    # Row 4 is the first content row; rows 0..3 mirror rows 8..5.
    np.testing.assert_array_equal(fitted[0:4], fitted[8:4:-1])
    np.testing.assert_array_equal(fitted[12:16], fitted[10:6:-1])
    assert json.loads(json.dumps(info.to_dict()))["scaled_hw"] == [8, 16]


def test_resize_to_fit_same_size_is_identity():
    image = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16)
    fitted, info = resize_to_fit(image, (16, 16), order=1)
    np.testing.assert_array_equal(fitted, image)
    assert (info.pad_top, info.pad_left, info.scaled_hw) == (0, 0, (16, 16))


def test_resize_to_fit_label_keeps_its_class_set():
    label = np.zeros((30, 17), dtype=np.uint8)
    label[5:20, 3:9] = 2
    label[22:, 10:] = 5
    fitted, info = resize_to_fit(label, (64, 64), order=0)
    assert fitted.dtype == np.uint8
    assert set(np.unique(fitted)) == {0, 2, 5}
    small, _ = resize_to_fit(label, (8, 8), order=0)
    assert set(np.unique(small)) <= {0, 2, 5}
    # Same geometry as an image of the same shape.
    assert resize_to_fit(np.zeros((30, 17, 3), np.uint8), (64, 64), order=1)[1] == info


@pytest.mark.parametrize(("shape", "target", "tol"), [
    ((50, 30), (64, 64), 0.02),     # up-scaled
    ((120, 90), (48, 48), 0.06),    # down-scaled
])
def test_fit_round_trip_on_smooth_probabilities(shape, target, tol):
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    smooth = 0.5 + 0.25 * np.sin(yy / 9.0) * np.cos(xx / 11.0)
    probs = np.stack([smooth, 1 - smooth], axis=-1).astype(np.float32)
    fitted, info = resize_to_fit(probs, target, order=1)
    assert fitted.shape == (*target, 2)
    back = undo_fit(fitted, info)
    assert back.shape == (*shape, 2) and back.dtype == np.float32
    assert np.abs(back - probs).max() < tol


def test_undo_fit_restores_an_integer_label_exactly_at_scale_two():
    label = np.random.default_rng(1).integers(0, 4, (8, 4), dtype=np.uint8)
    fitted, info = resize_to_fit(label, (16, 16), order=0)
    assert info.scaled_hw == (16, 8) and info.pad_left == 4
    np.testing.assert_array_equal(undo_fit(fitted, info), label)


def test_undo_fit_rejects_wrong_size():
    _, info = resize_to_fit(np.zeros((10, 10), np.float32), (16, 16), order=1)
    with pytest.raises(ValueError, match="fitted size"):
        undo_fit(np.zeros((8, 8), np.float32), info)


# blend_window / TileBlender -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["hann", "spline", "flat"])
def test_blend_window_positive_max_one_symmetric(kind):
    win = blend_window((8, 12), kind)
    assert win.shape == (8, 12) and win.dtype == np.float32
    assert win.min() > 0
    assert win.max() == pytest.approx(1.0)
    np.testing.assert_allclose(win, win[::-1, ::-1])


def test_blend_window_hand_values():
    # 1-D spline on 4 pixels: t = 0.25, 0.75 -> 2 t^2 = 0.125, 1 - 2 (1 - t)^2 = 0.875.
    spline = blend_window((4, 4), "spline")
    assert spline[0, 0] == pytest.approx((0.125 / 0.875) ** 2, rel=1e-6)
    assert spline[0, 1] == pytest.approx(0.125 / 0.875, rel=1e-6)
    # 1-D Hann on 4 pixels: sin^2(pi/8), sin^2(3 pi/8).
    ratio = np.sin(np.pi / 8) ** 2 / np.sin(3 * np.pi / 8) ** 2
    assert blend_window((4, 4), "hann")[0, 0] == pytest.approx(ratio ** 2, rel=1e-6)
    assert blend_window((256, 256), "hann").min() == pytest.approx(1e-3)  # the floor
    np.testing.assert_array_equal(blend_window((3, 5), "flat"), np.ones((3, 5)))
    with pytest.raises(ValueError, match="unknown blend window"):
        blend_window((4, 4), "gauss")


@pytest.mark.parametrize("kind", ["hann", "spline", "flat"])
def test_blending_constant_tiles_gives_a_constant_map(kind):
    shape, tile = (37, 23), (8, 8)
    blender = TileBlender(shape, 3, blend_window(tile, kind))
    const = np.array([0.2, 0.5, 0.3], dtype=np.float32)
    for r0, c0 in tile_grid(shape, tile, 0.25):
        blender.add(np.broadcast_to(const, (*tile, 3)), r0, c0)
    out = blender.result()
    assert out.shape == (37, 23, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, np.broadcast_to(const, out.shape), atol=1e-6)


@pytest.mark.parametrize(("shape", "kind"), [((37, 23), "hann"), ((5, 6), "spline")])
def test_blending_tiles_of_a_map_reconstructs_it(shape, kind):
    probs = np.random.default_rng(2).random((*shape, 2)).astype(np.float32)
    tile = (8, 8)
    blender = TileBlender(shape, 2, blend_window(tile, kind))
    for r0, c0 in tile_grid(shape, tile, 0.5):
        blender.add(extract_tile(probs, r0, c0, tile), r0, c0)
    np.testing.assert_allclose(blender.result(), probs, atol=1e-6)


def test_blender_two_tiles_weighted_by_hand():
    window = np.array([[1.0, 0.5]], dtype=np.float32)
    blender = TileBlender((1, 3), 1, window)
    blender.add(np.array([[1.0, 1.0]]), 0, 0)   # weights 1, 0.5 on columns 0, 1
    blender.add(np.array([[4.0, 4.0]]), 0, 1)   # weights 1, 0.5 on columns 1, 2
    # column 1: (0.5 * 1 + 1 * 4) / 1.5 = 3
    np.testing.assert_allclose(blender.result()[0, :, 0], [1.0, 3.0, 4.0])


def test_blender_reports_uncovered_pixels():
    blender = TileBlender((4, 4), 1, blend_window((2, 2), "flat"))
    blender.add(np.ones((2, 2, 1), np.float32), 0, 0)
    with pytest.raises(ValueError, match="12 pixels"):
        blender.result()


# Working scale (DOWNSAMPLE) ------------------------------------------------------------------

def test_downsample_image_is_the_block_mean():
    image = np.arange(5 * 4 * 1, dtype=np.uint8).reshape(5, 4, 1)
    small = tiling.downsample_image(image, 2)
    assert small.shape == (3, 2, 1) and small.dtype == np.uint8
    # rows 0-1, cols 0-1: 0, 1, 4, 5 -> 2.5 -> rounds to 2 (half to even)
    assert small[0, 0, 0] == np.rint(np.mean([0, 1, 4, 5]))
    # the last row block is edge-padded: rows 4, 4
    assert small[2, 1, 0] == np.rint(np.mean([18, 19, 18, 19]))
    assert tiling.downsample_image(image, 1) is image
    assert tiling.downsampled_shape((5, 4), 2) == (3, 2)
    assert tiling.downsampled_shape((1024, 777), 4) == (256, 195)


def test_downsample_label_takes_the_block_majority():
    label = np.array([[0, 1, 2, 2],
                      [1, 1, 2, 0],
                      [3, 3, 0, 0],
                      [3, 0, 1, 0]], np.uint8)
    np.testing.assert_array_equal(tiling.downsample_label(label, 2), [[1, 2], [3, 0]])
    tie = np.array([[0, 1], [1, 0]], np.uint8)
    assert tiling.downsample_label(tie, 2)[0, 0] == 0  # ties go to the lower value


def test_upsample_inverts_the_geometry_of_downsample():
    """A linear ramp survives down- then up-sampling exactly (away from the clamped edges),
    and any split into row ranges gives the same values as the whole."""
    rows, cols = 40, 24
    ramp = (np.arange(rows)[:, None] * 2.0 + np.arange(cols)[None, :] * 3.0)[..., None]
    small = tiling.downsample_image(ramp.astype(np.float32), 4)
    up = tiling.upsample_rows(small, 4, (rows, cols))
    assert up.shape == (rows, cols, 1) and up.dtype == np.float32
    np.testing.assert_allclose(up[2:-2, 2:-2], ramp[2:-2, 2:-2], atol=1e-4)
    pieces = np.concatenate([tiling.upsample_rows(small, 4, (rows, cols), r, min(r + 7, rows))
                             for r in range(0, rows, 7)])
    np.testing.assert_array_equal(pieces, up)


# SlidingWindow ----------------------------------------------------------------------------


def as_float(batch):
    """A fake model: the probabilities are the tile's own pixels (identity)."""
    return batch.astype(np.float32)


@pytest.mark.parametrize(("shape", "tile", "overlap"), [
    ((10, 13), (4, 4), 0.25), ((9, 9), (4, 3), 0.5), ((3, 7), (4, 4), 0.0), ((8, 8), (8, 8), 0.5),
])
def test_sliding_window_origins_cover_the_image_once_or_more(shape, tile, overlap):
    window = tiling.SlidingWindow(as_float, tile, overlap)
    covered = np.zeros(shape, int)
    for r, c in window.origins(shape):
        assert r >= 0 and c >= 0
        covered[r:r + tile[0], c:c + tile[1]] += 1
    assert covered.min() >= 1
    assert window.origins(shape) == tile_grid(shape, tile, overlap)


@pytest.mark.parametrize("kind", ["hann", "spline", "flat"])
def test_sliding_window_weights_sum_as_computed_by_hand(kind):
    """Each tile predicts one value (its origin, r * 100 + c): every pixel gets the mean of
    the values of the tiles covering it, weighted by their windows at that pixel."""
    shape, tile, overlap = (11, 9), (4, 4), 0.5
    rows = np.broadcast_to(np.arange(shape[0])[:, None], shape)
    cols = np.broadcast_to(np.arange(shape[1])[None, :], shape)
    image = np.stack([rows, cols], -1).astype(np.uint8)

    def origin_value(batch):
        value = batch[:, 0, 0, 0] * 100.0 + batch[:, 0, 0, 1]
        return np.broadcast_to(value[:, None, None, None], (*batch.shape[:3], 1)).astype(
            np.float32)

    got = tiling.SlidingWindow(origin_value, tile, overlap, kind).probabilities(image)
    win = blend_window(tile, kind).astype(np.float64)
    total = np.zeros(shape)
    weight = np.zeros(shape)
    for r, c in tile_grid(shape, tile, overlap):
        total[r:r + 4, c:c + 4] += win * (r * 100 + c)
        weight[r:r + 4, c:c + 4] += win
    np.testing.assert_allclose(got[..., 0], total / weight, rtol=1e-5)


@pytest.mark.parametrize("mode", ["tile", "resize"])
@pytest.mark.parametrize("downsample", [1, 2])
@pytest.mark.parametrize("kind", ["hann", "spline", "flat"])
def test_sliding_window_identity_on_a_constant_image(mode, downsample, kind):
    image = np.full((13, 10, 2), 77, np.uint8)
    window = tiling.SlidingWindow(as_float, (4, 4), 0.25, kind, downsample=downsample)
    prob = window.probabilities(image, mode)
    assert prob.shape == (13, 10, 2) and prob.dtype == np.float32
    np.testing.assert_allclose(prob, 77.0, rtol=1e-6)
    strips = list(window.strips(image, mode))
    assert [r0 for r0, _ in strips] == list(np.cumsum([0] + [len(s) for _, s in strips]))[:-1]
    np.testing.assert_allclose(np.concatenate([s for _, s in strips]), 77.0, rtol=1e-6)


def test_sliding_window_identity_on_any_image_in_tile_mode():
    image = np.random.default_rng(0).integers(0, 256, (21, 17, 3), dtype=np.uint8)
    prob = tiling.SlidingWindow(as_float, (8, 8), 0.25).probabilities(image)
    np.testing.assert_allclose(prob, image, rtol=1e-5)


def test_sliding_window_batching_and_strips_do_not_change_results():
    image = np.random.default_rng(1).integers(0, 256, (23, 19, 1), dtype=np.uint8)
    calls = []

    def nonlinear(batch):
        calls.append(len(batch))
        return np.sqrt(batch.astype(np.float32) + np.arange(batch.shape[2])[None, None, :, None])

    results = []
    for batch_size in (1, 3, 100):
        window = tiling.SlidingWindow(nonlinear, (8, 8), 0.5, "hann", batch_size)
        results.append(window.probabilities(image))
        strips = list(window.strips(image))
        np.testing.assert_array_equal(np.concatenate([s for _, s in strips]), results[-1])
    n_tiles = len(tile_grid(image.shape[:2], (8, 8), 0.5))
    assert max(calls) == n_tiles and min(calls) == 1
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])
