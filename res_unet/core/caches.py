"""Where res_unet keeps what it can rebuild, and the folders of the libraries it uses.

res_unet writes only in the folders a user names and in its cache (:func:`cache_dir`). Two
libraries it imports would write in the home folder by themselves: Keras creates
``~/.keras/keras.json`` when imported (and keeps downloads in ``~/.keras/models``), and
matplotlib keeps its font cache in ``~/.cache/matplotlib``. :func:`keep_library_files_in_cache`,
called when ``res_unet`` is imported, points them (``KERAS_HOME``, ``MPLCONFIGDIR``) into the
cache unless the user set those variables; both are read when the library is imported, so
import res_unet before Keras and matplotlib (the commands do).
"""

from __future__ import annotations

import os
from pathlib import Path

# Library -> (its environment variable, our cache's subfolder for it).
LIBRARY_DIRS = {"keras": ("KERAS_HOME", "keras"), "matplotlib": ("MPLCONFIGDIR", "matplotlib")}


def cache_dir() -> Path:
    """Where res_unet keeps what it can rebuild (converted models, the libraries' files):
    RES_UNET_CACHE_DIR, else $XDG_CACHE_HOME/res_unet, else ~/.cache/res_unet."""
    if os.environ.get("RES_UNET_CACHE_DIR"):
        return Path(os.environ["RES_UNET_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "res_unet"


def keep_library_files_in_cache() -> None:
    """Set KERAS_HOME and MPLCONFIGDIR to folders of :func:`cache_dir`, each unless the user
    set it. The libraries create the folders when they need them."""
    for variable, folder in LIBRARY_DIRS.values():
        if not os.environ.get(variable):
            os.environ[variable] = str(cache_dir() / folder)
