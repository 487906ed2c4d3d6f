"""The files a segmentation writes for each scene: a registry of outputs, and the writing.

Each per-image output is one :class:`Output` in :data:`OUTPUTS`: its file name, when it is
written, what it is fed, and its writers:

- ``labels``: the class map. A streaming writer (``stream``) takes label rows as strips are
  finished, so a scene read in windows is never held whole; a whole-map writer (``write``)
  takes the (H, W) map. An output without a streaming writer (polygons) makes the map be
  kept whole.
- ``probabilities``: probability rows (N, W, outputs) float32, as they stream.
- ``overlay`` and ``ranking``: drawn by :func:`segment_image` from the sampled image and
  labels, and by the scene's uncertainty sums (:mod:`res_unet.inference.uncertainty`).

A new output format is its writer (here or in :mod:`res_unet.geo.writers`) and one entry in
:data:`OUTPUTS`; :func:`output_paths` and :func:`segment_image` take it from there.

GIS outputs. The label and probability GeoTIFFs of GeoTIFF inputs are Cloud-Optimized
GeoTIFFs (:mod:`res_unet.geo.cog`: internal tiles, overviews, CRS, transform and nodata kept);
VECTOR_FORMAT adds the classes as polygons (:mod:`res_unet.geo.polygons`: a GeoPackage in the
scene's CRS, RFC 7946 GeoJSON), or in pixel coordinates without a CRS for plain images.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
from rasterio.transform import Affine

from res_unet.config.keys import Config, key_choices
from res_unet.core.atomic import atomic_path
from res_unet.core.errors import UserError
from res_unet.data import pairing, report
from res_unet.geo import cog, polygons, rasters, scenes, writers
from res_unet.geo.grid import is_georeferenced
from res_unet.geo.tiling import RowSource, every_nth
from res_unet.inference import review, uncertainty
from res_unet.inference.predict import LABEL_NODATA, ProbabilitySink, Segmenter, nodata_values

# A writer of row strips: (first row, rows) -> None.
Sink = Callable[[int, np.ndarray], None]


@dataclass(frozen=True)
class Scene:
    """What an output's writers know of the scene being segmented."""

    shape_hw: tuple[int, int]
    meta: rasters.RasterMeta
    cfg: Config
    n_outputs: int  # 1: binary (sigmoid), else one probability per class


@dataclass(frozen=True)
class Wanted:
    """What the user asked for beyond the outputs every scene gets."""

    save_probs: bool = False
    vector: str | None = None  # a VECTOR_FORMAT choice
    save_uncertainty: bool = False


@dataclass(frozen=True)
class Output:
    """One per-image output file (see the module docstring).

    Attributes:
        name: (stem, tiff input, what was asked) -> the file's name.
        wanted: (what was asked, tiff input) -> whether this scene gets it.
        feeds: 'labels', 'probabilities', 'overlay' or 'ranking'.
        stream: (path, scene) -> a context manager giving a :data:`Sink`, written
            atomically when the block ends; None when it needs the whole map.
        write: (path, whole label map, scene) -> None, for 'labels' outputs.
    """

    name: Callable[[str, bool, Wanted], str]
    wanted: Callable[[Wanted, bool], bool]
    feeds: str
    stream: Callable[[Path, Scene], contextlib.AbstractContextManager[Sink]] | None = None
    write: Callable[[Path, np.ndarray, Scene], None] | None = None


