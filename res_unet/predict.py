"""Segmentation of new imagery with trained run folders: the library behind seg_images_in_folder.

A run folder (``train_resunet --out``) is loaded with :func:`load_run`; one or several of them
(an ensemble) segment images through a :class:`Segmenter`, in one of two modes:

- ``resize`` (the original toolbox's behaviour): the whole image is scaled to fit the model
  input keeping its aspect ratio (:func:`res_unet.tiling.resize_to_fit`), predicted once, and
  the probabilities are scaled back (:func:`predict_resize`).
- ``tile`` (INFER_MODE 'auto' picks it for images larger than the model input): overlapping
  tiles (TILE_OVERLAP), reflect-padded at the image edges, predicted in batches and blended
  with a smooth window (BLEND_WINDOW) divided by the accumulated window weight, so there are
  no seams and no bias towards tile centres (:func:`predict_tiled`, :func:`iter_strips`).

Test-time augmentation averages the probabilities over flips (and, with TTA_ROT90 and square
tiles, the 90-degree rotations: the 8 symmetries of the square); ensembles average every
member's probabilities. Both are means in probability space over the spatial axes only.

Memory. An image is read whole (uint8/uint16, H*W*B bytes or twice that). Small images keep
their (H, W, C) float32 probabilities and go through :func:`res_unet.postprocess.postprocess`
as is. Larger ones (more than ``FULL_MAX_VALUES`` probability values) are predicted in
horizontal strips of tile rows (:func:`iter_strips`): only a band about one tile high holds
float32 probabilities; rows no later tile touches are finished, thresholded (or arg-maxed)
into the (H, W) uint8 label (1 byte per pixel, or 2 bytes with THRESHOLD 'otsu', whose
threshold needs every probability: they are kept quantised to 1/65535) and, with
``--save-probs``, streamed to disk. The label clean-up (median, morphology, small objects and
holes) then runs on the whole label map, as it involves whole connected components. A
20000 x 20000 RGB scene thus needs about 1.2 GB for the image, 0.4 GB for the label and a
few more label-sized temporaries for clean-up; never the 1.6 GB-per-class probability cube.
The dense CRF is the exception: it needs the whole probability map (H*W*C*4 bytes, plus
about three times that while :func:`res_unet.postprocess.crf_refine` works, on a grid it
down-samples beyond CRF_MAX_PIXELS). The overlay of images above ``OVERLAY_MAX_PIXELS`` is
drawn on a regularly sub-sampled grid (it is for viewing; the label files are full size).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import rasterio
import rasterio.errors
import tensorflow as tf
from rasterio.windows import Window
from skimage.filters import threshold_otsu

from res_unet import __version__, imagery, metrics, postprocess, report
from res_unet.atomic import atomic_path, check_writable, clean_stale_temporaries, write_atomic
from res_unet.config import Config, config_from_dict, load_config, upgrade_keys
from res_unet.errors import UserError
from res_unet.models import build_model
from res_unet.tiling import (
    TileBlender,
    blend_window,
    downsample_image,
    downsampled_shape,
    extract_tile,
    resize_to_fit,
    tile_origins,
    undo_fit,
    upsample_rows,
)
from res_unet.train import (
    BEST_WEIGHTS,
    FULL_MODEL,
    check_intact,
    load_weights_checked,
)

LABEL_NODATA = 255
# The label map of image NAME is NAME + LABEL_SUFFIX in the output folder.
LABEL_SUFFIX = "_predseg.png"
# Probability values (H * W * C) above which an image is predicted strip by strip: 256 MB
# of float32; below it the whole map is kept, which costs nothing worth saving.
FULL_MAX_VALUES = 64_000_000
# Rows interpolated at a time when a DOWNSAMPLE model's map goes back to full resolution.
UPSAMPLE_ROWS = 1024
# With labels, the first few scored images are drawn (image | label | prediction), each
# shown at most this many pixels on its longer side.
FIGURE_ROWS = 4
FIGURE_MAX_SIDE = 512
# Overlays larger than this are drawn on a sub-sampled grid: a viewer cannot show more.
OVERLAY_MAX_PIXELS = 30_000_000
OVERLAY_ALPHA = 0.4
_OTSU_LEVELS = 65535

# Config keys a segmentation --config may set; everything else comes from the run folder.
INFERENCE_KEYS = (
    *(f.name for f in dataclasses.fields(Config) if f.metadata["group"] == "segmentation"),
    "TILE_OVERLAP", "BATCH_SIZE", "USEMASK", "REMAP_CLASSES", "EXTRA_BAND_DIRS", "SET_GPU",
)

# Overlay colours: binary foreground, then classes 0, 1, ... of multiclass maps (cycled).
_BINARY_COLOUR = (255, 0, 255)
_PALETTE = np.array([
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
], dtype=np.uint8)


# Run folders --------------------------------------------------------------------------------

@dataclass
class LoadedModel:
    """A trained model ready for inference.

    ``model`` maps float32 raw pixels (N, *tile_hw, n_bands) to float32 probabilities
    (N, *tile_hw, n_outputs): 1 sigmoid channel for binary models, else one softmax channel
    per class. ``threshold`` is the model card's validation-optimal binary threshold.
    """

    model: keras.Model
    tile_hw: tuple[int, int]
    n_bands: int
    n_outputs: int
    threshold: float | None = None
    downsample: int = 1
    input_dtype: str | None = None
    run_dir: Path | None = None
    card: dict[str, Any] = field(default_factory=dict)
    weights: Path | None = None
    _fn: Any = field(default=None, repr=False)

    @property
    def binary(self) -> bool:
        """Whether the model has one sigmoid output (classes 0 and 1)."""
        return self.n_outputs == 1

    @property
    def n_classes(self) -> int:
        """Label classes: 2 for binary models, else the number of outputs."""
        return 2 if self.binary else self.n_outputs

    @classmethod
    def from_model(cls, model: keras.Model, tile_hw: Sequence[int] | None = None,
                   threshold: float | None = None) -> LoadedModel:
        """Wrap an in-memory Keras model; ``tile_hw`` defaults to its input size."""
        shape = model.input_shape
        hw = tuple(int(v) for v in (tile_hw or shape[1:3]))
        return cls(model=model, tile_hw=(hw[0], hw[1]), n_bands=int(shape[-1]),
                   n_outputs=int(model.output_shape[-1]), threshold=threshold)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities (N, h, w, n_outputs) float32 of a float32 batch (N, h, w, n_bands)."""
        if self._fn is None:
            model = self.model
            spec = tf.TensorSpec([None, *self.tile_hw, self.n_bands], tf.float32)
            self._fn = tf.function(lambda x: tf.cast(model(x, training=False), tf.float32),
                                   input_signature=[spec])
        return self._fn(tf.constant(batch, tf.float32)).numpy()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read it as JSON ({exc}); restore it from the "
                        "training run or re-run train_resunet --evaluate-only") from None


