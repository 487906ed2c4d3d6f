"""Segmenting a folder: outputs per image, scores against labels, and resuming safely.

:func:`segment_folder` is the library behind seg_images_in_folder: it finds the images,
loads the run folders (:func:`res_unet.runfolder.load_run`), segments each image with a
:class:`res_unet.predict.Segmenter` and writes its outputs (:func:`output_paths`), each
atomically, so an interrupted run resumes where it stopped; with labels it scores every
image (scores.csv, :mod:`res_unet.scoring`) and draws a few (examples.png).

GIS outputs. The label and probability GeoTIFFs of GeoTIFF inputs are Cloud-Optimized
GeoTIFFs (:mod:`res_unet.cog`: internal tiles, overviews, CRS, transform and nodata kept);
VECTOR_FORMAT adds the classes as polygons (:mod:`res_unet.polygons`: a GeoPackage in the
scene's CRS, RFC 7946 GeoJSON), or in pixel coordinates without a CRS for plain images.

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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio.errors
import tensorflow as tf
from rasterio.transform import Affine

from res_unet import __version__, cog, metrics, pairing, polygons, rasters, report, scoring, writers
from res_unet.atomic import (
    atomic_path,
    check_writable,
    clean_stale_temporaries,
    write_atomic,
    write_csv,
)
from res_unet.config import Config, key_choices
from res_unet.errors import UserError
from res_unet.fingerprint import (
    IMAGE_RECORD,
    SEGMENTATION_CONFIG,
    check_resumable,
    made_with,
    output_fingerprint,
)
from res_unet.folders import folder_lock, reading_lock, settings_digest, settings_lock
from res_unet.inference import review, uncertainty
from res_unet.labelsource import LabelSource
from res_unet.predict import (
    FULL_MAX_VALUES,
    LABEL_NODATA,
    ProbabilitySink,
    Segmenter,
    nodata_values,
)
from res_unet.progress import progress_bar, say
from res_unet.runfolder import CARD, LoadedModel, load_run
from res_unet.scale import check_enlargement, raster_pixel_size, rescale_note
from res_unet.tiling import RowSource, every_nth

# The label map of image NAME is NAME + LABEL_SUFFIX in the output folder.
LABEL_SUFFIX = "_predseg.png"
# Plain images' polygons: pixel corners placed as QGIS places an image without georeferencing
# (x = column, y = -row), so that they lie on the image and its label PNG there.
PIXEL_TRANSFORM = Affine(1.0, 0.0, 0.0, 0.0, -1.0, 0.0)

# Outputs -----------------------------------------------------------------------------------

@contextlib.contextmanager
def _probability_file(path: Path, shape_hw: tuple[int, int], channels: int,
                      meta: rasters.RasterMeta, class_names: Sequence[str]
                      ) -> Iterator[ProbabilitySink]:
    """A sink writing probability strips into ``path`` (.npy float16, or a .tif float32 COG
    with ``meta``'s georeferencing, NaN nodata, averaged overviews and each band named after
    its class of ``class_names``), atomically: renamed when the block ends."""
    if path.suffix != ".npy":
        with writers.cog_writer(path, shape_hw, channels, np.float32, meta,
                                nodata=float("nan"), classes=False,
                                description=cog.probability_description(
                                    class_names, binary=channels == 1)) as write:
            yield write
        return
    with atomic_path(path) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                          shape=(*shape_hw, channels))

        def write_npy(r0: int, prob: np.ndarray) -> None:
            array[r0:r0 + len(prob)] = prob

        yield write_npy
        array.flush()


def output_paths(out_dir: Path, pair: pairing.Pair, save_probs: bool = False,
                 vector: str | None = None, save_uncertainty: bool = False
                 ) -> dict[str, Path]:
    """Output files of one image NAME: label (NAME_predseg.png), overlay (NAME_overlay.png),
    geotiff (NAME_predseg.tif, a COG, TIFF inputs), probs (NAME_probs.npy, or a .tif COG
    for TIFF inputs), uncertainty (NAME_uncertainty.tif, a float32 COG, for TIFF inputs,
    else NAME_uncertainty.png) and vector (NAME_predseg.gpkg or .geojson: ``vector``, one of
    VECTOR_FORMAT's choices) when asked for."""
    tiff = pair.image.suffix.lower() in (".tif", ".tiff")
    stem = pair.stem
    paths = {"label": out_dir / f"{stem}{LABEL_SUFFIX}", "overlay": out_dir / f"{stem}_overlay.png"}
    if tiff:
        paths["geotiff"] = out_dir / f"{stem}_predseg.tif"
    if save_probs:
        paths["probs"] = out_dir / f"{stem}_probs{'.tif' if tiff else '.npy'}"
    if save_uncertainty:
        paths["uncertainty"] = out_dir / f"{stem}_uncertainty{'.tif' if tiff else '.png'}"
    if vector is not None:
        if vector not in key_choices("VECTOR_FORMAT"):
            raise ValueError(f"vector format {vector!r} is not one of "
                             f"{key_choices('VECTOR_FORMAT')}")
        paths["vector"] = out_dir / f"{stem}_predseg.{vector}"
    return paths


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
            say(f"note: {pair.image} has no pixel size (not a GeoTIFF in a CRS); plain scenes "
                f"are taken to be at the training images' scale (the model sees "
                f"{segmenter.pixel_size_m:g} m per pixel); pass --pixel-size to set theirs")
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
        say(rescale_note(pair.image.name, size, segmenter.pixel_size_m))
    return scaled


def write_polygons(path: Path, label: np.ndarray, meta: rasters.RasterMeta, cfg: Config,
                   binary: bool) -> None:
    """Write the classes of ``label`` ((H, W) class indices, LABEL_NODATA at nodata) as
    polygons (:func:`res_unet.polygons.write_class_polygons`), in ``meta``'s CRS and map
    coordinates, or in pixel coordinates (:data:`PIXEL_TRANSFORM`, no CRS, said in the
    layer's description) for a plain image. Binary models: the foreground only; multiclass:
    every class but IGNORE_CLASS. VECTOR_SIMPLIFY and VECTOR_LAYER_PER_CLASS apply."""
    georeferenced = rasters.is_georeferenced(meta) and meta.transform is not None
    skip = [0] if binary else [] if cfg.IGNORE_CLASS is None else [cfg.IGNORE_CLASS]
    found = polygons.class_polygons(label, meta.transform if georeferenced else PIXEL_TRANSFORM,
                                    cfg.class_names, nodata=LABEL_NODATA,
                                    simplify=cfg.VECTOR_SIMPLIFY, skip_classes=skip,
                                    crs=meta.crs if georeferenced else None)
    description = None if georeferenced else (
        f"Classes of {meta.path.name} in pixel coordinates, no CRS (the image has no "
        "georeferencing): x = column, y = -row from its top-left corner, as QGIS places it")
    polygons.write_class_polygons(path, found, meta.crs if georeferenced else None,
                                  per_class_layers=cfg.VECTOR_LAYER_PER_CLASS
                                  and path.suffix == ".gpkg",
                                  description=description)


def segment_image(segmenter: Segmenter, pair: pairing.Pair, paths: dict[str, Path],
                  keep_label: bool = True, ranking: uncertainty.UncertaintySums | None = None,
                  pictures: review.ScenePictures | None = None) -> tuple[np.ndarray | None, int]:
    """Segment one image and write its outputs (``output_paths``), each atomically.

    A large image that GDAL can read in windows (a single-page GeoTIFF with the model's
    bands, see :func:`res_unet.pairing.open_image_rows`) is never read whole: it is
    segmented strip by strip from windows. Unless ``keep_label`` (or polygons, a clean-up
    step or an Otsu threshold needs the whole map), its label strips then go straight to the
    output files as they are finished, and the label map is never held whole either.
    ``ranking`` (the scene's uncertainty, its map) and ``pictures`` (for review.html) see it.
    Returns (label (H, W) uint8 with LABEL_NODATA at nodata, or None when it was streamed;
    pixel count). Raises UserError for unreadable images or a band count the models do not
    take.
    """
    cfg = segmenter.cfg
    with contextlib.ExitStack() as stack:
        rows = pairing.open_image_rows(pair, cfg.N_DATA_BANDS, cfg.MAX_IMAGE_PIXELS)
        if rows is not None:
            stack.enter_context(rows)
        image: np.ndarray | RowSource
        if rows is not None and segmenter.uses_strips(rows.shape[:2]):
            image, meta = rows, rows.meta
        else:
            image, meta = pairing.load_image(pair, cfg.N_DATA_BANDS, for_model=True,
                                             max_pixels=cfg.MAX_IMAGE_PIXELS)
        image = rasters.fit_model_dtype(image, meta, segmenter.input_dtype)
        segmenter.check_dtype(image, pair.image)
        nodata = nodata_values(meta, cfg.NODATA_ZERO)
        shape_hw = image.shape[:2]
        prob_sinks = []
        if "probs" in paths:
            prob_sinks.append(stack.enter_context(_probability_file(
                paths["probs"], shape_hw, segmenter.n_outputs, meta, cfg.class_names)))
        if ranking is None and "uncertainty" in paths:
            ranking = uncertainty.UncertaintySums(segmenter.n_outputs, segmenter.label_cut)
        if ranking is not None:
            ranking.thumb_step = review.picture_step(shape_hw) if pictures else 0
            if "uncertainty" in paths:
                ranking.on_map = stack.enter_context(uncertainty.uncertainty_map_writer(
                    paths["uncertainty"], shape_hw, meta))
            prob_sinks.append(ranking.add)

        def sink(r0: int, prob: np.ndarray) -> None:
            for write in prob_sinks:
                write(r0, prob)
        stream = (isinstance(image, rasters.RasterRows) and segmenter.streams_labels
                  and not keep_label and "vector" not in paths)
        step = report.overlay_step(shape_hw)
        shown: list[tuple[np.ndarray, np.ndarray]] = []
        on_label = None
        if stream:
            sinks = [stack.enter_context(writers.png_writer(paths["label"], shape_hw))]
            if "geotiff" in paths:
                sinks.append(stack.enter_context(writers.cog_writer(
                    paths["geotiff"], shape_hw, 1, np.uint8, meta, nodata=LABEL_NODATA,
                    description=cog.label_description(cfg.class_names, LABEL_NODATA))))

            def on_label(r0: int, label_rows: np.ndarray) -> None:
                for write in sinks:
                    write(r0, label_rows)
                first = -r0 % step
                if first < len(label_rows):
                    # Copies: a strided view would keep the whole strip alive.
                    pixels = image.rows(r0 + first, r0 + len(label_rows))[::step, ::step]
                    shown.append((pixels.copy(), label_rows[first::step, ::step].copy()))

        try:
            label = segmenter.segment(image, nodata, sink if prob_sinks else None, on_label)
        except tf.errors.ResourceExhaustedError:
            raise UserError(f"{pair.image}: out of memory at batch size {cfg.BATCH_SIZE}; lower "
                            "--batch-size (or --tile-size)") from None
        if label is not None:
            shown = [(every_nth(image, step), label[::step, ::step])]
        small = [np.concatenate([s[0] for s in shown]), np.concatenate([s[1] for s in shown])]
        writers.write_png(paths["overlay"], report.overlay_image(*small, segmenter.n_classes))
        if pictures is not None:
            pictures.write_prediction(*small, step, ranking and ranking.thumbnail)
    if label is None:
        return None, shape_hw[0] * shape_hw[1]
    if "geotiff" in paths:
        cog.write_cog(paths["geotiff"], label, meta.crs, meta.transform, nodata=LABEL_NODATA,
                      description=cog.label_description(cfg.class_names, LABEL_NODATA))
    if "vector" in paths:
        write_polygons(paths["vector"], label, meta, cfg, binary=segmenter.n_outputs == 1)
    writers.write_png(paths["label"], label)
    return label, label.shape[0] * label.shape[1]


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
    if str(path) not in message:
        message = f"{path}: {message}"
    say(f"{what}: {message}")
    return {"image": str(path), "error": message}


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
                   images_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                   labels_dir: str | os.PathLike | None = None, overwrite: bool = False,
                   shard: tuple[int, int] = (0, 1), save_probs: bool = False,
                   geojson: bool = False, progress: bool = True,
                   full_max_values: int = FULL_MAX_VALUES,
                   save_uncertainty: bool = False) -> dict[str, Any]:
    """Segment every image of ``images_dir`` (shard i of n: images i, i+n, ...) into ``out_dir``.

    ``labels_dir`` is a label source (:class:`res_unet.labelsource.LabelSource`, under
    ``cfg``'s label keys): a folder of raster labels or per-scene polygon layers, or one
    polygon layer over many scenes (scenes it does not touch are segmented, not scored).
    ``runs`` are run folders (or loaded models) forming an ensemble; ``cfg`` comes from
    :func:`res_unet.runfolder.inference_config`. Per image NAME: see :func:`output_paths`;
    polygons come with ``cfg.VECTOR_FORMAT`` (``geojson=True``, kept for older callers, is
    VECTOR_FORMAT 'geojson' when the config names no format).
    Images whose outputs all exist and were made with these models and settings (their
    record, :data:`IMAGE_RECORD`) are skipped unless ``overwrite``; any other is redone, so
    a folder never holds a mix (e.g. after ``--shard i/n --overwrite`` with another model).
    An unreadable image is reported on one line and counted as failed. With ``labels_dir``
    the predictions are scored (scores.csv, or scores_shard{i}of{n}.csv: one row per image
    and an 'ALL' row from the summed confusion matrix) and the first FIGURE_ROWS scored
    images are drawn in examples.png. Scenes are ranked by uncertainty (uncertainty.csv, most
    uncertain first; ``save_uncertainty``: a map per scene) and listed in review.html, per
    shard as scores are. Writes segmentation_config.json. Returns a summary dict:
    images, done, skipped, failed, failures, seconds, megapixels, mpx_per_second,
    uncertainty_file, review_file and, with labels, scores.
    """
    started = time.perf_counter()
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise UserError(f"command line: shard {index}/{count} is invalid; need 0 <= i < n")
    if out_dir.resolve() == images_dir.resolve():
        raise UserError(f"{out_dir}: the output folder is the images folder; write the "
                        "outputs to another folder (they would be read as images next time)")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder; choose another --out")
    check_writable(out_dir)
    # One command per folder for the whole run; shards of one job share it, and
    # settings_lock below keeps shards of other models or settings out, whatever the timing.
    with contextlib.ExitStack() as held:
        held.enter_context(folder_lock(out_dir, "seg_images_in_folder", shared=count > 1))
        return _segment_folder(held, cfg, runs, images_dir, out_dir, labels_dir, overwrite,
                               shard, save_probs, geojson, progress, full_max_values, started,
                               save_uncertainty)


