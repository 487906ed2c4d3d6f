"""A scene as a GDAL VRT: its assets stacked band by band on the first one's grid, cut to an
area of interest, at the COG overview that matches the model's pixel size.

The VRT is XML that only names the assets, so reading it reads only the blocks its windows
cover (over HTTP, range requests). Assets are opened with one fixed driver by suffix
(:data:`ASSET_DRIVERS`), never GDAL's guess by content: a stranger's VRT may name local files.

May import :mod:`res_unet.core` and the rest of :mod:`res_unet.geo` below it.
"""

from __future__ import annotations

import contextlib
import math
import urllib.parse
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import rasterio
import rasterio.errors
import rasterio.windows
import shapely
from rasterio.crs import CRS
from rasterio.windows import Window, from_bounds

from res_unet.core.errors import UserError
from res_unet.geo import remote, vectors

# The one driver an asset is opened with, by suffix (GeoTIFF otherwise): never GDAL's pick
# by content, which would open a stranger's VRT, and a VRT may name local files.
ASSET_DRIVERS = {".jp2": "JP2OpenJPEG", ".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
_GDAL_TYPES = {"uint8": "Byte", "int8": "Int8", "uint16": "UInt16", "int16": "Int16",
               "uint32": "UInt32", "int32": "Int32", "float32": "Float32",
               "float64": "Float64"}


def _window(area: tuple[Any, CRS] | None, ds: Any) -> Window | None:
    """The window of ``ds`` that covers ``area`` (whole pixels, inside the scene); the whole
    scene without an area; None when the area misses the scene."""
    full = Window(0, 0, ds.width, ds.height)
    if area is None:
        return full
    geometry, crs = area
    if ds.crs is None:
        raise UserError(f"{remote.redact(ds.name)}: has no CRS, so --bbox/--aoi cannot be "
                        "placed on it")
    size = max(geometry.bounds[2] - geometry.bounds[0], geometry.bounds[3] - geometry.bounds[1])
    dense = shapely.segmentize(geometry, max(size / 64, 1e-9))
    moved = vectors.to_crs(shapely.get_parts(dense), crs, ds.crs, "the area of interest")
    left, bottom, right, top = ds.bounds
    clipped = shapely.intersection(shapely.union_all(moved),
                                   shapely.box(left, bottom, right, top))
    if clipped.is_empty or clipped.area == 0:
        return None
    window = from_bounds(*clipped.bounds, transform=ds.transform)
    col0, row0 = math.floor(window.col_off + 1e-6), math.floor(window.row_off + 1e-6)
    col1 = math.ceil(window.col_off + window.width - 1e-6)
    row1 = math.ceil(window.row_off + window.height - 1e-6)
    return Window(col0, row0, col1 - col0, row1 - row0).intersection(full)


def overview_factor(ds: Any, scene_px: float, model_px: float | None) -> int:
    """The largest overview decimation of ``ds`` (1: full resolution) whose pixels are no
    coarser than the model's, within 10 %."""
    if model_px is None or scene_px <= 0:
        return 1
    factors = [f for f in ds.overviews(1) if scene_px * f <= model_px * 1.1]
    return max(factors, default=1)


def _open_asset(source: str) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        path = urllib.parse.urlsplit(source).path if "://" in source else source
        return rasterio.open(source, driver=ASSET_DRIVERS.get(Path(path).suffix.lower(),
                                                              "GTiff"))


def _band_xml(band: int, dtype: str, nodata: float | None, sources: list[str]) -> str:
    nodata_xml = "" if nodata is None else f"<NoDataValue>{nodata!r}</NoDataValue>"
    return (f'<VRTRasterBand dataType="{_GDAL_TYPES[dtype]}" band="{band}">{nodata_xml}'
            + "".join(sources) + "</VRTRasterBand>")


def _source_xml(path: str, band: int, src: Window, dst: tuple[int, int], resample: bool
                ) -> str:
    attribute = ' resampling="bilinear"' if resample else ""
    return (f"<SimpleSource{attribute}><SourceFilename relativeToVRT=\"0\">{escape(path)}"
            f"</SourceFilename><SourceBand>{band}</SourceBand>"
            f'<SrcRect xOff="{float(src.col_off)!r}" yOff="{float(src.row_off)!r}" '
            f'xSize="{float(src.width)!r}" ySize="{float(src.height)!r}"/>'
            f'<DstRect xOff="0" yOff="0" xSize="{dst[1]}" ySize="{dst[0]}"/></SimpleSource>')


def scene_vrt(sources: Sequence[str], shown: str, area: tuple[Any, CRS] | None = None,
              model_pixel_size: float | None = None) -> tuple[str, dict[str, Any]] | None:
    """The VRT XML of a scene (its assets, the GDAL paths ``sources``, stacked; cut to
    ``area``; at the overview that matches ``model_pixel_size`` metres; ``shown`` names it
    in messages) and facts about it (window, overview); None when
    the area misses it. Raises UserError for assets on different CRSs or pixel types, and
    rasterio errors for an unreadable asset."""
    from res_unet.geo.scale import pixel_size_m

    with contextlib.ExitStack() as stack:
        datasets = [stack.enter_context(_open_asset(s)) for s in sources]
        first = datasets[0]
        window = _window(area, first)
        if window is None:
            return None
        factor = 1
        if first.crs is not None:
            scene_px = math.sqrt(math.prod(pixel_size_m(first)))
            factor = overview_factor(first, scene_px, model_pixel_size)
        height = max(1, round(window.height / factor))
        width = max(1, round(window.width / factor))
        transform = first.window_transform(window) @ rasterio.Affine.scale(
            window.width / width, window.height / height)
        bounds = rasterio.windows.bounds(window, first.transform)
        dtypes = {d.dtypes[0] for d in datasets} | {t for d in datasets for t in d.dtypes}
        if len(dtypes) > 1 or any(d.crs != first.crs for d in datasets):
            raise UserError(f"{shown}: the assets differ in CRS or pixel type; pick "
                            "assets of one kind with --asset")
        dtype = first.dtypes[0]
        if dtype not in _GDAL_TYPES:
            raise UserError(f"{shown}: pixel type {dtype} cannot be read; convert it")
        bands = []
        for path, ds in zip(sources, datasets, strict=True):
            src = window if ds is first else from_bounds(*bounds, transform=ds.transform)
            resample = ds is not first or factor > 1
            for b in range(1, ds.count + 1):
                bands.append(_band_xml(len(bands) + 1, dtype, first.nodata,
                                       [_source_xml(path, b, src, (height, width), resample)]))
        srs = "" if first.crs is None else f"<SRS>{escape(first.crs.to_wkt())}</SRS>"
        gt = ", ".join(repr(v) for v in transform.to_gdal())
        xml = (f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">{srs}'
               f"<GeoTransform>{gt}</GeoTransform>" + "".join(bands) + "</VRTDataset>\n")
        facts = {"window": [int(window.col_off), int(window.row_off), int(window.width),
                            int(window.height)], "overview": factor,
                 "full": [first.width, first.height]}
    return xml, facts