def _check_run_folder(run_dir: Path) -> None:
    fix = ("pass the folder train_resunet --out wrote (with model_card.json, config.json and "
           f"{BEST_WEIGHTS} or {FULL_MODEL})")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: run folder not found; {fix}")
    missing = [n for n in ("model_card.json", "config.json") if not (run_dir / n).is_file()]
    if not (run_dir / BEST_WEIGHTS).is_file() and not (run_dir / FULL_MODEL).is_file():
        missing.append(f"{BEST_WEIGHTS} or {FULL_MODEL}")
    if missing:
        raise UserError(f"{run_dir}: not a run folder (no {', '.join(missing)}); {fix}")


def load_run(run_dir: str | os.PathLike, tile_hw: Sequence[int] | None = None) -> LoadedModel:
    """Load a run folder for inference.

    ``tile_hw`` is the input size wanted (rows, cols); default the model card's. At that
    size ``model.keras`` is loaded as saved (compile=False); at another size the model is
    rebuilt from config.json and the card's band statistics, and ``best.weights.h5`` loaded.
    Raises UserError when ``run_dir`` is not a run folder, its files are damaged, or
    ``tile_hw`` does not suit the architecture.
    """
    run_dir = Path(run_dir)
    _check_run_folder(run_dir)
    card_path, config_path = run_dir / "model_card.json", run_dir / "config.json"
    card = _read_json(card_path)
    cfg, _ = config_from_dict(_read_json(config_path), source=str(config_path))
    try:
        size = (int(card["input"]["size"][0]), int(card["input"]["size"][1]))
        bands = int(card["input"]["bands"])
        mean, std = list(card["input"]["band_mean"]), list(card["input"]["band_std"])
        n_outputs = 1 if card["binary"] else int(card["classes"])
        downsample = int(card["input"].get("downsample", 1))
        input_dtype = card["input"].get("dtype")
    except (KeyError, TypeError, ValueError, IndexError):
        raise UserError(f"{card_path}: the model card lacks input size, bands, band "
                        "statistics or classes; re-run train_resunet --evaluate-only on this "
                        "folder to rewrite it") from None
    want = (int(tile_hw[0]), int(tile_hw[1])) if tile_hw is not None else size
    full, weights = run_dir / FULL_MODEL, run_dir / BEST_WEIGHTS
    if want == size and full.is_file():
        check_intact(full)
        try:
            model = keras.models.load_model(full, compile=False)
        except (ValueError, OSError, KeyError, TypeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"{full}: cannot load the model ({first[:200]}); restore the file "
                            "or delete it to use best.weights.h5") from None
        source = full
    else:
        try:
            # The run's weights replace any pretrained encoder: never read (or download) it.
            model = build_model(dataclasses.replace(cfg, ENCODER_WEIGHTS=None), mean, std,
                                input_shape=(*want, bands))
        except ValueError as exc:
            raise UserError(f"{run_dir}: cannot build the model for {want[0]}x{want[1]} tiles "
                            f"({exc}); pick a tile size divisible by "
                            f"{cfg.downsampling_factor}") from None
        source = weights if weights.is_file() else full
        load_weights_checked(model, source)
    if int(model.output_shape[-1]) != n_outputs or int(model.input_shape[-1]) != bands:
        raise UserError(f"{source}: the model takes {model.input_shape[-1]} bands and gives "
                        f"{model.output_shape[-1]} outputs but {card_path} says {bands} and "
                        f"{n_outputs}; use the files of one training run")
    threshold = card.get("threshold")
    return LoadedModel(model=model, tile_hw=want, n_bands=bands, n_outputs=n_outputs,
                       threshold=None if threshold is None else float(threshold),
                       downsample=downsample, input_dtype=input_dtype, run_dir=run_dir,
                       card=card, weights=source)


def inference_config(run_dirs: Sequence[str | os.PathLike], config_path: str | None = None,
                     overrides: dict[str, Any] | None = None) -> Config:
    """The settings to segment with: the first run's config.json, then the segmentation keys
    (``INFERENCE_KEYS``) set in ``config_path``, then ``overrides`` (command-line flags).

    EXTRA_BAND_DIRS of the run describe its training images, so they are dropped unless
    ``config_path`` names the new images' extra-band folders. Raises UserError for invalid
    values, naming the source.
    """
    if not run_dirs:
        raise UserError("command line: no --model given; pass a run folder of train_resunet")
    first = Path(run_dirs[0])
    _check_run_folder(first)
    run_cfg, _ = config_from_dict(_read_json(first / "config.json"),
                                  source=str(first / "config.json"))
    values = run_cfg.to_dict()
    values["EXTRA_BAND_DIRS"] = []
    if config_path is not None:
        user = load_config(config_path)
        raw, _ = upgrade_keys(_read_json(Path(config_path)), str(config_path))
        values.update({k: getattr(user, k) for k in raw if k in INFERENCE_KEYS})
    values.update(overrides or {})
    cfg, _ = config_from_dict(values, source="command line")
    return cfg


# Prediction ----------------------------------------------------------------------------------

def tta_transforms(tta: bool, rot90: bool) -> list[tuple[int, bool]]:
    """Test-time augmentations as (quarter turns k, then horizontal flip) pairs.

    Without ``tta`` only the identity; with it the identity, horizontal, vertical and both
    flips ((0, F), (0, T), (2, T), (2, F)); with ``rot90`` also the four transforms with an
    odd number of quarter turns (the 8 symmetries of a square).
    """
    if not tta:
        return [(0, False)]
    flips = [(0, False), (0, True), (2, True), (2, False)]
    return flips + ([(1, False), (1, True), (3, False), (3, True)] if rot90 else [])


def _forward(batch: np.ndarray, k: int, flip: bool) -> np.ndarray:
    out = np.rot90(batch, k, axes=(1, 2))
    return np.ascontiguousarray(out[:, :, ::-1] if flip else out)


def _inverse(batch: np.ndarray, k: int, flip: bool) -> np.ndarray:
    out = batch[:, :, ::-1] if flip else batch
    return np.rot90(out, -k, axes=(1, 2))


