"""Tests for res_unet.data.pairing: pairing image and label files by name, hidden files and
temporaries, the label rules, loading a pair checked against the config, extra bands."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from helpers import make_folders, random_u8, shared_data
from PIL import Image

from res_unet.config.keys import LabelRules, config_from_dict
from res_unet.core.errors import UserError
from res_unet.data import pairing
from res_unet.data.pairing import (
    Pair,
    find_images,
    find_pairs,
    left_out_images,
    load_image,
    load_pair,
    prepare_label,
)
from res_unet.geo.rasters import read_image
from res_unet.geo.writers import write_png


def make_cfg(**keys):
    return config_from_dict(keys)[0]


# Preparing labels -------------------------------------------------------------------------

def test_remap_classes_applies_before_the_range_check():
    cfg = make_cfg(NCLASSES=1, REMAP_CLASSES={"3": 1, "7": 0})
    label = np.array([[0, 3], [7, 3]], np.uint8)
    np.testing.assert_array_equal(prepare_label(label, cfg.label_rules, "a.png"),
                                  [[0, 1], [0, 1]])


def test_binary_0_255_mask_becomes_0_1_with_one_note(capsys, monkeypatch):
    monkeypatch.setattr(pairing, "_NOTED", set())
    label = np.array([[0, 255], [255, 0]], np.uint8)
    out = prepare_label(label, LabelRules(nclasses=1), Path("m/a.png"))
    np.testing.assert_array_equal(out, [[0, 1], [1, 0]])
    assert out.dtype == np.uint8
    assert capsys.readouterr().err == (
        "note: m/a.png: 0/255 mask read as 0/1 (and any further 0/255 masks)\n")
    prepare_label(label, LabelRules(nclasses=1), Path("m/b.png"))
    assert capsys.readouterr().err == "", "the note is printed once, not once per file"
    # An explicit remap takes precedence and prints nothing.
    cfg = make_cfg(NCLASSES=1, REMAP_CLASSES={"255": 1})
    np.testing.assert_array_equal(prepare_label(label, cfg.label_rules, "a.png"),
                                  [[0, 1], [1, 0]])
    assert capsys.readouterr().err == ""


def test_out_of_range_label_lists_values_and_fixes():
    label = np.array([[0, 1], [4, 7]], np.uint8)
    with pytest.raises(UserError) as err:
        prepare_label(label, LabelRules(nclasses=3), "labels/a.png")
    message = str(err.value)
    assert message.startswith("labels/a.png: label values 0, 1, 4, 7 but NCLASSES=3 allows "
                              "only 0..2 (found 4, 7)")
    assert "set NCLASSES to 8" in message
    assert 'REMAP_CLASSES, e.g. {"4": 0}' in message


def test_0_255_labels_in_a_multiclass_config_suggest_a_remap():
    with pytest.raises(UserError, match=r'REMAP_CLASSES \{"0": 0, "255": 1\}'):
        prepare_label(np.array([[0, 255]], np.uint8), LabelRules(nclasses=2), "a.png")


def test_jpeg_label_out_of_range_mentions_jpeg_compression():
    with pytest.raises(UserError, match="save labels as PNG"):
        prepare_label(np.array([[0, 1, 2]], np.uint8), LabelRules(nclasses=1), "a.jpg")


def test_ignore_class_and_valid_values_pass_unchanged():
    cfg = make_cfg(NCLASSES=6, IGNORE_CLASS=5)
    label = np.arange(6, dtype=np.uint8).reshape(2, 3)
    np.testing.assert_array_equal(prepare_label(label, cfg.label_rules, "a.png"), label)


# Finding and pairing files ----------------------------------------------------------------

def test_find_pairs_by_stem_with_label_suffix_and_ignores_other_files(tmp_path):
    images, labels = make_folders(tmp_path, ["b.png", "a.jpg", "c.tif"],
                                  ["a.png", "b_label.png", "c.tif"])
    for junk in ("notes.txt", "a.jpg.aux.xml", ".DS_Store", ".hidden.png"):
        (images / junk).write_text("x")
        (labels / junk).write_text("x")
    pairs = find_pairs(images, labels)
    assert [p.stem for p in pairs] == ["a", "b", "c"]
    assert pairs[1] == Pair("b", images / "b.png", labels / "b_label.png", [])
    assert pairs[2].label == labels / "c.tif"


def test_hidden_image_files_are_skipped_with_one_warning_per_folder(tmp_path, capsys):
    """Image files whose names start with '.' (macOS '._' copies, hidden files) are not
    paired, and the user is told how many were skipped, where and why, once per folder;
    hidden files that are not images (.DS_Store) are not counted."""
    images, labels = make_folders(tmp_path, ["a.png", "b.png"], ["a.png", "b.png"])
    for name in ("._a.png", ".b.png", ".c.tif"):
        (images / name).write_text("x")
    (labels / "._a.png").write_text("x")
    (images / ".DS_Store").write_text("x")
    pairs = find_pairs(images, labels)
    assert [p.stem for p in pairs] == ["a", "b"]
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"warning: {images}: skipped 3 image files whose names start with '.' (._a.png, "
        ".b.png, .c.tif): hidden files are not read; rename them without the leading '.' to "
        "use them",
        f"warning: {labels}: skipped 1 image file whose name starts with '.' (._a.png): "
        "hidden files are not read; rename it without the leading '.' to use it"]
    find_images(images)
    assert len(capsys.readouterr().err.splitlines()) == 1
    (tmp_path / "clean").mkdir()
    make_folders(tmp_path / "clean", ["a.png"], ["a.png"])
    find_pairs(tmp_path / "clean" / "images", tmp_path / "clean" / "labels")
    assert capsys.readouterr().err == ""


def test_our_temporaries_in_an_input_folder_are_named_as_such(tmp_path, capsys):
    """A temporary left by a killed res_unet command (e.g. in an output folder later used
    as input) is not a hidden file to rename: its own line says what it is."""
    from res_unet.core.atomic import owner_tag

    images, labels = make_folders(tmp_path, ["a.png"], ["a.png"])
    left = images / f".b.png.{owner_tag()}-k2x9.tmp.png"  # as atomic_path names it
    left.write_text("x")
    (images / ".c.png").write_text("x")
    assert [p.stem for p in find_pairs(images, labels)] == ["a"]
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"warning: {images}: skipped 1 unfinished image file ({left.name}): temporaries of a "
        "res_unet command that is still writing there or was killed; they are never read "
        "(delete them when no command is running)",
        f"warning: {images}: skipped 1 image file whose name starts with '.' (.c.png): hidden "
        "files are not read; rename it without the leading '.' to use it"]


def test_find_pairs_usemask(tmp_path):
    images, labels = make_folders(tmp_path, ["a.jpg", "b.jpg"], ["a_mask.png", "b_mask.png"])
    pairs = find_pairs(images, labels, usemask=True)
    assert [(p.stem, p.label.name) for p in pairs] == [("a", "a_mask.png"), ("b", "b_mask.png")]
    with pytest.raises(UserError, match="set USEMASK to true"):
        find_pairs(images, labels, usemask=False)


def test_usemask_true_rejects_labels_without_mask_suffix(tmp_path):
    images, labels = make_folders(tmp_path, ["a.jpg"], ["a.png"])
    with pytest.raises(UserError, match=r"1 label without an image .*\(a\.png\).*set USEMASK to "
                                        "false"):
        find_pairs(images, labels, usemask=True)


def test_every_unmatched_image_and_label_is_reported_in_one_error(tmp_path):
    image_names = [f"img{i:02d}.png" for i in range(25)] + ["both.png"]
    images, labels = make_folders(tmp_path, image_names, ["both.png", "x.png", "y_label.png"])
    with pytest.raises(UserError) as err:
        find_pairs(images, labels)
    lines = str(err.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{images}: 25 images without a label in {labels} (img00.png, ")
    assert "img19.png, ... and 5 more)" in lines[0] and "img20" not in lines[0]
    assert lines[1].startswith(f"{labels}: 2 labels without an image in {images} "
                               "(x.png, y_label.png)")


def test_duplicate_stems_are_an_error(tmp_path):
    images, labels = make_folders(tmp_path, ["a.jpg", "a.png", "b.png"], ["a.png", "b.png"])
    with pytest.raises(UserError, match=r"images: several image files share a name "
                                        r"\(a\.jpg & a\.png\)"):
        find_pairs(images, labels)


def test_label_and_plain_name_for_one_image_is_a_duplicate(tmp_path):
    images, labels = make_folders(tmp_path, ["a.jpg"], ["a.png", "a_label.png"])
    with pytest.raises(UserError, match=r"a\.png & a_label\.png"):
        find_pairs(images, labels)


def test_empty_missing_and_non_image_folders_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty: no images \(\.jpg"):
        find_images(tmp_path / "empty")
    with pytest.raises(UserError, match=r"nowhere: images folder not found"):
        find_images(tmp_path / "nowhere")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("x")
    (tmp_path / "junk" / "a.tif.aux.xml").write_text("x")
    with pytest.raises(UserError, match=r"junk: no images"):
        find_images(tmp_path / "junk")
    (tmp_path / "nested" / "inner").mkdir(parents=True)
    write_png(tmp_path / "nested" / "inner" / "a.png", random_u8((2, 2)))
    with pytest.raises(UserError, match=r"sub-folder .*inner holds images: pass that folder"):
        find_images(tmp_path / "nested")


def test_images_and_masks_in_one_folder(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("a.jpg", "a_mask.png", "b.jpg", "b_mask.png"):
        Image.fromarray(random_u8((4, 5))).save(folder / name)
    pairs = find_pairs(folder, folder, usemask=True)
    assert [(p.image.name, p.label.name) for p in pairs] == [("a.jpg", "a_mask.png"),
                                                             ("b.jpg", "b_mask.png")]
    assert left_out_images(folder, pairs) == [], "labels beside the images are not left out"


def test_find_images_returns_unlabelled_pairs_sorted(tmp_path):
    images, _ = make_folders(tmp_path, ["z.png", "m.jpg"], [])
    pairs = find_images(images)
    assert [(p.stem, p.label, p.extra_bands) for p in pairs] == [("m", None, []),
                                                                 ("z", None, [])]


# Loading pairs ----------------------------------------------------------------------------

def test_load_pair_returns_checked_image_label_and_meta(tmp_path):
    images, labels = make_folders(tmp_path, ["a.png"], [])
    write_png(labels / "a.png", np.array([[0, 255, 0, 0, 0]] * 4, np.uint8))
    image, label, meta = load_pair(find_pairs(images, labels)[0], 3, LabelRules(1))
    assert image.shape == (4, 5, 3) and image.dtype == np.uint8
    assert label.dtype == np.uint8 and label.shape == (4, 5)
    assert set(np.unique(label)) == {0, 1}
    assert meta.path == images / "a.png"


def test_size_mismatch_names_both_files_and_sizes(tmp_path):
    images, labels = make_folders(tmp_path, ["a.png"], [])
    write_png(labels / "a.png", np.zeros((4, 6), np.uint8))
    with pytest.raises(UserError) as err:
        load_pair(find_pairs(images, labels)[0], 3, LabelRules(1))
    assert str(err.value).startswith(f"{labels / 'a.png'}: label size 6x4 (WxH) differs from "
                                     f"its image {images / 'a.png'} (5x4)")


def test_band_count_mismatch_is_an_error(tmp_path):
    write_png(tmp_path / "g.png", random_u8((4, 5)))
    pair = Pair("g", tmp_path / "g.png", None)
    with pytest.raises(UserError, match=r"g\.png: 1 band found but N_DATA_BANDS is 3; set "
                                        "N_DATA_BANDS to 1 if all images"):
        load_image(pair, 3)
    image, _ = load_image(pair, 1)
    assert image.shape == (4, 5, 1)


def test_opaque_alpha_is_dropped_only_when_n_data_bands_is_3(tmp_path):
    rgba = random_u8((4, 5, 4))
    rgba[..., 3] = 255
    write_png(tmp_path / "opaque.png", rgba)
    pair = Pair("opaque", tmp_path / "opaque.png", None)
    image, _ = load_image(pair, 3)
    np.testing.assert_array_equal(image, rgba[..., :3])
    image, _ = load_image(pair, 4)
    np.testing.assert_array_equal(image, rgba)

    rgba[0, 0, 3] = 0
    write_png(tmp_path / "holes.png", rgba)
    with pytest.raises(UserError, match=r"holes\.png: 4 bands found but N_DATA_BANDS is 3 \(the "
                                        "last band is an alpha channel with transparent"):
        load_image(Pair("holes", tmp_path / "holes.png", None), 3)


def test_extra_band_dirs_are_appended_in_order(tmp_path):
    images, labels = make_folders(tmp_path, ["a.png", "b.png"], ["a.png", "b.png"])
    bands = {}
    for i, name in enumerate(("nir", "swir")):
        (tmp_path / name).mkdir()
        for stem in ("a", "b"):
            band = np.full((4, 5), 1000 * (i + 1), np.uint16)
            bands[name, stem] = band
            tifffile.imwrite(tmp_path / name / f"{stem}.tif", band)
    pairs = find_pairs(images, labels, extra_band_dirs=[tmp_path / "nir", tmp_path / "swir"])
    assert pairs[0].extra_bands == [tmp_path / "nir" / "a.tif", tmp_path / "swir" / "a.tif"]
    image, label, _ = load_pair(pairs[0], 5, LabelRules(1))
    assert image.shape == (4, 5, 5) and image.dtype == np.uint16
    assert label.shape == (4, 5)
    rgb, _ = read_image(images / "a.png")
    np.testing.assert_array_equal(image[..., :3], rgb)
    np.testing.assert_array_equal(image[..., 3], bands["nir", "a"])
    np.testing.assert_array_equal(image[..., 4], bands["swir", "a"])
    with pytest.raises(UserError, match=r"a\.png: 3 bands found plus 2 extra bands but "
                                        r"N_DATA_BANDS is 3; set N_DATA_BANDS to 5"):
        load_pair(pairs[0], 3, LabelRules(1))
    # find_images attaches the same extra bands.
    assert find_images(images, [tmp_path / "nir"])[1].extra_bands == [tmp_path / "nir" / "b.tif"]


def test_extra_band_missing_wrong_size_or_multiband_is_an_error(tmp_path):
    images, labels = make_folders(tmp_path, ["a.png", "b.png"], ["a.png", "b.png"])
    nir = tmp_path / "nir"
    nir.mkdir()
    write_png(nir / "a.png", random_u8((4, 6)))
    with pytest.raises(UserError, match=r"nir: no extra-band image for 1 image \(b\.png\)"):
        find_pairs(images, labels, extra_band_dirs=[nir])
    write_png(nir / "b.png", random_u8((4, 5, 3)))
    pairs = find_pairs(images, labels, extra_band_dirs=[nir])
    with pytest.raises(UserError) as err:
        load_pair(pairs[0], 4, LabelRules(1))
    assert str(err.value).startswith(f"{nir / 'a.png'}: size 6x4 (WxH) differs from "
                                     f"{images / 'a.png'} (5x4)")
    with pytest.raises(UserError, match=r"b\.png: extra-band images must have one band, this "
                                        "one has 3"):
        load_pair(pairs[1], 4, LabelRules(1))


def test_rgba_with_extra_band_drops_opaque_alpha_before_appending(tmp_path):
    rgba = random_u8((4, 5, 4))
    rgba[..., 3] = 255
    write_png(tmp_path / "a.png", rgba)
    nir = random_u8((4, 5), seed=1)
    write_png(tmp_path / "nir.png", nir)
    image, _ = load_image(Pair("a", tmp_path / "a.png", None, [tmp_path / "nir.png"]), 4)
    np.testing.assert_array_equal(image[..., :3], rgba[..., :3])
    np.testing.assert_array_equal(image[..., 3], nir)


# Real data --------------------------------------------------------------------------------

def test_reads_a_real_lakes_pair():
    lakes = shared_data("lakes")
    pairs = find_pairs(lakes / "images", lakes / "labels")
    assert len(pairs) == 154
    image, label, meta = load_pair(pairs[0], 3, LabelRules(1))
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
    assert max(image.shape[:2]) == 1024
    assert label.shape == image.shape[:2] and label.dtype == np.uint8
    assert set(np.unique(label).tolist()) == {0, 1}
    assert meta.path == pairs[0].image


def test_dangling_symlink_among_images_is_named(tmp_path):
    from res_unet.core.errors import UserError
    from res_unet.data.pairing import find_pairs
    from res_unet.geo.writers import write_png

    images, labels = tmp_path / "images", tmp_path / "labels"
    write_png(images / "a.png", np.zeros((8, 8, 3), np.uint8))
    write_png(labels / "a.png", np.zeros((8, 8), np.uint8))
    (images / "b.png").symlink_to(tmp_path / "moved" / "b.png")
    with pytest.raises(UserError, match=r"b\.png: is a link to .*moved/b\.png, which does not "
                                        r"exist \(1 broken link among the images\)"):
        find_pairs(images, labels)