# Plain images' polygons: pixel corners placed as QGIS places an image without georeferencing
# (x = column, y = -row), so that they lie on the image and its label PNG there.
PIXEL_TRANSFORM = Affine(1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
# The label map of image NAME is NAME + LABEL_SUFFIX in the output folder.
LABEL_SUFFIX = "_predseg.png"


# Writers ----------------------------------------------------------------------------------

@contextlib.contextmanager
def probability_file(path: Path, scene: Scene) -> Iterator[ProbabilitySink]:
    """A sink writing probability strips into ``path`` (.npy float16, or a .tif float32 COG
    with the scene's georeferencing, NaN nodata, averaged overviews and each band named after
    its class), atomically: renamed when the block ends."""
    channels = scene.n_outputs
    if path.suffix != ".npy":
        with writers.cog_writer(path, scene.shape_hw, channels, np.float32, scene.meta,
                                nodata=float("nan"), classes=False,
                                description=cog.probability_description(
                                    scene.cfg.class_names, binary=channels == 1)) as write:
            yield write
        return
    with atomic_path(path) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                          shape=(*scene.shape_hw, channels))

        def write_npy(r0: int, prob: np.ndarray) -> None:
            array[r0:r0 + len(prob)] = prob

        yield write_npy
        array.flush()


def _label_cog_description(scene: Scene) -> cog.RasterDescription:
    return cog.label_description(scene.cfg.class_names, LABEL_NODATA)


def label_cog_stream(path: Path, scene: Scene) -> contextlib.AbstractContextManager[Sink]:
    """The label map as a COG written strip by strip (through a tiled temporary)."""
    return writers.cog_writer(path, scene.shape_hw, 1, np.uint8, scene.meta,
                              nodata=LABEL_NODATA, description=_label_cog_description(scene))


def label_cog(path: Path, label: np.ndarray, scene: Scene) -> None:
    """The whole label map as a COG with the scene's georeferencing and colour table."""
    cog.write_cog(path, label, scene.meta.crs, scene.meta.transform, nodata=LABEL_NODATA,
                  description=_label_cog_description(scene))


def write_polygons(path: Path, label: np.ndarray, meta: rasters.RasterMeta, cfg: Config,
                   binary: bool) -> None:
    """Write the classes of ``label`` ((H, W) class indices, LABEL_NODATA at nodata) as
    polygons (:func:`res_unet.geo.polygons.write_class_polygons`), in ``meta``'s CRS and map
    coordinates, or in pixel coordinates (:data:`PIXEL_TRANSFORM`, no CRS, said in the
    layer's description) for a plain image. Binary models: the foreground only; multiclass:
    every class but IGNORE_CLASS. VECTOR_SIMPLIFY and VECTOR_LAYER_PER_CLASS apply."""
    georeferenced = is_georeferenced(meta) and meta.transform is not None
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




def _polygons(path: Path, label: np.ndarray, scene: Scene) -> None:
    write_polygons(path, label, scene.meta, scene.cfg, binary=scene.n_outputs == 1)


def _vector_wanted(wanted: Wanted, tiff: bool) -> bool:
    if wanted.vector is not None and wanted.vector not in key_choices("VECTOR_FORMAT"):
        raise ValueError(f"vector format {wanted.vector!r} is not one of "
                         f"{key_choices('VECTOR_FORMAT')}")
    return wanted.vector is not None


# The registry -----------------------------------------------------------------------------

# Output key -> Output, in the order of output_paths' dict (the keys are the paths' keys).
OUTPUTS: dict[str, Output] = {
    # NAME_predseg.png: class indices, 8-bit grey.
    "label": Output(name=lambda stem, tiff, wanted: f"{stem}{LABEL_SUFFIX}",
                    wanted=lambda wanted, tiff: True, feeds="labels",
                    stream=lambda path, scene: writers.png_writer(path, scene.shape_hw),
                    write=lambda path, label, scene: writers.write_png(path, label)),
    # NAME_overlay.png: the classes over the image, for a person.
    "overlay": Output(name=lambda stem, tiff, wanted: f"{stem}_overlay.png",
                      wanted=lambda wanted, tiff: True, feeds="overlay"),
    # NAME_predseg.tif: the label map as a COG, for GeoTIFF inputs.
    "geotiff": Output(name=lambda stem, tiff, wanted: f"{stem}_predseg.tif",
                      wanted=lambda wanted, tiff: tiff, feeds="labels",
                      stream=label_cog_stream, write=label_cog),
    # NAME_probs.npy (float16), or a float32 COG for GeoTIFF inputs: --save-probs.
    "probs": Output(name=lambda stem, tiff, wanted: f"{stem}_probs{'.tif' if tiff else '.npy'}",
                    wanted=lambda wanted, tiff: wanted.save_probs, feeds="probabilities",
                    stream=probability_file),
    # NAME_uncertainty.tif (float32 COG) or .png: --save-uncertainty.
    "uncertainty": Output(name=lambda stem, tiff, wanted:
                          f"{stem}_uncertainty{'.tif' if tiff else '.png'}",
                          wanted=lambda wanted, tiff: wanted.save_uncertainty, feeds="ranking"),
    # NAME_predseg.gpkg / .geojson: the classes as polygons (VECTOR_FORMAT); needs the whole map.
    "vector": Output(name=lambda stem, tiff, wanted: f"{stem}_predseg.{wanted.vector}",
                     wanted=_vector_wanted, feeds="labels", write=_polygons),
}