def predict_batch(models: Sequence[LoadedModel], batch: np.ndarray, tta: bool = False,
                  rot90: bool = False) -> np.ndarray:
    """Mean probabilities (N, h, w, C) float32 of a batch of raw pixels (N, h, w, B).

    Averages over every model and every test-time augmentation (:func:`tta_transforms`;
    rotations only for square tiles). Augmentations act on the two spatial axes only.
    """
    batch = np.asarray(batch, dtype=np.float32)
    transforms = tta_transforms(tta, rot90 and batch.shape[1] == batch.shape[2])
    total: np.ndarray | None = None
    for model in models:
        for k, flip in transforms:
            prob = _inverse(model(_forward(batch, k, flip)), k, flip)
            total = prob.copy() if total is None else np.add(total, prob, out=total)
    assert total is not None
    total /= len(models) * len(transforms)
    return total


def predict_resize(models: Sequence[LoadedModel], image: np.ndarray, tta: bool = False,
                   rot90: bool = False) -> np.ndarray:
    """Resize mode: (H, W, B) raw image -> (H, W, C) float32 probabilities.

    The image is fitted to the models' input (aspect kept, reflect-padded), predicted once
    and the probabilities are cropped and scaled back bilinearly to (H, W).
    """
    fitted, info = resize_to_fit(image, models[0].tile_hw, order=1)
    prob = predict_batch(models, fitted[None], tta, rot90)[0]
    return undo_fit(prob, info)


def _tile_predictions(models: Sequence[LoadedModel], image: np.ndarray,
                      origins: list[tuple[int, int]], tile_hw: tuple[int, int],
                      batch_size: int, tta: bool, rot90: bool
                      ) -> Iterator[tuple[int, int, np.ndarray]]:
    """(row, col, probabilities (th, tw, C)) of every tile, in the order of ``origins``."""
    for start in range(0, len(origins), batch_size):
        chunk = origins[start:start + batch_size]
        batch = np.stack([extract_tile(image, r, c, tile_hw) for r, c in chunk])
        probs = predict_batch(models, batch, tta, rot90)
        for (r, c), prob in zip(chunk, probs, strict=True):
            yield r, c, prob


def predict_tiled(models: Sequence[LoadedModel], image: np.ndarray, tile_hw: Sequence[int],
                  overlap: float, window: str = "hann", batch_size: int = 8, tta: bool = False,
                  rot90: bool = False) -> np.ndarray:
    """Tiled mode, whole image at once: (H, W, B) raw image -> (H, W, C) float32 probabilities.

    Tiles of ``tile_hw`` overlapping by the fraction ``overlap`` cover the image (edges
    reflect-padded); their probabilities are blended with ``blend_window(tile_hw, window)``
    and divided by the summed window weight. Holds the whole (H, W, C) map: for large
    images use :func:`iter_strips`, which gives the same values strip by strip.
    """
    th, tw = int(tile_hw[0]), int(tile_hw[1])
    rows = tile_origins(image.shape[0], th, overlap)
    cols = tile_origins(image.shape[1], tw, overlap)
    blender = TileBlender(image.shape[:2], models[0].n_outputs, blend_window((th, tw), window))
    for r, c, prob in _tile_predictions(models, image, [(r, c) for r in rows for c in cols],
                                        (th, tw), batch_size, tta, rot90):
        blender.add(prob, r, c)
    return blender.result()


class _StripAccumulator:
    """Window-weighted sums of tile probabilities for a band of image rows [start, end)."""

    def __init__(self, height: int, width: int, channels: int, window: np.ndarray) -> None:
        self.height, self.width, self.window = height, width, window
        self.start = 0
        self.sum = np.zeros((0, width, channels), np.float32)
        self.weight = np.zeros((0, width), np.float32)

    def add(self, prob: np.ndarray, r0: int, c0: int) -> None:
        th, tw = self.window.shape
        r_hi, c_hi = min(r0 + th, self.height), min(c0 + tw, self.width)
        grow = r_hi - (self.start + len(self.sum))
        if grow > 0:
            self.sum = np.concatenate([self.sum, np.zeros((grow, *self.sum.shape[1:]),
                                                          np.float32)])
            self.weight = np.concatenate([self.weight, np.zeros((grow, self.width),
                                                                np.float32)])
        win = self.window[:r_hi - r0, :c_hi - c0]
        rows = slice(r0 - self.start, r_hi - self.start)
        self.sum[rows, c0:c_hi] += prob[:r_hi - r0, :c_hi - c0] * win[..., None]
        self.weight[rows, c0:c_hi] += win

    def pop(self, end: int) -> np.ndarray:
        """Blended probabilities of rows [start, end), which no later tile may touch."""
        n = end - self.start
        out = self.sum[:n] / self.weight[:n, :, None]
        self.sum, self.weight = self.sum[n:].copy(), self.weight[n:].copy()
        self.start = end
        return out


def iter_strips(models: Sequence[LoadedModel], image: np.ndarray, tile_hw: Sequence[int],
                overlap: float, window: str = "hann", batch_size: int = 8, tta: bool = False,
                rot90: bool = False) -> Iterator[tuple[int, np.ndarray]]:
    """Tiled mode, memory-bounded: yields ``(first_row, probabilities (rows, W, C) float32)``
    strips from top to bottom that together cover every row exactly once.

    Same tiles, window and values as :func:`predict_tiled` (up to float rounding of batch
    composition), but only a band of about one tile height (plus one batch of tiles) holds
    probabilities: after each row of tiles the rows above the next row of tiles are final.
    """
    th, tw = int(tile_hw[0]), int(tile_hw[1])
    height, width = image.shape[:2]
    rows = tile_origins(height, th, overlap)
    cols = tile_origins(width, tw, overlap)
    acc = _StripAccumulator(height, width, models[0].n_outputs, blend_window((th, tw), window))
    origins = [(r, c) for r in rows for c in cols]
    for i, (r, c, prob) in enumerate(_tile_predictions(models, image, origins, (th, tw),
                                                       batch_size, tta, rot90)):
        acc.add(prob, r, c)
        if (i + 1) % len(cols) == 0:
            row_index = (i + 1) // len(cols)
            end = rows[row_index] if row_index < len(rows) else height
            first = acc.start
            yield first, acc.pop(end)


# Labels ------------------------------------------------------------------------------------

