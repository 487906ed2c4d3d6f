"""Inference: probabilities and label maps of images from loaded models.

One or several loaded run folders (:class:`res_unet.inference.runtime.LoadedModel`, an ensemble)
segment an image through a :class:`Segmenter`. This module runs the models (TensorFlow or
OpenVINO, :func:`predict_batch` with test-time augmentation) and turns probabilities into
labels; the image is tiled, batched, blended and rescaled by a
:class:`res_unet.geo.tiling.SlidingWindow` over :func:`predict_batch`, in one of two modes:

- ``resize`` (the original toolbox's behaviour): the whole image is scaled to fit the model
  input keeping its aspect ratio (:func:`res_unet.geo.tiling.resize_to_fit`), predicted once, and
  the probabilities are scaled back (:meth:`SlidingWindow.resized`).
- ``tile`` (INFER_MODE 'auto' picks it for images larger than the model input): overlapping
  tiles (TILE_OVERLAP), reflect-padded at the image edges, predicted in batches and blended
  with a smooth window (BLEND_WINDOW) divided by the accumulated window weight, so there are
  no seams and no bias towards tile centres (:meth:`SlidingWindow.blend`).

Test-time augmentation averages the probabilities over flips (and, with TTA_ROT90 and square
tiles, the 90-degree rotations: the 8 symmetries of the square); ensembles average every
member's probabilities. Both are means in probability space over the spatial axes only.

Memory. Small images keep their (H, W, C) float32 probabilities and go through
:func:`res_unet.inference.postprocess.postprocess` as is. Larger ones (more than
``FULL_MAX_VALUES`` probability values) are predicted in horizontal strips of tile rows
(:meth:`SlidingWindow.blend_strips`): only a band about one tile high holds float32
probabilities; rows no later tile touches are finished, thresholded (or arg-maxed) into
the (H, W) uint8 label (1 byte per pixel, or 2 bytes with THRESHOLD 'otsu', whose threshold
needs every probability: they are kept quantised to 1/65535) and handed to an optional sink
(saving probabilities). The label clean-up (median, morphology, small objects and holes)
then runs on the whole label map, as it involves whole connected components. The dense CRF
is the exception: it needs the whole probability map (H*W*C*4 bytes, plus about three
times that while :func:`res_unet.inference.postprocess.crf_refine` works, on a grid it
down-samples beyond CRF_MAX_PIXELS).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from res_unet.config.keys import Config
from res_unet.core.errors import UserError
from res_unet.geo import rasters
from res_unet.geo.scale import needs_resampling, resample_to_pixel_size, restore_scene_grid
from res_unet.geo.tiling import (
    RowSource,
    SlidingWindow,
    as_rows,
    downsampled_shape,
)
from res_unet.inference import postprocess
from res_unet.inference.runtime import LoadedModel
from res_unet.inference.uncertainty import ViewDisagreement
from res_unet.training.runfolder import TTA_VIEWS

LABEL_NODATA = 255
# Probability values (H * W * C) above which an image is predicted strip by strip: 256 MB
# of float32; below it the whole map is kept, which costs nothing worth saving.
FULL_MAX_VALUES = 64_000_000
# Rows handled at a time in passes over the whole label map (nodata marks, Otsu labels).
ROW_BLOCK = 256
_OTSU_LEVELS = 65535


# Prediction ----------------------------------------------------------------------------------

# The four flips of test-time augmentation by name, as (quarter turns k, then horizontal
# flip): what a model card's ``tta_views`` lists.
FLIP_VIEWS = dict(zip(TTA_VIEWS, [(0, False), (0, True), (2, True), (2, False)], strict=True))


def tta_transforms(tta: bool, rot90: bool, views: Sequence[str] | None = None
                   ) -> list[tuple[int, bool]]:
    """Test-time augmentations as (quarter turns k, then horizontal flip) pairs.

    Without ``tta`` only the identity; with it the flips named in ``views`` (names of
    FLIP_VIEWS, e.g. a model card's ``tta_views``), or all four when ``views`` is None:
    identity, horizontal, vertical and both flips ((0, F), (0, T), (2, T), (2, F)); with
    ``rot90`` always the 8 symmetries of a square (the four flips and the four transforms
    with an odd number of quarter turns), whatever ``views`` says.
    """
    if not tta:
        return [(0, False)]
    flips = list(FLIP_VIEWS.values())
    if rot90:
        return [*flips, (1, False), (1, True), (3, False), (3, True)]
    return flips if views is None else [FLIP_VIEWS[name] for name in views]


def _forward(batch: np.ndarray, k: int, flip: bool) -> np.ndarray:
    out = np.rot90(batch, k, axes=(1, 2))
    return np.ascontiguousarray(out[:, :, ::-1] if flip else out)


def _inverse(batch: np.ndarray, k: int, flip: bool) -> np.ndarray:
    out = batch[:, :, ::-1] if flip else batch
    return np.rot90(out, -k, axes=(1, 2))


def predict_batch(models: Sequence[LoadedModel], batch: np.ndarray, tta: bool = False,
                  rot90: bool = False, views: Sequence[str] | None = None,
                  disagreement: ViewDisagreement | None = None) -> np.ndarray:
    """Mean probabilities (N, h, w, C) float32 of a batch of raw pixels (N, h, w, B).

    Averages over every model and every test-time augmentation (:func:`tta_transforms`;
    rotations only for square tiles; ``views``: the flips to use, default all four).
    Augmentations act on the two spatial axes only. Each view is its own model call:
    stacking the views into one call of N x views tiles was measured no faster (OpenVINO,
    2 cores, per CPU-second) and took up to 60 % more memory (bench/bench_segment.py
    --default-path, variant 'stacked'). ``disagreement``, when given, counts the pixels on
    which the views and members predict different classes.
    """
    batch = np.asarray(batch, dtype=np.float32)
    transforms = tta_transforms(tta, rot90 and batch.shape[1] == batch.shape[2], views)
    total: np.ndarray | None = None
    for model in models:
        for k, flip in transforms:
            prob = _inverse(model(_forward(batch, k, flip)), k, flip)
            if disagreement is not None:
                disagreement.view(prob)
            total = prob.copy() if total is None else np.add(total, prob, out=total)
    assert total is not None
    if disagreement is not None:
        disagreement.end_batch()
    total /= len(models) * len(transforms)
    return total


def sliding_window(models: Sequence[LoadedModel], tile_hw: Sequence[int] | None = None,
                   overlap: float = 0.25, window: str = "hann", batch_size: int = 8,
                   tta: bool = False, rot90: bool = False, downsample: int = 1,
                   views: Sequence[str] | None = None,
                   disagreement: ViewDisagreement | None = None) -> SlidingWindow:
    """A :class:`res_unet.geo.tiling.SlidingWindow` over the mean prediction of ``models`` with
    the test-time augmentation asked for (:func:`predict_batch`); ``tile_hw`` defaults to
    the models' input size."""
    return SlidingWindow(functools.partial(predict_batch, models, tta=tta, rot90=rot90,
                                           views=views, disagreement=disagreement),
                         models[0].tile_hw if tile_hw is None else tile_hw, overlap, window,
                         batch_size, downsample)


# Labels ------------------------------------------------------------------------------------

def nodata_values(meta: rasters.RasterMeta, nodata_zero: bool) -> list[float]:
    """Pixel values meaning 'no data': the raster's declared nodata, and 0 if ``nodata_zero``."""
    values = []
    if meta.nodata is not None and math.isfinite(meta.nodata):
        values.append(float(meta.nodata))
    if nodata_zero and 0.0 not in values:
        values.append(0.0)
    return values


ProbabilitySink = Callable[[int, np.ndarray], None]
LabelSink = Callable[[int, np.ndarray], None]


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
        for model in self.models:
            model.use_runtime(cfg.INFER_RUNTIME)
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
        # The flips of TTA: those the members' cards list when they agree, else all four.
        listed = {tuple(m.card.tta_views) if m.card and m.card.tta_views else None
                  for m in models}
        self.views = list(listed.pop()) if len(listed) == 1 and None not in listed else None
        sizes = {m.pixel_size_m for m in models}
        if None not in sizes and needs_resampling(min(sizes), max(sizes)):
            raise UserError(f"ensemble members were trained at pixel sizes of "
                            f"{' and '.join(f'{s:g}' for s in sorted(sizes))} m; use members "
                            "trained at one pixel size")
        # Metres per pixel of what the models see; None: unknown (scenes taken as they come).
        self.pixel_size_m = None if None in sizes else float(np.mean(sorted(sizes)))
        # A scene of another pixel size is resampled to (scene, model) pixel sizes first.
        self.resample: tuple[tuple[float, float], float] | None = None
        # Where several views or members run, the pixels they disagree on (per scene: take()).
        several = len(self.models) * len(self.transforms) > 1
        self.disagreement = ViewDisagreement(self.label_cut) if several else None
        self.window = self._window(self.downsample)

    def _window(self, downsample: int) -> SlidingWindow:
        cfg = self.cfg
        return sliding_window(self.models, self.tile_hw, cfg.TILE_OVERLAP, cfg.BLEND_WINDOW,
                              cfg.BATCH_SIZE, cfg.TESTTIMEAUG, self.rot90, downsample,
                              self.views, self.disagreement)

    @property
    def transforms(self) -> list[tuple[int, bool]]:
        """The test-time augmentations each tile is predicted under (:func:`tta_transforms`)."""
        return tta_transforms(self.cfg.TESTTIMEAUG, self.rot90, self.views)

    def for_scene(self, pixel_size: tuple[float, float] | None) -> Segmenter:
        """This segmenter for a scene of ``pixel_size`` (x, y) metres per pixel.

        When both the scene's and the model's pixel sizes are known and differ by more than
        10 %, the scene is brought to the model's: by block averaging when the ratio is a
        whole number (the strip-by-strip path, as DOWNSAMPLE), else by resampling the whole
        scene (area average when shrinking, bilinear when enlarging); probabilities come
        back onto the scene's grid either way. Otherwise (or with either size unknown) the
        scene is worked on at the model's DOWNSAMPLE, as it comes.
        """
        model = self.pixel_size_m
        if pixel_size is None or model is None:
            return self
        k = round(model / math.sqrt(pixel_size[0] * pixel_size[1]))
        scaled = copy.copy(self)
        if k >= 1 and not needs_resampling((pixel_size[0] * k, pixel_size[1] * k), model):
            if k == self.downsample:
                return self
            scaled.downsample, scaled.window = k, self._window(k)
        else:
            scaled.downsample, scaled.window = 1, self._window(1)
            scaled.resample = ((float(pixel_size[0]), float(pixel_size[1])), model)
        return scaled

    @property
    def threshold_setting(self) -> float | str | None:
        """The binary threshold in use: a number or 'otsu'; None for multiclass models."""
        if self.n_outputs != 1:
            return None
        if self.cfg.THRESHOLD is not None:
            return self.cfg.THRESHOLD
        return 0.5 if self.card_threshold is None else self.card_threshold

    @property
    def label_cut(self) -> float:
        """The binary threshold labels are cut at as strips come (0.5 with 'otsu', whose
        threshold needs the whole map, and for multiclass models, which take the argmax)."""
        setting = self.threshold_setting
        return 0.5 if setting is None or setting == "otsu" else float(setting)

    def mode_for(self, shape_hw: Sequence[int]) -> str:
        """'tile' or 'resize' for a source image of ``shape_hw`` under INFER_MODE (decided on
        its size at the working scale, 1/DOWNSAMPLE)."""
        if self.cfg.INFER_MODE != "auto":
            return self.cfg.INFER_MODE
        rows, cols = downsampled_shape(shape_hw, self.downsample)
        larger = rows > self.tile_hw[0] or cols > self.tile_hw[1]
        return "tile" if larger else "resize"

    def probabilities(self, image: np.ndarray) -> np.ndarray:
        """The whole (H, W, C) float32 probability map of a raw (H, W, B) image."""
        if self.resample is not None:
            small = resample_to_pixel_size(image, *self.resample)
            prob = self.window.probabilities(small, self.mode_for(small.shape[:2]))
            return restore_scene_grid(prob, image.shape[:2], classes=False)
        return self.window.probabilities(image, self.mode_for(image.shape[:2]))

    def strips(self, image: np.ndarray | RowSource) -> Iterator[tuple[int, np.ndarray]]:
        """Probabilities as (first_row, (rows, W, C)) strips, top to bottom.

        ``image`` may be a :class:`res_unet.geo.tiling.RowSource`: in tile mode it is then read a
        band of rows at a time, and only about one tile-high band of probabilities (at the
        working scale) is held, so the image may be larger than memory.
        """
        return self.window.strips(image, self.mode_for(image.shape[:2]))

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
        return big and strippable and not self.cfg.DO_CRF_REFINE and self.resample is None

    @property
    def streams_labels(self) -> bool:
        """Whether strips of the label map are final as they come (no clean-up step and no
        Otsu threshold needs the whole map), so :meth:`segment` can hand them out."""
        return self.threshold_setting != "otsu" and not postprocess.cleans_labels(self.cfg)

    def segment(self, image: np.ndarray | RowSource, nodata: Sequence[float] = (),
                on_probs: ProbabilitySink | None = None,
                on_label: LabelSink | None = None) -> np.ndarray | None:
        """Raw (H, W, B) image -> post-processed (H, W) uint8 label map.

        Pixels whose bands all equal a ``nodata`` value are LABEL_NODATA (255). ``on_probs``
        receives the probabilities as (first_row, (rows, W, C) float32) pieces covering the
        image top to bottom, NaN at nodata pixels (for saving them). ``image`` may be a
        :class:`res_unet.geo.tiling.RowSource` (a scene read in windows); images that are not
        segmented strip by strip (:meth:`uses_strips`) are then read whole. With
        ``on_label``, an image segmented strip by strip whose label strips are final
        (:attr:`streams_labels`) hands them to it as (first_row, (rows, W) uint8) pieces,
        top to bottom, and None is returned: the whole label map is never held.
        """
        if image.shape[-1] != self.n_bands:
            raise ValueError(f"image has {image.shape[-1]} bands, the model takes {self.n_bands}")
        self.check_dtype(image)
        if self.uses_strips(image.shape[:2]):
            return self._segment_strips(as_rows(image), nodata, on_probs, on_label)
        if not isinstance(image, np.ndarray):
            image = image.rows(0, image.shape[0])
        prob = self.probabilities(image)
        invalid = rasters.nodata_mask(image, nodata)
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

    def _segment_strips(self, source: RowSource, nodata: Sequence[float],
                        on_probs: ProbabilitySink | None, on_label: LabelSink | None = None
                        ) -> np.ndarray | None:
        otsu = self.threshold_setting == "otsu"
        cut = self.label_cut
        stream = on_label is not None and self.streams_labels
        store = None if stream else np.empty(source.shape[:2], np.uint16 if otsu else np.uint8)
        counts = np.zeros(_OTSU_LEVELS + 1, np.int64)

        def invalid_rows(r0: int, r1: int) -> np.ndarray:
            if not nodata:
                return np.zeros((r1 - r0, source.shape[1]), bool)
            return rasters.nodata_mask(source.rows(r0, r1), nodata)

        for r0, prob in self.strips(source):
            rows = slice(r0, r0 + len(prob))
            invalid = invalid_rows(r0, r0 + len(prob))
            if otsu:
                quantised = np.rint(prob[..., 0] * _OTSU_LEVELS).astype(np.uint16)
                store[rows] = quantised
                counts += np.bincount(quantised[~invalid], minlength=_OTSU_LEVELS + 1)
            elif stream:
                label_rows = postprocess.probs_to_label(prob, cut)
                label_rows[invalid] = LABEL_NODATA
                on_label(r0, label_rows)
            else:
                store[rows] = postprocess.probs_to_label(prob, cut)
            if on_probs is not None:
                prob[invalid] = np.nan
                on_probs(r0, prob)
        if stream:
            return None
        if otsu:
            # Otsu's threshold is a histogram level; that level itself is background.
            level = math.floor(postprocess.otsu_from_histogram(counts) * _OTSU_LEVELS
                               + 1e-6) + 1
            label = np.empty(store.shape, np.uint8)
            for r0 in range(0, len(store), ROW_BLOCK):
                label[r0:r0 + ROW_BLOCK] = store[r0:r0 + ROW_BLOCK] >= level
            del store
        else:
            label = store
        label = postprocess.clean_label(label, self.cfg, self.n_classes)
        if nodata:
            # Row blocks: a whole-image nodata mask would cost another byte per pixel.
            for r0 in range(0, label.shape[0], ROW_BLOCK):
                r1 = min(r0 + ROW_BLOCK, label.shape[0])
                label[r0:r1][invalid_rows(r0, r1)] = LABEL_NODATA
        return label
