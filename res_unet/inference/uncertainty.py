"""How unsure a model is about a scene: per-scene figures from its probabilities, as strips stream.

What to label next. A segmentation ranks its scenes by :data:`HEADLINE`, the figure that best
ranked the held-out scenes the shipped models get most wrong first (Spearman rank correlation
with 1 - mean IoU, ``bench/uncertainty_rank.py``, ``bench/results/uncertainty_rank.json``).
Every figure is in 0-1, higher = less sure, over the scene's valid pixels (NaN probabilities,
nodata, are left out):

- ``entropy``: the mean normalised entropy of the class probabilities (entropy / log C; a
  binary model's two classes p and 1 - p, so 1 means p = 0.5 everywhere);
- ``low_confidence``: the fraction of pixels whose top-class probability is below
  :data:`LOW_CONFIDENCE`;
- ``margin``: the mean of 1 - (top - second) class probability;
- ``expected_error``: 1 - the mean IoU expected when the truth is drawn from the
  probabilities: per predicted class c, sum of p_c over the pixels predicted c, divided by the
  pixels predicted c plus the p_c of the others (classes whose expected union is below
  :data:`MIN_UNION` of the pixels, and the ignored class, are left out, as empty classes are
  in scores.csv);
- ``disagreement``: where test-time augmentation or an ensemble runs, the fraction of tile
  pixels on which the views or members do not all predict the same class (every second row
  and column; tiles overlap, so pixels under several tiles count once per tile); None with a
  single view.

The sums are running sums (:class:`UncertaintySums`), so scenes larger than memory are ranked
as their strips stream; each strip also gives the per-pixel map (normalised entropy) that
``--save-uncertainty`` writes and a small sub-sampled copy for the review page.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from res_unet.geo import cog, writers
from res_unet.geo.rasters import RasterMeta

# The figure uncertainty.csv ranks by (see the module docstring for how it was chosen).
HEADLINE = "expected_error"
FIGURES = ("entropy", "low_confidence", "margin", "expected_error", "disagreement")
# Top-class probability below which a pixel counts as unsure (low_confidence).
LOW_CONFIDENCE = 0.9
# Classes whose expected union is below this share of a scene's pixels do not count in
# expected_error (a whisper of probability would otherwise make an 'IoU' of 0).
MIN_UNION = 0.001
_EPS = 1e-7
# Views are compared on every VIEW_STEP-th row and column of a tile (ViewDisagreement.view).
VIEW_STEP = 2


def predicted_classes(prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Class indices (...) of probabilities (..., C): binary p >= ``threshold``, else argmax."""
    if prob.shape[-1] == 1:
        return (prob[..., 0] >= threshold).astype(np.uint8)
    return prob.argmax(-1).astype(np.uint8)


def pixel_entropy(prob: np.ndarray) -> np.ndarray:
    """Normalised entropy (...) float32 in 0-1 of probabilities (..., C) (binary C = 1);
    NaN where the probabilities are NaN."""
    prob = prob.astype(np.float32, copy=False)
    if prob.shape[-1] == 1:
        p = np.clip(prob[..., 0], _EPS, 1.0 - _EPS)
        q = 1.0 - p
        out = p * np.log(p)
        out += q * np.log(q)
        out *= np.float32(-1.0 / math.log(2.0))
        return out
    clipped = np.clip(prob, _EPS, 1.0)
    return (-(prob * np.log(clipped)).sum(-1) / np.float32(math.log(prob.shape[-1]))
            ).astype(np.float32)