def nodata_values(meta: imagery.RasterMeta, nodata_zero: bool) -> list[float]:
    """Pixel values meaning 'no data': the raster's declared nodata, and 0 if ``nodata_zero``."""
    values = []
    if meta.nodata is not None and math.isfinite(meta.nodata):
        values.append(float(meta.nodata))
    if nodata_zero and 0.0 not in values:
        values.append(0.0)
    return values


def nodata_mask(image: np.ndarray, values: Sequence[float]) -> np.ndarray:
    """(H, W) bool: True where every band of ``image`` (H, W, B) equals one of ``values``."""
    mask = np.zeros(image.shape[:2], bool)
    for value in values:
        mask |= np.all(image == value, axis=-1)
    return mask


def _otsu_from_histogram(counts: np.ndarray) -> float:
    """Otsu's threshold in [0, 1] from counts of probabilities quantised to 1/_OTSU_LEVELS."""
    present = np.flatnonzero(counts)
    if len(present) < 2:
        return 0.5
    lo, hi = present[0], present[-1] + 1
    centres = np.arange(lo, hi) / _OTSU_LEVELS
    return float(threshold_otsu(hist=(counts[lo:hi], centres)))


ProbabilitySink = Callable[[int, np.ndarray], None]


class Segmenter:
    """An ensemble of loaded models plus the segmentation settings of a Config.

    ``cfg`` supplies INFER_MODE, TILE_OVERLAP, BLEND_WINDOW, BATCH_SIZE, TESTTIMEAUG,
    TTA_ROT90 and the post-processing keys. The models must agree on bands, outputs and
    input (tile) size. The binary threshold is cfg.THRESHOLD when set, else the mean of the
    members' model-card thresholds, else 0.5.
    """

    def __init__(self, models: Sequence[LoadedModel], cfg: Config,
                 full_max_values: int = FULL_MAX_VALUES) -> None:
        if not models:
            raise UserError("command line: no model given; pass at least one --model")
        first = models[0]
        for other in models[1:]:
            name = other.run_dir or "an ensemble member"
            if other.n_bands != first.n_bands:
                raise UserError(f"{name}: takes {other.n_bands} bands but {first.run_dir} takes "
                                f"{first.n_bands}; ensemble members must use the same bands")
            if other.n_outputs != first.n_outputs:
                raise UserError(f"{name}: has {other.n_classes} classes "
                                f"({'binary' if other.binary else 'multiclass'}) but "
                                f"{first.run_dir} has {first.n_classes}; ensemble members "
                                "must predict the same classes")
            if other.tile_hw != first.tile_hw:
                raise ValueError("ensemble members must be loaded at the same tile size")
            if other.downsample != first.downsample:
                raise UserError(f"{name}: works at DOWNSAMPLE={other.downsample} but "
                                f"{first.run_dir} at {first.downsample}; ensemble members "
                                "must work at the same scale")
        self.models = list(models)
        self.cfg = cfg
        self.tile_hw = first.tile_hw
        self.downsample = first.downsample
        dtypes = {m.input_dtype for m in models if m.input_dtype is not None}
        if len(dtypes) > 1:
            raise UserError(f"ensemble members were trained on {' and '.join(sorted(dtypes))} "
                            "imagery; use members trained on the same data type")
        self.input_dtype = dtypes.pop() if dtypes else None
        self.n_bands, self.n_outputs, self.n_classes = (first.n_bands, first.n_outputs,
                                                        first.n_classes)
        self.full_max_values = full_max_values
        thresholds = [m.threshold for m in models if m.threshold is not None]
        self.card_threshold = float(np.mean(thresholds)) if thresholds else None
        self.rot90 = cfg.TTA_ROT90 and self.tile_hw[0] == self.tile_hw[1]

    @property
    def threshold_setting(self) -> float | str | None:
        """The binary threshold in use: a number or 'otsu'; None for multiclass models."""
        if self.n_outputs != 1:
            return None
        if self.cfg.THRESHOLD is not None:
            return self.cfg.THRESHOLD
        return 0.5 if self.card_threshold is None else self.card_threshold

    def mode_for(self, shape_hw: Sequence[int]) -> str:
        """'tile' or 'resize' for a source image of ``shape_hw`` under INFER_MODE (decided on
        its size at the working scale, 1/DOWNSAMPLE)."""
        if self.cfg.INFER_MODE != "auto":
            return self.cfg.INFER_MODE
        rows, cols = downsampled_shape(shape_hw, self.downsample)
        larger = rows > self.tile_hw[0] or cols > self.tile_hw[1]
        return "tile" if larger else "resize"

    def _probabilities_at_scale(self, image: np.ndarray) -> np.ndarray:
        """(h, w, C) probabilities of an image already at the working scale."""
        cfg = self.cfg
        if self.mode_for(np.multiply(image.shape[:2], self.downsample)) == "resize":
            return predict_resize(self.models, image, cfg.TESTTIMEAUG, self.rot90)
        return predict_tiled(self.models, image, self.tile_hw, cfg.TILE_OVERLAP,
                             cfg.BLEND_WINDOW, cfg.BATCH_SIZE, cfg.TESTTIMEAUG, self.rot90)

    def probabilities(self, image: np.ndarray) -> np.ndarray:
        """The whole (H, W, C) float32 probability map of a raw (H, W, B) image."""
        if self.downsample == 1:
            return self._probabilities_at_scale(image)
        small = self._probabilities_at_scale(downsample_image(image, self.downsample))
        return upsample_rows(small, self.downsample, image.shape[:2])

    def strips(self, image: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """Probabilities as (first_row, (rows, W, C)) strips (one strip in resize mode)."""
        cfg = self.cfg
        if self.downsample > 1:
            # The down-sampled map is DOWNSAMPLE**2 times smaller: predict it whole, then
            # interpolate back to full resolution a block of rows at a time.
            small = self._probabilities_at_scale(downsample_image(image, self.downsample))
            for r0 in range(0, image.shape[0], UPSAMPLE_ROWS):
                r1 = min(r0 + UPSAMPLE_ROWS, image.shape[0])
                yield r0, upsample_rows(small, self.downsample, image.shape[:2], r0, r1)
            return
        if self.mode_for(image.shape[:2]) == "resize":
            yield 0, predict_resize(self.models, image, cfg.TESTTIMEAUG, self.rot90)
            return
        yield from iter_strips(self.models, image, self.tile_hw, cfg.TILE_OVERLAP,
                               cfg.BLEND_WINDOW, cfg.BATCH_SIZE, cfg.TESTTIMEAUG, self.rot90)

    def check_dtype(self, image: np.ndarray, source: str | os.PathLike = "image") -> None:
        """Raise UserError when the image's data type is not the one the models were trained
        on: 16-bit reflectances through an 8-bit model give confident nonsense."""
        if self.input_dtype is None or image.dtype.name == self.input_dtype:
            return
        bits = {"uint8": "8-bit", "uint16": "16-bit"}
        raise UserError(
            f"{source}: {bits.get(image.dtype.name, image.dtype.name)} ({image.dtype.name}) "
            f"image but the model was trained on {bits.get(self.input_dtype, self.input_dtype)} "
            f"({self.input_dtype}) imagery; convert it the way the training images were made "
            "(e.g. gdal_translate -ot Byte -scale MIN MAX 0 255 for 8 bits), or use a model "
            f"trained on {image.dtype.name} imagery")

    def uses_strips(self, shape_hw: Sequence[int]) -> bool:
        """Whether an image of ``shape_hw`` is segmented strip by strip (memory-bounded)."""
        big = shape_hw[0] * shape_hw[1] * self.n_outputs > self.full_max_values
        strippable = self.mode_for(shape_hw) == "tile" or self.downsample > 1
        return big and strippable and not self.cfg.DO_CRF_REFINE

    def segment(self, image: np.ndarray, nodata: Sequence[float] = (),
                on_probs: ProbabilitySink | None = None) -> np.ndarray:
        """Raw (H, W, B) image -> post-processed (H, W) uint8 label map.

        Pixels whose bands all equal a ``nodata`` value are LABEL_NODATA (255). ``on_probs``
        receives the probabilities as (first_row, (rows, W, C) float32) pieces covering the
        image top to bottom, NaN at nodata pixels (for saving them).
        """
        if image.shape[-1] != self.n_bands:
            raise ValueError(f"image has {image.shape[-1]} bands, the model takes {self.n_bands}")
        self.check_dtype(image)
        if self.uses_strips(image.shape[:2]):
            label = self._segment_strips(image, nodata, on_probs)
        else:
            prob = self.probabilities(image)
            invalid = nodata_mask(image, nodata)
            cfg = self.cfg
            if (self.threshold_setting == "otsu" and not cfg.DO_CRF_REFINE and invalid.any()
                    and not invalid.all()):
                # A nodata collar would drag Otsu's threshold; take it from valid pixels only.
                cut = postprocess.otsu_threshold(prob[~invalid][:, None, :])
                cfg = dataclasses.replace(cfg, THRESHOLD=cut)
            label = postprocess.postprocess(prob, image, cfg, self.card_threshold)
            label[invalid] = LABEL_NODATA
            if on_probs is not None:
                prob[invalid] = np.nan
                on_probs(0, prob)
        return label

    def _segment_strips(self, image: np.ndarray, nodata: Sequence[float],
                        on_probs: ProbabilitySink | None) -> np.ndarray:
        otsu = self.threshold_setting == "otsu"
        cut = 0.5 if otsu or self.n_outputs != 1 else float(self.threshold_setting)
        store = np.empty(image.shape[:2], np.uint16 if otsu else np.uint8)
        counts = np.zeros(_OTSU_LEVELS + 1, np.int64)
        for r0, prob in self.strips(image):
            rows = slice(r0, r0 + len(prob))
            invalid = nodata_mask(image[rows], nodata)
            if otsu:
                quantised = np.rint(prob[..., 0] * _OTSU_LEVELS).astype(np.uint16)
                store[rows] = quantised
                counts += np.bincount(quantised[~invalid], minlength=_OTSU_LEVELS + 1)
            else:
                store[rows] = postprocess.probs_to_label(prob, cut)
            if on_probs is not None:
                prob[invalid] = np.nan
                on_probs(r0, prob)
        if otsu:
            # Otsu's threshold is a histogram level; that level itself is background.
            level = math.floor(_otsu_from_histogram(counts) * _OTSU_LEVELS + 1e-6) + 1
            label = np.empty(store.shape, np.uint8)
            for r0 in range(0, len(store), 1024):
                label[r0:r0 + 1024] = store[r0:r0 + 1024] >= level
            del store
        else:
            label = store
        label = postprocess.clean_label(label, self.cfg, self.n_classes)
        # Row blocks: a whole-image nodata mask would cost another byte per pixel.
        for r0 in range(0, label.shape[0], 1024):
            rows = slice(r0, r0 + 1024)
            label[rows][nodata_mask(image[rows], nodata)] = LABEL_NODATA
        return label


# Outputs -----------------------------------------------------------------------------------

def overlay_image(image: np.ndarray, label: np.ndarray, n_classes: int,
                  max_pixels: int = OVERLAY_MAX_PIXELS) -> np.ndarray:
    """The image with coloured classes (alpha OVERLAY_ALPHA) and class outlines, uint8 RGB.

    ``image`` (H, W, B) raw values are shown through their first three bands (uint16 and
    others stretched 2-98 percent); ``label`` (H, W) class indices, LABEL_NODATA uncoloured.
    Binary maps colour class 1 only. Images above ``max_pixels`` are drawn sub-sampled by
    the smallest integer step that fits.
    """
    step = max(1, math.ceil(math.sqrt(image.shape[0] * image.shape[1] / max_pixels)))
    if step > 1:
        image, label = image[::step, ::step], label[::step, ::step]
    out = postprocess.to_display_rgb(image)
    if n_classes == 2:
        colours = {1: np.array(_BINARY_COLOUR, np.uint16)}
    else:
        colours = {k: _PALETTE[k % len(_PALETTE)].astype(np.uint16) for k in range(n_classes)}
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


@contextlib.contextmanager
def _probability_file(path: Path, shape_hw: tuple[int, int], channels: int,
                      meta: imagery.RasterMeta) -> Iterator[ProbabilitySink]:
    """A sink writing probability strips into ``path`` (.npy float16 or .tif float32 with
    ``meta``'s georeferencing and NaN nodata), atomically: renamed when the block ends."""
    height, width = shape_hw
    with atomic_path(path) as tmp:
        if path.suffix == ".npy":
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                              shape=(height, width, channels))

            def write_npy(r0: int, prob: np.ndarray) -> None:
                array[r0:r0 + len(prob)] = prob

            yield write_npy
            array.flush()
            del array
            return
        profile = {"driver": "GTiff", "height": height, "width": width, "count": channels,
                   "dtype": "float32", "crs": meta.crs, "transform": meta.transform,
                   "nodata": float("nan"), "compress": "deflate", "predictor": 3,
                   "tiled": True, "blockxsize": 256, "blockysize": 256,
                   "BIGTIFF": "IF_SAFER"}
        with rasterio.Env(GDAL_PAM_ENABLED="NO"), rasterio.open(tmp, "w", **profile) as ds:

            def write_tif(r0: int, prob: np.ndarray) -> None:
                ds.write(np.moveaxis(prob.astype(np.float32, copy=False), -1, 0),
                         window=Window(0, r0, width, len(prob)))

            yield write_tif


