"""Figures and overlays: how images, labels and results are shown to the user (PNG files).

Figures are drawn with matplotlib's Agg canvas directly (no GUI backend, no global pyplot
state), so they work on headless servers and in worker processes, and every file is
written atomically. Functions here take numpy arrays and paths; they never read datasets.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from res_unet.core.atomic import atomic_path
from res_unet.geo.palette import class_colours

# The palette (class_colours, CLASS_COLOURS, BINARY_COLOUR) is palette.py's, shared with the
# colour tables of label GeoTIFFs.
OVERLAY_ALPHA = 0.4
# Overlays larger than this are drawn on a sub-sampled grid: a viewer cannot show more.
OVERLAY_MAX_PIXELS = 30_000_000
# Panel titles are wrapped to this many characters so neighbours do not overlap.
_TITLE_CHARS = 36

Sample = tuple[np.ndarray, np.ndarray, str]


# Display stretch ----------------------------------------------------------------------------

# Pixels sampled for the percentile stretch of large images.
_STRETCH_SAMPLE = 1_000_000
# Percentiles of the per-band stretch of imagery that is not 8-bit.
STRETCH_PERCENTILES = (2.0, 98.0)


def to_display_rgb(image: np.ndarray) -> np.ndarray:
    """An image (H, W, B) of any dtype -> C-contiguous uint8 (H, W, 3) in 0-255: the one
    display stretch (overlays, figures, and the colours the dense CRF compares).

    uint8 images keep their values (they already are 0-255 display values, the units of
    ``CRF_BILATERAL_SRGB``). Other dtypes (uint16, float) get a 2-98 percentile stretch per
    band, ignoring all-zero (nodata) pixels. The first three bands are used; one band is
    repeated as grey and two bands become (b0, b1, b1).
    """
    if image.ndim == 2:
        image = image[..., None]
    bands = image[..., [min(i, image.shape[2] - 1) for i in range(3)]]
    if bands.dtype == np.uint8:
        return np.ascontiguousarray(bands)
    step = max(1, int(math.sqrt(bands.shape[0] * bands.shape[1] / _STRETCH_SAMPLE)))
    sample = bands[::step, ::step].reshape(-1, 3).astype(np.float64)
    valid = sample.any(axis=1)
    if valid.any():
        sample = sample[valid]
    lo, hi = np.percentile(sample, STRETCH_PERCENTILES, axis=0)
    scale = np.where(hi > lo, 255.0 / np.maximum(hi - lo, 1e-12), 0.0).astype(np.float32)
    out = (bands.astype(np.float32) - lo.astype(np.float32)) * scale
    return np.ascontiguousarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def overlay_step(shape_hw: Sequence[int], max_pixels: int = OVERLAY_MAX_PIXELS) -> int:
    """The sub-sampling step of an overlay of an image of ``shape_hw``: the smallest integer
    that brings it to at most ``max_pixels``."""
    return max(1, math.ceil(math.sqrt(shape_hw[0] * shape_hw[1] / max_pixels)))


def overlay_image(image: np.ndarray, label: np.ndarray, n_classes: int,
                  max_pixels: int = OVERLAY_MAX_PIXELS) -> np.ndarray:
    """The image with coloured classes (alpha OVERLAY_ALPHA) and class outlines, uint8 RGB.

    ``image`` (H, W, B) raw values are shown through their first three bands (uint16 and
    others stretched 2-98 percent); ``label`` (H, W) class indices, LABEL_NODATA uncoloured.
    Binary maps colour class 1 only. Images above ``max_pixels`` are drawn sub-sampled by
    the smallest integer step that fits.
    """
    step = overlay_step(image.shape[:2], max_pixels)
    if step > 1:
        image, label = image[::step, ::step], label[::step, ::step]
    out = to_display_rgb(image)
    palette = class_colours(n_classes).astype(np.uint16)
    # Binary maps leave the background (class 0) uncoloured.
    colours = {k: palette[k] for k in range(1 if n_classes == 2 else 0, n_classes)}
    edge = np.zeros(label.shape, bool)
    differs = label[:, 1:] != label[:, :-1]
    edge[:, 1:] |= differs
    edge[:, :-1] |= differs
    differs = label[1:] != label[:-1]
    edge[1:] |= differs
    edge[:-1] |= differs
    weight = round(OVERLAY_ALPHA * 256)
    for k, colour in colours.items():
        mask = label == k
        blended = (out[mask].astype(np.uint16) * (256 - weight) + colour * weight + 128) >> 8
        out[mask] = blended.astype(np.uint8)
        out[mask & edge] = colour.astype(np.uint8)
    return out


def class_legend(n_classes: int, class_names: Sequence[str] | None = None) -> list[Patch]:
    """Legend handles for :func:`overlay_image` colours (binary: the foreground only)."""
    colours = class_colours(n_classes) / 255.0
    if n_classes == 2:
        return [Patch(color=tuple(colours[1]),
                      label=class_names[1] if class_names else "class 1")]
    names = class_names or [f"class {k}" for k in range(n_classes)]
    return [Patch(color=tuple(c), label=name) for c, name in zip(colours, names, strict=False)]


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> None:
    """Render ``fig`` with the Agg canvas and write it as PNG, atomically."""
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


def sample_grid(path: str | os.PathLike, train: Sequence[Sample], validation: Sequence[Sample],
                n_classes: int, class_names: Sequence[str] | None = None) -> None:
    """Write a PNG grid of sample pairs: for each split a row of images and a row of labels
    overlaid on them, one column per sample.

    ``train``/``validation``: [(image (H, W, B) uint8/uint16, label (H, W) uint8, title)].
    ``n_classes``: label classes including background (2 for binary).
    """
    rows = [(split, kind, samples) for split, samples in
            (("train", train), ("validation", validation)) if samples
            for kind in ("image", "label")]
    n_cols = max([len(train), len(validation), 1])
    fig = Figure(figsize=(2.6 * n_cols, 2.7 * max(len(rows), 1) + 0.4), layout="constrained")
    axes = fig.subplots(max(len(rows), 1), n_cols, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for r, (split, kind, samples) in enumerate(rows):
        for c, (image, label, title) in enumerate(samples):
            shown = (to_display_rgb(image) if kind == "image"
                     else overlay_image(image, label, n_classes))
            axes[r, c].imshow(shown, interpolation="nearest")
            heading = f"{split}: {title}" if kind == "image" else "label"
            axes[r, c].set_title("\n".join(textwrap.wrap(heading, _TITLE_CHARS)), fontsize=7)
    if not rows:
        axes[0, 0].text(0.5, 0.5, "no samples", ha="center", va="center")
    fig.legend(handles=class_legend(n_classes, class_names), loc="outside lower center",
               ncol=min(n_classes, 6), fontsize=8)
    save_figure(fig, path)


def plot_history(history: Sequence[dict], path: str | os.PathLike) -> None:
    """Training curves from history.csv rows: loss and val_loss, mean IoU and val mean IoU
    (and val dice) per epoch, with the best (lowest val_loss) epoch marked. Rows without
    validation figures (empty, or None: no validation split) draw the training curves only."""
    epochs = [int(row["epoch"]) for row in history]
    validated = [row for row in history if _figure(row, "val_loss") is not None]
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    ax_loss, ax_iou = fig.subplots(1, 2)
    ax_loss.plot(epochs, [float(r["loss"]) for r in history], "o-", label="train")
    ax_iou.plot(epochs, [float(r["mean_iou"]) for r in history], "o-", label="train mean IoU")
    if validated:
        val_epochs = [int(r["epoch"]) for r in validated]
        ax_loss.plot(val_epochs, [_figure(r, "val_loss") for r in validated], "o-",
                     label="validation")
        best = min(validated, key=lambda r: _figure(r, "val_loss"))
        ax_loss.axvline(int(best["epoch"]), color="grey", ls=":",
                        label=f"best epoch {best['epoch']}")
        ax_iou.plot(val_epochs, [_figure(r, "val_mean_iou") for r in validated], "o-",
                    label="validation mean IoU")
        ax_iou.plot(val_epochs, [_figure(r, "val_dice") for r in validated], "s--",
                    label="validation dice")
    ax_loss.set(xlabel="epoch", ylabel="loss",
                title="loss" if validated else "loss (no validation split)")
    ax_iou.set(xlabel="epoch", ylabel="score", title="IoU / dice (threshold 0.5)", ylim=(0, 1))
    for ax in (ax_loss, ax_iou):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def _figure(row: dict, key: str) -> float | None:
    """``row[key]`` as a float; None when it is missing or empty (no validation split)."""
    value = row.get(key)
    return None if value is None or value == "" else float(value)


def plot_lr_schedule(rates: Sequence[float], path: str | os.PathLike) -> None:
    """The learning rate per epoch (epoch 1 first), on a log axis."""
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    ax.plot(range(1, len(rates) + 1), rates, "o-", ms=3)
    ax.set(xlabel="epoch", ylabel="learning rate", yscale="log",
           title="learning-rate schedule (warm-up, sustain, exponential decay)")
    ax.grid(alpha=0.3, which="both")
    save_figure(fig, path)


def plot_predictions(examples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                     n_classes: int, path: str | os.PathLike,
                     class_names: Sequence[str] | None = None,
                     row_titles: Sequence[str] | None = None) -> None:
    """Rows of image | label | prediction for validation examples.

    ``examples``: [(image (H, W, B) raw values, label (H, W) class indices, prediction
    (H, W) class indices)]; ``n_classes`` counts the background (2 for binary).
    ``row_titles``: one caption per row (e.g. the image name and its IoU), shown over the image.
    """
    n = max(len(examples), 1)
    fig = Figure(figsize=(7.5, 2.6 * n + 0.4), layout="constrained")
    axes = fig.subplots(n, 3, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for r, (image, label, pred) in enumerate(examples):
        for c, (shown, title) in enumerate(((to_display_rgb(image), "image"),
                                            (overlay_image(image, label, n_classes), "label"),
                                            (overlay_image(image, pred, n_classes),
                                             "prediction"))):
            axes[r, c].imshow(shown, interpolation="nearest")
            if c == 0 and row_titles is not None:
                title = row_titles[r]
            axes[r, c].set_title(title, fontsize=8)
    fig.legend(handles=class_legend(n_classes, class_names), loc="outside lower center",
               ncol=min(n_classes, 6), fontsize=8)
    save_figure(fig, path)
