"""Tests for res_unet.report: image display, label overlays and the sample grid figure."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from res_unet import report


def test_uint8_rgb_is_shown_as_is():
    image = np.array([[[0, 51, 255]]], dtype=np.uint8)
    assert np.allclose(report.display_image(image), [[[0.0, 0.2, 1.0]]])


def test_uint16_gets_a_percentile_stretch_per_band():
    band = np.arange(101, dtype=np.uint16).reshape(1, 101)  # percentiles 2 and 98 are 2, 98
    image = np.stack([band, band * 2, band * 3], axis=-1)
    shown = report.display_image(image)
    expected = np.clip((np.arange(101) - 2.0) / 96.0, 0, 1)
    for b in range(3):
        assert np.allclose(shown[0, :, b], expected)


def test_more_than_three_bands_shows_the_first_three_and_one_band_is_grey():
    image = np.zeros((2, 2, 6), np.uint8)
    image[..., 0], image[..., 1], image[..., 2], image[..., 3:] = 255, 0, 51, 9
    assert np.allclose(report.display_image(image), [1.0, 0.0, 0.2])
    grey = report.display_image(np.full((2, 2, 1), 102, np.uint8))
    assert grey.shape == (2, 2, 3) and np.allclose(grey, 0.4)
    flat = report.display_image(np.full((2, 2, 3), 500, np.uint16))
    assert np.allclose(flat, 0.0)


def test_binary_overlay_colours_only_the_foreground():
    rgb = np.full((1, 2, 3), 0.5)
    label = np.array([[0, 1]], np.uint8)
    out = report.overlay_label(rgb, label, n_classes=2, alpha=0.5)
    assert np.allclose(out[0, 0], 0.5)
    assert np.allclose(out[0, 1], 0.25 + 0.5 * np.array(report._FOREGROUND))


def test_multiclass_overlay_uses_class_colours():
    rgb = np.zeros((1, 3, 3))
    label = np.array([[0, 1, 2]], np.uint8)
    out = report.overlay_label(rgb, label, n_classes=3, alpha=1.0)
    assert np.allclose(out[0], report.class_colours(3))
    assert report.class_colours(12).shape == (12, 3)
    assert np.allclose(report.class_colours(12)[10], report.class_colours(12)[0])


@pytest.mark.parametrize("n_classes", [2, 3])
def test_nodata_is_left_uncoloured(n_classes):
    rgb = np.full((1, 2, 3), 0.5)
    out = report.overlay_label(rgb, np.array([[255, 1]], np.uint8), n_classes, alpha=1.0)
    assert np.allclose(out[0, 0], 0.5), "nodata (255) shows the image"
    assert not np.allclose(out[0, 1], 0.5)


def test_prediction_figure_has_a_row_per_example_with_titles(tmp_path):
    rng = np.random.default_rng(0)
    example = (rng.integers(0, 255, (20, 30, 3)).astype(np.uint8),
               rng.integers(0, 3, (20, 30)).astype(np.uint8),
               rng.integers(0, 3, (20, 30)).astype(np.uint8))
    path = tmp_path / "examples.png"
    report.plot_predictions([example] * 2, 3, path, class_names=["a", "b", "c"],
                            row_titles=["one: mean IoU 0.5", "two"])
    with Image.open(path) as png:
        assert png.size == (750, 2 * 260 + 40)
    assert [p.name for p in tmp_path.iterdir()] == ["examples.png"]


@pytest.mark.parametrize(("dtype", "bands", "n_classes"), [("uint8", 3, 2), ("uint16", 6, 4)])
def test_sample_grid_writes_a_png_atomically(tmp_path, dtype, bands, n_classes):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 1000, (16, 16, bands)).astype(dtype)
    label = rng.integers(0, n_classes, (16, 16)).astype(np.uint8)
    path = tmp_path / "samples.png"
    report.sample_grid(path, [(image, label, "a (aug 1)")] * 3, [(image, label, "b")],
                       n_classes)
    with Image.open(path) as png:
        width, height = png.size
    assert (width, height) == (3 * 260, 4 * 270 + 40)  # 3 columns, 4 rows of panels
    assert [p.name for p in tmp_path.iterdir()] == ["samples.png"]


def test_failed_figure_leaves_no_file(tmp_path, monkeypatch):
    def broken_savefig(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(report.Figure, "savefig", broken_savefig)
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(OSError):
        report.sample_grid(tmp_path / "s.png", [(image, image[..., 0], "x")], [], 2)
    assert list(tmp_path.iterdir()) == []