def output_paths(out_dir: Path, pair: imagery.Pair, save_probs: bool = False,
                 geojson: bool = False, binary: bool = True) -> dict[str, Path]:
    """Output files of one image NAME: label (NAME_predseg.png), overlay (NAME_overlay.png),
    geotiff (NAME_predseg.tif, TIFF inputs), probs (NAME_probs.npy, or .tif for TIFF inputs)
    and geojson (NAME_predseg.geojson, binary models) when asked for."""
    tiff = pair.image.suffix.lower() in (".tif", ".tiff")
    stem = pair.stem
    paths = {"label": out_dir / f"{stem}{LABEL_SUFFIX}", "overlay": out_dir / f"{stem}_overlay.png"}
    if tiff:
        paths["geotiff"] = out_dir / f"{stem}_predseg.tif"
    if save_probs:
        paths["probs"] = out_dir / f"{stem}_probs{'.tif' if tiff else '.npy'}"
    if geojson and binary:
        paths["geojson"] = out_dir / f"{stem}_predseg.geojson"
    return paths


def segment_image(segmenter: Segmenter, pair: imagery.Pair, paths: dict[str, Path]
                  ) -> tuple[np.ndarray, int]:
    """Segment one image and write its outputs (``output_paths``), each atomically.

    Returns (label (H, W) uint8 with LABEL_NODATA at nodata, pixel count). Raises UserError
    for unreadable images or a band count the models do not take.
    """
    cfg = segmenter.cfg
    image, meta = imagery.load_image(pair, cfg, for_model=True)
    segmenter.check_dtype(image, pair.image)
    nodata = nodata_values(meta, cfg.NODATA_ZERO)
    with contextlib.ExitStack() as stack:
        sink = None
        if "probs" in paths:
            sink = stack.enter_context(_probability_file(paths["probs"], image.shape[:2],
                                                         segmenter.n_outputs, meta))
        try:
            label = segmenter.segment(image, nodata, sink)
        except tf.errors.ResourceExhaustedError:
            raise UserError(f"{pair.image}: out of memory at batch size {cfg.BATCH_SIZE}; lower "
                            "--batch-size (or --tile-size)") from None
    if "geotiff" in paths:
        imagery.write_geotiff(paths["geotiff"], label, meta, nodata=LABEL_NODATA)
    if "geojson" in paths:
        collection = postprocess.mask_to_geojson(label, meta.transform, meta.crs)
        write_atomic(paths["geojson"], json.dumps(collection))
    imagery.write_png(paths["overlay"], overlay_image(image, label, segmenter.n_classes))
    imagery.write_png(paths["label"], label)
    return label, image.shape[0] * image.shape[1]


