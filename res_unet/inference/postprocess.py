"""Turn predicted probabilities into clean label maps.

Inputs are the model's probabilities, float32 (H, W, C): C = 1 is binary (the foreground
probability, from a sigmoid), C = N > 1 is N classes (softmax). Label maps are (H, W) uint8
class indices 0..n_classes-1, where n_classes is 2 for binary outputs.

:func:`postprocess` runs the configured chain in this order:

1. dense CRF on the probabilities (``DO_CRF_REFINE``), :func:`crf_refine`;
2. probabilities -> labels: binary ``p >= threshold`` (a number or Otsu's), multiclass argmax;
3. majority (median) filter (``MEDIAN_FILTER_VALUE``, applied when > 1);
4. opening (``OPENING_RADIUS``), then closing (``CLOSING_RADIUS``);
5. removal of small objects (``MIN_OBJECT_AREA``), then filling of small holes
   (``MIN_HOLE_AREA``).

Images above ``CRF_MAX_PIXELS`` are CRF-refined on a coarser grid (see :func:`crf_refine`).
Nodata is not part of the chain: segmentation (:mod:`res_unet.inference.predict`) sets nodata pixels
to LABEL_NODATA (255) after it.

Binary label maps are cleaned as a foreground mask (class 1) with the scikit-image
operations. Multiclass maps follow rules that treat every class alike and only ever
assign a pixel a class that is already present (see each function). Connected components
are 4-connected throughout, as are the polygons of :mod:`res_unet.geo.polygons`.
"""

from __future__ import annotations

import math

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_softmax
from scipy import ndimage
from skimage import filters, morphology

from res_unet.config.keys import Config
from res_unet.data.report import to_display_rgb
from res_unet.geo.tiling import downsample_image

_PROB_CLIP = 1e-5  # floor for probabilities before logs, as pydensecrf's unary_from_softmax


# Probabilities -> labels -------------------------------------------------------------------

def _check_prob(prob: np.ndarray) -> np.ndarray:
    if prob.ndim != 3 or prob.shape[2] < 1:
        raise ValueError(f"probabilities must be (H, W, C), got shape {prob.shape}")
    return prob


def to_two_class(prob: np.ndarray) -> np.ndarray:
    """Binary foreground probabilities (H, W, 1) -> float32 (H, W, 2) as [1 - p, p]."""
    p = _check_prob(prob)[..., 0].astype(np.float32)
    return np.stack([1.0 - p, p], axis=-1)


