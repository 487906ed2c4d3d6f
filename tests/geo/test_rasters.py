"""Tests for res_unet.geo.rasters: decoding image and label files of every supported kind,
bit-exact round trips, georeferencing, one-line errors for files that cannot be read."""

from __future__ import annotations

import struct
import types
import zlib

import numpy as np
import pytest
import rasterio
import rasterio.io
import tifffile
from affine import Affine
from helpers import folder_listing, random_u8
from PIL import Image, ImageFile
from rasterio.crs import CRS

from res_unet.core.errors import UserError
from res_unet.geo import rasters
from res_unet.geo.grid import RasterMeta, is_georeferenced
from res_unet.geo.rasters import (
    open_raster_rows,
    read_image,
    read_label,
)
from res_unet.geo.writers import write_geotiff, write_png

# Reading images ---------------------------------------------------------------------------

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
    with pytest.raises(UserError, match=r"neg\.tif: int16 image has negative values \(min -3,"):
        read_image(tmp_path / "neg.tif")


# Declared nodata and signed / float scenes -------------------------------------------------

def signed_scene(path, array: np.ndarray, nodata) -> None:
    """A small GeoTIFF in UTM 33N of ``array`` (H, W, B) in its own dtype, with ``nodata``."""
    with rasterio.open(path, "w", driver="GTiff", height=array.shape[0], width=array.shape[1],
                       count=array.shape[2], dtype=array.dtype.name, nodata=nodata,
                       crs="EPSG:32633", transform=Affine(10.0, 0, 5e5, 0, -10.0, 4.6e6)) as ds:
        ds.write(np.moveaxis(array, -1, 0))


@pytest.mark.parametrize("dtype, nodata", [("int16", -9999), ("float32", float("nan")),
                                           ("float32", -3.4e38), ("int32", 70000)])
def test_declared_nodata_of_signed_and_float_scenes_is_honoured(tmp_path, dtype, nodata):
    """A collar at the declared nodata is not data: the rest is read losslessly as uint16,
    the collar as 0, and the meta says nodata 0 and the stored type; read in windows too."""
    from res_unet.geo.rasters import nodata_mask, open_raster_rows

    values = (np.arange(6 * 7 * 2).reshape(6, 7, 2) * 300 + 1).astype(dtype)
    values[:2] = nodata  # the collar
    signed_scene(tmp_path / "s.tif", values, nodata)
    image, meta = read_image(tmp_path / "s.tif")
    assert image.dtype == np.uint16 and (meta.nodata, meta.stored_dtype) == (0.0, dtype)
    np.testing.assert_array_equal(image[2:], values[2:].astype(np.uint16))
    assert (image[:2] == 0).all()
    np.testing.assert_array_equal(nodata_mask(image, [meta.nodata]), np.arange(6)[:, None] < 2
                                  | np.zeros((6, 7), bool))
    with open_raster_rows(tmp_path / "s.tif", 2) as rows:
        assert (rows.meta.nodata, rows.meta.stored_dtype, rows.dtype) == (0.0, dtype, np.uint16)
        np.testing.assert_array_equal(np.concatenate([rows.rows(0, 3), rows.rows(3, 6)]), image)


def test_signed_scene_messages_name_the_real_type_and_the_nodata(tmp_path):
    collar = np.full((4, 4, 1), -9999, np.int16)
    collar[2:, 2:] = [[[5], [-3]], [[7], [8]]]
    signed_scene(tmp_path / "neg.tif", collar, -9999)
    with pytest.raises(UserError, match=r"neg\.tif: int16 image has negative values \(min -3, "
                       r"besides its nodata -9999\); the model takes whole numbers 0\.\.65535"):
        read_image(tmp_path / "neg.tif")
    signed_scene(tmp_path / "undeclared.tif", np.where(collar == -3, 1, collar), None)
    with pytest.raises(UserError, match=r"int16 image has negative values \(min -9999, and no "
                       r"nodata value declared\).*if -9999 marks missing data declare it "
                       r"\(gdal_edit\.py -a_nodata -9999 undeclared\.tif\)"):
        read_image(tmp_path / "undeclared.tif")