# Evaluation --------------------------------------------------------------------------------

def read_truth(pair: imagery.Pair, cfg: Config, shape: tuple[int, int]) -> np.ndarray:
    """The pair's label file as class indices (H, W); raises UserError unless it is ``shape``
    (the image's, as rows and columns)."""
    truth = imagery.prepare_label(imagery.read_label(pair.label), cfg, pair.label)
    if truth.shape != shape:
        raise UserError(f"{pair.label}: label is {truth.shape[1]}x{truth.shape[0]} (WxH) but "
                        f"its image {pair.image} is {shape[1]}x{shape[0]}; labels "
                        "must cover their image pixel for pixel")
    return truth


def score_label(label: np.ndarray, truth: np.ndarray, cfg: Config, n_classes: int
                ) -> np.ndarray:
    """Confusion matrix (n_classes x n_classes, rows truth) of a predicted label map against
    the true one; nodata predictions and IGNORE_CLASS truth pixels are not counted."""
    valid = label != LABEL_NODATA
    return metrics.confusion_matrix(truth[valid], label[valid], n_classes,
                                    ignore_class=cfg.IGNORE_CLASS)


def evaluate_scenes(run_dir: str | os.PathLike, data_dir: str | os.PathLike,
                    progress: bool = True) -> dict[str, Any] | None:
    """Score a run on the whole validation scenes of its dataset, segmented as users run
    seg_images_in_folder (working scale, tiles, blending and the TTA the config enables),
    and for binary models choose the threshold there.

    The validation images are those the dataset manifest lists, read from the folders it
    was built from, at full resolution against their full-resolution labels. Writes
    ``scenes`` into the run's evaluation.json and model card and, for binary models, sets
    the card's threshold to the scene-optimal one (so segmentation uses it by default).
    Returns the scene evaluation, or None (with a notice) when the dataset has no
    validation split or its source images are no longer where they were.
    """
    from res_unet import records

    run_dir = Path(run_dir)
    manifest = records.read_manifest(data_dir)
    names = set(manifest["files"]["validation"])
    images_dir, labels_dir = Path(manifest["images_dir"]), Path(manifest["labels_dir"])
    if not names:
        return None
    cfg = inference_config([run_dir])
    try:
        pairs = [p for p in imagery.find_pairs(images_dir, labels_dir, cfg.USEMASK,
                                               cfg.EXTRA_BAND_DIRS) if p.image.name in names]
    except UserError as exc:
        _say(f"scene evaluation skipped: {str(exc).splitlines()[0]}")
        return None
    if len(pairs) != len(names):
        _say(f"scene evaluation skipped: {len(names) - len(pairs)} validation images are no "
             f"longer in {images_dir}")
        return None
    model = load_run(run_dir)
    segmenter = Segmenter([model], cfg)
    n_classes = model.n_classes
    cm = np.zeros((n_classes, n_classes), np.int64)
    sweep = metrics.ThresholdSweep() if model.binary else None
    started = time.perf_counter()
    pixels = 0
    for pair in _progress(pairs, progress):
        image, _ = imagery.load_image(pair, cfg)
        truth = read_truth(pair, cfg, image.shape[:2])
        prob = segmenter.probabilities(image)
        pixels += truth.size
        valid = truth != cfg.IGNORE_CLASS if cfg.IGNORE_CLASS is not None else slice(None)
        if sweep is not None:
            sweep.update(truth[valid], prob[..., 0][valid])
        cm += metrics.confusion_matrix(truth, postprocess.probs_to_label(prob), n_classes,
                                       ignore_class=cfg.IGNORE_CLASS)
    seconds = time.perf_counter() - started
    result: dict[str, Any] = {
        "images": len(pairs), "megapixels": round(pixels / 1e6, 2),
        "seconds": round(seconds, 1), "downsample": segmenter.downsample,
        "tta": cfg.TESTTIMEAUG, "tile_overlap": cfg.TILE_OVERLAP,
        **metrics.evaluation_scores(cm, sweep, cfg.IGNORE_CLASS)}
    card = dict(model.card)
    card.setdefault("validation", {})["scenes"] = {
        k: v for k, v in result.items() if k != "threshold_sweep"}
    if "optimal_threshold" in result:
        card["threshold"] = result["optimal_threshold"]
        card["threshold_source"] = "whole validation scenes"
    evaluation = _read_json(run_dir / "evaluation.json") if (
        run_dir / "evaluation.json").is_file() else {}
    evaluation["scenes"] = result
    write_atomic(run_dir / "evaluation.json", json.dumps(evaluation, indent=2, default=float))
    write_atomic(run_dir / "model_card.json", json.dumps(card, indent=2, default=float))
    return result


