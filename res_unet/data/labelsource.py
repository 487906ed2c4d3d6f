"""Where a folder of scenes takes its labels from: chosen once, read the same way everywhere.

A :class:`LabelSource` is what ``--labels`` names, for make_tfrecords and
seg_images_in_folder alike, and what a dataset's manifest records for the scene evaluation
that ends training (:func:`res_unet.inference.scoring.evaluate_scenes`):

- a folder of raster labels (``NAME.png``, ``NAME_label.tif``, ``NAME_mask.*`` with USEMASK),
- a folder of each scene's own polygon layer (``NAME.gpkg``, ``.geojson``, ``.shp``; rasters
  and layers may mix),
- one polygon layer over many scenes (a ``.gpkg``, ``.geojson`` or ``.shp`` file): the scenes
  it does not touch have no label (left out of a dataset, not scored by segmentation).

With it go the rules that turn labels into classes: NCLASSES, REMAP_CLASSES, IGNORE_CLASS
(:class:`res_unet.config.keys.LabelRules`) and, for polygons, LABEL_ATTRIBUTE, LABEL_LAYER,
LABEL_PRIORITY and CLASS_NAMES (:class:`res_unet.data.pairing.PolygonRules`). As in Raster
Vision's rasterized label sources and TorchGeo's vector datasets, a polygon layer is one
more kind of label: :meth:`LabelSource.pairs` gives every scene its label (pairing's rules),
:meth:`LabelSource.truth` reads it as class indices on the scene's grid, and
:meth:`LabelSource.record` / :meth:`LabelSource.of_dataset` carry the source through the
manifest.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from res_unet.config.keys import Config, LabelRules, config_from_dict
from res_unet.core.errors import UserError
from res_unet.data import pairing
from res_unet.data.pairing import Pair, PolygonRules
from res_unet.geo import vectors

if TYPE_CHECKING:
    from res_unet.data.records import Manifest

# What segmentation says about the scenes a shared layer does not touch.
NOT_SCORED = ("segmented but not scored: a scene nobody labelled is not a scene without "
              "objects (draw a class-0 polygon on it to score it as background)")


# The config keys that say how labels become classes: a source keeps them, the manifest too.
LABEL_KEYS = ("USEMASK", "NCLASSES", "CLASS_NAMES", "REMAP_CLASSES", "IGNORE_CLASS",
              "LABEL_ATTRIBUTE", "LABEL_LAYER", "LABEL_PRIORITY")


def _label_config(values: dict[str, Any], source: str) -> Config:
    """A Config holding ``values``' label keys (others at their defaults), validated."""
    cfg, _ = config_from_dict({k: values[k] for k in LABEL_KEYS if k in values}, source)
    return cfg


@dataclass(frozen=True)
class LabelKind:
    """One kind of ``--labels``: ``takes(path)`` says whether a path is one; ``pairs(source,
    images_dir, extra_band_dirs, untouched)`` gives the labelled scenes (see
    :meth:`LabelSource.pairs`); ``all_scenes`` whether scenes without a label are still
    segmented (and named in a note) rather than an error; ``layer(source)`` the layer it
    reads, recorded in the manifest (None: none)."""

    name: str
    takes: Callable[[Path], bool]
    pairs: Callable[[LabelSource, str | os.PathLike, Sequence[str | os.PathLike], str | None],
                    list[Pair]]
    all_scenes: bool = False
    layer: Callable[[LabelSource], str | None] = lambda source: None


def _folder_pairs(source: LabelSource, images_dir: str | os.PathLike,
                  extra_band_dirs: Sequence[str | os.PathLike], untouched: str | None
                  ) -> list[Pair]:
    return pairing.find_pairs(images_dir, source.path, source.cfg.USEMASK, extra_band_dirs,
                              source.polygons)


def _layer_pairs(source: LabelSource, images_dir: str | os.PathLike,
                 extra_band_dirs: Sequence[str | os.PathLike], untouched: str | None
                 ) -> list[Pair]:
    if not source.path.exists():
        raise UserError(f"{source.path}: no such label file; check the labels path")
    return pairing.pairs_over_one_layer(images_dir, source.path, source.polygons,
                                        extra_band_dirs, untouched)


# The kinds of --labels, tried in order (the first that takes the path reads it; the last
# takes every path). A new kind of label source is its pairs function (reading its labels
# through res_unet.data.pairing's readers, or a module of its own) and one entry here; its
# name is what the manifest records.
LABEL_KINDS: tuple[LabelKind, ...] = (
    # One polygon layer over many scenes (a .gpkg, .geojson or .shp file).
    LabelKind("layer", lambda path: not path.is_dir() and vectors.is_vector_path(path),
              _layer_pairs, all_scenes=True,
              layer=lambda source: vectors.layer_name(source.path, source.cfg.LABEL_LAYER)),
    # A folder of each scene's own label raster or polygon layer.
    LabelKind("folder", lambda path: True, _folder_pairs),
)


