"""GIS: rasters, vectors, scales and where scenes come from (folders, URLs, STAC)."""
