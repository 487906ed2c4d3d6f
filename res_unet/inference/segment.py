"""Segmenting a folder: outputs per image, scores against labels, and resuming safely.

:func:`segment_folder` is the library behind seg_images_in_folder: it finds the images,
loads the run folders (:func:`res_unet.inference.runtime.load_run`), segments each image with
a :class:`res_unet.inference.predict.Segmenter` and writes its outputs (the registry of
:mod:`res_unet.inference.outputs`), each atomically, so an interrupted run resumes where it
stopped; with labels it scores every image (scores.csv, :mod:`res_unet.inference.scoring`)
and draws a few (examples.png).

Memory. Images are read whole (uint8/uint16, H*W*B bytes), except large single-page GeoTIFFs
(and other rasters GDAL reads in windows) with the model's bands: those are read a band of
tile rows at a time, and their label strips go straight to the label PNG and GeoTIFF as they
are finished (the GeoTIFF through a tiled temporary that becomes the COG at the end), unless
a clean-up step (MEDIAN_FILTER_VALUE, OPENING_RADIUS, CLOSING_RADIUS, MIN_OBJECT_AREA,
MIN_HOLE_AREA, which need whole connected components), an Otsu threshold, polygons
(VECTOR_FORMAT) or scoring against a label needs the whole (H, W) uint8 label map (1 byte
per pixel). JPEG and PNG cannot be read in windows. The dense CRF needs the whole
probability map. The overlay of images above ``report.OVERLAY_MAX_PIXELS`` is drawn from
every n-th row and column (it is for viewing; the label files are full size).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio.errors

from res_unet import __version__
from res_unet.config.keys import Config
from res_unet.core import messages
from res_unet.core.atomic import (
    check_output_folder,
    clean_stale_temporaries,
    write_atomic,
    write_csv,
)
from res_unet.core.errors import UserError
from res_unet.core.folders import folder_lock, reading_lock, settings_digest, settings_lock
from res_unet.core.progress import progress_bar
from res_unet.data import pairing, report
from res_unet.data.labelsource import LabelSource
from res_unet.geo import rasters, remote, scenes
from res_unet.geo.scale import check_enlargement, raster_pixel_size, rescale_note
from res_unet.inference import review, scoring, uncertainty
from res_unet.inference.fingerprint import (
    IMAGE_RECORD,
    SEGMENTATION_CONFIG,
    check_resumable,
    made_with,
    output_fingerprint,
)
from res_unet.inference.outputs import LABEL_SUFFIX, Wanted, output_paths, segment_image
from res_unet.inference.predict import (
    FULL_MAX_VALUES,
    Segmenter,
)
from res_unet.inference.runtime import LoadedModel, load_run
from res_unet.training import metrics
from res_unet.training.runfolder import CARD

# Scenes at the model's scale ------------------------------------------------------------

def scene_pixel_size(pair: pairing.Pair, segmenter: Segmenter, cfg: Config,
                     unknown: list[Path]) -> tuple[float, float] | None:
    """Metres per pixel (x, y) of a scene: its GeoTIFF's, else SCENE_PIXEL_SIZE, else None.

    Only looked up when the model's pixel size is known. A plain scene without one is taken
    to be at the training images' scale; the first such scene gets a note (``unknown``
    collects them)."""
    if segmenter.pixel_size_m is None:
        return None
    size = raster_pixel_size(pair.image)
    if size is None and cfg.SCENE_PIXEL_SIZE is not None:
        size = (cfg.SCENE_PIXEL_SIZE, cfg.SCENE_PIXEL_SIZE)
    if size is None:
        if not unknown:
            messages.note(f"{pair.image} has no pixel size (not a GeoTIFF in a CRS); plain "
                          f"scenes are taken to be at the training images' scale (the model "
                          f"sees {segmenter.pixel_size_m:g} m per pixel); pass --pixel-size to "
                          "set theirs")
        unknown.append(pair.image)
    return size


def scene_segmenter(pair: pairing.Pair, segmenter: Segmenter, cfg: Config,
                    unknown: list[Path]) -> Segmenter:
    """``segmenter`` for this scene's pixel size (:meth:`Segmenter.for_scene`). A scene
    brought to the model's scale gets a note saying how; one that would be enlarged more
    than MAX_ENLARGEMENT times is refused (UserError) before anything is read."""
    size = scene_pixel_size(pair, segmenter, cfg, unknown)
    if size is None or segmenter.pixel_size_m is None:
        return segmenter
    check_enlargement(str(pair.image), size, segmenter.pixel_size_m, cfg.MAX_ENLARGEMENT)
    scaled = segmenter.for_scene(size)
    if scaled is not segmenter:
        shown = pair.image.name if scenes.scene_record(pair.image) is None else pair.stem
        messages.status(rescale_note(shown, size, segmenter.pixel_size_m))
    return scaled


# The folder --------------------------------------------------------------------------------

def _load_models(cfg: Config, runs: Sequence[str | os.PathLike | LoadedModel]
                 ) -> list[LoadedModel]:
    tile_hw = tuple(cfg.TARGET_SIZE)
    models = []
    for run in runs:
        if isinstance(run, LoadedModel):
            models.append(run)
        else:
            models.append(load_run(run, tile_hw))
    return models


def _problem(path: Path, exc: Exception, what: str) -> dict[str, str]:
    """Report a per-file problem on one line and return it for the summary."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    shown = scenes.shown(path)  # a scene from a URL: its address, without credentials
    message = remote.redact(message.replace(str(path), shown))
    if shown not in message:
        message = f"{shown}: {message}"
    messages.status(f"{what}: {message}")
    return {"image": shown, "error": message}


