"""Examples on disk: pairing image, label and extra-band files by name, the label rules,
and reading a pair checked against the config's band count and classes.

A :class:`Pair` is one example: an image, its label (None when segmenting) and the
co-registered single-band images appended as extra bands. :func:`find_pairs` and
:func:`find_images` build them from folders; :func:`prepare_label` turns raw label values
into class indices under a :class:`res_unet.config.keys.LabelRules`; :func:`load_image`,
:func:`open_image_rows` and :func:`load_pair` read a pair through :mod:`res_unet.geo.rasters`.
Messages name every file that does not fit, and the fix.

A label may also be a polygon layer (:mod:`res_unet.geo.vectors`, :class:`PolygonRules`): the
image's own ``NAME.gpkg`` / ``.geojson`` / ``.shp``, or one layer over many scenes, burnt
onto the image's grid when the pair is read (a process reads each layer once).

Why this module is long: raster and polygon labels are paired, checked and read through
the same Pair and label rules; splitting them would put one rule in two places.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import rasterio.errors
from rasterio.crs import CRS

from res_unet.core import messages
from res_unet.core.atomic import is_temporary
from res_unet.core.errors import UserError, listing
from res_unet.geo import vectors
from res_unet.geo.rasters import (
    IMAGE_SUFFIXES,
    RasterMeta,
    RasterRows,
    append_bands,
    nodata_mask,
    open_raster_rows,
    read_image,
    read_label,
)
from res_unet.geo.scenes import VRT_SUFFIX, is_scene_folder

if TYPE_CHECKING:
    from res_unet.config.keys import Config, LabelRules

_MAX_LISTED = 20


@dataclass
class Pair:
    """One training example on disk: an image, its label (None when segmenting) and the
    co-registered single-band images appended as extra bands, in EXTRA_BAND_DIRS order."""

    stem: str
    image: Path
    label: Path | None
    extra_bands: list[Path] = field(default_factory=list)
    # Polygon labels: the layer to read (None: the only one); one layer over many scenes?
    label_layer: str | None = None
    shared_label: bool = False
    # A shared layer: the scenes whose features are read (the same for every pair).
    label_area: vectors.SceneArea | None = None

    @property
    def label_name(self) -> str | None:
        """The label's file name for reports, with its layer when one is named."""
        if self.label is None:
            return None
        return self.label.name + (f" (layer {self.label_layer})" if self.label_layer else "")


@dataclass(frozen=True)
class PolygonRules:
    """How polygon layers become label maps: LABEL_ATTRIBUTE, LABEL_LAYER, LABEL_PRIORITY,
    CLASS_NAMES, NCLASSES (``n_classes``: label values, background included). Hashable:
    a process caches each layer it read under it."""

    attribute: str | None = None
    layer: str | None = None
    priority: tuple[int, ...] | None = None
    n_classes: int = 2
    class_names: tuple[str, ...] = ()
    nclasses: int = 1
    # REMAP_CLASSES as (attribute value, class) pairs: applied to the polygons' values, so
    # the pixels no polygon covers stay background (0) whatever it maps.
    remap: tuple[tuple[int, int], ...] = ()

    @classmethod
    def from_config(cls, cfg: Config) -> PolygonRules:
        """The rules of a config."""
        return cls(cfg.LABEL_ATTRIBUTE, cfg.LABEL_LAYER, tuple(cfg.LABEL_PRIORITY) or None,
                   cfg.n_label_classes, tuple(cfg.CLASS_NAMES), cfg.NCLASSES,
                   tuple(sorted((int(k), int(v)) for k, v in cfg.REMAP_CLASSES.items())))

    @property
    def remapped(self) -> bool:
        """Whether REMAP_CLASSES is set."""
        return bool(self.remap)

    def check_attribute(self, label_file: Path) -> None:
        """Raise UserError when the classes need an attribute and none is named."""
        if self.attribute is None and self.nclasses > 1:
            raise UserError(f"{label_file}: polygon labels for NCLASSES={self.nclasses} need "
                            "LABEL_ATTRIBUTE, the attribute holding each polygon's class; set "
                            "it in the config (null burns every polygon as class 1, for "
                            "binary models only)")


