"""Key roles read from the Config declaration (res_unet/config/reference.py): the derived
lists equal the hand-written lists they replaced, so resuming, segmentation settings and the
output fingerprint behave exactly as before."""

from __future__ import annotations

import dataclasses

import pytest

from res_unet.config.keys import FIRST_VERSION, ROLES, Config
from res_unet.config.reference import (
    key_group,
    key_since,
    keys_added_after,
    keys_with,
    reference_markdown,
)

SEGMENTATION_GROUP = (
    "INFER_MODE", "INFER_RUNTIME", "BLEND_WINDOW", "TESTTIMEAUG", "TTA_ROT90", "THRESHOLD",
    "DO_CRF_REFINE", "CRF_ITERATIONS", "CRF_GAUSSIAN_SXY", "CRF_GAUSSIAN_COMPAT",
    "CRF_BILATERAL_SXY", "CRF_BILATERAL_SRGB", "CRF_BILATERAL_COMPAT", "CRF_MAX_PIXELS",
    "MEDIAN_FILTER_VALUE", "OPENING_RADIUS", "CLOSING_RADIUS", "MIN_OBJECT_AREA",
    "MIN_HOLE_AREA", "NODATA_ZERO", "SCENE_PIXEL_SIZE", "MAX_ENLARGEMENT", "MAX_IMAGE_PIXELS",
    "VECTOR_FORMAT", "VECTOR_SIMPLIFY", "VECTOR_LAYER_PER_CLASS")
# The lists as they were written by hand before the roles (resume.py, settings.py,
# fingerprint.py at 611be45).
OLD_RESUMABLE_KEYS = ("MAX_EPOCHS", "PATIENCE", "MAX_TRAIN_MINUTES", "STEPS_PER_EPOCH",
                      "KEEP_WEIGHTS", "DOPLOT", "TENSORBOARD", "SET_GPU")
OLD_INFERENCE_KEYS = (*SEGMENTATION_GROUP, "TILE_OVERLAP", "BATCH_SIZE", "USEMASK",
                      "REMAP_CLASSES", "EXTRA_BAND_DIRS", "SET_GPU", "LABEL_ATTRIBUTE",
                      "LABEL_LAYER", "LABEL_PRIORITY")
OLD_NEUTRAL_KEYS = ("BATCH_SIZE", "SET_GPU", "USEMASK", "REMAP_CLASSES", "EXTRA_BAND_DIRS",
                    "INFER_RUNTIME", "VECTOR_FORMAT", "LABEL_ATTRIBUTE", "LABEL_LAYER",
                    "LABEL_PRIORITY", "MAX_ENLARGEMENT", "MAX_IMAGE_PIXELS")
OLD_ADDED_LATER = {"SCENE_PIXEL_SIZE": None, "VECTOR_SIMPLIFY": 0.0,
                   "VECTOR_LAYER_PER_CLASS": False}


def test_segmentation_group_is_as_before():
    assert tuple(f.name for f in dataclasses.fields(Config)
                 if key_group(f.name) == "segmentation") == SEGMENTATION_GROUP


def test_resumable_keys_are_the_old_list_and_the_segmentation_keys():
    assert set(keys_with("resumable")) == set(OLD_RESUMABLE_KEYS) | set(SEGMENTATION_GROUP)


def test_inference_keys_are_the_old_list():
    assert set(keys_with("inference")) == set(OLD_INFERENCE_KEYS)
    assert len(keys_with("inference")) == len(set(OLD_INFERENCE_KEYS))


def test_output_keys_are_the_old_inference_keys_less_the_neutral_ones():
    old = [k for k in OLD_INFERENCE_KEYS if k not in OLD_NEUTRAL_KEYS]
    assert set(keys_with("affects_outputs")) == set(old)
    assert set(keys_with("affects_outputs")) <= set(keys_with("inference"))


def test_output_fingerprint_keys_keep_their_order_and_the_added_later_rule():
    from res_unet.inference import fingerprint

    old = [k for k in OLD_INFERENCE_KEYS if k not in OLD_NEUTRAL_KEYS]
    assert list(fingerprint._SETTINGS) == old  # segmentation_config.json's order
    assert fingerprint._ADDED_LATER == OLD_ADDED_LATER


def test_since_marks_the_keys_added_after_the_first_version():
    later = keys_added_after(FIRST_VERSION)
    assert set(later) == {"LABEL_ATTRIBUTE", "LABEL_LAYER", "LABEL_PRIORITY", "PIXEL_SIZE",
                          "DETERMINISTIC", "SCENE_PIXEL_SIZE", "VECTOR_FORMAT",
                          "VECTOR_SIMPLIFY", "VECTOR_LAYER_PER_CLASS", "MAX_ENLARGEMENT",
                          "MAX_IMAGE_PIXELS"}
    assert key_since("NCLASSES") == FIRST_VERSION
    assert key_since("VECTOR_SIMPLIFY") == "0.2.0"
    assert set(keys_added_after("0.2.0")) == {"MAX_ENLARGEMENT", "MAX_IMAGE_PIXELS"}
    assert keys_added_after("99.0.0") == ()


def test_every_declared_role_is_known_and_unknown_roles_are_refused():
    for f in dataclasses.fields(Config):
        assert f.metadata["roles"] <= set(ROLES), f.name
    with pytest.raises(ValueError, match="unknown key role 'resume'"):
        keys_with("resume")


def test_reference_marks_roles_and_versions():
    lines = {line.split("|")[1].strip(" `"): line for line in reference_markdown().splitlines()
             if line.startswith("| `")}
    assert "*(segmentation --config; resume may change)*" in lines["THRESHOLD"]
    assert ("*(segmentation --config; resume may change; segmented images kept; new in "
            "0.3.0)*") in lines["MAX_ENLARGEMENT"]
    assert "*(segmentation --config; segmented images kept)*" in lines["BATCH_SIZE"]
    assert "*(resume may change)*" in lines["MAX_EPOCHS"]
    assert "*(" not in lines["NCLASSES"]
