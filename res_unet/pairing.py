"""Examples on disk: pairing image, label and extra-band files by name, the label rules,
and reading a pair checked against the config's band count and classes.

A :class:`Pair` is one example: an image, its label (None when segmenting) and the
co-registered single-band images appended as extra bands. :func:`find_pairs` and
:func:`find_images` build them from folders; :func:`prepare_label` turns raw label values
into class indices under a :class:`res_unet.config.LabelRules`; :func:`load_image`,
:func:`open_image_rows` and :func:`load_pair` read a pair through :mod:`res_unet.rasters`.
Messages name every file that does not fit, and the fix.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from res_unet.errors import UserError
from res_unet.rasters import (
    IMAGE_SUFFIXES,
    RasterMeta,
    RasterRows,
    append_bands,
    open_raster_rows,
    read_image,
    read_label,
)

if TYPE_CHECKING:
    from res_unet.config import LabelRules

_MAX_LISTED = 20


@dataclass
class Pair:
    """One training example on disk: an image, its label (None when segmenting) and the
    co-registered single-band images appended as extra bands, in EXTRA_BAND_DIRS order."""

    stem: str
    image: Path
    label: Path | None
    extra_bands: list[Path] = field(default_factory=list)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _listing(names: Sequence[str]) -> str:
    """'a, b, c' with at most _MAX_LISTED names, then '... and N more'."""
    shown = ", ".join(names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return shown + (f", ... and {more} more" if more > 0 else "")


def _values_text(values: Sequence[int]) -> str:
    shown = ", ".join(str(v) for v in values[:_MAX_LISTED])
    return shown + (f", ... ({len(values)} values)" if len(values) > _MAX_LISTED else "")


_NOTED: set[str] = set()


def _note_once(kind: str, message: str) -> None:
    """Print a note the first time this kind of thing is seen in the process, not per file."""
    if kind not in _NOTED:
        _NOTED.add(kind)
        print(f"note: {message}")


def prepare_label(label: np.ndarray, rules: LabelRules, path: str | os.PathLike
                  ) -> np.ndarray:
    """Turn a raw (H, W) uint8 label into class indices 0..rules.n_label_classes-1.

    Applies REMAP_CLASSES (``rules.remap``) first; then, for binary models (NCLASSES=1), a
    0/255 mask becomes 0/1 with a printed note. Raises UserError naming ``path``, the values
    found and the fix when a value is not a class (IGNORE_CLASS is allowed). Returns (H, W)
    uint8 (the input itself when nothing changed).
    """
    path = Path(path)
    if rules.remap:
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


def load_image(pair: Pair, n_bands: int, for_model: bool = False
               ) -> tuple[np.ndarray, RasterMeta]:
    """Read a pair's image plus extra bands and check the band count against ``n_bands``
    (the config's N_DATA_BANDS, image bands plus extra bands).

    A constant, fully opaque alpha band (255, or 65535 for uint16) one band beyond what the
    config expects from the image (RGBA for 3 bands, grey+alpha for 1) is dropped. Returns
    (image (H, W, n_bands) uint8|uint16, meta). Raises UserError on a band mismatch;
    ``for_model``: ``n_bands`` is a trained model's, which the message says cannot change.
    """
    image, meta = read_image(pair.image)
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
    return append_bands(image, pair.image, pair.extra_bands), meta


def open_image_rows(pair: Pair, n_bands: int) -> RasterRows | None:
    """The pair's image as :class:`res_unet.rasters.RasterRows` when it can be read in
    windows: no extra-band folders, and a raster :func:`res_unet.rasters.open_raster_rows`
    opens with exactly the model's ``n_bands`` bands. Else None: use :func:`load_image`,
    which reads the image whole and gives the messages for the other cases."""
    if pair.extra_bands:
        return None
    return open_raster_rows(pair.image, n_bands)


def load_pair(pair: Pair, n_bands: int, rules: LabelRules
              ) -> tuple[np.ndarray, np.ndarray, RasterMeta]:
    """Read one training example and check it against the config's N_DATA_BANDS
    (``n_bands``) and label rules.

    Returns (image (H, W, n_bands) uint8|uint16 raw values, label (H, W) uint8 class
    indices 0..rules.n_label_classes-1, meta of the image). Raises UserError for band-count or size
    mismatches (naming both files and sizes) and invalid label values.
    """
    if pair.label is None:
        raise ValueError(f"load_pair needs a labelled pair; {pair.stem} has no label")
    image, meta = load_image(pair, n_bands)
    label = read_label(pair.label)
    if label.shape != image.shape[:2]:
        raise UserError(f"{pair.label}: label size {label.shape[1]}x{label.shape[0]} (WxH) "
                        f"differs from its image {pair.image} ({image.shape[1]}x"
                        f"{image.shape[0]}); labels must cover their image pixel for pixel")
    return image, prepare_label(label, rules, pair.label), meta


# Finding files -----------------------------------------------------------------------------

def _has_images(folder: Path) -> bool:
    return any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())


def _scan_folder(folder: Path, role: str) -> list[Path]:
    """Image files directly in ``folder``, sorted. Non-image files are ignored; hidden image
    files (names starting with '.', e.g. macOS '._' copies) are skipped with one warning line
    on stderr giving their number and names."""
    if not folder.exists():
        raise UserError(f"{folder}: {role} folder not found; check the path")
    if not folder.is_dir():
        raise UserError(f"{folder}: is a file, not a folder; pass the folder holding the {role}")
    entries = sorted(folder.iterdir())
    dangling = [p for p in entries if p.is_symlink() and not p.exists()
                and p.suffix.lower() in IMAGE_SUFFIXES]
    if dangling:
        raise UserError(f"{dangling[0]}: is a link to {os.readlink(dangling[0])}, which does "
                        f"not exist ({_count(len(dangling), 'broken link')} among the {role}); "
                        "restore the target or remove the link")
    images = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    files = [p for p in images if not p.name.startswith(".")]
    hidden = [p.name for p in images if p.name.startswith(".")]
    if hidden:
        one = len(hidden) == 1
        print(f"warning: {folder}: skipped {_count(len(hidden), 'image file')} whose "
              f"{'name starts' if one else 'names start'} with '.' ({_listing(hidden)}): hidden "
              f"files are not read; rename {'it' if one else 'them'} without the leading '.' "
              f"to use {'it' if one else 'them'}", file=sys.stderr)
    if not files:
        subs = [d for d in entries if d.is_dir() and not d.name.startswith(".")
                and _has_images(d)]
        hint = f"; the sub-folder {subs[0]} holds images: pass that folder" if subs else ""
        raise UserError(f"{folder}: no {role} ({', '.join(IMAGE_SUFFIXES)}) in this folder; "
                        f"put the {role} files directly in it{hint}")
    return files


def _by_stem(files: Iterable[Path], key: Callable[[str], str], folder: Path,
             role: str) -> dict[str, Path]:
    """Index files by key(stem); several files with one key are a UserError listing all."""
    index: dict[str, list[Path]] = {}
    for path in files:
        index.setdefault(key(path.stem), []).append(path)
    clashes = [" & ".join(p.name for p in paths) for paths in index.values() if len(paths) > 1]
    if clashes:
        raise UserError(f"{folder}: several {role} files share a name ({_listing(clashes)}); "
                        "keep one file per name")
    return {k: paths[0] for k, paths in index.items()}


def _label_key(stem: str, usemask: bool) -> str | None:
    """The image stem a label belongs to, or None if the name breaks the USEMASK convention."""
    if usemask:
        return stem[: -len("_mask")] if stem.endswith("_mask") else None
    return stem[: -len("_label")] if stem.endswith("_label") else stem


def _attach_extra_bands(pairs: list[Pair], extra_band_dirs: Sequence[str | os.PathLike]
                        ) -> None:
    for folder in map(Path, extra_band_dirs):
        bands = _by_stem(_scan_folder(folder, "extra-band images"), str, folder,
                         "extra-band image")
        missing = [p.image.name for p in pairs if p.stem not in bands]
        if missing:
            raise UserError(f"{folder}: no extra-band image for {_count(len(missing), 'image')} "
                            f"({_listing(missing)}); every image NAME.* needs a NAME.* here")
        for pair in pairs:
            pair.extra_bands.append(bands[pair.stem])


def find_pairs(images_dir: str | os.PathLike, labels_dir: str | os.PathLike,
               usemask: bool = False, extra_band_dirs: Sequence[str | os.PathLike] = ()
               ) -> list[Pair]:
    """Match images to labels by file stem; returns Pairs sorted by stem.

    Labels are named NAME_mask.* when ``usemask``, else NAME_label.* or NAME.* (any supported
    suffix). Images and labels may share one folder when labels carry the _mask/_label tag.
    Raises one UserError listing every image without a label and every label without an
    image; also for missing or empty folders and duplicate names.
    """
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    image_files = _scan_folder(images_dir, "images")
    tag = "_mask" if usemask else "_label"
    if images_dir.resolve() == labels_dir.resolve():
        label_files = [p for p in image_files if p.stem.endswith(tag)]
        image_files = [p for p in image_files if not p.stem.endswith(tag)]
        if not image_files or not label_files:
            raise UserError(f"{images_dir}: images and labels share this folder, so labels "
                            f"must be named NAME{tag}.* beside NAME.*; found "
                            f"{len(image_files)} images and {len(label_files)} labels")
    else:
        label_files = _scan_folder(labels_dir, "labels")
    images = _by_stem(image_files, str, images_dir, "image")
    misnamed = [p for p in label_files if _label_key(p.stem, usemask) is None]
    well_named = [p for p in label_files if _label_key(p.stem, usemask) is not None]
    labels = _by_stem(well_named, lambda s: str(_label_key(s, usemask)), labels_dir, "label")
    no_label = [images[s].name for s in sorted(images) if s not in labels]
    no_image = sorted([labels[s].name for s in labels if s not in images]
                      + [p.name for p in misnamed])
    if no_label or no_image:
        raise UserError(_unmatched_message(images_dir, labels_dir, no_label, no_image,
                                           usemask))
    pairs = [Pair(stem=s, image=images[s], label=labels[s]) for s in sorted(images)]
    _attach_extra_bands(pairs, extra_band_dirs)
    return pairs


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
    images = _by_stem(_scan_folder(images_dir, "images"), str, images_dir, "image")
    pairs = [Pair(stem=s, image=images[s], label=None) for s in sorted(images)]
    _attach_extra_bands(pairs, extra_band_dirs)
    return pairs