def _scene_pairs(source: LabelSource | None, images_dir: Path, cfg: Config
                 ) -> list[pairing.Pair]:
    """The scenes of ``images_dir``, with their labels when there is a ``source``."""
    if source is not None:
        return source.scenes(images_dir, cfg.EXTRA_BAND_DIRS)
    return pairing.find_images(images_dir, cfg.EXTRA_BAND_DIRS)


def _run_summary(models: list[LoadedModel], segmenter: Segmenter, cfg: Config,
                 options: dict[str, Any]) -> dict[str, Any]:
    return {
        "res_unet_version": __version__,
        "models": [{"run_dir": None if m.run_dir is None else str(m.run_dir.resolve()),
                    "model_card": None if m.run_dir is None
                    else str((m.run_dir / CARD).resolve()),
                    "weights": None if m.weights is None else str(m.weights.resolve()),
                    "card_threshold": m.threshold} for m in models],
        "tile_size": list(segmenter.tile_hw),
        "classes": segmenter.n_classes,
        "binary": segmenter.n_outputs == 1,
        "threshold": segmenter.threshold_setting,
        "tta_transforms": len(segmenter.transforms),
        "options": options,
        "fingerprint": output_fingerprint(models, segmenter, cfg),
        "config": cfg.to_dict(),
    }


def segment_folder(cfg: Config, runs: Sequence[str | os.PathLike | LoadedModel],
                   images_dir: str | os.PathLike | scenes.SceneQuery,
                   out_dir: str | os.PathLike, *,
                   labels_dir: str | os.PathLike | None = None, overwrite: bool = False,
                   shard: tuple[int, int] = (0, 1), save_probs: bool = False,
                   progress: bool = True,
                   full_max_values: int = FULL_MAX_VALUES,
                   save_uncertainty: bool = False) -> dict[str, Any]:
    """Segment every image of ``images_dir`` (shard i of n: images i, i+n, ...) into ``out_dir``.

    ``labels_dir`` is a label source (:class:`res_unet.data.labelsource.LabelSource`, under
    ``cfg``'s label keys): a folder of raster labels or per-scene polygon layers, or one
    polygon layer over many scenes (scenes it does not touch are segmented, not scored).
    ``runs`` are run folders (or loaded models) forming an ensemble; ``cfg`` comes from
    :func:`res_unet.inference.settings.inference_config`. Per image NAME: see :func:`output_paths`;
    polygons come with ``cfg.VECTOR_FORMAT``.
    Images whose outputs all exist and were made with these models and settings (their
    record, :data:`IMAGE_RECORD`) are skipped unless ``overwrite``; any other is redone, so
    a folder never holds a mix (e.g. after ``--shard i/n --overwrite`` with another model).
    An unreadable image is reported on one line and counted as failed. With ``labels_dir``
    the predictions are scored (scores.csv, or scores_shard{i}of{n}.csv: one row per image
    and an 'ALL' row from the summed confusion matrix) and the first FIGURE_ROWS scored
    images are drawn in examples.png. Scenes are ranked by uncertainty (uncertainty.csv, most
    uncertain first; ``save_uncertainty``: a map per scene) and listed in review.html, per
    shard as scores are. Writes segmentation_config.json. ``images_dir`` may also be a
    :class:`res_unet.geo.scenes.SceneQuery` (URLs, lists, STAC catalogues, an area of
    interest); remote scenes resume by URL and ETag. Returns a summary dict: images, done,
    skipped, failed, failures, seconds, megapixels, mpx_per_second, uncertainty_file,
    review_file and, with labels, scores.
    """
    started = time.perf_counter()
    query = (images_dir if isinstance(images_dir, scenes.SceneQuery)
             else scenes.SceneQuery(str(images_dir)))
    images_dir, out_dir = Path(query.images or "."), Path(out_dir)
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise UserError(f"command line: shard {index}/{count} is invalid; need 0 <= i < n")
    check_output_folder(out_dir, "outputs", [("images", images_dir)] if query.plain_folder
                        else [])
    # One command per folder for the whole run; shards of one job share it, and
    # settings_lock below keeps shards of other models or settings out, whatever the timing.
    with contextlib.ExitStack() as held:
        held.enter_context(folder_lock(out_dir, "seg_images_in_folder", shared=count > 1))
        return _segment_folder(held, cfg, runs, query, out_dir, labels_dir, overwrite,
                               shard, save_probs, progress, full_max_values, started,
                               save_uncertainty)