@functools.lru_cache(maxsize=8)
def _read_polygons(key: tuple[str, int, int], layer: str | None, rules: PolygonRules,
                   crs_wkt: str | None, within: vectors.SceneArea | None
                   ) -> tuple[vectors.VectorLabels, np.ndarray]:
    """:func:`read_polygons` once per process, file version (``key``), CRS and area."""
    if crs_wkt is not None:
        labels, classes = _read_polygons(key, layer, rules, None, within)
        crs = CRS.from_wkt(crs_wkt)
        return dataclasses.replace(labels, crs=crs, geometries=vectors.to_crs(
            labels.geometries, labels.crs, crs, labels.where)), classes
    labels = vectors.read_vector_labels(key[0], layer=layer, attribute=rules.attribute,
                                        within=within)
    return labels, vectors.class_indices(labels, rules.attribute, rules.n_classes,
                                         rules.class_names, dict(rules.remap))


def read_polygons(path: str | os.PathLike, layer: str | None, rules: PolygonRules,
                  crs: CRS | None = None, within: vectors.SceneArea | None = None
                  ) -> tuple[vectors.VectorLabels, np.ndarray]:
    """A polygon label layer and each feature's class index (uint8, REMAP_CLASSES applied),
    reprojected to ``crs`` when given; ``within``: only the features over these scenes.
    Cached, so that a process reads a file once (while it is unchanged). Raises UserError
    as :func:`res_unet.geo.vectors.read_vector_labels` and ``class_indices``."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such label file; check the labels path")
    stat = path.stat()
    return _read_polygons((str(path.resolve()), stat.st_mtime_ns, stat.st_size), layer, rules,
                          None if crs is None else crs.to_wkt(), within)


def repaired_note(where: str, n: int) -> str:
    """What to say once about a label file with ``n`` invalid polygons repaired."""
    return (f"{where}: {_count(n, 'invalid polygon')} repaired (make_valid); check them in "
            "QGIS (Vector > Geometry Tools > Check Validity)")


def burn_pair_label(pair: Pair, rules: PolygonRules
                    ) -> tuple[np.ndarray, vectors.LabelFacts]:
    """A pair's polygon label burnt onto its image's grid: (H, W) uint8 class indices
    (REMAP_CLASSES applied to the polygons' values; 0 where none lies), and what was found.
    Only the features over the image (or, for a shared layer, over all its scenes) are
    read. Raises UserError for an image without georeferencing, a layer without a CRS,
    classes outside the config's, and no polygon on the image."""
    assert pair.label is not None
    grid = vectors.SceneGrid.of_file(pair.image)
    vectors.require_georeferenced(grid, pair.label)
    within = pair.label_area or vectors.SceneArea.of_grids([grid])
    labels, classes = read_polygons(pair.label, pair.label_layer, rules, grid.crs, within)
    return vectors.burn_labels(labels, classes, grid, priority=rules.priority)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _listing(names: Sequence[str]) -> str:
    """'a, b, c' with at most _MAX_LISTED names, then '... and N more'."""
    return listing(names, _MAX_LISTED)


def _values_text(values: Sequence[int]) -> str:
    shown = ", ".join(str(v) for v in values[:_MAX_LISTED])
    return shown + (f", ... ({len(values)} values)" if len(values) > _MAX_LISTED else "")


_NOTED: set[str] = set()


def _note_once(kind: str, message: str) -> None:
    """Print a note the first time this kind of thing is seen in the process, not per file."""
    if kind not in _NOTED:
        _NOTED.add(kind)
        messages.note(message)


def prepare_label(label: np.ndarray, rules: LabelRules, path: str | os.PathLike
                  ) -> np.ndarray:
    """Turn a raw (H, W) uint8 label into class indices 0..rules.n_label_classes-1.

    Applies REMAP_CLASSES (``rules.remap``) first, except to a polygon label (``path`` a
    vector file), burnt with its polygons' values remapped already, so that the pixels no
    polygon covers stay background (:func:`burn_pair_label`); then, for binary models
    (NCLASSES=1), a 0/255 mask becomes 0/1 with a printed note. Raises UserError naming
    ``path``, the values found and the fix when a value is not a class (IGNORE_CLASS is
    allowed). Returns (H, W) uint8 (the input itself when nothing changed).
    """
    path = Path(path)
    if rules.remap and not vectors.is_vector_path(path):
        lut = np.arange(256, dtype=np.uint8)
        for key, value in rules.remap.items():
            if 0 <= int(key) <= 255:
                lut[int(key)] = value
        label = lut[label]
    counts = np.bincount(label.ravel(), minlength=256)
    present = [int(v) for v in np.flatnonzero(counts)]
    if rules.nclasses == 1 and 255 in present and set(present) <= {0, 255}:
        _note_once("0/255", f"{path}: 0/255 mask read as 0/1 (and any further 0/255 masks)")
        return (label == 255).astype(np.uint8)
    n = rules.n_label_classes
    bad = [v for v in present if v >= n and v != rules.ignore_class]
    if bad:
        raise UserError(_range_message(path, present, bad, rules))
    return label


def _range_message(path: Path, present: list[int], bad: list[int], rules: LabelRules) -> str:
    n = rules.n_label_classes
    after = " (after REMAP_CLASSES)" if rules.remap else ""
    fixes = []
    if path.suffix.lower() in (".jpg", ".jpeg"):
        fixes.append("JPEG compression invents label values: save labels as PNG")
    if len(present) <= n:
        mapping = {str(v): i for i, v in enumerate(present)}
        fixes.append(f"map the values to classes with REMAP_CLASSES {json.dumps(mapping)}")
    if present[-1] + 1 <= 255:
        fixes.append(f"set NCLASSES to {present[-1] + 1} if every value 0..{present[-1]} is a "
                     "class")
    if len(present) > n:
        fixes.append("merge values into classes with REMAP_CLASSES, e.g. "
                     f"{json.dumps({str(bad[0]): 0})}")
    return (f"{path}: label values {_values_text(present)}{after} but NCLASSES={rules.nclasses} "
            f"allows only 0..{n - 1} (found {_values_text(bad)}); " + ", or ".join(fixes))


def load_image(pair: Pair, n_bands: int, for_model: bool = False,
               max_pixels: int | None = None) -> tuple[np.ndarray, RasterMeta]:
    """Read a pair's image plus extra bands and check the band count against ``n_bands``
    (the config's N_DATA_BANDS, image bands plus extra bands).

    A constant, fully opaque alpha band (255, or 65535 for uint16) one band beyond what the
    config expects from the image (RGBA for 3 bands, grey+alpha for 1) is dropped. Returns
    (image (H, W, n_bands) uint8|uint16, meta). Raises UserError on a band mismatch;
    ``for_model``: ``n_bands`` is a trained model's, which the message says cannot change.
    ``max_pixels``: the config's MAX_IMAGE_PIXELS (see :func:`res_unet.geo.rasters.pixel_limit`).
    """
    image, meta = read_image(pair.image, max_pixels=max_pixels)
    expected = n_bands - len(pair.extra_bands)
    found = image.shape[-1]
    alpha_hint = ""
    if found == expected + 1 and found in (2, 4):
        alpha = image[..., -1]
        if (alpha == np.iinfo(image.dtype).max).all():
            image = np.ascontiguousarray(image[..., :-1])
        else:
            alpha_hint = (" (the last band is an alpha channel with transparent pixels: set "
                          f"N_DATA_BANDS to {n_bands + 1} to use it as data, or "
                          "re-save the image without transparency)")
    if image.shape[-1] != expected:
        extra = f" plus {_count(len(pair.extra_bands), 'extra band')}" if pair.extra_bands else ""
        total = found + len(pair.extra_bands)
        counted = " (image bands plus extra bands)" if pair.extra_bands else ""
        convert = f", or convert this image to {expected} bands" if expected >= 1 else ""
        if for_model:
            raise UserError(f"{pair.image}: {_count(found, 'band')} found{extra} but the model "
                            f"takes {_count(n_bands, 'band')} (as it was trained); "
                            f"convert this image to {expected} bands, or use a model trained "
                            f"on {total}-band imagery")
        fix = alpha_hint or (f"; set N_DATA_BANDS to {total}{counted} if all images are like "
                             f"this{convert}")
        raise UserError(f"{pair.image}: {_count(found, 'band')} found{extra} but N_DATA_BANDS "
                        f"is {n_bands}{fix}")
    return append_bands(image, pair.image, pair.extra_bands, max_pixels), meta


def open_image_rows(pair: Pair, n_bands: int, max_pixels: int | None = None
                    ) -> RasterRows | None:
    """The pair's image as :class:`res_unet.geo.rasters.RasterRows` when it can be read in
    windows: no extra-band folders, and a raster :func:`res_unet.geo.rasters.open_raster_rows`
    opens with exactly the model's ``n_bands`` bands. Else None: use :func:`load_image`,
    which reads the image whole and gives the messages for the other cases."""
    if pair.extra_bands:
        return None
    return open_raster_rows(pair.image, n_bands, max_pixels)


def load_pair(pair: Pair, n_bands: int, rules: LabelRules,
              polygons: PolygonRules | None = None, max_pixels: int | None = None
              ) -> tuple[np.ndarray, np.ndarray, RasterMeta]:
    """Read one training example and check it against the config's N_DATA_BANDS
    (``n_bands``) and label rules; a polygon label is burnt under ``polygons``.

    Returns (image (H, W, n_bands) uint8|uint16 raw values, label (H, W) uint8 class
    indices 0..rules.n_label_classes-1, meta of the image). Raises UserError for band-count or size
    mismatches (naming both files and sizes) and invalid label values.
    """
    image, label, meta, _ = load_pair_and_facts(pair, n_bands, rules, polygons, max_pixels)
    return image, label, meta


def load_pair_and_facts(pair: Pair, n_bands: int, rules: LabelRules,
                        polygons: PolygonRules | None = None, max_pixels: int | None = None
                        ) -> tuple[np.ndarray, np.ndarray, RasterMeta,
                                   vectors.LabelFacts | None]:
    """:func:`load_pair`, and what burning a polygon label found (None for a raster label)."""
    if pair.label is None:
        raise ValueError(f"load_pair needs a labelled pair; {pair.stem} has no label")
    image, meta = load_image(pair, n_bands, max_pixels=max_pixels)
    label, facts = read_pair_label(pair, rules, polygons, image.shape[:2], max_pixels)
    if meta.nodata is not None and rules.ignore_class is not None:
        # The image's nodata pixels are no example of any class: left out of the loss.
        label[nodata_mask(image, [meta.nodata])] = rules.ignore_class
    return image, label, meta, facts


def read_pair_label(pair: Pair, rules: LabelRules, polygons: PolygonRules | None,
                    shape: tuple[int, int], max_pixels: int | None = None
                    ) -> tuple[np.ndarray, vectors.LabelFacts | None]:
    """A pair's label as (H, W) uint8 class indices 0..rules.n_label_classes-1 (REMAP_CLASSES
    applied, IGNORE_CLASS kept), and what burning found (None for a raster label).

    The one way a label is read, for datasets, scores and the scene evaluation alike: a
    raster label as it is, a polygon label (:func:`burn_pair_label`, under ``polygons``)
    burnt onto the scene's own grid, which is also the grid the label maps segmentation
    writes and scores are on. Raises UserError unless the label is ``shape`` (the image's
    rows and columns), and as :func:`res_unet.geo.rasters.read_label` (``max_pixels``),
    :func:`prepare_label` and :func:`burn_pair_label`.
    """
    if pair.label is None:
        raise ValueError(f"read_pair_label needs a labelled pair; {pair.stem} has no label")
    facts = None
    if vectors.is_vector_path(pair.label):
        label, facts = burn_pair_label(pair, polygons or PolygonRules())
    else:
        label = read_label(pair.label, max_pixels)
    if label.shape != tuple(shape):
        raise UserError(f"{pair.label}: label size {label.shape[1]}x{label.shape[0]} (WxH) "
                        f"differs from its image {pair.image} ({shape[1]}x{shape[0]}); "
                        "labels must cover their image pixel for pixel")
    return prepare_label(label, rules, pair.label), facts


# Finding files -----------------------------------------------------------------------------

def _has_images(folder: Path) -> bool:
    return any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())


