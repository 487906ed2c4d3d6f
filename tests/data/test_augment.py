"""Augmentation: shapes, dtypes, class sets, image/label alignment, no fill borders."""

import dataclasses

import numpy as np
import pytest

from res_unet.config.keys import Config
from res_unet.data.augment import augment_pair

EXACT = dict(AUG_ROT=0.0, AUG_ZOOM=0.0, AUG_WIDTHSHIFT=0.0, AUG_HEIGHTSHIFT=0.0,
             AUG_HFLIP=True, AUG_VFLIP=True, AUG_ROT90=True)
STRONG = dict(AUG_ROT=30.0, AUG_ZOOM=0.2, AUG_WIDTHSHIFT=0.15, AUG_HEIGHTSHIFT=0.15,
              AUG_HFLIP=True, AUG_VFLIP=True, AUG_ROT90=True)


def make_cfg(**keys) -> Config:
    return dataclasses.replace(Config(), **keys)


def blocks_pair(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Label with three classes in large blocks; band 0 of the image is label * 100."""
    label = np.zeros((h, w), dtype=np.uint8)
    label[h // 8:h // 2, w // 6:w // 2] = 1
    label[h // 2 + 2:h - 3, 2:w // 3] = 2
    label[h // 3:h - 5, w // 2 + 4:w - 2] = 1
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([label * 100, (yy * 3) % 256, (xx * 5) % 256], axis=-1).astype(np.uint8)
    return image, label


def dihedral(a: np.ndarray, square: bool) -> list[np.ndarray]:
    """All flips / 90-degree rotations of ``a`` (only 0 and 180 degrees if not square)."""
    out = []
    for k in (range(4) if square else (0, 2)):
        r = np.rot90(a, k)
        out += [r, r[:, ::-1], r[::-1], r[::-1, ::-1]]
    return out


@pytest.mark.parametrize(("h", "w"), [(32, 32), (24, 40)])
def test_flips_and_rot90_are_exact_and_aligned(h, w):
    image, label = blocks_pair(h, w)
    cfg = make_cfg(**EXACT)
    seen = set()
    for seed in range(24):
        img, lab = augment_pair(image, label, np.random.default_rng(seed), cfg)
        assert img.shape == image.shape and img.dtype == np.uint8
        assert lab.shape == label.shape and lab.dtype == np.uint8
        np.testing.assert_array_equal(img[..., 0], lab.astype(np.uint16) * 100)
        matches = [i for i, cand in enumerate(dihedral(label, h == w))
                   if np.array_equal(cand, lab)]
        assert matches, "label is not a flip/rotation of the input"
        assert any(np.array_equal(c, img) for c in dihedral(image, h == w))
        seen.add(lab.tobytes())
    assert len(seen) >= (6 if h == w else 3)  # the transforms really vary


def test_no_augmentation_when_everything_is_off():
    image, label = blocks_pair(16, 16)
    cfg = make_cfg(AUG_ROT=0.0, AUG_ZOOM=0.0, AUG_WIDTHSHIFT=0.0, AUG_HEIGHTSHIFT=0.0,
                   AUG_HFLIP=False, AUG_VFLIP=False, AUG_ROT90=False)
    img, lab = augment_pair(image, label, np.random.default_rng(0), cfg)
    np.testing.assert_array_equal(img, image)
    np.testing.assert_array_equal(lab, label)
    assert not np.shares_memory(img, image) and not np.shares_memory(lab, label)


def test_rotation_zoom_shift_keep_the_class_set():
    image, label = blocks_pair(64, 64)
    cfg = make_cfg(**STRONG)
    changed = 0
    for seed in range(10):
        img, lab = augment_pair(image, label, np.random.default_rng(seed), cfg)
        assert img.shape == image.shape and img.dtype == np.uint8 and lab.shape == label.shape
        assert set(np.unique(lab)) <= {0, 1, 2}
        changed += not any(np.array_equal(c, lab) for c in dihedral(label, True))
    assert changed >= 8  # the continuous part of the transform was applied


def test_rotation_zoom_shift_keep_image_and_label_aligned():
    image, label = blocks_pair(64, 64)
    label = (label > 0).astype(np.uint8)
    image[..., 0] = label * 100
    cfg = make_cfg(**STRONG)
    for seed in range(10):
        img, lab = augment_pair(image, label, np.random.default_rng(seed), cfg)
        diff = img[..., 0].astype(int) - lab.astype(int) * 100
        # Bilinear image and nearest label differ only in edge pixels, by under half a step.
        assert np.mean(np.abs(diff) <= 50) > 0.98
        assert np.mean(diff == 0) > 0.85
        assert abs(diff.mean()) < 0.5  # no systematic bias either way


@pytest.mark.parametrize(("dtype", "value"), [(np.uint8, (120, 80, 200)),
                                              (np.uint16, (40000, 3, 65535))])
def test_constant_image_stays_constant(dtype, value):
    """Mirrored fill: no black (zero) border appears when rotating, zooming out, shifting."""
    image = np.empty((37, 41, 3), dtype=dtype)
    image[:] = value
    label = np.ones((37, 41), dtype=np.uint8)
    cfg = make_cfg(**{**STRONG, "AUG_ROT": 45.0, "AUG_ZOOM": 0.5, "AUG_WIDTHSHIFT": 0.3})
    for seed in range(5):
        img, lab = augment_pair(image, label, np.random.default_rng(seed), cfg)
        assert img.dtype == dtype
        np.testing.assert_array_equal(img, image)
        assert np.all(lab == 1)


def test_uint16_stays_within_input_range():
    yy, xx = np.mgrid[0:40, 0:40]
    image = (60000 + 100 * np.sin(yy / 3.0) * np.cos(xx / 2.0)).astype(np.uint16)[..., None]
    label = (yy > xx).astype(np.uint8)
    img, lab = augment_pair(image, label, np.random.default_rng(3), make_cfg(**STRONG))
    assert img.dtype == np.uint16 and img.shape == (40, 40, 1)
    assert image.min() <= img.min() and img.max() <= image.max()
    assert set(np.unique(lab)) <= {0, 1}


def test_single_band_2d_image():
    image, label = blocks_pair(32, 32)
    img, lab = augment_pair(image[..., 0], label, np.random.default_rng(5), make_cfg(**STRONG))
    assert img.shape == (32, 32) and lab.shape == (32, 32)


def test_deterministic_for_a_seed():
    image, label = blocks_pair(48, 48)
    cfg = make_cfg(**STRONG)
    a = augment_pair(image, label, np.random.default_rng(7), cfg)
    b = augment_pair(image, label, np.random.default_rng(7), cfg)
    c = augment_pair(image, label, np.random.default_rng(8), cfg)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    # The inputs are not modified.
    np.testing.assert_array_equal(image, blocks_pair(48, 48)[0])
