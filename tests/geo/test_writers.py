"""Tests for res_unet.geo.writers: PNG and GeoTIFF writing (whole or strip by strip), atomic
replacement, arrays a format cannot store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import tifffile
from helpers import folder_listing
from PIL import Image

from res_unet.geo import rasters
from res_unet.geo.grid import RasterMeta, is_georeferenced
from res_unet.geo.rasters import read_image, read_label
from res_unet.geo.writers import write_geotiff, write_png


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


def test_png_writer_streams_rows_and_leaves_nothing_when_incomplete(tmp_path):
    from res_unet.geo.writers import png_writer

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