def _scan_folder(folder: Path, role: str, suffixes: Sequence[str] = IMAGE_SUFFIXES,
                 warn: bool = True) -> list[Path]:
    """Files with ``suffixes`` (images by default) directly in ``folder``, sorted. Other files
    are ignored; hidden ones (names starting with '.', e.g. macOS '._' copies) are skipped
    with one warning line on stderr giving their number and names (unless not ``warn``)."""
    if not folder.exists():
        raise UserError(f"{folder}: {role} folder not found; check the path")
    if not folder.is_dir():
        vector = " or one polygon layer (.gpkg ...)" if ".gpkg" in suffixes else ""
        raise UserError(f"{folder}: is a file, not a folder; pass the folder holding the "
                        f"{role}{vector}")
    if suffixes is IMAGE_SUFFIXES and is_scene_folder(folder):
        suffixes = (VRT_SUFFIX,)  # scenes from URLs and catalogues (res_unet.geo.scenes)
    entries = sorted(folder.iterdir())
    dangling = [p for p in entries if p.is_symlink() and not p.exists()
                and p.suffix.lower() in suffixes]
    if dangling:
        raise UserError(f"{dangling[0]}: is a link to {os.readlink(dangling[0])}, which does "
                        f"not exist ({_count(len(dangling), 'broken link')} among the {role}); "
                        "restore the target or remove the link")
    matching = [p for p in entries if p.is_file() and p.suffix.lower() in suffixes]
    files = [p for p in matching if not p.name.startswith(".")]
    ours = [p.name for p in matching if warn and is_temporary(p.name)]
    hidden = [p.name for p in matching
              if warn and p.name.startswith(".") and not is_temporary(p.name)]
    noun = "image file" if suffixes is IMAGE_SUFFIXES else "file"
    if ours:
        messages.warn(f"{folder}: skipped {_count(len(ours), 'unfinished ' + noun)} "
                      f"({_listing(ours)}): temporaries of a res_unet command that is still "
                      "writing there or was killed; they are never read (delete them when no "
                      "command is running)")
    if hidden:
        one = len(hidden) == 1
        messages.warn(f"{folder}: skipped {_count(len(hidden), noun)} whose "
                      f"{'name starts' if one else 'names start'} with '.' "
                      f"({_listing(hidden)}): hidden files are not read; rename "
                      f"{'it' if one else 'them'} without the leading '.' to use "
                      f"{'it' if one else 'them'}")
    if not files:
        subs = [d for d in entries if d.is_dir() and not d.name.startswith(".")
                and _has_images(d)]
        hint = f"; the sub-folder {subs[0]} holds images: pass that folder" if subs else ""
        raise UserError(f"{folder}: no {role} ({', '.join(suffixes)}) in this folder; "
                        f"put the {role} files directly in it{hint}")
    return files


