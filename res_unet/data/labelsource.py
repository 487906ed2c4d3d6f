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
from collections.abc import Sequence
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
    def shared_layer(self) -> bool:
        """Whether the source is one polygon layer over many scenes (not a folder)."""
        return not self.path.is_dir() and vectors.is_vector_path(self.path)

    def pairs(self, images_dir: str | os.PathLike,
              extra_band_dirs: Sequence[str | os.PathLike] = (),
              untouched: str | None = pairing.LEFT_OUT) -> list[Pair]:
        """The labelled scenes of ``images_dir``, sorted by stem: each image with its label
        file (a folder: every image needs one) or with the shared layer (the images it
        touches; the others are named in a note ending with ``untouched``, None: quiet).
        Raises UserError as :func:`res_unet.data.pairing.find_pairs`."""
        if self.shared_layer:
            if not self.path.exists():
                raise UserError(f"{self.path}: no such label file; check the labels path")
            return pairing.pairs_over_one_layer(images_dir, self.path, self.polygons,
                                                extra_band_dirs, untouched)
        return pairing.find_pairs(images_dir, self.path, self.cfg.USEMASK, extra_band_dirs,
                                  self.polygons)

    def scenes(self, images_dir: str | os.PathLike,
               extra_band_dirs: Sequence[str | os.PathLike] = ()) -> list[Pair]:
        """Every scene to segment in ``images_dir``, sorted by stem, with its label; scenes a
        shared layer does not touch come without one (label None) and are named in a note."""
        pairs = self.pairs(images_dir, extra_band_dirs, NOT_SCORED)
        if not self.shared_layer:
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
        layer = vectors.layer_name(self.path, self.cfg.LABEL_LAYER) if self.shared_layer else None
        values = self.cfg.to_dict()
        return {"kind": "layer" if self.shared_layer else "folder",
                "path": str(self.path.resolve()), "layer": layer,
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