def _figure_example(pair: imagery.Pair, label: np.ndarray, truth: np.ndarray, cfg: Config
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, truth, prediction) of a labelled pair, subsampled to FIGURE_MAX_SIDE."""
    image, _ = imagery.load_image(pair, cfg)
    step = max(1, math.ceil(max(label.shape) / FIGURE_MAX_SIDE))
    return image[::step, ::step], truth[::step, ::step], label[::step, ::step]


def _score_row(name: str, cm: np.ndarray, cfg: Config) -> dict[str, Any]:
    scores = metrics.scores_from_confusion(cm, ignore_class=cfg.IGNORE_CLASS)
    row: dict[str, Any] = {"image": name, "n_pixels": scores["n_pixels"],
                           "pixel_accuracy": scores["pixel_accuracy"],
                           "mean_iou": scores["mean_iou"], "mean_dice": scores["mean_dice"]}
    row.update({f"iou_{k}": v for k, v in enumerate(scores["iou"])})
    row.update({f"dice_{k}": v for k, v in enumerate(scores["dice"])})
    return row


def _write_scores(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else (f"{v:.6f}" if isinstance(v, float) else v)
                         for k, v in row.items()})
    write_atomic(path, buf.getvalue())


# The folder --------------------------------------------------------------------------------

def parse_shard(text: str | None) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n; None -> (0, 1). Raises UserError otherwise."""
    if text is None:
        return 0, 1
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserError(f"command line: --shard {text!r} must look like i/n, e.g. 0/4 "
                        "(0-based index i of n shards)") from None
    if count < 1 or not 0 <= index < count:
        raise UserError(f"command line: --shard {text}: need n >= 1 and 0 <= i < n (0-based); "
                        f"use 0/{max(count, 1)} .. {max(count, 1) - 1}/{max(count, 1)}")
    return index, count


def _load_models(cfg: Config, runs: Sequence[str | os.PathLike | LoadedModel]
                 ) -> list[LoadedModel]:
    tile_hw = tuple(cfg.TARGET_SIZE)
    models = []
    for run in runs:
        if isinstance(run, LoadedModel):
            models.append(run)
        else:
            models.append(load_run(run, tile_hw))
    return models


# Keys that do not change what a finished image's outputs contain.
_NEUTRAL_KEYS = ("BATCH_SIZE", "SET_GPU", "USEMASK", "REMAP_CLASSES", "EXTRA_BAND_DIRS")


def output_fingerprint(models: Sequence[LoadedModel], segmenter: Segmenter,
                       cfg: Config) -> dict[str, Any]:
    """What the outputs of a segmentation depend on: every model's weights (SHA-256 of their
    values), the tile size, scale, threshold, TTA and the segmentation settings."""
    digests = []
    for member in models:
        hasher = hashlib.sha256()
        for array in member.model.get_weights():
            hasher.update(np.ascontiguousarray(array).tobytes())
        digests.append(hasher.hexdigest())
    values = cfg.to_dict()
    return {"weights": digests, "tile_size": list(segmenter.tile_hw),
            "downsample": segmenter.downsample, "threshold": segmenter.threshold_setting,
            "tta_transforms": len(tta_transforms(cfg.TESTTIMEAUG, segmenter.rot90)),
            "settings": {k: values[k] for k in INFERENCE_KEYS if k not in _NEUTRAL_KEYS}}