def test_converted_scenes_fit_an_8_bit_model_only_when_their_values_do(tmp_path):
    from res_unet.geo.rasters import fit_model_dtype, open_raster_rows

    small = np.full((4, 4, 1), -9999, np.int16)
    small[1:] = 200
    signed_scene(tmp_path / "small.tif", small, -9999)
    image, meta = read_image(tmp_path / "small.tif")
    fitted = fit_model_dtype(image, meta, "uint8")
    assert fitted.dtype == np.uint8 and fitted[1:].min() == 200 and fitted[0].max() == 0
    assert fit_model_dtype(image, meta, "uint16") is image
    with open_raster_rows(tmp_path / "small.tif", 1) as rows:
        assert fit_model_dtype(rows, rows.meta, "uint8").rows(0, 4).dtype == np.uint8
    small[3, 3] = 300
    signed_scene(tmp_path / "big.tif", small, -9999)
    image, meta = read_image(tmp_path / "big.tif")
    with pytest.raises(UserError, match=r"big\.tif: int16 image values reach 300, above 255 "
                       r"\(the model was trained on 8-bit, uint8, imagery\)"):
        fit_model_dtype(image, meta, "uint8")


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


# Reading labels ---------------------------------------------------------------------------

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



# Pixel limits, checked from the header before decoding ------------------------------------

def write_zero_png(path, width: int, height: int) -> None:
    """An all-zero 1-bit grey PNG of ``width`` x ``height`` written row by row through a
    streaming zlib compressor: 50000 x 50000 px (2.5 GB once decoded) is a 0.3 MB file
    written in about a second."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    compressor = zlib.compressobj(9)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n"
                + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)))
        block = row * 1000
        for start in range(0, height, 1000):
            data = compressor.compress(block[: len(row) * min(1000, height - start)])
            if data:
                f.write(chunk(b"IDAT", data))
        f.write(chunk(b"IDAT", compressor.flush()) + chunk(b"IEND", b""))


def _no_decoding(monkeypatch) -> None:
    """Make decoding pixels (Pillow, GDAL, tifffile) fail the test: only headers are read."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    monkeypatch.setattr(rasterio.io.DatasetReader, "read", refuse)
    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", refuse)


def test_a_png_bomb_is_refused_from_its_header_without_decoding(tmp_path, monkeypatch):
    """A 50000 x 50000 px PNG of a few hundred kB is refused by MAX_IMAGE_PIXELS and, with
    no key, by the memory available (here 8 GB), with one line giving the gdal_translate
    command; no pixel is decoded (Pillow's own limit used to send it whole to GDAL)."""
    path = tmp_path / "bomb.png"
    write_zero_png(path, 50_000, 50_000)
    assert path.stat().st_size < 1_000_000
    _no_decoding(monkeypatch)
    with pytest.raises(UserError) as info:
        read_image(path, max_pixels=100_000_000)
    message = str(info.value)
    assert "\n" not in message and message.startswith(
        f"{path}: 50000x50000 px (1 band) is more than can be decoded at once (100000000 px, "
        "MAX_IMAGE_PIXELS); convert it to a tiled GeoTIFF")
    assert "gdal_translate -of GTiff -co TILED=YES" in message and "bomb_tiled.tif" in message
    monkeypatch.setattr(rasters.psutil, "virtual_memory",
                        lambda: types.SimpleNamespace(available=8 * 2**30))
    with pytest.raises(UserError, match=r"\(357913941 px, what fits in the 8\.0 GB of memory "
                                        r"available; MAX_IMAGE_PIXELS sets it\)"):
        read_image(path)
    with pytest.raises(UserError, match="50000x50000 px"):
        read_label(path)


