"""From image and label files to a dataset: pairing images with labels, label sources (label
rasters, per-scene polygon files, one shared layer), the split, augmentation, TFRecord shards
and their manifest, dataset reports.

May import :mod:`res_unet.core`, :mod:`res_unet.config` and :mod:`res_unet.geo`.
"""
