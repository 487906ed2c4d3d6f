"""A synthetic demo dataset: aerial-looking scenes with lakes, islands and rivers.

Used by the README demo and the end-to-end tests, so nothing has to be downloaded or
committed. Scenes are built from smooth random fields (vectorised numpy/scipy): a patchwork
of fields and meadows, forest patches, lakes (thresholded low-frequency noise) with islands,
meandering rivers 2-8 px wide, straight roads and blocks of buildings. Water is dark blue to
green, lighter and greener in the shallows, with ripples; dark forest and building shadows
have similar colours, so a model has to use texture and context, not one threshold.

Labels: binary 0 land, 1 water; multiclass 0 land/bare (fields, meadows, beaches), 1 water,
2 forest, 3 built-up (roads, bridges, buildings). A scene is the same image either way: the
binary label is exactly ``multiclass_label == 1``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from res_unet.core.errors import UserError
from res_unet.geo.writers import write_png

LAND, WATER, FOREST, BUILT = 0, 1, 2, 3
_NAME = re.compile(r"^demo_(\d+)\.png$")


# Random fields ------------------------------------------------------------------------------

def _noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Smooth Gaussian noise (zero mean, unit std) with features about ``scale`` px across.

    Large scales are smoothed on a coarse grid and interpolated up, which keeps the cost
    independent of the scale.
    """
    h, w = shape
    factor = max(1, int(scale / 2))
    sigma = scale / factor
    # A margin of 2 sigma keeps the wrapped edges of the filter out of the scene.
    pad = int(2 * sigma) + 1
    ch, cw = h // factor + 3, w // factor + 3
    coarse = rng.standard_normal((ch + 2 * pad, cw + 2 * pad), dtype=np.float32)
    field = ndi.gaussian_filter(coarse, sigma, mode="wrap")[pad:pad + ch, pad:pad + cw]
    field = _upsample(field, factor, shape) if factor > 1 else field[:h, :w]
    return (field - field.mean()) / (field.std() + 1e-12)