def _by_stem(files: Iterable[Path], folder: Path, role: str,
             key: Callable[[Path], str] = attrgetter("stem")) -> dict[str, Path]:
    """Index files by key(path); several files with one key are a UserError listing all."""
    index: dict[str, list[Path]] = {}
    for path in files:
        index.setdefault(key(path), []).append(path)
    clashes = [" & ".join(p.name for p in paths) for paths in index.values() if len(paths) > 1]
    if clashes:
        raise UserError(f"{folder}: several {role} files share a name ({_listing(clashes)}); "
                        "keep one file per name")
    return {k: paths[0] for k, paths in index.items()}


def _label_key(stem: str, usemask: bool, vector: bool = False) -> str | None:
    """The image stem a label belongs to, or None if the name breaks the USEMASK convention.
    Polygon layers (``vector``) are NAME.*, NAME_label.* or NAME_mask.* whatever USEMASK."""
    if vector:
        return next((stem[: -len(t)] for t in ("_mask", "_label") if stem.endswith(t)), stem)
    if usemask:
        return stem[: -len("_mask")] if stem.endswith("_mask") else None
    return stem[: -len("_label")] if stem.endswith("_label") else stem


def _attach_extra_bands(pairs: list[Pair], extra_band_dirs: Sequence[str | os.PathLike]
                        ) -> None:
    for folder in map(Path, extra_band_dirs):
        bands = _by_stem(_scan_folder(folder, "extra-band images"), folder,
                         "extra-band image")
        missing = [p.image.name for p in pairs if p.stem not in bands]
        if missing:
            raise UserError(f"{folder}: no extra-band image for {_count(len(missing), 'image')} "
                            f"({_listing(missing)}); every image NAME.* needs a NAME.* here")
        for pair in pairs:
            pair.extra_bands.append(bands[pair.stem])