def check_resumable(out_dir: Path, fingerprint: dict[str, Any]) -> None:
    """Refuse to resume into ``out_dir`` when its outputs were made by other models or
    settings (or by a version that did not record them): skipping those images would mix
    two results and score the old masks as if the new model made them."""
    if not any(out_dir.glob(f"*{LABEL_SUFFIX}")):
        return
    try:
        old = json.loads((out_dir / "segmentation_config.json").read_text(encoding="utf-8"))
        previous = old["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        previous = None
    if previous == fingerprint:
        return
    if previous is None:
        what = "by a run that recorded no model (or an older res_unet)"
    else:
        changed = [k for k in fingerprint if previous.get(k) != fingerprint[k]]
        if "settings" in changed:
            changed.remove("settings")
            changed += [k for k, v in fingerprint["settings"].items()
                        if previous.get("settings", {}).get(k) != v]
        what = "with other " + ", ".join("model weights" if k == "weights" else k
                                          for k in changed)
    raise UserError(f"{out_dir}: holds segmentations made {what}; choose another --out, or "
                    "pass --overwrite to redo every image with this model")


def _problem(path: Path, exc: Exception, what: str) -> dict[str, str]:
    """Report a per-file problem on one line and return it for the summary."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    if str(path) not in message:
        message = f"{path}: {message}"
    _say(f"{what}: {message}")
    return {"image": str(path), "error": message}


def _run_summary(models: list[LoadedModel], segmenter: Segmenter, cfg: Config,
                 options: dict[str, Any]) -> dict[str, Any]:
    return {
        "res_unet_version": __version__,
        "models": [{"run_dir": None if m.run_dir is None else str(m.run_dir.resolve()),
                    "model_card": None if m.run_dir is None
                    else str((m.run_dir / "model_card.json").resolve()),
                    "weights": None if m.weights is None else str(m.weights.resolve()),
                    "card_threshold": m.threshold} for m in models],
        "tile_size": list(segmenter.tile_hw),
        "classes": segmenter.n_classes,
        "binary": segmenter.n_outputs == 1,
        "threshold": segmenter.threshold_setting,
        "tta_transforms": len(tta_transforms(cfg.TESTTIMEAUG, segmenter.rot90)),
        "options": options,
        "fingerprint": output_fingerprint(models, segmenter, cfg),
        "config": cfg.to_dict(),
    }


def _progress(items: list, enabled: bool):
    from tqdm import tqdm

    return tqdm(items, unit="image", disable=not enabled, file=sys.stderr,
                mininterval=1.0 if sys.stderr.isatty() else 30.0)


def _say(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def segment_folder(cfg: Config, runs: Sequence[str | os.PathLike | LoadedModel],
                   images_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                   labels_dir: str | os.PathLike | None = None, overwrite: bool = False,
                   shard: tuple[int, int] = (0, 1), save_probs: bool = False,
                   geojson: bool = False, progress: bool = True,
                   full_max_values: int = FULL_MAX_VALUES) -> dict[str, Any]:
    """Segment every image of ``images_dir`` (shard i of n: images i, i+n, ...) into ``out_dir``.

    ``runs`` are run folders (or loaded models) forming an ensemble; ``cfg`` comes from
    :func:`inference_config`. Per image NAME: see :func:`output_paths`. Images whose outputs
    all exist are skipped unless ``overwrite``; an unreadable image is reported on one line
    and counted as failed. With ``labels_dir`` the predictions are scored (scores.csv, or
    scores_shard{i}of{n}.csv: one row per image and an 'ALL' row from the summed confusion
    matrix) and the first FIGURE_ROWS scored images are drawn in examples.png. Writes
    segmentation_config.json. Returns a summary dict: images, done, skipped,
    failed, failures, seconds, megapixels, mpx_per_second and, with labels, scores.
    """
    started = time.perf_counter()
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise UserError(f"command line: shard {index}/{count} is invalid; need 0 <= i < n")
    if out_dir.resolve() == images_dir.resolve():
        raise UserError(f"{out_dir}: the output folder is the images folder; write the "
                        "outputs to another folder (they would be read as images next time)")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder; choose another --out")
    check_writable(out_dir)
    if labels_dir is not None:
        pairs = imagery.find_pairs(images_dir, labels_dir, cfg.USEMASK, cfg.EXTRA_BAND_DIRS)
    else:
        pairs = imagery.find_images(images_dir, cfg.EXTRA_BAND_DIRS)
    pairs = pairs[index::count]
    models = _load_models(cfg, runs)
    segmenter = Segmenter(models, cfg, full_max_values)
    if cfg.TESTTIMEAUG and cfg.TTA_ROT90 and not segmenter.rot90:
        print(f"note: TTA_ROT90 needs square tiles; {segmenter.tile_hw[0]}x"
              f"{segmenter.tile_hw[1]} tiles are averaged over flips only")
    options = {"images": str(images_dir), "labels": None if labels_dir is None
               else str(labels_dir), "save_probs": save_probs, "geojson": geojson}
    run_summary = _run_summary(models, segmenter, cfg, options)
    if not overwrite and out_dir.is_dir():
        check_resumable(out_dir, run_summary["fingerprint"])
    clean_stale_temporaries(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "segmentation_config.json", json.dumps(run_summary, indent=2) + "\n")

    n = segmenter.n_classes
    done = skipped = 0
    failures: list[dict[str, str]] = []
    megapixels = busy = 0.0
    rows: list[dict[str, Any]] = []
    figure: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    figure_titles: list[str] = []
    total_cm = np.zeros((n, n), np.int64)
    unscored: list[dict[str, str]] = []
    problems = (UserError, OSError, ValueError, rasterio.errors.RasterioError)
    for pair in _progress(pairs, progress):
        paths = output_paths(out_dir, pair, save_probs, geojson, segmenter.n_outputs == 1)
        try:
            if not overwrite and all(p.is_file() for p in paths.values()):
                skipped += 1
                label = imagery.read_label(paths["label"]) if pair.label is not None else None
            else:
                t0 = time.perf_counter()
                label, pixels = segment_image(segmenter, pair, paths)
                busy += time.perf_counter() - t0
                megapixels += pixels / 1e6
                done += 1
        except problems as exc:
            failures.append(_problem(pair.image, exc, "failed"))
            continue
        if pair.label is None:
            continue
        # The image is segmented; a label that cannot be used only leaves it unscored.
        try:
            truth = read_truth(pair, cfg, label.shape)
        except problems as exc:
            unscored.append(_problem(pair.label, exc, "not scored"))
            continue
        cm = score_label(label, truth, cfg, n)
        total_cm += cm
        rows.append(_score_row(pair.stem, cm, cfg))
        if len(figure) < FIGURE_ROWS:
            figure.append(_figure_example(pair, label, truth, cfg))
            figure_titles.append(f"{pair.stem}: mean IoU {rows[-1]['mean_iou']:.3f}"
                                 if rows[-1]["mean_iou"] is not None else pair.stem)

    summary: dict[str, Any] = {
        "images": len(pairs), "done": done, "skipped": skipped, "failed": len(failures),
        "failures": failures, "unscored": unscored,
        "seconds": round(time.perf_counter() - started, 2),
        "megapixels": round(megapixels, 3),
        "mpx_per_second": round(megapixels / busy, 3) if busy > 0 else None,
        "out_dir": str(out_dir),
    }
    if labels_dir is not None and rows:
        rows.append(_score_row("ALL", total_cm, cfg))
        name = "scores.csv" if count == 1 else f"scores_shard{index}of{count}.csv"
        _write_scores(out_dir / name, rows)
        summary["scores_file"] = str(out_dir / name)
        summary["scores"] = metrics.scores_from_confusion(total_cm, ignore_class=cfg.IGNORE_CLASS)
    if figure and cfg.DOPLOT:
        name = "examples.png" if count == 1 else f"examples_shard{index}of{count}.png"
        report.plot_predictions(figure, n, out_dir / name, class_names=cfg.class_names,
                                row_titles=figure_titles)
        summary["examples_file"] = str(out_dir / name)
    return summary
