"""Fitting images to the model input size: overlapping tiles, or resize-and-pad, and back.

Why this module is long: it is the one home of the pixel geometry that dataset building
and segmentation share (tile origins, reflect padding, resize-and-pad, blending windows,
the DOWNSAMPLE working scale), so training and inference see images prepared the same way,
and of :class:`SlidingWindow`, which stitches predictions with it.

- ``FIT_MODE='tile'`` / ``INFER_MODE='tile'``: :func:`tile_grid` lists tile origins that cover
  the image exactly (the last tile is aligned to the far edge), :func:`extract_tile` cuts
  one tile (reflect-padded where it runs past the image) and :class:`TileBlender` averages
  overlapping tile predictions with a smooth :func:`blend_window`.
- ``'resize'``: :func:`resize_to_fit` scales the whole image to fit the target keeping its
  aspect ratio and reflect-pads the rest (centred); :func:`undo_fit` crops the padding and
  scales predictions back to the original size. Labels are scaled with nearest neighbour and
  padded the same way, so nothing is stretched.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from skimage.transform import resize

WINDOW_KINDS = ("hann", "spline", "flat")
# Smallest blending weight: tile edges that no other tile covers still get normalised.
WINDOW_FLOOR = 1e-3
# Rows interpolated at a time when a DOWNSAMPLE model's map goes back to full resolution.
UPSAMPLE_ROWS = 1024


# Tile positions -----------------------------------------------------------------------------

def tile_origins(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets along one axis of tiles that cover ``[0, length)`` exactly.

    ``overlap`` is the fraction of ``tile`` shared by neighbours (0 <= overlap < 1); the
    stride is ``tile - round(tile * overlap)`` (at least 1). The last tile is aligned to the
    end (``length - tile``), so it may overlap its neighbour more. If ``length <= tile`` the
    single origin is 0 and the tile is reflect-padded by :func:`extract_tile`.
    E.g. ``tile_origins(10, 4, 0) == [0, 4, 6]``.
    """
    if length < 1 or tile < 1:
        raise ValueError(f"length and tile must be positive, got {length} and {tile}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if length <= tile:
        return [0]
    stride = max(1, tile - round(tile * overlap))
    origins = list(range(0, length - tile + 1, stride))
    if origins[-1] != length - tile:
        origins.append(length - tile)
    return origins


def tile_grid(shape_hw: Sequence[int], tile_hw: Sequence[int],
              overlap: float) -> list[tuple[int, int]]:
    """Origins (row, col) of the tiles covering an image of ``shape_hw``, row-major order."""
    rows = tile_origins(int(shape_hw[0]), int(tile_hw[0]), overlap)
    cols = tile_origins(int(shape_hw[1]), int(tile_hw[1]), overlap)
    return [(r, c) for r in rows for c in cols]


def _reflect_indices(start: int, count: int, length: int) -> np.ndarray:
    """Indices ``start .. start+count-1`` folded into ``[0, length)`` by mirror reflection.

    Matches ``np.pad(mode='reflect')`` (the edge pixel is not repeated), applied as often as
    needed, so arrays much smaller than the tile are handled too.
    """
    idx = np.arange(start, start + count)
    if length == 1:
        return np.zeros(count, dtype=np.intp)
    period = 2 * (length - 1)
    idx = np.mod(idx, period)
    return np.where(idx >= length, period - idx, idx).astype(np.intp)


def extract_tile(array: np.ndarray, r0: int, c0: int, tile_hw: Sequence[int]) -> np.ndarray:
    """The ``tile_hw`` window of ``array`` (H, W, ...) starting at row ``r0``, column ``c0``.

    Parts outside the array (including negative origins) are filled by mirror reflection of
    the array's content, never with zeros, so padding does not look like a fake class. The
    dtype and any trailing band dimensions are kept; the result is a copy.
    """
    th, tw = int(tile_hw[0]), int(tile_hw[1])
    h, w = array.shape[:2]
    if 0 <= r0 and r0 + th <= h and 0 <= c0 and c0 + tw <= w:
        return array[r0:r0 + th, c0:c0 + tw].copy()
    rows = _reflect_indices(r0, th, h)
    cols = _reflect_indices(c0, tw, w)
    return array[rows[:, None], cols[None, :]]


# Resize and pad -----------------------------------------------------------------------------

@dataclass(frozen=True)
class FitInfo:
    """How :func:`resize_to_fit` changed an image, so :func:`undo_fit` can reverse it.

    ``original_hw``: the input (rows, cols); ``scaled_hw``: its size after scaling, before
    padding; ``pad_top``/``pad_left``: rows/cols of reflect padding before the content (the
    rest of ``target_hw`` is padding after it).
    """

    original_hw: tuple[int, int]
    scaled_hw: tuple[int, int]
    target_hw: tuple[int, int]
    pad_top: int
    pad_left: int

    def to_dict(self) -> dict[str, list[int] | int]:
        """JSON-ready form (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}


def _resize(array: np.ndarray, shape_hw: tuple[int, int], order: int,
            anti_aliasing: bool) -> np.ndarray:
    """Resize the first two axes, keeping dtype (integers are rounded and clipped)."""
    if array.shape[:2] == shape_hw:
        return array.copy()
    out = resize(array, shape_hw + array.shape[2:], order=order, mode="reflect",
                 preserve_range=True, anti_aliasing=anti_aliasing)
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    elif array.dtype == bool:
        out = out > 0.5
    return out.astype(array.dtype, copy=False)


def resize_to_fit(array: np.ndarray, target_hw: Sequence[int],
                  order: int) -> tuple[np.ndarray, FitInfo]:
    """Scale ``array`` (H, W, ...) to fit inside ``target_hw`` keeping its aspect ratio, then
    reflect-pad it (content centred) to exactly ``target_hw``.

    ``order=1`` for images (bilinear, anti-aliased when shrinking, dtype kept by rounding and
    clipping), ``order=0`` for labels (nearest neighbour: no new class values). Returns the
    fitted array and the :class:`FitInfo` needed by :func:`undo_fit`.
    """
    th, tw = int(target_hw[0]), int(target_hw[1])
    h, w = array.shape[:2]
    scale = min(th / h, tw / w)
    sh = min(th, max(1, round(h * scale)))
    sw = min(tw, max(1, round(w * scale)))
    scaled = _resize(array, (sh, sw), order, anti_aliasing=order > 0 and scale < 1)
    pad_top, pad_left = (th - sh) // 2, (tw - sw) // 2
    fitted = extract_tile(scaled, -pad_top, -pad_left, (th, tw))
    return fitted, FitInfo((h, w), (sh, sw), (th, tw), pad_top, pad_left)


def undo_fit(array: np.ndarray, info: FitInfo) -> np.ndarray:
    """Reverse :func:`resize_to_fit`: crop the padding of ``array`` (target_hw, ...) and scale
    it back to ``info.original_hw``.

    Float arrays (probabilities, any channel count) are scaled bilinearly; integer or bool
    arrays (class indices) with nearest neighbour. The dtype is kept.
    """
    if tuple(array.shape[:2]) != info.target_hw:
        raise ValueError(f"array is {array.shape[:2]}, expected the fitted size {info.target_hw}")
    sh, sw = info.scaled_hw
    content = array[info.pad_top:info.pad_top + sh, info.pad_left:info.pad_left + sw]
    order = 1 if np.issubdtype(array.dtype, np.floating) else 0
    return _resize(content, info.original_hw, order, anti_aliasing=False)


# Blending -----------------------------------------------------------------------------------

def _spline_1d(n: int) -> np.ndarray:
    """Quadratic-spline ramp: 0 at the edges, 1 in the middle, smooth (C1) in between.

    With t the triangle rising from the edge to 1 at the centre, the outer half (t < 0.5) is
    2 t^2 and the inner half 1 - 2 (1 - t)^2: the power-2 spline window of smoothly blended
    tile predictions.
    """
    t = 1.0 - np.abs(2.0 * (np.arange(n) + 0.5) / n - 1.0)
    return np.where(t < 0.5, 2.0 * t ** 2, 1.0 - 2.0 * (1.0 - t) ** 2)


def _hann_1d(n: int) -> np.ndarray:
    """Hann window sampled at pixel centres (no exact zeros at the ends)."""
    return np.sin(np.pi * (np.arange(n) + 0.5) / n) ** 2


def blend_window(tile_hw: Sequence[int], kind: str = "hann") -> np.ndarray:
    """Weights (H, W) float32 for blending overlapping tile predictions.

    'hann': outer product of Hann windows; 'spline': outer product of the quadratic-spline
    window; 'flat': ones. Scaled to a maximum of 1 and floored at ``WINDOW_FLOOR`` so every
    pixel, even a tile's corner, has positive weight.
    """
    th, tw = int(tile_hw[0]), int(tile_hw[1])
    if kind == "flat":
        return np.ones((th, tw), dtype=np.float32)
    if kind == "hann":
        win = np.outer(_hann_1d(th), _hann_1d(tw))
    elif kind == "spline":
        win = np.outer(_spline_1d(th), _spline_1d(tw))
    else:
        raise ValueError(f"unknown blend window {kind!r}; use one of {WINDOW_KINDS}")
    win = np.maximum(win / win.max(), WINDOW_FLOOR)
    return win.astype(np.float32)


class TileBlender:
    """Weighted average of overlapping tile predictions over an (H, W) image.

    ``add`` accumulates ``window * probs`` and ``window`` for one tile (the parts beyond the
    image are dropped); ``result`` returns the weighted mean, (H, W, C) float32.

    With ``streaming`` only a band of rows is held: tiles must then come in row-major order
    (as :func:`tile_grid` gives them), and :meth:`pop_rows` hands back the rows above a
    given one, which no later tile touches, and frees them. The band is then about one tile
    high, whatever the image height.
    """

    def __init__(self, shape_hw: Sequence[int], n_channels: int, window: np.ndarray,
                 streaming: bool = False) -> None:
        self.shape_hw = (int(shape_hw[0]), int(shape_hw[1]))
        self.window = np.asarray(window, dtype=np.float32)
        held = 0 if streaming else self.shape_hw[0]
        # Rows [start, start + len(sum)) of the image are held.
        self.start = 0
        self.sum = np.zeros((held, self.shape_hw[1], int(n_channels)), dtype=np.float32)
        self.weight = np.zeros((held, self.shape_hw[1]), dtype=np.float32)

    def add(self, tile_probs: np.ndarray, r0: int, c0: int) -> None:
        """Accumulate one tile (tile_h, tile_w, C) or (tile_h, tile_w) placed at (r0, c0)."""
        probs = tile_probs if tile_probs.ndim == 3 else tile_probs[..., None]
        if probs.shape[:2] != self.window.shape:
            raise ValueError(f"tile is {probs.shape[:2]} but the window is {self.window.shape}")
        h, w = self.shape_hw
        th, tw = self.window.shape
        r_lo, r_hi = max(r0, 0), min(r0 + th, h)
        c_lo, c_hi = max(c0, 0), min(c0 + tw, w)
        if r_lo >= r_hi or c_lo >= c_hi:
            return
        if r_lo < self.start:
            raise ValueError(f"a tile at row {r0} reaches rows already handed back (before "
                             f"{self.start}); add tiles in row-major order")
        grow = r_hi - (self.start + len(self.sum))
        if grow > 0:
            self.sum = np.concatenate([self.sum, np.zeros((grow, *self.sum.shape[1:]),
                                                          np.float32)])
            self.weight = np.concatenate([self.weight, np.zeros((grow, w), np.float32)])
        tr, tc = slice(r_lo - r0, r_hi - r0), slice(c_lo - c0, c_hi - c0)
        rows = slice(r_lo - self.start, r_hi - self.start)
        win = self.window[tr, tc]
        self.sum[rows, c_lo:c_hi] += probs[tr, tc] * win[..., None]
        self.weight[rows, c_lo:c_hi] += win

    def pop_rows(self, end: int) -> np.ndarray:
        """Blended probabilities (rows, W, C) float32 of the held rows above ``end`` (the
        first row a later tile may touch), which are then released."""
        n = max(0, min(end, self.shape_hw[0]) - self.start)
        if n > len(self.sum):
            raise ValueError(f"rows up to {end} were not covered by any tile")
        weight = self.weight[:n]
        if not np.all(weight > 0):
            raise ValueError(f"{int(np.sum(weight <= 0))} pixels were not covered by any tile")
        out = self.sum[:n] / weight[..., None]
        self.sum, self.weight = self.sum[n:].copy(), self.weight[n:].copy()
        self.start += n
        return out

    def result(self) -> np.ndarray:
        """The blended probabilities (H, W, C) float32; every pixel must have been covered."""
        if self.start != 0:
            raise ValueError("result() after pop_rows(): the first rows were handed back")
        return self.pop_rows(self.shape_hw[0])


# Images as bands of rows ---------------------------------------------------------------------


class RowSource(Protocol):
    """An (H, W, B) image read a band of rows at a time: an array in memory
    (:class:`ArrayRows`), a raster on disk read in windows
    (:class:`res_unet.geo.rasters.RasterRows`), or another source at a coarser scale
    (:class:`DownsampledRows`)."""

    shape: tuple[int, int, int]
    dtype: np.dtype

    def rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows ``r0:r1`` (clipped to the image) as an (rows, W, B) array."""
        ...


class ArrayRows:
    """An image in memory as a :class:`RowSource` (rows are views, no copies)."""

    def __init__(self, image: np.ndarray) -> None:
        self.image = image
        self.shape = (int(image.shape[0]), int(image.shape[1]), int(image.shape[2]))
        self.dtype = image.dtype

    def rows(self, r0: int, r1: int) -> np.ndarray:
        return self.image[max(r0, 0):min(r1, self.shape[0])]


def as_rows(image: np.ndarray | RowSource) -> RowSource:
    """``image`` as a :class:`RowSource` (arrays are wrapped, sources returned as they are)."""
    return ArrayRows(image) if isinstance(image, np.ndarray) else image


def every_nth(image: np.ndarray | RowSource, step: int, block_rows: int = 1024) -> np.ndarray:
    """``image[::step, ::step]`` of an array or a :class:`RowSource` (read a band of rows at a
    time, so only the result is held)."""
    if isinstance(image, np.ndarray):
        return image[::step, ::step]
    block = max(step, block_rows - block_rows % step)
    # Copies: a strided view would keep each whole band alive until the end.
    parts = [image.rows(r0, r0 + block)[::step, ::step].copy()
             for r0 in range(0, image.shape[0], block)]
    return np.concatenate(parts)


# Working scale (DOWNSAMPLE) -------------------------------------------------------------------
#
# A model trained with DOWNSAMPLE = k sees the imagery k times coarser, so one tile covers k
# times more of the scene: enough context to tell a large, uniform lake from a forest. The
# dataset builder and the segmenter both go through these functions. Pixel (i, j) of the
# down-sampled image is the mean of the k x k block of source pixels starting at (k i, k j)
# (the image is edge-padded to a multiple of k); predictions come back to the source grid by
# bilinear interpolation with the same geometry (block centres at k i + (k - 1) / 2).


def downsampled_shape(shape_hw: Sequence[int], factor: int) -> tuple[int, int]:
    """Size (rows, cols) of an image of ``shape_hw`` after :func:`downsample_image`."""
    return (-(-int(shape_hw[0]) // factor), -(-int(shape_hw[1]) // factor))


def _pad_to_multiple(array: np.ndarray, factor: int) -> np.ndarray:
    h, w = array.shape[:2]
    pad = [(0, -h % factor), (0, -w % factor)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, pad, mode="edge") if any(p[1] for p in pad[:2]) else array


def downsample_image(image: np.ndarray, factor: int) -> np.ndarray:
    """Block means of ``factor`` x ``factor`` pixels of an (H, W, B) image, dtype kept
    (integers rounded). ``factor`` 1 returns the image itself."""
    if factor == 1:
        return image
    padded = _pad_to_multiple(image, factor)
    h, w = padded.shape[0] // factor, padded.shape[1] // factor
    blocks = padded.reshape(h, factor, w, factor, *padded.shape[2:])
    mean = blocks.mean(axis=(1, 3), dtype=np.float32)
    if np.issubdtype(image.dtype, np.integer):
        mean = np.rint(mean)
    return mean.astype(image.dtype, copy=False)


class DownsampledRows:
    """:func:`downsample_image` of a :class:`RowSource`, a band of rows at a time: rows
    ``r0:r1`` of the result read rows ``factor * r0 : factor * r1`` of the source, so any
    split gives the same values as down-sampling the whole image."""

    def __init__(self, source: RowSource, factor: int) -> None:
        self.source, self.factor = source, int(factor)
        h, w = downsampled_shape(source.shape[:2], self.factor)
        self.shape = (h, w, source.shape[2])
        self.dtype = source.dtype

    def rows(self, r0: int, r1: int) -> np.ndarray:
        r0, r1 = max(r0, 0), min(r1, self.shape[0])
        k = self.factor
        return downsample_image(self.source.rows(k * r0, min(k * r1, self.source.shape[0])), k)


def downsample_label(label: np.ndarray, factor: int) -> np.ndarray:
    """Majority class of each ``factor`` x ``factor`` block of an (H, W) label map (ties go
    to the lower class value). ``factor`` 1 returns the label itself."""
    if factor == 1:
        return label
    padded = _pad_to_multiple(label, factor)
    h, w = padded.shape[0] // factor, padded.shape[1] // factor
    blocks = padded.reshape(h, factor, w, factor).transpose(0, 2, 1, 3).reshape(h, w, -1)
    best = np.zeros((h, w), dtype=label.dtype)
    best_count = np.full((h, w), -1, dtype=np.int32)
    for value in np.unique(blocks):
        count = np.count_nonzero(blocks == value, axis=-1)
        better = count > best_count
        best[better], best_count[better] = value, count[better]
    return best


def _upsample_axis_weights(n_out: int, n_in: int, factor: int, start: int = 0
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (lo, hi) and weight of hi for output positions start..start+n_out-1."""
    pos = (np.arange(start, start + n_out, dtype=np.float64) + 0.5) / factor - 0.5
    pos = np.clip(pos, 0, n_in - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (pos - lo).astype(np.float32)


def upsample_rows(small: np.ndarray, factor: int, out_hw: Sequence[int], r0: int = 0,
                  r1: int | None = None, small_first_row: int = 0,
                  small_height: int | None = None) -> np.ndarray:
    """Rows ``r0:r1`` of the bilinear up-sampling of ``small`` (h, w, C) float to ``out_hw``.

    Inverse geometry of :func:`downsample_image`; edges are clamped. Any split into row
    ranges gives the same values as the whole, so large scenes can be done strip by strip.
    ``small`` may hold only rows ``small_first_row:`` of a map ``small_height`` rows high
    (default: all of it); it must include the rows :func:`upsample_source_rows` names.
    """
    out_h, out_w = int(out_hw[0]), int(out_hw[1])
    r1 = out_h if r1 is None else r1
    if factor == 1:
        return small[r0 - small_first_row:r1 - small_first_row]
    total = small.shape[0] + small_first_row if small_height is None else small_height
    rlo, rhi, rw = _upsample_axis_weights(r1 - r0, total, factor, r0)
    rlo, rhi = rlo - small_first_row, rhi - small_first_row
    if len(rlo) and (rlo.min() < 0 or rhi.max() >= small.shape[0]):
        raise ValueError(f"rows {r0}:{r1} need small rows {rlo.min() + small_first_row}.."
                         f"{rhi.max() + small_first_row}, not all held")
    clo, chi, cw = _upsample_axis_weights(out_w, small.shape[1], factor)
    rows = small[rlo] * (1 - rw)[:, None, None] + small[rhi] * rw[:, None, None]
    return (rows[:, clo] * (1 - cw)[None, :, None] + rows[:, chi] * cw[None, :, None]
            ).astype(np.float32, copy=False)


def upsample_source_rows(r0: int, r1: int, factor: int, small_height: int) -> tuple[int, int]:
    """The rows [lo, hi) of the small map that output rows [r0, r1) of
    :func:`upsample_rows` read."""
    lo, hi, _ = _upsample_axis_weights(max(r1 - r0, 1), small_height, factor, r0)
    return int(lo.min()), int(hi.max()) + 1


def upsample_ready_rows(small_rows: int, factor: int, small_height: int, out_height: int
                        ) -> int:
    """How many output rows :func:`upsample_rows` can finish once the first ``small_rows``
    rows of a ``small_height``-row map are known (all of them at the end)."""
    if small_rows >= small_height:
        return out_height
    if small_rows < 2:
        return 0
    # Output row R reads small rows lo, lo + 1 with lo = floor((R + 0.5) / factor - 0.5);
    # lo + 1 < small_rows  <=>  R < factor * small_rows - (factor + 1) / 2.
    return max(0, min(out_height, (2 * factor * small_rows - factor) // 2))


def upsample_strips(small_strips: Iterable[tuple[int, np.ndarray]], factor: int,
                    small_height: int, out_hw: Sequence[int]
                    ) -> Iterator[tuple[int, np.ndarray]]:
    """Strips of a map at 1/``factor`` scale (``(first_row, rows)``, top to bottom) ->
    strips of its bilinear up-sampling to ``out_hw``, equal to :func:`upsample_rows` of the
    whole map; only the small rows still needed are held."""
    out_h = int(out_hw[0])
    held: np.ndarray | None = None
    held_first = done = 0
    for first, strip in small_strips:
        held = strip if held is None else np.concatenate([held, strip])
        ready = upsample_ready_rows(first + len(strip), factor, small_height, out_h)
        for r0 in range(done, ready, UPSAMPLE_ROWS):
            r1 = min(r0 + UPSAMPLE_ROWS, ready)
            yield r0, upsample_rows(held, factor, out_hw, r0, r1, held_first, small_height)
        done = max(done, ready)
        if done < out_h:
            keep = upsample_source_rows(done, done + 1, factor, small_height)[0]
            held, held_first = held[keep - held_first:], keep


# The sliding window ---------------------------------------------------------------------------

# A model's prediction of a batch: raw tiles (N, rows, cols, B) -> probabilities
# (N, rows, cols, C) float32.
PredictFn = Callable[[np.ndarray], np.ndarray]


class SlidingWindow:
    """Probabilities of an image of any size from a model of one input size: the one place
    that tiles, batches, blends and changes scale.

    ``predict_fn`` maps raw tiles (N, th, tw, B) of ``tile_hw`` to probabilities
    (N, th, tw, C) float32 (models, ensembles and test-time augmentation are the caller's).
    The image is worked on at 1/``downsample`` of its grid (:func:`downsample_image`), the
    map brought back by :func:`upsample_rows`. Mode ``'tile'``: tiles :meth:`origins`,
    overlapping by the fraction ``overlap``, predicted ``batch_size`` at a time and blended
    with ``blend_window(tile_hw, window)`` over the summed weight (:class:`TileBlender`);
    ``'resize'``: the image fitted to the tile, predicted once and scaled back.
    :meth:`probabilities` gives the whole (H, W, C) map; :meth:`strips` the same values
    (up to float rounding of batch composition) strip by strip, holding about one
    tile-high band, from an image that may be a :class:`RowSource` read in windows.
    """

    def __init__(self, predict_fn: PredictFn, tile_hw: Sequence[int], overlap: float = 0.25,
                 window: str = "hann", batch_size: int = 8, downsample: int = 1) -> None:
        self.predict_fn = predict_fn
        self.tile_hw = (int(tile_hw[0]), int(tile_hw[1]))
        self.overlap = overlap
        self.window = window
        self.batch_size = int(batch_size)
        self.downsample = int(downsample)

    def origins(self, shape_hw: Sequence[int]) -> list[tuple[int, int]]:
        """Origins (row, col) of the tiles covering an image of ``shape_hw`` (at the working
        scale), row-major: :func:`tile_grid`."""
        return tile_grid(shape_hw, self.tile_hw, self.overlap)

    def _tiles(self, source: RowSource) -> Iterator[tuple[int, int, np.ndarray]]:
        """The tiles of :meth:`origins`, row-major, reading each band of rows of ``source``
        once (a band is one tile high; edges reflect-padded as extract_tile)."""
        th, tw = self.tile_hw
        height, width = source.shape[:2]
        cols = tile_origins(width, tw, self.overlap)
        for r in tile_origins(height, th, self.overlap):
            band = source.rows(r, r + th)
            for c in cols:
                yield r, c, extract_tile(band, 0, c, self.tile_hw)

    def _predicted(self, source: RowSource) -> Iterator[tuple[int, int, np.ndarray]]:
        """(row, col, probabilities (th, tw, C)) of every tile of ``source``, in order,
        predicted in batches of ``batch_size``."""
        tiles = self._tiles(source)
        while chunk := list(itertools.islice(tiles, self.batch_size)):
            probs = self.predict_fn(np.stack([tile for _, _, tile in chunk]))
            for (r, c, _), prob in zip(chunk, probs, strict=True):
                yield r, c, prob

    def _blender(self, shape_hw: Sequence[int], first: np.ndarray, streaming: bool
                 ) -> TileBlender:
        channels = first.shape[-1] if first.ndim == 3 else 1
        return TileBlender(shape_hw, channels, blend_window(self.tile_hw, self.window),
                           streaming=streaming)

    def blend(self, image: np.ndarray | RowSource) -> np.ndarray:
        """Tile mode at the image's own scale: (h, w, B) raw image -> (h, w, C) float32
        probabilities, held whole."""
        source = as_rows(image)
        blender = None
        for r, c, prob in self._predicted(source):
            blender = blender or self._blender(source.shape[:2], prob, streaming=False)
            blender.add(prob, r, c)
        return blender.result()

    def blend_strips(self, image: np.ndarray | RowSource) -> Iterator[tuple[int, np.ndarray]]:
        """Tile mode at the image's own scale, memory-bounded: ``(first_row, probabilities
        (rows, w, C) float32)`` strips from top to bottom covering every row once. After each
        row of tiles the rows above the next row of tiles are final."""
        source = as_rows(image)
        th, tw = self.tile_hw
        height, width = source.shape[:2]
        rows = tile_origins(height, th, self.overlap)
        per_row = len(tile_origins(width, tw, self.overlap))
        blender = None
        for i, (r, c, prob) in enumerate(self._predicted(source)):
            blender = blender or self._blender((height, width), prob, streaming=True)
            blender.add(prob, r, c)
            if (i + 1) % per_row == 0:
                row_index = (i + 1) // per_row
                end = rows[row_index] if row_index < len(rows) else height
                first = blender.start
                yield first, blender.pop_rows(end)

    def resized(self, image: np.ndarray) -> np.ndarray:
        """Resize mode at the image's own scale: (h, w, B) raw image -> (h, w, C) float32
        probabilities, the image fitted to the tile, predicted once and scaled back."""
        fitted, info = resize_to_fit(image, self.tile_hw, order=1)
        return undo_fit(self.predict_fn(fitted[None])[0], info)

    def probabilities(self, image: np.ndarray, mode: str = "tile") -> np.ndarray:
        """The whole (H, W, C) float32 probability map of a raw (H, W, B) image."""
        small = downsample_image(image, self.downsample)
        prob = self.resized(small) if mode == "resize" else self.blend(small)
        if self.downsample == 1:
            return prob
        return upsample_rows(prob, self.downsample, image.shape[:2])

    def strips(self, image: np.ndarray | RowSource, mode: str = "tile"
               ) -> Iterator[tuple[int, np.ndarray]]:
        """Probabilities as ``(first_row, (rows, W, C) float32)`` strips, top to bottom.

        In tile mode ``image`` is read a band of rows at a time, and only about one
        tile-high band of probabilities (at the working scale) is held, so the image may be
        larger than memory. Resize mode reads it whole.
        """
        source = as_rows(image)
        k = self.downsample
        if mode == "resize":
            prob = self.resized(downsample_image(source.rows(0, source.shape[0]), k))
            yield from upsample_strips([(0, prob)], k, len(prob), source.shape[:2])
            return
        small = DownsampledRows(source, k) if k > 1 else source
        strips = self.blend_strips(small)
        if k == 1:
            yield from strips
        else:
            yield from upsample_strips(strips, k, small.shape[0], source.shape[:2])