def find_pairs(images_dir: str | os.PathLike, labels_dir: str | os.PathLike,
               usemask: bool = False, extra_band_dirs: Sequence[str | os.PathLike] = (),
               polygons: PolygonRules | None = None) -> list[Pair]:
    """Match images to labels by file stem; returns Pairs sorted by stem.

    Labels are named NAME_mask.* when ``usemask``, else NAME_label.* or NAME.* (any supported
    suffix). Images and labels may share one folder when labels carry the _mask/_label tag.
    With ``polygons``, labels may also be polygon layers: NAME.gpkg, NAME.geojson or
    NAME.shp (beside the images too), or ``labels_dir`` is one such file covering many
    scenes (:func:`pairs_over_one_layer`). Raises one UserError listing every image without
    a label and every label without an image; also for missing or empty folders and
    duplicate names.
    """
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    if polygons is not None and labels_dir.is_file() and vectors.is_vector_path(labels_dir):
        return pairs_over_one_layer(images_dir, labels_dir, polygons, extra_band_dirs)
    suffixes = IMAGE_SUFFIXES + (vectors.VECTOR_SUFFIXES if polygons is not None else ())
    image_files = _scan_folder(images_dir, "images")
    tag = "_mask" if usemask else "_label"
    if images_dir.resolve() == labels_dir.resolve():
        label_files = [p for p in image_files if p.stem.endswith(tag)]
        image_files = [p for p in image_files if not p.stem.endswith(tag)]
        if polygons is not None:
            label_files += [p for p in sorted(images_dir.iterdir()) if p.is_file()
                            and not p.name.startswith(".") and vectors.is_vector_path(p)]
        if not image_files or not label_files:
            raise UserError(f"{images_dir}: images and labels share this folder, so labels "
                            f"must be named NAME{tag}.* beside NAME.*; found "
                            f"{len(image_files)} images and {len(label_files)} labels")
    else:
        label_files = _scan_folder(labels_dir, "labels", suffixes)

    def key(p: Path) -> str | None:
        return _label_key(p.stem, usemask, vectors.is_vector_path(p))

    images = _by_stem(image_files, images_dir, "image")
    misnamed = [p for p in label_files if key(p) is None]
    well_named = [p for p in label_files if key(p) is not None]
    labels = _by_stem(well_named, labels_dir, "label", lambda p: str(key(p)))
    no_label = [images[s].name for s in sorted(images) if s not in labels]
    no_image = sorted([labels[s].name for s in labels if s not in images]
                      + [p.name for p in misnamed])
    if no_label or no_image:
        raise UserError(_unmatched_message(images_dir, labels_dir, no_label, no_image,
                                           usemask))
    pairs = [Pair(stem=s, image=images[s], label=labels[s]) for s in sorted(images)]
    drawn = [p for p in pairs if vectors.is_vector_path(p.label)]
    if polygons is not None and drawn:
        polygons.check_attribute(drawn[0].label)
        for pair in drawn:
            pair.label_layer = polygons.layer
    _attach_extra_bands(pairs, extra_band_dirs)
    return pairs