def probs_to_label(prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Probabilities (H, W, C) in [0, 1] -> (H, W) uint8 class indices.

    Binary (C = 1): 1 where ``p >= threshold``, else 0. Multiclass: the argmax (the threshold
    is not used).
    """
    prob = _check_prob(prob)
    if prob.shape[2] == 1:
        return (prob[..., 0] >= threshold).astype(np.uint8)
    return np.argmax(prob, axis=-1).astype(np.uint8)


def otsu_threshold(prob: np.ndarray) -> float:
    """Otsu's threshold (in [0, 1]) of binary foreground probabilities (H, W, 1).

    Returns 0.5 for a constant map, where there is nothing to separate.
    """
    prob = _check_prob(prob)
    if prob.shape[2] != 1:
        raise ValueError("Otsu's threshold applies to binary probabilities (H, W, 1), got "
                         f"{prob.shape[2]} classes")
    p = prob[..., 0]
    if float(p.min()) == float(p.max()):
        return 0.5
    return float(filters.threshold_otsu(p))


def otsu_from_histogram(counts: np.ndarray) -> float:
    """Otsu's threshold in [0, 1] from ``counts[k]``, the number of probabilities equal to
    k / (len(counts) - 1) (probabilities quantised to that many levels); 0.5 when fewer than
    two levels occur."""
    present = np.flatnonzero(counts)
    if len(present) < 2:
        return 0.5
    lo, hi = present[0], present[-1] + 1
    centres = np.arange(lo, hi) / (len(counts) - 1)
    return float(filters.threshold_otsu(hist=(counts[lo:hi], centres)))


def resolve_threshold(prob: np.ndarray, setting: float | str | None,
                      fallback: float | None = None) -> float:
    """The binary threshold to use: ``setting`` (cfg.THRESHOLD) if given, else ``fallback``.

    ``setting`` is a number in (0, 1), 'otsu' (computed on ``prob``) or None. ``fallback``
    is the model card's validation-optimal threshold; 0.5 when that is None as well.
    """
    if setting == "otsu":
        return otsu_threshold(prob)
    if setting is not None:
        return float(setting)
    return 0.5 if fallback is None else float(fallback)


# Dense CRF --------------------------------------------------------------------------------

def crf_grid_factor(height: int, width: int, max_pixels: int) -> int:
    """Smallest integer down-sampling factor f with ceil(H/f) * ceil(W/f) <= max_pixels."""
    factor = max(1, math.ceil(math.sqrt(height * width / max_pixels)))
    while math.ceil(height / factor) * math.ceil(width / factor) > max_pixels:
        factor += 1
    return factor


def _upsample_bilinear(array: np.ndarray, factor: int, shape_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear up-sampling of (h, w, C) by ``factor`` (pixel areas aligned), cropped to H, W.

    The geometry of :func:`res_unet.geo.tiling.upsample_rows` (DOWNSAMPLE), which would do
    here too but rounds differently (rows then columns in float32, where scipy sums the four
    products in float64): up to 4e-7 apart, enough to change the refined probabilities of
    large images, so the CRF keeps its own until its outputs may change.
    """
    out = np.empty((*shape_hw, array.shape[2]), np.float32)
    for k in range(array.shape[2]):
        up = ndimage.zoom(array[..., k], factor, order=1, grid_mode=True, mode="nearest")
        out[..., k] = up[:shape_hw[0], :shape_hw[1]]
    return out


def _dense_crf(prob: np.ndarray, rgb: np.ndarray, iterations: int, gaussian_sxy: float,
               gaussian_compat: float, bilateral_sxy: float, bilateral_srgb: float,
               bilateral_compat: float) -> np.ndarray:
    """Mean-field dense CRF on (H, W, C) probabilities (C >= 2) -> Q, float32 (H, W, C)."""
    h, w, c = prob.shape
    crf = dcrf.DenseCRF2D(w, h, c)
    unary = unary_from_softmax(np.moveaxis(prob, -1, 0), clip=_PROB_CLIP)
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    if gaussian_compat > 0:
        crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
    if bilateral_compat > 0:
        crf.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=rgb,
                                 compat=bilateral_compat)
    q = np.asarray(crf.inference(iterations), dtype=np.float32)
    return np.ascontiguousarray(np.moveaxis(q.reshape(c, h, w), 0, -1))


def _softmax_inplace(logits: np.ndarray) -> np.ndarray:
    logits -= logits.max(axis=-1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=-1, keepdims=True)
    return logits


