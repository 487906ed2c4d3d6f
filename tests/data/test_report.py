"""Tests for res_unet.data.report: image display, label overlays and the sample grid figure."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from res_unet.data import report
from res_unet.data.report import to_display_rgb
from res_unet.geo import palette


def test_uint8_rgb_is_shown_as_is():
    image = np.array([[[0, 51, 255]]], dtype=np.uint8)
    np.testing.assert_array_equal(to_display_rgb(image), image)


def test_display_rgb_uint8_kept_and_uint16_stretched():
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    np.testing.assert_array_equal(to_display_rgb(image), image)
    grey = to_display_rgb(image[..., :1])
    assert grey.shape == (2, 3, 3) and np.all(grey == image[..., :1])
    raw = np.linspace(1000, 3000, 100 * 6).astype(np.uint16).reshape(10, 10, 6)
    rgb = to_display_rgb(raw)
    assert rgb.shape == (10, 10, 3) and rgb.dtype == np.uint8 and rgb.flags.c_contiguous
    # A proper 0-255 stretch, not the nearly all-zero image the old toolbox passed.
    assert rgb.min() == 0 and rgb.max() == 255 and 100 < rgb.mean() < 155


def test_uint16_gets_a_percentile_stretch_per_band_ignoring_nodata():
    band = np.arange(1, 102, dtype=np.uint16).reshape(1, 101)  # 2nd/98th percentiles 3, 99
    image = np.stack([band, band * 2, band * 3], axis=-1)
    image = np.concatenate([image, np.zeros((1, 50, 3), np.uint16)], axis=1)  # a nodata collar
    shown = to_display_rgb(image)
    expected = np.rint(np.clip((np.arange(1, 102) - 3.0) / 96.0, 0, 1) * 255)
    for b in range(3):
        np.testing.assert_allclose(shown[0, :101, b], expected, atol=1)
    assert np.all(shown[0, 101:] == 0)


def test_more_than_three_bands_shows_the_first_three_and_one_band_is_grey():
    image = np.zeros((2, 2, 6), np.uint8)
    image[..., 0], image[..., 1], image[..., 2], image[..., 3:] = 255, 0, 51, 9
    np.testing.assert_array_equal(to_display_rgb(image), np.broadcast_to([255, 0, 51], (2, 2, 3)))
    grey = to_display_rgb(np.full((2, 2, 1), 102, np.uint8))
    assert grey.shape == (2, 2, 3) and np.all(grey == 102)
    flat = to_display_rgb(np.full((2, 2, 3), 500, np.uint16))
    assert np.all(flat == 0)


def test_binary_overlay_colours_only_the_foreground():
    image = np.full((4, 4, 3), 100, np.uint8)
    label = np.zeros((4, 4), np.uint8)
    label[:, 2:] = 1
    out = report.overlay_image(image, label, n_classes=2)
    assert tuple(out[0, 0]) == (100, 100, 100), "background stays as it is"
    assert tuple(out[0, 2]) == palette.BINARY_COLOUR, "class outline in full colour"
    assert tuple(out[0, 3]) == (162, 60, 162), "inside: 0.6 * image + 0.4 * colour"


def test_multiclass_overlay_uses_the_one_palette():
    image = np.zeros((1, 9, 3), np.uint8)
    label = np.repeat(np.arange(3, dtype=np.uint8), 3)[None]
    out = report.overlay_image(image, label, n_classes=3)
    for k in range(3):
        np.testing.assert_allclose(out[0, 3 * k + 1], 0.4 * palette.CLASS_COLOURS[k], atol=1)
    n = len(palette.CLASS_COLOURS)
    colours = palette.class_colours(n + 2)
    assert colours.shape == (n + 2, 3) and np.all(colours[n] == colours[0])


@pytest.mark.parametrize("n_classes", [2, 3])
def test_nodata_is_left_uncoloured(n_classes):
    image = np.full((1, 2, 3), 128, np.uint8)
    out = report.overlay_image(image, np.array([[255, 1]], np.uint8), n_classes)
    assert tuple(out[0, 0]) == (128, 128, 128), "nodata (255) shows the image"
    assert tuple(out[0, 1]) != (128, 128, 128)


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


def _history_rows(validated: bool) -> list[dict]:
    """history.csv rows as csv.DictReader gives them: strings, empty without validation."""
    return [{"epoch": str(e), "loss": str(1.0 / e), "mean_iou": str(0.2 * e),
             "val_loss": str(1.2 / e) if validated else "",
             "val_mean_iou": str(0.15 * e) if validated else "",
             "val_dice": str(0.18 * e) if validated else ""} for e in (1, 2, 3)]


@pytest.mark.parametrize("validated", [True, False])
def test_training_curves_draw_validation_only_when_there_is_some(tmp_path, monkeypatch,
                                                                 validated):
    """Without a validation split (empty val_ cells) the curves show training alone: no copy
    of the training line labelled validation, no best-epoch marker."""
    figures = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path: figures.append(fig))
    report.plot_history(_history_rows(validated), tmp_path / "curves.png")
    ax_loss, ax_iou = figures[0].axes
    loss_labels = [line.get_label() for line in ax_loss.get_lines()]
    iou_labels = [line.get_label() for line in ax_iou.get_lines()]
    if validated:
        assert loss_labels == ["train", "validation", "best epoch 3"]
        assert iou_labels == ["train mean IoU", "validation mean IoU", "validation dice"]
        np.testing.assert_allclose(ax_loss.get_lines()[1].get_ydata(), [1.2, 0.6, 0.4])
    else:
        assert loss_labels == ["train"] and iou_labels == ["train mean IoU"]
        assert "no validation split" in ax_loss.get_title()