# What happens to the scenes a shared layer does not touch, said after naming them.
LEFT_OUT = ("left out (manifest.json lists them), as their labels would be all background (to "
            "train on a scene as background, draw a class-0 polygon on it)")


def pairs_over_one_layer(images_dir: str | os.PathLike, layer_file: str | os.PathLike,
                         polygons: PolygonRules,
                         extra_band_dirs: Sequence[str | os.PathLike] = (),
                         untouched: str | None = LEFT_OUT) -> list[Pair]:
    """Pairs of the images in ``images_dir`` that one polygon layer touches, by stem. Images
    no polygon touches are left out with a note naming them and ending with ``untouched``
    (None: quiet, no notes at all): a scene nobody labelled is not a scene without objects.
    Raises
    UserError for a layer without a CRS or with classes outside the config's, images without
    georeferencing (a line each) and when no polygon touches any image."""
    images_dir, layer_file = Path(images_dir), Path(layer_file)
    polygons.check_attribute(layer_file)
    layer = vectors.layer_name(layer_file, polygons.layer)
    images = _by_stem(_scan_folder(images_dir, "images"), images_dir, "image")
    grids, problems = [], []
    for stem in sorted(images):
        try:
            grid = vectors.SceneGrid.of_file(images[stem])
            vectors.require_georeferenced(grid, layer_file)
        except rasterio.errors.RasterioIOError:
            continue  # not an image: the checks report it with their words
        except UserError as exc:
            problems.append(str(exc))
            continue
        grids.append(grid)
    if problems:
        raise UserError("\n".join(problems))
    area = vectors.SceneArea.of_grids(grids)
    labels, _ = read_polygons(layer_file, layer, polygons, within=area)
    found = vectors.features_by_scene(labels, grids)
    missed = sorted(path.name for path, hits in found.items() if not len(hits))
    if missed and untouched is not None:
        messages.note(f"{labels.where}: no polygon touches {_count(len(missed), 'image')} of "
                      f"{len(images)} ({_listing(missed)}); {untouched}")
    if labels.repaired and untouched is not None:
        messages.note(repaired_note(labels.where, len(labels.repaired)))
    pairs = [Pair(stem=s, image=images[s], label=layer_file, label_layer=layer,
                  shared_label=True, label_area=area)
             for s in sorted(images) if images[s].name not in missed]
    _attach_extra_bands(pairs, extra_band_dirs)
    return pairs