@dataclass(frozen=True)
class LabelSource:
    """The labels of a folder of scenes: ``path`` (a folder of label files, or one polygon
    layer file over many scenes) and ``cfg``, a config whose label keys (:data:`LABEL_KEYS`)
    say how they become classes (its other keys are unused)."""

    path: Path
    cfg: Config

    @classmethod
    def from_config(cls, path: str | os.PathLike, cfg: Config) -> LabelSource:
        """The source ``path`` (``--labels``) under a config's label keys."""
        return cls(Path(path), _label_config(cfg.to_dict(), "config"))

    @property
    def rules(self) -> LabelRules:
        """NCLASSES, REMAP_CLASSES and IGNORE_CLASS."""
        return self.cfg.label_rules

    @property
    def polygons(self) -> PolygonRules:
        """How polygon layers become label maps (LABEL_ATTRIBUTE, LABEL_LAYER, ...)."""
        return PolygonRules.from_config(self.cfg)

    @property
    def kind(self) -> LabelKind:
        """What kind of source ``path`` is: the first of :data:`LABEL_KINDS` that takes it."""
        return next(kind for kind in LABEL_KINDS if kind.takes(self.path))

    @property
    def shared_layer(self) -> bool:
        """Whether the source is one polygon layer over many scenes (not a folder)."""
        return self.kind.name == "layer"

    def pairs(self, images_dir: str | os.PathLike,
              extra_band_dirs: Sequence[str | os.PathLike] = (),
              untouched: str | None = pairing.LEFT_OUT) -> list[Pair]:
        """The labelled scenes of ``images_dir``, sorted by stem: each image with its label
        file (a folder: every image needs one) or with the shared layer (the images it
        touches; the others are named in a note ending with ``untouched``, None: quiet).
        Raises UserError as :func:`res_unet.data.pairing.find_pairs`."""
        return self.kind.pairs(self, images_dir, extra_band_dirs, untouched)

    def scenes(self, images_dir: str | os.PathLike,
               extra_band_dirs: Sequence[str | os.PathLike] = ()) -> list[Pair]:
        """Every scene to segment in ``images_dir``, sorted by stem, with its label; scenes a
        shared layer does not touch come without one (label None) and are named in a note."""
        pairs = self.pairs(images_dir, extra_band_dirs, NOT_SCORED)
        if not self.kind.all_scenes:
            return pairs
        labelled = {pair.stem: pair for pair in pairs}
        return [labelled.get(pair.stem, pair)
                for pair in pairing.find_images(images_dir, extra_band_dirs)]

    def truth(self, pair: Pair, shape: tuple[int, int]
              ) -> tuple[np.ndarray, vectors.LabelFacts | None]:
        """A scene's label as (H, W) uint8 class indices (REMAP_CLASSES applied) on the
        scene's grid, which is the grid segmentation writes its label maps on and scores:
        polygons are burnt there whatever the scene's pixel size or CRS. Also what burning
        found (None for rasters). Raises UserError unless the label is ``shape``."""
        return pairing.read_pair_label(pair, self.rules, self.polygons, shape)

    def record(self) -> dict[str, Any]:
        """The source as the manifest records it (JSON-ready): ``kind`` ("folder" or
        "layer"), the absolute ``path``, the ``layer`` read from a shared layer file (None
        for a folder) and the label keys; :meth:`from_record` reads it back."""
        values = self.cfg.to_dict()
        kind = self.kind
        return {"kind": kind.name, "path": str(self.path.resolve()), "layer": kind.layer(self),
                **{k: values[k] for k in LABEL_KEYS}}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> LabelSource:
        """The source a manifest recorded (:meth:`record`); a shared layer file is read at
        the layer recorded. Raises UserError for a record with invalid label keys."""
        values = dict(record)
        if record.get("layer") is not None:
            values["LABEL_LAYER"] = record["layer"]
        return cls(Path(record["path"]), _label_config(values, "manifest.json: label_source"))

    @classmethod
    def of_dataset(cls, manifest: Manifest) -> LabelSource:
        """Where a dataset's labels came from: its manifest's record, or for a dataset made
        before the manifest kept one, its labels path under the building config's keys."""
        if manifest.label_source:
            return cls.from_record(manifest.label_source)
        return cls(Path(manifest.labels_dir), _label_config(manifest.config,
                                                            "manifest.json: config"))