def crf_refine(prob: np.ndarray, image: np.ndarray, *, iterations: int = 10,
               gaussian_sxy: float = 3.0, gaussian_compat: float = 3.0,
               bilateral_sxy: float = 50.0, bilateral_srgb: float = 13.0,
               bilateral_compat: float = 10.0, max_pixels: int = 4_000_000) -> np.ndarray:
    """Refine probabilities with a fully connected (dense) CRF; same shape, float32 in [0, 1].

    ``prob`` is (H, W, 1) binary or (H, W, N) softmax; ``image`` (H, W, B) is the raw image,
    shown to the CRF as 0-255 RGB via :func:`to_display_rgb`. The unary term is
    -log(max(p, 1e-5)) (binary maps are expanded to [1 - p, p]); pairwise terms are a
    Gaussian kernel (``gaussian_sxy`` pixels) and a bilateral kernel (``bilateral_sxy``
    pixels, ``bilateral_srgb`` in 0-255 colour units); ``iterations`` mean-field steps.

    Images with more than ``max_pixels`` pixels are refined on a coarser grid: image and
    probabilities are block-averaged by the smallest integer factor f that brings the pixel
    count within ``max_pixels``, the pixel widths ``*_sxy`` are divided by f, and the CRF runs
    there. Its correction, log Q - log p on the coarse grid (the pairwise messages), is
    up-sampled bilinearly and added to the full-resolution log-probabilities, which are then
    renormalised. So detail finer than f pixels in the original probabilities survives
    wherever the CRF agreed with them, rather than being blurred away by up-sampling Q.
    """
    prob = _check_prob(prob)
    h, w, c = prob.shape
    if image.shape[:2] != (h, w):
        raise ValueError(f"image {image.shape[:2]} and probabilities {(h, w)} differ in size")
    full = to_two_class(prob) if c == 1 else prob.astype(np.float32, copy=False)
    rgb = to_display_rgb(image)
    factor = crf_grid_factor(h, w, max_pixels)
    if factor == 1:
        refined = _dense_crf(full, rgb, iterations, gaussian_sxy, gaussian_compat,
                             bilateral_sxy, bilateral_srgb, bilateral_compat)
    else:
        coarse_p = downsample_image(full, factor)
        coarse_rgb = np.ascontiguousarray(downsample_image(rgb, factor))
        del rgb
        # pydensecrf normalises its kernels (weighted averages, not sums), so only the pixel
        # widths change with the grid; the compatibilities keep their meaning.
        q = _dense_crf(coarse_p, coarse_rgb, iterations, gaussian_sxy / factor,
                       gaussian_compat, bilateral_sxy / factor, bilateral_srgb,
                       bilateral_compat)
        correction = np.log(np.clip(q, _PROB_CLIP, 1.0)) - np.log(
            np.clip(coarse_p, _PROB_CLIP, 1.0))
        refined = np.log(np.clip(full, _PROB_CLIP, 1.0))
        refined += _upsample_bilinear(correction, factor, (h, w))
        refined = _softmax_inplace(refined)
    return refined[..., 1:2].copy() if c == 1 else refined


# Label clean-up ---------------------------------------------------------------------------

def median_filter(label: np.ndarray, radius: int) -> np.ndarray:
    """Majority filter of a label map (H, W) over a disk of ``radius`` pixels.

    Applied when ``radius > 1`` (MEDIAN_FILTER_VALUE semantics); otherwise a copy is
    returned. For 0/1 maps the majority is the median; for multiclass maps a median of class
    indices means nothing, so every pixel takes the most common class in its disk. Pixels
    outside the image do not vote; a tie keeps the pixel's own class if it is among the
    most common, else goes to the lowest of them.
    """
    if radius <= 1:
        return label.copy()
    # uint16 holds 2 * count + 1 for the largest allowed disk (radius 100: 31417 pixels).
    footprint = morphology.disk(radius).astype(np.uint16)
    best = np.zeros(label.shape, np.uint16)
    out = label.copy()
    for k in np.unique(label):
        own = label == k
        # Doubled counts plus one for the pixel's own class: ties break towards keeping it.
        score = ndimage.convolve(own.astype(np.uint16), footprint, mode="constant")
        score *= 2
        score += own
        better = score > best
        best[better] = score[better]
        out[better] = k
    return out