def _segment_folder(held: contextlib.ExitStack, cfg: Config,
                    runs: Sequence[str | os.PathLike | LoadedModel], images_dir: Path,
                    out_dir: Path, labels_dir: str | os.PathLike | None, overwrite: bool,
                    shard: tuple[int, int], save_probs: bool, geojson: bool, progress: bool,
                    full_max_values: int, started: float, save_uncertainty: bool = False
                    ) -> dict[str, Any]:
    """The body of :func:`segment_folder`, run while ``out_dir`` is locked (``held``)."""
    index, count = shard
    vector = cfg.VECTOR_FORMAT or ("geojson" if geojson else None)
    source = None if labels_dir is None else LabelSource.from_config(labels_dir, cfg)
    if source is not None:
        pairs = source.scenes(images_dir, cfg.EXTRA_BAND_DIRS)
    else:
        pairs = pairing.find_images(images_dir, cfg.EXTRA_BAND_DIRS)
    pairs = pairs[index::count]
    for run in (r for r in runs if not isinstance(r, LoadedModel)):  # no training writes them
        held.enter_context(reading_lock(run, "seg_images_in_folder", writing=out_dir))
    models = _load_models(cfg, runs)
    segmenter = Segmenter(models, cfg, full_max_values)
    if cfg.TESTTIMEAUG and cfg.TTA_ROT90 and not segmenter.rot90:
        print(f"note: TTA_ROT90 needs square tiles; {segmenter.tile_hw[0]}x"
              f"{segmenter.tile_hw[1]} tiles are averaged over flips only")
    options = {"images": str(images_dir), "labels": None if labels_dir is None
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
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / SEGMENTATION_CONFIG, json.dumps(run_summary, indent=2) + "\n")

    n = segmenter.n_classes
    done = skipped = 0
    failures: list[dict[str, str]] = []
    megapixels = busy = 0.0
    rows: list[dict[str, Any]] = []
    figure: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    figure_titles: list[str] = []
    total_cm = np.zeros((n, n), np.int64)
    unscored: list[dict[str, str]] = []
    problems = (UserError, OSError, ValueError, rasterio.errors.RasterioError)
    say(f"runtime: {runtimes}")
    if segmenter.pixel_size_m is None:
        say("note: the model card records no pixel size, so the scale of the scenes cannot "
            "be checked; they are segmented as they come (at the model's DOWNSAMPLE)")
    unknown: list[Path] = []  # plain scenes without a pixel size (noted once)
    digest = settings_digest(run_summary["fingerprint"])
    ranked: list[dict[str, Any]] = []  # uncertainty.csv's rows
    scenes: list[list[Any]] = []  # review.html's scenes: pair, figures, score, outputs
    for pair in progress_bar(pairs, enabled=progress):
        paths = output_paths(out_dir, pair, save_probs, vector, save_uncertainty)
        record = out_dir / IMAGE_RECORD.format(stem=pair.stem)
        pictures = review.ScenePictures(out_dir, pair.stem, n)
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
        scenes.append([pair, figures, None, paths])
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
        scenes[-1][2] = rows[-1]["mean_iou"]
        if len(figure) < scoring.FIGURE_ROWS:
            figure.append(scoring.figure_example(pair, label, truth, cfg.N_DATA_BANDS))
            figure_titles.append(f"{pair.stem}: mean IoU {rows[-1]['mean_iou']:.3f}"
                                 if rows[-1]["mean_iou"] is not None else pair.stem)

    summary: dict[str, Any] = {
        "images": len(pairs), "done": done, "skipped": skipped, "failed": len(failures),
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
                                       for p, f, s, o in scenes],
        f"Review: {images_dir.name} segmented into {out_dir.name}",
        f"{len(scenes)} scenes, most uncertain first ({uncertainty.HEADLINE})")
    if figure and cfg.DOPLOT:
        name = "examples.png" if count == 1 else f"examples_shard{index}of{count}.png"
        report.plot_predictions(figure, n, out_dir / name, class_names=cfg.class_names,
                                row_titles=figure_titles)
        summary["examples_file"] = str(out_dir / name)
    return summary
