"""Reading and writing georeferenced data: rasters (windowed reads, pixel types, nodata),
scale (bringing a scene to the model's pixel size), tiles, polygon layers (``vectors``,
``vector_files``), polygons from masks, COGs and the output writers, the colour palette,
and where scenes come from (``scenes``: folders, files, URLs, lists and STAC catalogues
through ``stac``, cut to an area of interest; ``remote``: GDAL's network settings).

May import :mod:`res_unet.core` and :mod:`res_unet.config.keys`. Knows nothing of datasets,
models or training.
"""