def _nearest_kept(label: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Give every pixel outside ``kept`` the class of the nearest pixel inside it."""
    if kept.all() or not kept.any():
        return label.copy()
    index = ndimage.distance_transform_edt(~kept, return_distances=False, return_indices=True)
    return label[tuple(index)]


def _open(mask: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Binary opening; the image border does not erode objects that touch it."""
    return morphology.opening(mask, footprint, mode="ignore")


def _close(mask: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Binary closing with background beyond the border, so objects near it do not grow
    onto it (scikit-image's border handling would fill the strip between them)."""
    r = footprint.shape[0] // 2
    closed = morphology.closing(np.pad(mask, r), footprint, mode="ignore")
    return closed[r:-r, r:-r]


def morphological_open(label: np.ndarray, radius: int, n_classes: int = 2) -> np.ndarray:
    """Opening with a disk of ``radius`` pixels (0 = off): removes specks and thin parts.

    Binary (``n_classes == 2``): the opening of the foreground (class 1). Multiclass: every
    class is opened; the pixels no class keeps take the class of the nearest kept pixel.
    """
    if radius <= 0:
        return label.copy()
    footprint = morphology.disk(radius)
    if n_classes == 2:
        return _open(label == 1, footprint).astype(label.dtype)
    kept = np.zeros(label.shape, bool)
    for k in np.unique(label):
        kept |= _open(label == k, footprint)
    return _nearest_kept(label, kept)


def morphological_close(label: np.ndarray, radius: int, n_classes: int = 2) -> np.ndarray:
    """Closing with a disk of ``radius`` pixels (0 = off): fills gaps and narrow inlets.

    Binary (``n_classes == 2``): the closing of the foreground (class 1). Multiclass: every
    class is closed; a pixel the closing of exactly one other class claims takes that class,
    a pixel claimed by several classes keeps its own. As the classes tile the image, closing
    one class also trims the sharp corners of the classes it surrounds.
    """
    if radius <= 0:
        return label.copy()
    footprint = morphology.disk(radius)
    if n_classes == 2:
        return _close(label == 1, footprint).astype(label.dtype)
    claims = np.zeros(label.shape, np.uint8)
    claimant = label.copy()
    for k in np.unique(label):
        added = _close(label == k, footprint) & (label != k)
        claims[added] += 1
        claimant[added] = k
    return np.where(claims == 1, claimant, label).astype(label.dtype, copy=False)


def _components(label: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4-connected components of every class: (ids (H, W) 0..n-1, class of each, sizes)."""
    ids = np.empty(label.shape, np.int64)
    classes, offset = [], 0
    for k in np.unique(label):
        mask = label == k
        lab, n = ndimage.label(mask)
        ids[mask] = lab[mask] - 1 + offset
        classes.append(np.full(n, k, label.dtype))
        offset += n
    comp_class = np.concatenate(classes)
    return ids, comp_class, np.bincount(ids.ravel(), minlength=offset)


def _boundary_pairs(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Component ids on either side of every 4-neighbour edge between two components."""
    a, b = [], []
    for first, second in ((ids[:, :-1], ids[:, 1:]), (ids[:-1, :], ids[1:, :])):
        differ = first != second
        a.append(first[differ])
        b.append(second[differ])
    return np.concatenate(a), np.concatenate(b)


def _reassign_small_components(label: np.ndarray, min_area: int, enclosed_only: bool
                               ) -> np.ndarray:
    """Multiclass clean-up: components smaller than ``min_area`` join a neighbouring class.

    Each small component takes the class it shares most boundary with (ties: the lower
    class index). With ``enclosed_only``, only components whose neighbours all have one
    class change (holes). Rounds repeat until nothing changes, because a small component
    inside another small one only finds its final class after that one has moved. Two
    adjacent components never change in the same round (the larger waits), so nothing
    swaps back and forth: every round merges components, so the loop ends.
    """
    out = label.copy()
    while True:
        ids, comp_class, sizes = _components(out)
        n_comp, n_cls = len(sizes), int(comp_class.max()) + 1
        small = sizes < min_area
        if not small.any() or n_comp == 1:
            return out
        a, b = _boundary_pairs(ids)
        side_a = np.concatenate([a, b])
        side_b_class = comp_class[np.concatenate([b, a])].astype(np.int64)
        counts = np.bincount(side_a * n_cls + side_b_class,
                             minlength=n_comp * n_cls).reshape(n_comp, n_cls)
        touching = (counts > 0).sum(axis=1)
        eligible = small & ((touching == 1) if enclosed_only else (touching > 0))
        # Between two adjacent eligible components only the smaller (then lower id) moves.
        order = np.lexsort((np.arange(n_comp), sizes))
        rank = np.empty(n_comp, np.int64)
        rank[order] = np.arange(n_comp)
        both = eligible[a] & eligible[b]
        waits = np.where(rank[a[both]] > rank[b[both]], a[both], b[both])
        eligible[waits] = False
        if not eligible.any():
            return out
        target = comp_class.copy()
        target[eligible] = np.argmax(counts[eligible], axis=1).astype(comp_class.dtype)
        out = target[ids]


def remove_small_objects(label: np.ndarray, min_area: int, n_classes: int = 2) -> np.ndarray:
    """Remove connected objects of fewer than ``min_area`` pixels (0 = off).

    Binary: foreground components (class 1) smaller than ``min_area`` become background.
    Multiclass: every component of any class smaller than ``min_area`` takes the class it
    shares the longest boundary with.
    """
    if min_area <= 1:
        return label.copy()
    if n_classes == 2:
        kept = morphology.remove_small_objects(label == 1, max_size=min_area - 1)
        return kept.astype(label.dtype)
    return _reassign_small_components(label, min_area, enclosed_only=False)


def fill_small_holes(label: np.ndarray, min_area: int, n_classes: int = 2) -> np.ndarray:
    """Fill holes of fewer than ``min_area`` pixels (0 = off).

    Binary: background components (class 0) smaller than ``min_area`` become foreground
    (also at the image border, as scikit-image does). Multiclass: a component smaller than
    ``min_area`` whose neighbours all have one class takes that class.
    """
    if min_area <= 1:
        return label.copy()
    if n_classes == 2:
        filled = morphology.remove_small_holes(label == 1, max_size=min_area - 1)
        return filled.astype(label.dtype)
    return _reassign_small_components(label, min_area, enclosed_only=True)


# The chain --------------------------------------------------------------------------------

def postprocess(prob: np.ndarray, image: np.ndarray | None, cfg: Config,
                threshold: float | None = None) -> np.ndarray:
    """Probabilities (H, W, C) -> cleaned (H, W) uint8 label map, as configured in ``cfg``.

    Order: CRF (DO_CRF_REFINE; needs ``image``, the raw (H, W, B) image) -> threshold or
    argmax -> majority filter (MEDIAN_FILTER_VALUE) -> opening (OPENING_RADIUS) -> closing
    (CLOSING_RADIUS) -> small objects (MIN_OBJECT_AREA) -> small holes (MIN_HOLE_AREA).
    The binary threshold is cfg.THRESHOLD when set (a number, or 'otsu' computed after the
    CRF), else ``threshold`` (the model card's), else 0.5.
    """
    prob = _check_prob(prob)
    if cfg.DO_CRF_REFINE:
        if image is None:
            raise ValueError("DO_CRF_REFINE needs the image")
        prob = crf_refine(prob, image, iterations=cfg.CRF_ITERATIONS,
                          gaussian_sxy=cfg.CRF_GAUSSIAN_SXY,
                          gaussian_compat=cfg.CRF_GAUSSIAN_COMPAT,
                          bilateral_sxy=cfg.CRF_BILATERAL_SXY,
                          bilateral_srgb=cfg.CRF_BILATERAL_SRGB,
                          bilateral_compat=cfg.CRF_BILATERAL_COMPAT,
                          max_pixels=cfg.CRF_MAX_PIXELS)
    n_classes = 2 if prob.shape[2] == 1 else prob.shape[2]
    cut = resolve_threshold(prob, cfg.THRESHOLD, threshold) if n_classes == 2 else 0.5
    return clean_label(probs_to_label(prob, cut), cfg, n_classes)


def cleans_labels(cfg: Config) -> bool:
    """Whether :func:`clean_label` changes anything under ``cfg`` (some step is on)."""
    return (cfg.MEDIAN_FILTER_VALUE > 1 or cfg.OPENING_RADIUS > 0 or cfg.CLOSING_RADIUS > 0
            or cfg.MIN_OBJECT_AREA > 1 or cfg.MIN_HOLE_AREA > 1)


def clean_label(label: np.ndarray, cfg: Config, n_classes: int) -> np.ndarray:
    """The label clean-up of :func:`postprocess` on a (H, W) uint8 class map: majority
    filter (MEDIAN_FILTER_VALUE) -> opening -> closing -> small objects -> small holes.

    ``n_classes`` counts the background (2 for binary). Steps whose setting is 0 are skipped.
    """
    label = median_filter(label, cfg.MEDIAN_FILTER_VALUE)
    label = morphological_open(label, cfg.OPENING_RADIUS, n_classes)
    label = morphological_close(label, cfg.CLOSING_RADIUS, n_classes)
    label = remove_small_objects(label, cfg.MIN_OBJECT_AREA, n_classes)
    return fill_small_holes(label, cfg.MIN_HOLE_AREA, n_classes)
