"""Keras' saving (``.keras`` and ``.weights.h5`` files), with its cache of attribute skip-sets
mended.

For every layer it saves or loads, Keras 3 walks the layer's attributes, leaving out those a
plain reference object of the same kind has. It builds that reference object (a new
``keras.layers.Layer()``, a few milliseconds of Python) and means to keep its attributes in a
cache, but the cache is read under one key (``saving_attr_skiplist_<kind>``) and written
under another (``saving_attr_skipset_<kind>``), so the reference is built again for every
layer of every save and load (Keras 3.15). :func:`cache_attr_skipsets` keeps them once per
kind; a Keras whose own cache works is left as it is. The skip-set depends only on the
kind of object, so files written and read are unchanged (tests/models/test_saving.py).
"""

from __future__ import annotations

import functools

from keras.src.saving import saving_lib


def keras_caches_attr_skipsets() -> bool:
    """Whether Keras' saving keeps the attribute skip-set of a kind once built (asked twice,
    it gives the same set back, whatever key it keeps it under)."""
    return saving_lib.get_attr_skipset("Layer") is saving_lib.get_attr_skipset("Layer")


def cache_attr_skipsets() -> None:
    """Keep Keras' attribute skip-sets once per kind of object (see the module docstring).
    Idempotent; nothing changes where Keras keeps them itself."""
    current = saving_lib.get_attr_skipset
    if getattr(current, "cache_info", None) is not None or keras_caches_attr_skipsets():
        return
    saving_lib.get_attr_skipset = functools.cache(current)