def _segment_folder(held: contextlib.ExitStack, cfg: Config,
                    runs: Sequence[str | os.PathLike | LoadedModel], query: scenes.SceneQuery,
                    out_dir: Path, labels_dir: str | os.PathLike | None, overwrite: bool,
                    shard: tuple[int, int], save_probs: bool, progress: bool,
                    full_max_values: int, started: float, save_uncertainty: bool = False
                    ) -> dict[str, Any]:
    """The body of :func:`segment_folder`, run while ``out_dir`` is locked (``held``)."""
    index, count = shard
    vector = cfg.VECTOR_FORMAT
    source = None if labels_dir is None else LabelSource.from_config(labels_dir, cfg)
    # A plain folder is checked before the models load, as always.
    pairs = _scene_pairs(source, Path(query.images or "."), cfg) if query.plain_folder else None
    for run in (r for r in runs if not isinstance(r, LoadedModel)):  # no training writes them
        held.enter_context(reading_lock(run, "seg_images_in_folder", writing=out_dir))
    models = _load_models(cfg, runs)
    segmenter = Segmenter(models, cfg, full_max_values)
    # Scenes from URLs and catalogues, cut to the area, at the overview the model needs.
    found = held.enter_context(scenes.scene_folder(query, segmenter.pixel_size_m))
    if pairs is None:
        pairs = _scene_pairs(source, found.folder, cfg)
    # Shards split scenes by name, those whose header could not be read included.
    names = sorted([p.stem for p in pairs] + [f["name"] for f in found.failed])[index::count]
    pairs = [p for p in pairs if p.stem in names]
    failed = [{"image": f["image"], "error": f["error"]} for f in found.failed
              if f["name"] in names]
    if cfg.TESTTIMEAUG and cfg.TTA_ROT90 and not segmenter.rot90:
        messages.note(f"TTA_ROT90 needs square tiles; {segmenter.tile_hw[0]}x"
                      f"{segmenter.tile_hw[1]} tiles are averaged over flips only")
    options = {"images": query.shown, "labels": None if labels_dir is None
               else str(labels_dir), "save_probs": save_probs, "vector": vector,
               "save_uncertainty": save_uncertainty}
    # Prepared first: 'auto' may choose bfloat16, which the fingerprint records.
    runtimes = "; ".join(sorted({m.prepare() for m in models}))
    run_summary = _run_summary(models, segmenter, cfg, options)
    if count > 1:
        held.enter_context(settings_lock(out_dir, run_summary["fingerprint"],
                                         "seg_images_in_folder"))
    if not overwrite and out_dir.is_dir():
        check_resumable(out_dir, run_summary["fingerprint"], f"*{LABEL_SUFFIX}")
    clean_stale_temporaries(out_dir)
    if (out_dir / review.PICTURES).is_dir() and not (out_dir / review.PICTURES).is_symlink():
        clean_stale_temporaries(out_dir / review.PICTURES)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / SEGMENTATION_CONFIG, json.dumps(run_summary, indent=2) + "\n")

    n = segmenter.n_classes
    done = skipped = 0
    failures: list[dict[str, str]] = failed  # scenes whose header could not be read
    megapixels = busy = 0.0
    rows: list[dict[str, Any]] = []
    figure: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    figure_titles: list[str] = []
    total_cm = np.zeros((n, n), np.int64)
    unscored: list[dict[str, str]] = []
    problems = (UserError, OSError, ValueError, rasterio.errors.RasterioError)
    messages.status(f"runtime: {runtimes}")
    if segmenter.pixel_size_m is None:
        messages.note("the model card records no pixel size, so the scale of the scenes cannot "
                      "be checked; they are segmented as they come (at the model's DOWNSAMPLE)")
    unknown: list[Path] = []  # plain scenes without a pixel size (noted once)
    base_digest = settings_digest(run_summary["fingerprint"])
    ranked: list[dict[str, Any]] = []  # uncertainty.csv's rows
    listed: list[list[Any]] = []  # review.html's scenes: pair, figures, score, outputs
    for pair in progress_bar(pairs, enabled=progress):
        paths = output_paths(out_dir, pair, Wanted(save_probs, vector, save_uncertainty))
        record = out_dir / IMAGE_RECORD.format(stem=pair.stem)
        pictures = review.ScenePictures(out_dir, pair.stem, n)
        scene = scenes.scene_record(pair.image)
        # A remote scene is redone when its file changed (URL + ETag), not by a local mtime.
        digest = base_digest if scene is None else settings_digest(
            {"fingerprint": base_digest, "scene": scene})
        try:
            # Another model's image (left by a shard run with --overwrite) is redone.
            if not overwrite and made_with(paths, record) == digest:
                skipped += 1
                label = rasters.read_label(paths["label"]) if pair.label is not None else None
                figures = uncertainty.recorded_figures(record)
            else:
                t0 = time.perf_counter()
                scaled = scene_segmenter(pair, segmenter, cfg, unknown)
                ranking = uncertainty.UncertaintySums(segmenter.n_outputs, segmenter.label_cut,
                                                      cfg.IGNORE_CLASS, scaled.disagreement)
                label, pixels = segment_image(scaled, pair, paths,
                                              keep_label=pair.label is not None,
                                              ranking=ranking, pictures=pictures)
                figures = ranking.figures()
                write_atomic(record, json.dumps({"fingerprint": digest,
                                                 "uncertainty": figures}) + "\n")
                busy += time.perf_counter() - t0
                megapixels += pixels / 1e6
                done += 1
        except problems as exc:
            failures.append(_problem(pair.image, exc, "failed"))
            continue
        ranked.append({"image": pair.image.name, **(figures or {})})
        listed.append([pair, figures, None, paths])
        if source is None or pair.label is None:
            continue
        # The image is segmented; a label that cannot be used only leaves it unscored.
        try:
            truth, _ = source.truth(pair, label.shape)
        except problems as exc:
            unscored.append(_problem(pair.label, exc, "not scored"))
            continue
        cm = scoring.score_label(label, truth, n, cfg.IGNORE_CLASS)
        total_cm += cm
        rows.append(scoring.score_row(pair.stem, cm, cfg.IGNORE_CLASS))
        pictures.write_label(truth)  # (written before when the scene was skipped)
        listed[-1][2] = rows[-1]["mean_iou"]
        if len(figure) < scoring.FIGURE_ROWS:
            figure.append(scoring.figure_example(pair, label, truth, cfg.N_DATA_BANDS))
            figure_titles.append(f"{pair.stem}: mean IoU {rows[-1]['mean_iou']:.3f}"
                                 if rows[-1]["mean_iou"] is not None else pair.stem)

    summary: dict[str, Any] = {
        "images": len(pairs) + len(failed), "done": done, "skipped": skipped,
        "failed": len(failures),
        "failures": failures, "unscored": unscored,
        "seconds": round(time.perf_counter() - started, 2),
        "megapixels": round(megapixels, 3),
        "mpx_per_second": round(megapixels / busy, 3) if busy > 0 else None,
        "out_dir": str(out_dir),
    }
    if labels_dir is not None and rows:
        rows.append(scoring.score_row("ALL", total_cm, cfg.IGNORE_CLASS))
        name = "scores.csv" if count == 1 else f"scores_shard{index}of{count}.csv"
        write_csv(out_dir / name, rows, float_format=".6f")
        summary["scores_file"] = str(out_dir / name)
        summary["scores"] = metrics.scores_from_confusion(total_cm, ignore_class=cfg.IGNORE_CLASS)
    if ranked:
        summary["uncertainty_file"] = str(out_dir / uncertainty.uncertainty_file(shard))
        write_csv(summary["uncertainty_file"], uncertainty.rank_rows(ranked), float_format=".6f")
    summary["review_file"] = str(out_dir / review.review_file(shard))
    review.write_review_page(
        Path(summary["review_file"]), [review.scene_entry(p.image.name, f, s, o, out_dir, p.stem)
                                       for p, f, s, o in listed],
        f"Review: {query.shown}",
        f"{len(listed)} scenes, most uncertain first ({uncertainty.HEADLINE})")
    if figure and cfg.DOPLOT:
        name = "examples.png" if count == 1 else f"examples_shard{index}of{count}.png"
        report.plot_predictions(figure, n, out_dir / name, class_names=cfg.class_names,
                                row_titles=figure_titles)
        summary["examples_file"] = str(out_dir / name)
    return summary
