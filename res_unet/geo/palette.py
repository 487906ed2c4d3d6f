"""The one palette of class maps: the colours of the overlays and figures (:mod:`report`)
and of the colour tables written into label GeoTIFFs (:mod:`cog`), so a class looks the
same in a PNG overlay and in QGIS. A leaf module, so that every layer may use it.

Class k is ``CLASS_COLOURS[k]`` (matplotlib's tab20, cycled), except binary maps, whose
foreground is ``BINARY_COLOUR`` and whose background is left uncoloured in overlays.
"""

from __future__ import annotations

import numpy as np

CLASS_COLOURS = np.array([
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
], dtype=np.uint8)
BINARY_COLOUR = (255, 0, 255)


def class_colours(n_classes: int) -> np.ndarray:
    """RGB colours (n_classes, 3) uint8 of the classes of a map (binary: background black,
    foreground BINARY_COLOUR)."""
    if n_classes == 2:
        return np.array([(0, 0, 0), BINARY_COLOUR], np.uint8)
    return CLASS_COLOURS[np.arange(n_classes) % len(CLASS_COLOURS)]

