"""Figures: how images, labels and results are shown to the user, written as PNG files.

Figures are drawn with matplotlib's Agg canvas directly (no GUI backend, no global pyplot
state), so they work on headless servers and in worker processes, and every file is
written atomically. Functions here take numpy arrays and paths; they never read datasets.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from res_unet.atomic import atomic_path

# Percentiles of the per-band stretch used to display high-bit-depth imagery.
STRETCH_PERCENTILES = (2.0, 98.0)
# Qualitative colours (tab10), class 0 first; longer class lists cycle through them.
_CLASS_COLOURS = np.array([
    (0.12, 0.47, 0.71), (1.00, 0.50, 0.05), (0.17, 0.63, 0.17), (0.84, 0.15, 0.16),
    (0.58, 0.40, 0.74), (0.55, 0.34, 0.29), (0.89, 0.47, 0.76), (0.50, 0.50, 0.50),
    (0.74, 0.74, 0.13), (0.09, 0.75, 0.81)])
# Binary labels: background is left uncoloured, water/foreground drawn in this colour.
_FOREGROUND = (0.0, 0.75, 1.0)
# Panel titles are wrapped to this many characters so neighbours do not overlap.
_TITLE_CHARS = 36

Sample = tuple[np.ndarray, np.ndarray, str]


def display_image(image: np.ndarray) -> np.ndarray:
    """An image (H, W) or (H, W, B) of any dtype as float RGB (H, W, 3) in [0, 1] for display.

    uint8 images are shown as they are; other dtypes (uint16, floats) get a per-band
    2-98 percentile stretch. More than three bands: the first three are shown; one band is
    shown in grey; two bands: the first in grey.
    """
    img = image if image.ndim == 3 else image[..., None]
    img = img[..., :3] if img.shape[-1] >= 3 else np.repeat(img[..., :1], 3, axis=-1)
    if img.dtype == np.uint8:
        return img.astype(np.float64) / 255.0
    out = np.empty(img.shape, dtype=np.float64)
    for b in range(3):
        band = img[..., b].astype(np.float64)
        lo, hi = np.percentile(band, STRETCH_PERCENTILES)
        out[..., b] = (band - lo) / (hi - lo) if hi > lo else 0.0
    return np.clip(out, 0.0, 1.0)


def class_colours(n_classes: int) -> np.ndarray:
    """RGB colours (n_classes, 3) in [0, 1], one per class index."""
    return _CLASS_COLOURS[np.arange(n_classes) % len(_CLASS_COLOURS)]


def overlay_label(rgb: np.ndarray, label: np.ndarray, n_classes: int,
                  alpha: float = 0.45) -> np.ndarray:
    """Blend class colours over an RGB image (H, W, 3) in [0, 1].

    ``label`` (H, W) holds class indices. Binary labels (``n_classes == 2``) colour only the
    foreground, so the image stays visible; multiclass labels colour every class with
    :func:`class_colours`. Returns (H, W, 3) floats in [0, 1].
    """
    valid = label < n_classes  # values beyond the classes (nodata 255) stay uncoloured
    if n_classes == 2:
        colours = np.array([(0.0, 0.0, 0.0), _FOREGROUND])
        weight = np.where(valid & (label > 0), alpha, 0.0)[..., None]
    else:
        colours = class_colours(n_classes)
        weight = np.where(valid, alpha, 0.0)[..., None]
    colour = colours[np.clip(label, 0, len(colours) - 1)]
    return rgb * (1.0 - weight) + colour * weight


def class_legend(n_classes: int, class_names: Sequence[str] | None = None) -> list[Patch]:
    """Legend handles for :func:`overlay_label` colours (binary: the foreground only)."""
    if n_classes == 2:
        return [Patch(color=_FOREGROUND, label=class_names[1] if class_names else "class 1")]
    names = class_names or [f"class {k}" for k in range(n_classes)]
    return [Patch(color=tuple(c), label=name)
            for c, name in zip(class_colours(n_classes), names, strict=False)]


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
            rgb = display_image(image)
            shown = rgb if kind == "image" else overlay_label(rgb, label, n_classes)
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
    (and val dice) per epoch, with the best (lowest val_loss) epoch marked."""
    epochs = [int(row["epoch"]) for row in history]
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    ax_loss, ax_iou = fig.subplots(1, 2)
    ax_loss.plot(epochs, [float(r["loss"]) for r in history], "o-", label="train")
    ax_loss.plot(epochs, [float(r["val_loss"]) for r in history], "o-", label="validation")
    best = min(history, key=lambda r: float(r["val_loss"]))
    ax_loss.axvline(int(best["epoch"]), color="grey", ls=":", label=f"best epoch {best['epoch']}")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_iou.plot(epochs, [float(r["mean_iou"]) for r in history], "o-", label="train mean IoU")
    ax_iou.plot(epochs, [float(r["val_mean_iou"]) for r in history], "o-",
                label="validation mean IoU")
    ax_iou.plot(epochs, [float(r["val_dice"]) for r in history], "s--", label="validation dice")
    ax_iou.set(xlabel="epoch", ylabel="score", title="IoU / dice (threshold 0.5)", ylim=(0, 1))
    for ax in (ax_loss, ax_iou):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


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
        rgb = display_image(image)
        for c, (shown, title) in enumerate(((rgb, "image"),
                                            (overlay_label(rgb, label, n_classes), "label"),
                                            (overlay_label(rgb, pred, n_classes), "prediction"))):
            axes[r, c].imshow(shown, interpolation="nearest")
            if c == 0 and row_titles is not None:
                title = row_titles[r]
            axes[r, c].set_title(title, fontsize=8)
    fig.legend(handles=class_legend(n_classes, class_names), loc="outside lower center",
               ncol=min(n_classes, 6), fontsize=8)
    save_figure(fig, path)