def output_paths(out_dir: Path, pair: pairing.Pair, wanted: Wanted = Wanted()
                 ) -> dict[str, Path]:
    """The output files of one image, by :data:`OUTPUTS` key (those ``wanted`` for it)."""
    # A scene from a URL or catalogue is read through a GeoTIFF-like VRT.
    tiff = pair.image.suffix.lower() in (".tif", ".tiff", scenes.VRT_SUFFIX)
    return {key: out_dir / output.name(pair.stem, tiff, wanted) for key, output in OUTPUTS.items()
            if output.wanted(wanted, tiff)}


# Writing one scene ------------------------------------------------------------------------

def segment_image(segmenter: Segmenter, pair: pairing.Pair, paths: dict[str, Path],
                  keep_label: bool = True, ranking: uncertainty.UncertaintySums | None = None,
                  pictures: review.ScenePictures | None = None) -> tuple[np.ndarray | None, int]:
    """Segment one image and write its outputs (``paths``, from :func:`output_paths`), each
    atomically.

    A large image that GDAL can read in windows (a single-page GeoTIFF with the model's
    bands, see :func:`res_unet.data.pairing.open_image_rows`) is never read whole: it is
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
        scene = Scene(shape_hw, meta, cfg, segmenter.n_outputs)
        outputs = {key: OUTPUTS[key] for key in paths}
        sinks = [stack.enter_context(output.stream(paths[key], scene))  # probability rows
                 for key, output in outputs.items() if output.feeds == "probabilities"]
        if ranking is None and "uncertainty" in paths:
            ranking = uncertainty.UncertaintySums(segmenter.n_outputs, segmenter.label_cut)
        if ranking is not None:
            ranking.thumb_step = review.picture_step(shape_hw) if pictures else 0
            if "uncertainty" in paths:
                ranking.on_map = stack.enter_context(uncertainty.uncertainty_map_writer(
                    paths["uncertainty"], shape_hw, meta))
            sinks.append(ranking.add)

        def sink(r0: int, prob: np.ndarray) -> None:
            for write in sinks:
                write(r0, prob)
        labels = {key: output for key, output in outputs.items() if output.feeds == "labels"}
        stream = (isinstance(image, rasters.RasterRows) and segmenter.streams_labels
                  and not keep_label and all(o.stream is not None for o in labels.values()))
        step = report.overlay_step(shape_hw)
        shown: list[tuple[np.ndarray, np.ndarray]] = []
        on_label = None
        if stream:
            label_sinks = [stack.enter_context(output.stream(paths[key], scene))
                           for key, output in labels.items()]

            def on_label(r0: int, label_rows: np.ndarray) -> None:
                for write in label_sinks:
                    write(r0, label_rows)
                first = -r0 % step
                if first < len(label_rows):
                    # Copies: a strided view would keep the whole strip alive.
                    pixels = image.rows(r0 + first, r0 + len(label_rows))[::step, ::step]
                    shown.append((pixels.copy(), label_rows[first::step, ::step].copy()))

        try:
            label = segmenter.segment(image, nodata, sink if sinks else None, on_label)
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
    for key, output in labels.items():
        output.write(paths[key], label, scene)
    return label, label.shape[0] * label.shape[1]
