"""Tests for res_unet.data.dataset: fitting, example selection, task splitting and the working
scale (the outputs of the make_tfrecords command are tested in test_make_tfrecords.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import expected_tiles, make_config, read_examples, write_sources

from res_unet.core.errors import UserError
from res_unet.data import dataset
from res_unet.data.pairing import find_pairs
from res_unet.geo.tiling import tile_grid

# Fitting and example selection ------------------------------------------------------------

def test_tile_mode_gives_the_tile_grid():
    cfg = make_config("tiles16", TARGET_SIZE=[128, 128])
    image = np.zeros((300, 500, 3), np.uint8)
    label = np.zeros((300, 500), np.uint8)
    fitted = dataset.fit_examples(image, label, cfg)
    assert len(fitted) == len(tile_grid((300, 500), (128, 128), 0.0)) == 3 * 4
    assert {(r, c) for _, _, r, c in fitted} == {(r, c) for r in (0, 128, 172)
                                                 for c in (0, 128, 256, 372)}
    assert all(i.shape == (128, 128, 3) and lab.shape == (128, 128) for i, lab, _, _ in fitted)


def test_resize_mode_keeps_aspect_and_label_values():
    cfg = make_config("tiles16", FIT_MODE="resize", TARGET_SIZE=[32, 32])
    image = np.full((20, 40, 3), 7, np.uint8)
    label = np.zeros((20, 40), np.uint8)
    label[:, 20:] = 1
    [(img, lab, r, c)] = dataset.fit_examples(image, label, cfg)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8 and (img == 7).all()
    assert set(np.unique(lab)) == {0, 1} and (r, c) == (0, 0)
    # Scaled 0.8, not stretched: the left half of each content row stays background.
    assert (lab[:, :16] == 0).all() and (lab[:, 16:] == 1).all()


def test_is_empty_tile_hand_values():
    label = np.zeros((10, 10), np.uint8)
    label[0, :5] = 1
    assert dataset.is_empty_tile(label, 0.1)
    assert not dataset.is_empty_tile(label, 0.05)
    assert not dataset.is_empty_tile(np.zeros((4, 4), np.uint8), 0.0)


def _tiles_with_empty_ones():
    image = np.arange(64 * 64 * 3, dtype=np.uint32).reshape(64, 64, 3).astype(np.uint8)
    label = np.zeros((64, 64), np.uint8)
    label[:16, :16] = 1  # one foreground tile out of 16
    return image, label


def test_empty_tiles_dropped_in_training_only():
    image, label = _tiles_with_empty_ones()
    cfg = make_config("tiles16", MIN_FOREGROUND_FRACTION=0.5, EMPTY_TILE_KEEP=0.0)
    train, dropped = dataset.source_examples(image, label, "s", "train", 0, cfg)
    assert len(train) == 1 and dropped == 15 and (train[0].row, train[0].col) == (0, 0)
    val, dropped = dataset.source_examples(image, label, "s", "validation", 0, cfg)
    assert len(val) == 16 and dropped == 0


def test_empty_tile_keep_share_is_seeded():
    image, label = _tiles_with_empty_ones()
    cfg = make_config("tiles16", MIN_FOREGROUND_FRACTION=0.5, EMPTY_TILE_KEEP=0.5)
    kept = [(e.row, e.col) for e in dataset.source_examples(image, label, "s", "train", 3,
                                                            cfg)[0]]
    again = [(e.row, e.col) for e in dataset.source_examples(image, label, "s", "train", 3,
                                                             cfg)[0]]
    assert kept == again and 1 < len(kept) < 16


def test_augmented_copies_follow_each_training_example():
    image, label = _tiles_with_empty_ones()
    cfg = make_config("tiles16", DO_AUG=True, AUG_COPIES=2, TARGET_SIZE=[32, 32])
    train, _ = dataset.source_examples(image, label, "s", "train", 0, cfg)
    assert [e.copy for e in train] == [0, 1, 2] * 4
    assert np.array_equal(train[0].image, image[:32, :32])
    assert not np.array_equal(train[1].image, train[0].image)
    val, _ = dataset.source_examples(image, label, "s", "validation", 0, cfg)
    assert [e.copy for e in val] == [0] * 4
    # Seeds depend on the source index: another index gives other augmentations.
    other, _ = dataset.source_examples(image, label, "s", "train", 1, cfg)
    assert not np.array_equal(other[1].image, train[1].image)


# Whole datasets: task splitting and the working scale ------------------------------------

def test_big_scenes_split_into_tasks_give_the_same_dataset(tmp_path, monkeypatch):
    write_sources(tmp_path / "src", "uint8", 3, shape=(40, 72))  # 3 x 5 tiles of 16
    cfg = make_config("tiles16", DO_AUG=True, AUG_COPIES=1, IMS_PER_SHARD=7)
    src = (tmp_path / "src/images", tmp_path / "src/labels")
    whole = dataset.make_dataset(cfg, *src, tmp_path / "whole")
    monkeypatch.setattr(dataset, "_EXAMPLES_PER_TASK", 5)  # 2 tiles (+ copies) per task
    tasks = dataset._split_tasks(dataset._tasks(cfg, *[[p] for p in find_pairs(
        *src)]), [(40, 72), (40, 72)])
    # Training: 15 tiles, 2 per task (each has a copy); validation: 5 per task.
    assert [len(t.fits) for t in tasks] == [2] * 7 + [1] + [5] * 3
    assert [t.last for t in tasks].count(True) == 2
    split = dataset.make_dataset(cfg, *src, tmp_path / "split")
    assert split.content_hash == whole.content_hash
    assert split.counts == whole.counts and split.files == whole.files


def test_downsampled_dataset_holds_the_working_scale(tmp_path):
    """DOWNSAMPLE=2: examples are tiles of the block-mean image and majority label; the
    manifest records the factor, and training refuses a config that disagrees."""
    from res_unet.geo.tiling import downsample_image, downsample_label
    from res_unet.training import train

    sources = write_sources(tmp_path / "src", "uint8", 3, shape=(64, 96))
    cfg = make_config("tiles16", DOWNSAMPLE=2)
    manifest = dataset.make_dataset(cfg, tmp_path / "src/images", tmp_path / "src/labels",
                                    tmp_path / "ds")
    assert manifest.downsample == 2
    [stem] = [Path(f).stem for f in manifest.files["train"]]
    image, label = sources[stem]
    expected = expected_tiles(downsample_image(image, 2), downsample_label(label, 2))
    got = list(read_examples(tmp_path / "ds", "train"))
    assert len(got) == len(expected) == 6  # a 32 x 48 working image in 16-px tiles
    for (img, lab, _), (exp_img, exp_lab) in zip(got, expected, strict=True):
        np.testing.assert_array_equal(img, exp_img)
        np.testing.assert_array_equal(lab, exp_lab)
    with pytest.raises(UserError, match="DOWNSAMPLE=2 but the config says DOWNSAMPLE=1"):
        train.check_config_against_manifest(make_config("tiles16"), manifest, tmp_path / "ds")