class UncertaintySums:
    """Running sums of one scene's probabilities, strip by strip (:meth:`add`), whose
    :meth:`figures` are the scene's uncertainty figures.

    ``n_outputs``: 1 for a binary model (probabilities of the foreground), else the number
    of classes; ``threshold``: a binary model's cut (what its labels use); ``ignore_class``
    is left out of expected_error; ``views`` counts the pixels test-time-augmentation views
    or ensemble members disagree on (the segmenter's, started again here); ``thumb_step``:
    every n-th row and column of the pixel map is kept for a thumbnail (:attr:`thumbnail`;
    0 keeps none); ``on_map``, when set, receives the map strip by strip (e.g.
    :func:`uncertainty_map_writer`).
    """

    def __init__(self, n_outputs: int, threshold: float = 0.5, ignore_class: int | None = None,
                 views: ViewDisagreement | None = None, thumb_step: int = 0) -> None:
        self.n_outputs = n_outputs
        self.threshold = threshold
        self.ignore_class = ignore_class
        self.thumb_step = thumb_step
        k = 2 if n_outputs == 1 else n_outputs
        self.pixels = 0
        self.entropy = 0.0
        self.low = 0
        self.margin = 0.0
        self.predicted = np.zeros(k, np.int64)  # pixels predicted c
        self.inside = np.zeros(k)  # sum of p_c where c is predicted
        self.total = np.zeros(k)  # sum of p_c everywhere
        self.views = views
        if views is not None:
            views.take()
        self._thumb: list[np.ndarray] = []
        self.on_map: Callable[[int, np.ndarray], None] | None = None

    def add(self, first_row: int, prob: np.ndarray) -> np.ndarray:
        """Add a strip of probabilities (rows, W, C) float (NaN at nodata) starting at image
        row ``first_row``; returns its per-pixel normalised entropy (rows, W) float32, NaN at
        nodata (the uncertainty map)."""
        prob = prob.astype(np.float32, copy=False)
        entropy = pixel_entropy(prob)  # NaN where the probabilities are (nodata)
        if self.on_map is not None:
            self.on_map(first_row, entropy)
        if self.thumb_step:
            first = -first_row % self.thumb_step
            self._thumb.append(entropy[first::self.thumb_step, ::self.thumb_step].copy())
        valid = ~np.isnan(entropy)
        n = int(valid.sum())
        if not n:
            return entropy
        self.pixels += n
        self.entropy += float(entropy[valid].sum(dtype=np.float64))
        if prob.shape[-1] == 1:
            # Binary: the classes are (1 - p, p); no (N, 2) copy of them is made.
            p = prob[..., 0][valid]
            spread = np.abs(2.0 * p - 1.0)  # top - second
            self.low += int((spread < 2.0 * LOW_CONFIDENCE - 1.0).sum())
            self.margin += float(n - spread.sum(dtype=np.float64))
            water = p >= self.threshold
            in_water = float(p[water].sum(dtype=np.float64))
            total = float(p.sum(dtype=np.float64))
            self.predicted += [n - int(water.sum()), int(water.sum())]
            self.inside += [(n - int(water.sum())) - (total - in_water), in_water]
            self.total += [n - total, total]
            return entropy
        c = prob[valid]
        top2 = np.partition(c, c.shape[1] - 2, axis=1)[:, -2:]
        self.low += int((top2[:, 1] < LOW_CONFIDENCE).sum())
        self.margin += float((1.0 - (top2[:, 1] - top2[:, 0])).sum(dtype=np.float64))
        pred = c.argmax(1)
        k = c.shape[1]
        self.predicted += np.bincount(pred, minlength=k)
        self.inside += np.bincount(pred, weights=top2[:, 1], minlength=k)
        self.total += c.sum(0, dtype=np.float64)
        return entropy

    @property
    def thumbnail(self) -> np.ndarray | None:
        """The sub-sampled entropy map (every ``thumb_step``-th row and column), or None."""
        return np.concatenate(self._thumb) if self._thumb else None

    def expected_iou(self) -> list[float | None]:
        """Per class: the IoU expected when the truth is drawn from the probabilities, None
        for the ignored class and classes below MIN_UNION."""
        union = self.predicted + self.total - self.inside
        out: list[float | None] = []
        for k, u in enumerate(union):
            if k == self.ignore_class or u < max(MIN_UNION * self.pixels, 1.0):
                out.append(None)
            else:
                out.append(float(self.inside[k] / u))
        return out

    def figures(self) -> dict[str, float | None]:
        """The scene's figures (module docstring) plus ``uncertainty`` (the HEADLINE figure)
        and ``pixels`` (valid pixels counted); None where there was nothing to count."""
        n = self.pixels
        ious = [v for v in self.expected_iou() if v is not None]
        out: dict[str, float | None] = {
            "entropy": self.entropy / n if n else None,
            "low_confidence": self.low / n if n else None,
            "margin": self.margin / n if n else None,
            "expected_error": 1.0 - float(np.mean(ious)) if ious else None,
            "disagreement": (self.views.differ / self.views.pixels
                             if self.views is not None and self.views.pixels else None),
        }
        return {"uncertainty": out[HEADLINE], **out, "pixels": n}