@pytest.mark.parametrize("kind", ["png", "jpeg", "multipage", "tiff", "label"])
def test_images_read_whole_over_max_image_pixels_are_refused(tmp_path, monkeypatch, kind):
    """Every whole read (PNG, JPEG, multi-page TIFF, GeoTIFF, label) stops at a small
    MAX_IMAGE_PIXELS (599 px for a 30 x 20 image) before decoding, and reads the same file
    within it (600 px)."""
    array = random_u8((20, 30, 3))
    path = tmp_path / {"jpeg": "x.jpg", "multipage": "x.tif", "tiff": "x.tif"}.get(kind, "x.png")
    if kind == "jpeg":
        Image.fromarray(array).save(path)
    elif kind == "multipage":
        tifffile.imwrite(path, np.moveaxis(array, -1, 0), photometric="minisblack")
    elif kind == "tiff":
        write_geotiff(path, array, RasterMeta(path=path))
    else:
        write_png(path, array[..., 0] % 2 if kind == "label" else array)
    read = read_label if kind == "label" else read_image
    assert read(path, max_pixels=600) is not None
    _no_decoding(monkeypatch)
    with pytest.raises(UserError) as info:
        read(path, max_pixels=599)
    bands = "1 band" if kind == "label" else "3 bands"
    assert str(info.value).startswith(f"{path}: 30x20 px ({bands}) is more than can be "
                                      "decoded at once (599 px, MAX_IMAGE_PIXELS)")


def test_an_extra_band_over_max_image_pixels_is_refused_before_decoding(tmp_path, monkeypatch):
    """An extra band is checked from its header too, counting the bands of the whole stack
    (a 40 x 30 extra band of a 30 x 20 RGB image: 4 bands), before it is decoded."""
    write_png(tmp_path / "x.png", random_u8((20, 30, 3)))
    write_png(tmp_path / "e.png", random_u8((40, 30)))
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: (
        pytest.fail("the extra band was decoded") if im.filename.endswith("e.png")
        else load(im)))
    with pytest.raises(UserError, match=r"e\.png: 30x40 px \(4 bands\) is more than can be "
                                        r"decoded at once \(600 px, MAX_IMAGE_PIXELS\)"):
        read_image(tmp_path / "x.png", [tmp_path / "e.png"], max_pixels=600)


def test_a_raster_read_in_windows_is_refused_when_a_row_of_blocks_would_not_fit(tmp_path):
    """A GeoTIFF of one strip decodes whole whatever window is asked: refused when opened
    for windowed reading; a tiled one opens, and a window taller than the limit allows is
    refused as it is asked for."""
    array = random_u8((100, 40, 3))
    with rasterio.open(tmp_path / "strip.tif", "w", driver="GTiff", width=40, height=100,
                       count=3, dtype="uint8") as ds:
        ds.write(np.moveaxis(array, -1, 0))
        strip_rows = ds.block_shapes[0][0]
    assert 40 * strip_rows > 1000
    with pytest.raises(UserError, match=rf"strip\.tif: one row of blocks of 40x{strip_rows} px "
                                        r"\(3 bands\) is more than can be decoded at once "
                                        r"\(1000 px, MAX_IMAGE_PIXELS\); convert it to a tiled"):
        open_raster_rows(tmp_path / "strip.tif", 3, max_pixels=1000)
    with rasterio.open(tmp_path / "tiled.tif", "w", driver="GTiff", width=40, height=100,
                       count=3, dtype="uint8", tiled=True, blockxsize=16,
                       blockysize=16) as ds:
        ds.write(np.moveaxis(array, -1, 0))
    with open_raster_rows(tmp_path / "tiled.tif", 3, max_pixels=1000) as rows:
        np.testing.assert_array_equal(rows.rows(10, 35), array[10:35])
        with pytest.raises(UserError, match=r"a window of rows 0\.\.30 of 40x30 px \(3 bands\) "
                                            r"is more than .* \(1000 px, MAX_IMAGE_PIXELS\); "
                                            r"raise MAX_IMAGE_PIXELS"):
            rows.rows(0, 30)
    assert open_raster_rows(tmp_path / "strip.tif", 3) is not None
