"""Tests for res_unet.rasters, res_unet.pairing and res_unet.writers: reading, pairing,
label preparation and atomic writing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import tifffile
from affine import Affine
from helpers import shared_data
from PIL import Image
from rasterio.crs import CRS

from res_unet import pairing, rasters
from res_unet.config import LabelRules, config_from_dict
from res_unet.errors import UserError
from res_unet.pairing import (
    Pair,
    find_images,
    find_pairs,
    left_out_images,
    load_image,
    load_pair,
    prepare_label,
)
from res_unet.rasters import RasterMeta, is_georeferenced, read_image, read_label
from res_unet.writers import write_geotiff, write_png


def make_cfg(**keys):
    return config_from_dict(keys)[0]


def random_u8(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def make_folders(tmp_path, image_names, label_names):
    """Images and labels folders holding tiny 4x5 PNG/JPEG/TIFF files with the given names."""
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for name in image_names:
        Image.fromarray(random_u8((4, 5, 3))).save(images / name)
    for name in label_names:
        Image.fromarray(np.zeros((4, 5), np.uint8)).save(labels / name)
    return images, labels


def folder_listing(folder):
    return sorted(p.name for p in folder.iterdir())


# Reading images -----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 3), (5, 7, 4)])
def test_png_round_trip_is_bit_exact_for_1_3_4_bands(tmp_path, shape):
    array = random_u8(shape)
    path = tmp_path / "x.png"
    write_png(path, array)
    image, meta = read_image(path)
    assert image.dtype == np.uint8
    assert image.shape == (5, 7, 1 if len(shape) == 2 else shape[2])
    np.testing.assert_array_equal(image.reshape(shape), array)
    assert meta == RasterMeta(path=path)
    assert not is_georeferenced(meta)
    assert folder_listing(tmp_path) == ["x.png"]


def test_uint16_grey_png_round_trip(tmp_path):
    array = np.array([[0, 1, 300], [65535, 4096, 7]], np.uint16)
    write_png(tmp_path / "g.png", array)
    image, _ = read_image(tmp_path / "g.png")
    assert image.dtype == np.uint16
    np.testing.assert_array_equal(image[..., 0], array)


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_16bit_rgb_png_keeps_all_16_bits(tmp_path):
    # Pillow would truncate these to 8 bits; the reader must route them to GDAL.
    array = (np.arange(4 * 5 * 3).reshape(4, 5, 3) * 1000).astype(np.uint16)
    path = tmp_path / "rgb16.png"
    with rasterio.open(path, "w", driver="PNG", width=5, height=4, count=3,
                       dtype="uint16") as ds:
        ds.write(np.moveaxis(array, -1, 0))
    image, _ = read_image(path)
    assert image.dtype == np.uint16
    np.testing.assert_array_equal(image, array)


def test_images_beyond_pillows_size_limit_are_read_with_gdal(tmp_path, monkeypatch):
    array = random_u8((60, 70, 3))
    write_png(tmp_path / "big.png", array)
    # Pillow refuses images over twice this many pixels; real scenes can exceed its default.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    image, _ = read_image(tmp_path / "big.png")
    np.testing.assert_array_equal(image, array)


@pytest.mark.parametrize(("mode", "bands"), [("L", 1), ("RGB", 3), ("CMYK", 3)])
def test_jpeg_band_counts(tmp_path, mode, bands):
    # A flat image survives JPEG compression almost exactly.
    value = {"L": 120, "RGB": (200, 100, 50), "CMYK": (0, 0, 0, 0)}[mode]
    path = tmp_path / "x.jpg"
    Image.new(mode, (16, 8), value).save(path, quality=95)
    image, meta = read_image(path)
    assert image.dtype == np.uint8
    assert image.shape == (8, 16, bands)
    expected = {"L": [120], "RGB": [200, 100, 50], "CMYK": [255, 255, 255]}[mode]
    assert np.abs(image.astype(int) - expected).max() <= 2
    assert not is_georeferenced(meta)


def test_six_band_tiff_and_uint16_tiff_are_bit_exact(tmp_path):
    six = random_u8((4, 5, 6))
    tifffile.imwrite(tmp_path / "six.tif", six, photometric="minisblack", planarconfig="contig")
    image, _ = read_image(tmp_path / "six.tif")
    assert image.shape == (4, 5, 6) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, six)

    deep = (np.arange(4 * 5 * 3).reshape(3, 4, 5) * 4000).astype(np.uint16)
    tifffile.imwrite(tmp_path / "deep.tiff", deep, photometric="minisblack",
                     planarconfig="separate")
    image, _ = read_image(tmp_path / "deep.tiff")
    assert image.dtype == np.uint16
    np.testing.assert_array_equal(image, np.moveaxis(deep, 0, -1))


def test_multipage_tiff_reads_every_page_as_a_band(tmp_path):
    # GDAL alone would return only the first page: the reader must not drop the others.
    pages = np.arange(3 * 4 * 5, dtype=np.uint16).reshape(3, 4, 5)
    path = tmp_path / "pages.tif"
    for page in pages:
        tifffile.imwrite(path, page, append=True, metadata=None)
    image, _ = read_image(path)
    np.testing.assert_array_equal(image, np.moveaxis(pages, 0, -1))


def test_int16_without_negatives_becomes_uint16_and_negatives_are_an_error(tmp_path):
    tifffile.imwrite(tmp_path / "ok.tif", np.array([[0, 9000], [1, 2]], np.int16))
    image, _ = read_image(tmp_path / "ok.tif")
    assert image.dtype == np.uint16
    np.testing.assert_array_equal(image[..., 0], [[0, 9000], [1, 2]])

    tifffile.imwrite(tmp_path / "neg.tif", np.array([[0, -3], [1, 2]], np.int16))
    with pytest.raises(UserError, match=r"neg\.tif: int16 image has negative values \(min -3\)"):
        read_image(tmp_path / "neg.tif")


def test_float_rasters_are_cast_only_when_lossless(tmp_path):
    tifffile.imwrite(tmp_path / "whole.tif", np.array([[0.0, 4000.0], [1.0, 2.0]], np.float32))
    image, _ = read_image(tmp_path / "whole.tif")
    assert image.dtype == np.uint16
    np.testing.assert_array_equal(image[..., 0], [[0, 4000], [1, 2]])

    tifffile.imwrite(tmp_path / "refl.tif", np.array([[0.1, 0.5], [0.0, 0.93]], np.float32))
    with pytest.raises(UserError, match=r"refl\.tif: float32 pixels .*0\.93.*uint8 or uint16"):
        read_image(tmp_path / "refl.tif")


def test_geotiff_round_trip_keeps_crs_transform_nodata_and_pixels(tmp_path):
    crs = CRS.from_epsg(32633)
    transform = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4600000.0)
    array = (np.arange(6 * 7 * 4).reshape(6, 7, 4) * 997 % 65536).astype(np.uint16)
    path = tmp_path / "scene.tif"
    write_geotiff(path, array, RasterMeta(tmp_path / "in.tif", crs, transform, None), nodata=0)
    image, meta = read_image(path)
    np.testing.assert_array_equal(image, array)
    assert meta.crs == crs
    assert meta.transform == transform
    assert meta.nodata == 0.0
    assert meta.path == path and is_georeferenced(meta)

    # Reading then writing with the input's meta keeps everything exactly.
    write_geotiff(tmp_path / "copy.tif", image, meta, nodata=meta.nodata)
    copy, copy_meta = read_image(tmp_path / "copy.tif")
    np.testing.assert_array_equal(copy, array)
    assert (copy_meta.crs, copy_meta.transform, copy_meta.nodata) == (crs, transform, 0.0)
    assert folder_listing(tmp_path) == ["copy.tif", "scene.tif"]


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_geotiff_writes_any_dtype_compressed_and_tiles_large_arrays(tmp_path):
    probs = np.linspace(0, 1, 600 * 520, dtype=np.float32).reshape(600, 520)
    write_geotiff(tmp_path / "p.tif", probs, RasterMeta(tmp_path / "in.tif"))
    with rasterio.open(tmp_path / "p.tif") as ds:
        assert ds.dtypes[0] == "float32" and ds.count == 1
        assert ds.profile["tiled"] and ds.block_shapes[0] == (256, 256)
        assert ds.compression.value == "DEFLATE"
        assert ds.crs is None and ds.nodata is None
        np.testing.assert_array_equal(ds.read(1), probs)
    # Without georeferencing the result is a plain TIFF that other readers open too.
    with tifffile.TiffFile(tmp_path / "p.tif") as tif:
        assert tif.pages[0].shape == (600, 520)
        assert not tif.pages[0].is_geotiff
    assert folder_listing(tmp_path) == ["p.tif"]


def test_plain_tiff_written_without_georeference_reads_back_as_plain(tmp_path):
    write_geotiff(tmp_path / "m.tif", np.array([[0, 1], [1, 0]], np.uint8),
                  RasterMeta(tmp_path / "x.png"))
    image, meta = read_image(tmp_path / "m.tif")
    np.testing.assert_array_equal(image[..., 0], [[0, 1], [1, 0]])
    assert meta.crs is None and meta.transform is None and not is_georeferenced(meta)


def test_png_world_file_gives_its_transform(tmp_path):
    write_png(tmp_path / "w.png", random_u8((4, 5, 3)))
    # A world file refers to the centre of the top-left pixel.
    (tmp_path / "w.pgw").write_text("10\n0\n0\n-10\n500005\n4599995\n")
    _, meta = read_image(tmp_path / "w.png")
    assert meta.transform == Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4600000.0)
    assert is_georeferenced(meta)


@pytest.mark.parametrize("content", ["garbage", "truncated"])
def test_corrupt_jpeg_error_names_the_file(tmp_path, content):
    path = tmp_path / "broken.jpg"
    if content == "garbage":
        path.write_bytes(b"this is not a jpeg")
    else:
        Image.fromarray(random_u8((64, 64, 3))).save(path)
        path.write_bytes(path.read_bytes()[:400])
    with pytest.raises(UserError, match=r"broken\.jpg: cannot be read as an image .*remove or "
                                        r"re-export it"):
        read_image(path)


def test_unsupported_suffix_and_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"notes\.txt: not a supported image type"):
        read_image(tmp_path / "notes.txt")
    with pytest.raises(UserError, match=r"gone\.png: file not found"):
        read_image(tmp_path / "gone.png")


# Reading labels -----------------------------------------------------------------------------

def test_palette_png_label_gives_indices_and_image_gives_colours(tmp_path):
    indices = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    palette = Image.fromarray(indices, mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    palette.save(tmp_path / "pal.png")
    np.testing.assert_array_equal(read_label(tmp_path / "pal.png"), indices)
    image, _ = read_image(tmp_path / "pal.png")
    np.testing.assert_array_equal(image[0, 1], [255, 0, 0])
    np.testing.assert_array_equal(image[0, 2], [0, 0, 255])


def test_grey_rgb_and_rgba_labels_are_read_as_grey(tmp_path):
    grey = np.array([[0, 1], [2, 1]], np.uint8)
    write_png(tmp_path / "rgb.png", np.repeat(grey[..., None], 3, axis=-1))
    rgba = np.concatenate([np.repeat(grey[..., None], 3, axis=-1),
                           np.full((2, 2, 1), 255, np.uint8)], axis=-1)
    write_png(tmp_path / "rgba.png", rgba)
    for name in ("rgb.png", "rgba.png"):
        label = read_label(tmp_path / name)
        assert label.dtype == np.uint8 and label.shape == (2, 2)
        np.testing.assert_array_equal(label, grey)


def test_colour_label_is_rejected(tmp_path):
    colour = np.zeros((2, 2, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    write_png(tmp_path / "col.png", colour)
    with pytest.raises(UserError, match=r"col\.png: labels must be single-channel class "
                                        r"indices; found a colour label.*\(255, 0, 0\).*convert "
                                        "colours to indices"):
        read_label(tmp_path / "col.png")


def test_transparent_label_is_rejected(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 3] = [[0, 255], [255, 255]]
    write_png(tmp_path / "t.png", rgba)
    with pytest.raises(UserError, match=r"t\.png: label has transparent pixels"):
        read_label(tmp_path / "t.png")


def test_16bit_label_below_256_is_cast_and_above_is_an_error(tmp_path):
    write_png(tmp_path / "ok.png", np.array([[0, 3], [255, 1]], np.uint16))
    label = read_label(tmp_path / "ok.png")
    assert label.dtype == np.uint8
    np.testing.assert_array_equal(label, [[0, 3], [255, 1]])
    write_png(tmp_path / "big.png", np.array([[0, 300], [1, 1]], np.uint16))
    with pytest.raises(UserError, match=r"big\.png: label values reach 300, above 255"):
        read_label(tmp_path / "big.png")


# Preparing labels ---------------------------------------------------------------------------

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
    assert capsys.readouterr().out == (
        "note: m/a.png: 0/255 mask read as 0/1 (and any further 0/255 masks)\n")
    prepare_label(label, LabelRules(nclasses=1), Path("m/b.png"))
    assert capsys.readouterr().out == "", "the note is printed once, not once per file"
    # An explicit remap takes precedence and prints nothing.
    cfg = make_cfg(NCLASSES=1, REMAP_CLASSES={"255": 1})
    np.testing.assert_array_equal(prepare_label(label, cfg.label_rules, "a.png"),
                                  [[0, 1], [1, 0]])
    assert capsys.readouterr().out == ""


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


# Finding and pairing files ------------------------------------------------------------------

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
    from res_unet.atomic import owner_tag

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


# Loading pairs ------------------------------------------------------------------------------

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


# Atomic writing -----------------------------------------------------------------------------

def test_failed_png_write_leaves_old_file_and_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "out.png"
    write_png(target, np.zeros((2, 2), np.uint8))
    before = target.read_bytes()

    def broken_save(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_png(target, np.ones((2, 2), np.uint8))
    assert folder_listing(tmp_path) == ["out.png"]
    assert target.read_bytes() == before


def test_failed_geotiff_write_leaves_no_file(tmp_path, monkeypatch):
    def broken_open(path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise rasterio.errors.RasterioIOError("write failed")

    monkeypatch.setattr(rasters.rasterio, "open", broken_open)
    with pytest.raises(rasterio.errors.RasterioIOError):
        write_geotiff(tmp_path / "out.tif", np.zeros((2, 2), np.uint8), RasterMeta(tmp_path))
    assert folder_listing(tmp_path) == []


def test_writers_reject_arrays_they_cannot_store(tmp_path):
    with pytest.raises(ValueError, match="write_png takes"):
        write_png(tmp_path / "f.png", np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="write_geotiff takes"):
        write_geotiff(tmp_path / "f.tif", np.zeros((2, 2, 2, 2), np.uint8), RasterMeta(tmp_path))
    assert folder_listing(tmp_path) == []


# Real data ----------------------------------------------------------------------------------

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
    from res_unet.errors import UserError
    from res_unet.pairing import find_pairs
    from res_unet.writers import write_png

    images, labels = tmp_path / "images", tmp_path / "labels"
    write_png(images / "a.png", np.zeros((8, 8, 3), np.uint8))
    write_png(labels / "a.png", np.zeros((8, 8), np.uint8))
    (images / "b.png").symlink_to(tmp_path / "moved" / "b.png")
    with pytest.raises(UserError, match=r"b\.png: is a link to .*moved/b\.png, which does not "
                                        r"exist \(1 broken link among the images\)"):
        find_pairs(images, labels)


def test_png_writer_streams_rows_and_leaves_nothing_when_incomplete(tmp_path):
    from res_unet.writers import png_writer

    label = np.random.default_rng(3).integers(0, 7, (45, 31)).astype(np.uint8)
    with png_writer(tmp_path / "l.png", label.shape) as write:
        for r0 in range(0, 45, 10):
            write(r0, label[r0:r0 + 10])
    np.testing.assert_array_equal(read_label(tmp_path / "l.png"), label)
    with pytest.raises(ValueError, match="got 10 of 45 rows"), \
            png_writer(tmp_path / "part.png", label.shape) as write:
        write(0, label[:10])
    with pytest.raises(ValueError, match="from row 10"), \
            png_writer(tmp_path / "order.png", label.shape) as write:
        write(0, label[:10])
        write(20, label[20:30])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.png"], "no partial or temp file"