class ViewDisagreement:
    """Counts, batch by batch, the tile pixels on which test-time-augmentation views or
    ensemble members predict different classes (:func:`res_unet.inference.predict.predict_batch`
    hands it every view); a scene's :class:`UncertaintySums` reads the count."""

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = threshold
        self.differ = 0
        self.pixels = 0
        self._first: np.ndarray | None = None
        self._differs: np.ndarray | None = None
        self._views = 0

    def view(self, prob: np.ndarray) -> None:
        """One view's (or member's) probabilities (N, h, w, C) of the batch in progress;
        only its classes are kept (1 byte per pixel), not the probabilities. Every
        :data:`VIEW_STEP`-th row and column is compared: the share is an estimate, and each
        view is an arg-max over the whole tile otherwise."""
        classes = predicted_classes(prob[:, ::VIEW_STEP, ::VIEW_STEP], self.threshold)
        if self._first is None:
            self._first, self._differs = classes, np.zeros(classes.shape, bool)
        else:
            self._differs |= classes != self._first
        self._views += 1

    def end_batch(self) -> None:
        """Count the batch whose views were given (nothing with fewer than two views)."""
        if self._views > 1 and self._differs is not None:
            self.differ += int(self._differs.sum())
            self.pixels += self._differs.size
        self._first = self._differs = None
        self._views = 0

    def add(self, views: Sequence[np.ndarray]) -> None:
        """Add one batch: ``views`` are the probabilities (N, h, w, C) of each view/member."""
        for prob in views:
            self.view(prob)
        self.end_batch()

    def take(self) -> tuple[int, int]:
        """(pixels that differ, pixels) counted since the last call, and start again."""
        counted = self.differ, self.pixels
        self.differ = self.pixels = 0
        return counted


def rank_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """uncertainty.csv's rows, most uncertain first (scenes without a figure last, then by
    name): ``image``, ``uncertainty``, then the figures of :data:`FIGURES`, rounded."""
    def key(row: dict[str, Any]) -> tuple[bool, float, str]:
        value = row.get("uncertainty")
        return value is None, -(value or 0.0), str(row["image"])

    out = []
    for row in sorted(rows, key=key):
        out.append({"image": row["image"],
                    **{k: None if row.get(k) is None else round(float(row[k]), 6)
                       for k in ("uncertainty", *FIGURES)}})
    return out


def uncertainty_file(shard: tuple[int, int]) -> str:
    """uncertainty.csv, or uncertainty_shard{i}of{n}.csv for shard i of n (as scores)."""
    index, count = shard
    return "uncertainty.csv" if count == 1 else f"uncertainty_shard{index}of{count}.csv"


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation of two equally long sequences (ties get mean ranks);
    None when fewer than three pairs or either side is constant."""
    a, b = np.asarray(x, float), np.asarray(y, float)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None

    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for value in np.unique(v):  # ties: the mean of their ranks
            tied = v == value
            if tied.sum() > 1:
                r[tied] = r[tied].mean()
        return r

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def recorded_figures(record: Path) -> dict[str, Any] | None:
    """The uncertainty figures an image's record (.NAME.segmented) holds, or None (a record
    written before figures were, or unreadable: the scene is then ranked last)."""
    try:
        figures = json.loads(record.read_text(encoding="utf-8")).get("uncertainty")
    except (OSError, ValueError, AttributeError):
        return None
    return figures if isinstance(figures, dict) else None


@contextlib.contextmanager
def uncertainty_map_writer(path: Path, shape_hw: Sequence[int], meta: RasterMeta
                           ) -> Iterator[Callable[[int, np.ndarray], None]]:
    """Write a scene's uncertainty map strip by strip (``write(first_row, (rows, W) float32
    in 0-1, NaN at nodata)``) into ``path``, atomically: a float32 Cloud-Optimized GeoTIFF
    with ``meta``'s georeferencing (NaN nodata, averaged overviews) for .tif, else an 8-bit
    PNG (0-1 as 0-254, 255 at nodata)."""
    if path.suffix == ".tif":
        with writers.cog_writer(path, shape_hw, 1, np.float32, meta, nodata=float("nan"),
                                classes=False, description=cog.RasterDescription(band_names=[
                                    "uncertainty: normalised entropy of the class "
                                    "probabilities, 0 sure - 1 unsure"])) as write:
            yield write
        return
    with writers.png_writer(path, shape_hw) as write_png:

        def write(first_row: int, rows: np.ndarray) -> None:
            scaled = np.rint(np.nan_to_num(rows) * 254)
            write_png(first_row, np.where(np.isnan(rows), 255, scaled).astype(np.uint8))

        yield write