def _upsample(field: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    """Linear interpolation of ``field`` onto a grid ``factor`` times finer, cropped to
    ``shape`` (separable, elementwise: exact and the same on every machine)."""
    for axis, n in enumerate(shape):
        pos = (np.arange(n) + 0.5) / factor + 0.5
        i0 = np.floor(pos).astype(int)
        t = (pos - i0).astype(np.float32)
        if axis == 0:
            field = field[i0] * (1 - t)[:, None] + field[i0 + 1] * t[:, None]
        else:
            field = field[:, i0] * (1 - t) + field[:, i0 + 1] * t
    return field


def _fractal(rng: np.random.Generator, shape: tuple[int, int], scales: Sequence[float],
             weights: Sequence[float]) -> np.ndarray:
    """Weighted sum of :func:`_noise` octaves, normalised to unit std."""
    field = sum(wt * _noise(rng, shape, sc) for sc, wt in zip(scales, weights, strict=True))
    return (field - field.mean()) / (field.std() + 1e-12)


def _top_fraction(field: np.ndarray, fraction: float) -> np.ndarray:
    """Mask of the ``fraction`` of pixels with the highest ``field`` values (exact count)."""
    k = round(fraction * field.size)
    if k <= 0:
        return np.zeros(field.shape, dtype=bool)
    threshold = np.partition(field.ravel(), field.size - k)[field.size - k]
    return field >= threshold


def _smooth_1d(rng: np.random.Generator, n: int, scale: float) -> np.ndarray:
    """1-D smooth noise, unit std, correlation length about ``scale`` samples."""
    values = ndi.gaussian_filter1d(rng.standard_normal(n), scale, mode="reflect")
    return (values - values.mean()) / (values.std() + 1e-12)


def _rivers(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Mask of 0-2 meandering rivers crossing the scene, each 2-8 px wide (varying along it)."""
    h, w = shape
    n_rivers = int(rng.choice([0, 1, 1, 1, 2]))
    centre = np.zeros(shape, dtype=bool)
    half_width = np.zeros(shape, dtype=np.float32)
    for _ in range(n_rivers):
        n = 4 * (h + w)
        step = 0.5
        heading = rng.uniform(0, 2 * np.pi) + rng.uniform(0.5, 1.1) * _smooth_1d(rng, n, 60)
        # Walk both ways from a start point inside the scene so the river crosses it.
        dy = np.cumsum(step * np.sin(heading))
        dx = np.cumsum(step * np.cos(heading))
        mid = n // 2
        y = rng.uniform(0.2, 0.8) * h + dy - dy[mid]
        x = rng.uniform(0.2, 0.8) * w + dx - dx[mid]
        base = rng.uniform(1.0, 4.0)
        hw = np.clip(base * (1 + 0.25 * _smooth_1d(rng, n, 80)), 1.0, 4.0)
        yi, xi = np.rint(y).astype(int), np.rint(x).astype(int)
        inside = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
        centre[yi[inside], xi[inside]] = True
        np.maximum.at(half_width, (yi[inside], xi[inside]), hw[inside].astype(np.float32))
    if not centre.any():
        return centre
    dist, (iy, ix) = ndi.distance_transform_edt(~centre, return_indices=True)
    return dist <= half_width[iy, ix]


def _islands(rng: np.random.Generator, shape: tuple[int, int], lake: np.ndarray) -> np.ndarray:
    """Mask of islands: blobs of smooth noise lying wholly inside a lake, off its shore."""
    blobs = _top_fraction(_fractal(rng, shape, [min(shape) / 20, 3], [1, 0.25]),
                          rng.uniform(0.05, 0.2))
    interior = ndi.distance_transform_edt(lake) > 3
    ids, n = ndi.label(blobs)
    inside_count = np.bincount(ids[interior], minlength=n + 1)
    total = np.bincount(ids.ravel(), minlength=n + 1)
    whole = inside_count == total
    whole[0] = False
    return whole[ids]


def _rotated_coords(shape: tuple[int, int], angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (u, v) in a frame rotated by ``angle`` radians."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    c, s = float(np.cos(angle)), float(np.sin(angle))
    return xx * c + yy * s, -xx * s + yy * c


def _blend(image: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> None:
    """Paint ``colour`` (H, W, 3) or (3,) into ``image`` where ``mask``, in place."""
    if colour.ndim == 1:
        image[mask] = colour
    else:
        image[mask] = colour[mask]


# Scene parts --------------------------------------------------------------------------------

def _farmland(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Patchwork of fields (crop rows, bare soil, dry grass) and meadows, float RGB 0-255."""
    h, w = shape
    size = min(h, w)
    u, v = _rotated_coords(shape, rng.uniform(0, np.pi))
    wobble = 3.0 * _noise(rng, shape, 12)
    fu, fv = rng.uniform(22, 60), rng.uniform(18, 50)
    iu = np.floor((u + wobble) / fu).astype(int)
    iv = np.floor((v - wobble) / fv).astype(int)
    iu -= iu.min()
    iv -= iv.min()
    field_id = iu * (iv.max() + 1) + iv
    n_fields = int(field_id.max()) + 1

    palette = np.array([[95, 125, 60], [120, 145, 70], [175, 165, 110], [140, 110, 80],
                        [160, 150, 95], [85, 110, 55], [185, 175, 140]], dtype=np.float32)
    kinds = rng.integers(len(palette), size=n_fields)
    colours = palette[kinds] + rng.normal(0, 10, (n_fields, 3)).astype(np.float32)
    image = colours[field_id]

    # Crop rows: stripes along each field's own direction, some fields without.
    period = rng.uniform(3, 7, n_fields).astype(np.float32)
    amp = (rng.uniform(0, 14, n_fields) * (rng.random(n_fields) < 0.6)).astype(np.float32)
    along_u = rng.random(n_fields) < 0.5
    coord = np.where(along_u[field_id], u, v)
    image += (amp[field_id] * np.sin(2 * np.pi * coord / period[field_id]))[..., None]

    # Darker field margins (tracks, hedges).
    edge_u = np.abs(((u + wobble) / fu) % 1 - 0.5) > 0.5 - 1.2 / fu
    edge_v = np.abs(((v - wobble) / fv) % 1 - 0.5) > 0.5 - 1.2 / fv
    image[edge_u | edge_v] *= 0.82

    # Meadows and scrub instead of fields in part of the scene.
    meadow = _top_fraction(_fractal(rng, shape, [size / 5, size / 15], [1, 0.4]),
                           rng.uniform(0.1, 0.5))
    tint = _fractal(rng, shape, [2, 8], [0.6, 1])[..., None]
    meadow_rgb = np.array([110, 130, 70], dtype=np.float32) + tint * np.array(
        [12, 14, 8], dtype=np.float32)
    _blend(image, meadow, meadow_rgb)

    image += _noise(rng, shape, 1.0)[..., None] * 5
    return image


def _forest_rgb(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Dark green tree-crown texture: blobs ~3 px with darker gaps, float RGB."""
    crowns = _fractal(rng, shape, [1.3, 3.5], [0.7, 1])
    # Broadleaf green or darker conifer green (as dark as some water, but rough).
    kinds = np.array([[45, 75, 40], [36, 60, 44]], dtype=np.float32)
    base = kinds[rng.integers(len(kinds))] + rng.normal(0, 6, 3).astype(np.float32)
    shade = 1 + 0.28 * np.tanh(crowns)
    return base * shade[..., None]


def _water_rgb(rng: np.random.Generator, shape: tuple[int, int],
               water: np.ndarray) -> np.ndarray:
    """Water colours: dark deep water, lighter shallows near shore, ripples and plumes."""
    size = min(shape)
    # Clear blue, green, and turbid olive water (the last as warm as land).
    deep_choices = np.array([[25, 45, 75], [30, 60, 65], [40, 62, 58], [20, 40, 60],
                             [55, 62, 45]], dtype=np.float32)
    deep = deep_choices[rng.integers(len(deep_choices))] + rng.normal(0, 5, 3).astype(np.float32)
    shallow = deep + np.float32([35, 40, 18]) + rng.normal(0, 6, 3).astype(np.float32)
    depth = ndi.distance_transform_edt(water).astype(np.float32)
    near = np.exp(depth / -float(rng.uniform(1.5, 4.0)))[..., None]
    rgb = deep + (shallow - deep) * near
    rgb += _noise(rng, shape, size / 6)[..., None] * np.float32([6, 7, 3])
    rgb += _noise(rng, shape, rng.uniform(1.0, 2.5))[..., None] * float(rng.uniform(1.5, 4))
    return rgb


def _roads(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, float]:
    """Mask of 1-3 straight roads 2-5 px wide, and the angle of the first (for buildings)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    mask = np.zeros(shape, dtype=bool)
    first_angle = 0.0
    for i in range(int(rng.integers(1, 4))):
        angle = rng.uniform(0, np.pi)
        if i == 0:
            first_angle = angle
        y0, x0 = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
        dist = np.abs((xx - x0) * float(np.sin(angle)) - (yy - y0) * float(np.cos(angle)))
        mask |= dist <= rng.uniform(1.0, 2.5)
    return mask, first_angle


def _buildings(rng: np.random.Generator, shape: tuple[int, int], angle: float,
               town: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blocky buildings on a grid aligned with a road, inside ``town``.

    Returns the building mask, their roof colours (H, W, 3) and a shadow mask.
    """
    u, v = _rotated_coords(shape, angle)
    cell = rng.uniform(9, 15)
    iu, fu = np.divmod(u - u.min(), cell)
    iv, fv = np.divmod(v - v.min(), cell)
    iu, iv = iu.astype(int), iv.astype(int)
    cell_id = iu * (iv.max() + 1) + iv
    n_cells = int(cell_id.max()) + 1
    lo = rng.uniform(1.5, 3.5, (n_cells, 2))
    hi = cell - rng.uniform(1.5, 3.5, (n_cells, 2))
    present = rng.random(n_cells) < 0.75
    roofs = np.array([[170, 165, 160], [150, 85, 65], [110, 110, 115], [200, 195, 185]],
                     dtype=np.float32)
    roof = roofs[rng.integers(len(roofs), size=n_cells)] + rng.normal(0, 8, (n_cells, 3))
    inside = ((fu >= lo[cell_id, 0]) & (fu <= hi[cell_id, 0])
              & (fv >= lo[cell_id, 1]) & (fv <= hi[cell_id, 1]))
    buildings = inside & present[cell_id] & town
    shadow = np.zeros_like(buildings)
    shadow[2:, 2:] = buildings[:-2, :-2]
    shadow &= ~buildings
    return buildings, roof[cell_id].astype(np.float32), shadow


# Public API ---------------------------------------------------------------------------------

def synthesize_scene(rng: np.random.Generator, size: Sequence[int] = (256, 256),
                     multiclass: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic aerial scene and its label.

    ``size`` is (rows, cols). Returns ``image`` (H, W, 3) uint8 RGB and ``label`` (H, W) uint8:
    0 land / 1 water, or with ``multiclass`` 0 land/bare, 1 water, 2 forest, 3 built-up.
    Water covers roughly 5-40 % of the scene. The image does not depend on ``multiclass``.
    """
    h, w = int(size[0]), int(size[1])
    shape = (h, w)
    scale = min(h, w)

    # Water layout: lakes at a random share of the scene, islands, rivers.
    lake_field = _fractal(rng, shape, [scale / 4, scale / 10, scale / 30], [1, 0.45, 0.2])
    lake = _top_fraction(lake_field, rng.uniform(0.05, 0.36))
    lake &= ~_islands(rng, shape, lake)
    river = _rivers(rng, shape)
    water = lake | river

    # Land cover.
    image = _farmland(rng, shape)
    forest_field = _fractal(rng, shape, [scale / 8, scale / 25], [1, 0.5])
    forest = _top_fraction(forest_field, rng.uniform(0.08, 0.3)) & ~water
    _blend(image, forest, _forest_rgb(rng, shape))

    shore = ndi.distance_transform_edt(~water) <= rng.uniform(1.0, 3.0)
    beach = shore & ~water & (_noise(rng, shape, 10) > 0.3)
    _blend(image, beach, np.array([190, 180, 150], dtype=np.float32)
           + rng.normal(0, 6, 3).astype(np.float32))

    _blend(image, water, _water_rgb(rng, shape, water))
    glint = water & (_noise(rng, shape, 1.0) > 3.0)
    image[glint] = image[glint] * 0.7 + 40

    roads, road_angle = _roads(rng, shape)
    roads &= ~lake  # roads stop at lakes but bridge rivers
    town = _top_fraction(_noise(rng, shape, scale / 6), rng.uniform(0.04, 0.2)) & ~water
    buildings, roofs, shadow = _buildings(rng, shape, road_angle, town & ~roads)
    road_rgb = np.float32(rng.uniform(105, 150)) + 6 * _noise(rng, shape, 1.0)
    _blend(image, roads, np.repeat(road_rgb[..., None], 3, axis=2))
    _blend(image, buildings, roofs)
    image[shadow & ~roads] *= 0.55

    # Sensor: uneven illumination, optical blur, noise.
    light = 1 + 0.06 * _noise(rng, shape, scale / 2)
    image *= light[..., None]
    image = ndi.gaussian_filter(image, sigma=(0.6, 0.6, 0))
    image += 2.5 * rng.standard_normal(image.shape, dtype=np.float32)
    image_u8 = np.clip(np.rint(image), 0, 255).astype(np.uint8)

    label = np.full(shape, LAND, dtype=np.uint8)
    if multiclass:
        label[forest] = FOREST
        label[water] = WATER
        label[roads | buildings] = BUILT
    else:
        label[water & ~roads] = WATER
    return image_u8, label


def make_demo_dataset(out_dir: str | os.PathLike, n_images: int,
                      size: Sequence[int] = (256, 256), seed: int = 0,
                      multiclass: bool = False) -> tuple[Path, Path]:
    """Write ``n_images`` synthetic scenes to ``out_dir/images/demo_NNN.png`` (RGB) and their
    labels to ``out_dir/labels/demo_NNN.png`` (single-channel class indices).

    Scene ``i`` depends only on ``(seed, i)``, so the same seed gives identical files and a
    smaller count gives a prefix of a larger one. Older ``demo_NNN.png`` files beyond
    ``n_images`` are removed so the folders hold exactly this dataset. Returns
    ``(images_dir, labels_dir)``.
    """
    if n_images < 1:
        raise UserError(f"{out_dir}: demo dataset needs at least 1 image, got {n_images}")
    if len(size) != 2 or min(size) < 16:
        raise UserError(f"{out_dir}: demo image size must be [rows, cols] >= 16, got "
                        f"{list(size)}")
    out = Path(out_dir)
    images_dir, labels_dir = out / "images", out / "labels"
    for folder in (images_dir, labels_dir):
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("demo_*.png"):
            match = _NAME.match(old.name)
            if match and int(match.group(1)) >= n_images:
                old.unlink()
    for i in range(n_images):
        image, label = synthesize_scene(np.random.default_rng([seed, i]), size, multiclass)
        write_png(images_dir / f"demo_{i:03d}.png", image)
        write_png(labels_dir / f"demo_{i:03d}.png", label)
    return images_dir, labels_dir


def make_demo_splits(out_dir: str | os.PathLike, n_train: int, n_test: int,
                     size: Sequence[int] = (256, 256), seed: int = 0,
                     multiclass: bool = False) -> dict[str, tuple[Path, Path]]:
    """Training scenes in out_dir/train and unseen test scenes (another seed) in out_dir/test.

    Returns {"train": (images, labels), "test": (images, labels)}.
    """
    out = Path(out_dir)
    splits = {"train": make_demo_dataset(out / "train", n_train, size, seed, multiclass)}
    if n_test:
        splits["test"] = make_demo_dataset(out / "test", n_test, size, seed + 1, multiclass)
    return splits


def main(argv: list[str] | None = None) -> int:
    """``python -m res_unet.demo``: write the synthetic demo dataset."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m res_unet.demo",
                                     description="Synthesise the demo dataset (aerial-looking "
                                     "scenes with lakes, islands and rivers) into OUT/train "
                                     "and OUT/test.")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--count", type=int, default=48, help="training scenes")
    parser.add_argument("--test-count", type=int, default=8, help="held-out test scenes")
    parser.add_argument("--size", type=int, nargs="+", default=[256], help="ROWS [COLS]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--multiclass", action="store_true",
                        help="4 classes: land, water, forest, built-up")
    args = parser.parse_args(argv)
    size = (args.size[0], args.size[-1])
    splits = make_demo_splits(args.out, args.count, args.test_count, size, args.seed,
                              args.multiclass)
    for name, (images, labels) in splits.items():
        print(f"{name}: {len(list(images.glob('*.png')))} scenes in {images} (labels in "
              f"{labels})")
    return 0


if __name__ == "__main__":
    from res_unet.cli import run_command

    raise SystemExit(run_command(main))