def left_out_images(images_dir: str | os.PathLike, pairs: Sequence[Pair]) -> list[str]:
    """Names of the image files in ``images_dir`` that no pair uses, sorted: the scenes a
    shared polygon layer does not touch (:func:`pairs_over_one_layer`). Empty for labels
    per image, where an image without a label is an error."""
    if not any(pair.shared_label for pair in pairs):
        return []
    used = {pair.image.name for pair in pairs}
    return [p.name for p in _scan_folder(Path(images_dir), "images", warn=False)
            if p.name not in used]


def _unmatched_message(images_dir: Path, labels_dir: Path, no_label: list[str],
                       no_image: list[str], usemask: bool) -> str:
    naming = "NAME_mask.*" if usemask else "NAME.* / NAME_label.*"
    lines = []
    if no_label:
        lines.append(f"{images_dir}: {_count(len(no_label), 'image')} without a label in "
                     f"{labels_dir} ({_listing(no_label)}); add the labels (named {naming}) or "
                     "remove these images")
    if no_image:
        stems = [Path(n).stem for n in no_image]
        if usemask and sum(not s.endswith("_mask") for s in stems) > len(stems) / 2:
            hint = "; these labels are not named NAME_mask.*: set USEMASK to false"
        elif not usemask and sum(s.endswith("_mask") for s in stems) > len(stems) / 2:
            hint = "; these labels are named NAME_mask.*: set USEMASK to true"
        else:
            hint = f"; name each label like its image ({naming}) or remove these labels"
        lines.append(f"{labels_dir}: {_count(len(no_image), 'label')} without an image in "
                     f"{images_dir} ({_listing(no_image)}){hint}")
    return "\n".join(lines)


def find_images(images_dir: str | os.PathLike,
                extra_band_dirs: Sequence[str | os.PathLike] = ()) -> list[Pair]:
    """Images to segment (no labels): Pairs with label=None, sorted by stem.

    Raises UserError for a missing or empty folder, duplicate names, or extra-band folders
    lacking an image's stem.
    """
    images_dir = Path(images_dir)
    images = _by_stem(_scan_folder(images_dir, "images"), images_dir, "image")
    pairs = [Pair(stem=s, image=images[s], label=None) for s in sorted(images)]
    _attach_extra_bands(pairs, extra_band_dirs)
    return pairs
