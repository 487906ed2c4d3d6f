"""Reading and writing georeferenced data: rasters (windowed reads, pixel types, nodata),
scale (bringing a scene to the model's pixel size), tiles, polygon layers (``vectors``,
``vector_files``), polygons from masks, COGs and the output writers, the colour palette.

May import :mod:`res_unet.core` and :mod:`res_unet.config`. Knows nothing of datasets,
models or training.
"""
