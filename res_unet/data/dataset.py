"""Building TFRecord datasets from image and label folders (the format:
:mod:`res_unet.data.records`).

Why this module is long: one pipeline (tasks, workers, builder, staged output) with shared types.

:func:`make_dataset` splits the source images into train/validation first (by group,
seeded), reads every pair once to check it, then fits every image to TARGET_SIZE
(resize-and-pad, or tiles), augments the training split only, and streams the examples
into numbered shards. Worker processes each load one source image at a time and return its
examples (a big scene's tiles in several tasks); the parent writes them in a fixed order,
so the bytes on disk do not depend on the number of workers. Everything is written into a
hidden sibling folder and moved into place only when complete, with ``manifest.json``
last: an interrupted or failed run leaves the output folder as it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from res_unet import __version__
from res_unet.config.keys import Config, save_config
from res_unet.core import messages
from res_unet.core.atomic import (
    check_output_folder,
    clean_stale_temporaries,
    owner_tag,
    usual_mode,
)
from res_unet.core.errors import UserError
from res_unet.core.folders import folder_lock
from res_unet.core.progress import progress_bar
from res_unet.data import report
from res_unet.data.augment import augment_pair
from res_unet.data.labelsource import LabelSource
from res_unet.data.pairing import (
    Pair,
    PolygonRules,
    left_out_images,
    load_pair,
    load_pair_and_facts,
    repaired_note,
)
from res_unet.data.records import (
    CONFIG,
    MANIFEST,
    SAMPLES,
    SHARD_PATTERN,
    SPLITS,
    Example,
    Manifest,
    RunningBandStats,
    ShardWriter,
    SplitCounts,
    file_sha256,
    serialize_example,
)
from res_unet.data.split import split_pairs
from res_unet.geo import scenes
from res_unet.geo.scale import training_pixel_size
from res_unet.geo.tiling import (
    downsample_image,
    downsample_label,
    downsampled_shape,
    extract_tile,
    resize_to_fit,
    tile_grid,
)

# Independent random streams derived from SEED (numpy SeedSequence entropy words).
_ORDER_STREAM, _EMPTY_TILE_STREAM, _AUG_STREAM = 1, 2, 3
_N_SAMPLES = 4
_MAX_PROBLEMS = 20
# Examples one worker task returns at most (big scenes are split into several tasks).
_EXAMPLES_PER_TASK = 256
_PR_SET_PDEATHSIG = 1  # linux/prctl.h

T = TypeVar("T")


# Examples from one source image (runs in worker processes) -----------------------------

@dataclass
class _Task:
    pair: Pair
    split: str
    index: int  # position of the source in its split (sorted by stem): seeds depend on it
    cfg: Config
    fits: range | None = None  # which fitted examples (tiles) of the source; None = all
    last: bool = True  # the source's last task


@dataclass
class _SourceResult:
    pair: Pair
    split: str
    first: bool
    last: bool
    examples: list[Example] = field(default_factory=list)
    empty_dropped: int = 0


def fit_origins(shape_hw: tuple[int, int], cfg: Config) -> list[tuple[int, int]]:
    """Where each fitted example of an image of ``shape_hw`` starts: [(0, 0)] in resize
    mode (the whole image), ``tile_grid(shape_hw, TARGET_SIZE, TILE_OVERLAP)`` in tile mode."""
    if cfg.FIT_MODE == "resize":
        return [(0, 0)]
    return tile_grid(shape_hw, tuple(cfg.TARGET_SIZE), cfg.TILE_OVERLAP)


def fit_examples(image: np.ndarray, label: np.ndarray, cfg: Config,
                 select: range | None = None) -> list[tuple[np.ndarray, np.ndarray, int, int]]:
    """Fit one source pair to TARGET_SIZE as FIT_MODE says.

    'resize': one example, the whole image scaled to fit (aspect kept, reflect-padded; the
    label with nearest neighbour). 'tile': one example per tile of :func:`fit_origins`.
    ``select`` picks some of them by number (default all). Returns [(image, label, row, col)].
    """
    target = tuple(cfg.TARGET_SIZE)
    if cfg.FIT_MODE == "resize":
        fitted_image, _ = resize_to_fit(image, target, order=1)
        fitted_label, _ = resize_to_fit(label, target, order=0)
        return [(fitted_image, fitted_label, 0, 0)]
    origins = fit_origins(image.shape[:2], cfg)
    return [(extract_tile(image, r, c, target), extract_tile(label, r, c, target), r, c)
            for r, c in (origins if select is None else [origins[k] for k in select])]


def is_empty_tile(label: np.ndarray, min_foreground_fraction: float) -> bool:
    """Whether the share of non-background (label > 0) pixels is below the threshold."""
    return float(np.count_nonzero(label)) / label.size < min_foreground_fraction


def source_examples(image: np.ndarray, label: np.ndarray, stem: str, split: str, index: int,
                    cfg: Config, select: range | None = None) -> tuple[list[Example], int]:
    """The examples written for one source pair, and the number of empty tiles dropped.

    Training split: in tile mode a seeded EMPTY_TILE_KEEP share of empty tiles is kept;
    every kept example is followed by AUG_COPIES augmented copies when DO_AUG. Validation:
    every fitted example, never augmented. ``select``: only these fitted examples (tiles),
    by number. The random numbers depend only on (SEED, ``index``, tile number, copy), not
    on which process runs this or how the tiles are grouped into tasks.
    """
    train = split == "train"
    examples = []
    dropped = 0
    fitted = fit_examples(image, label, cfg, select)
    numbers = range(len(fitted)) if select is None else select
    for k, (img, lab, r, c) in zip(numbers, fitted, strict=True):
        if (train and cfg.FIT_MODE == "tile"
                and is_empty_tile(lab, cfg.MIN_FOREGROUND_FRACTION)
                and np.random.default_rng([cfg.SEED, _EMPTY_TILE_STREAM, index, k]).random()
                >= cfg.EMPTY_TILE_KEEP):
            dropped += 1
            continue
        examples.append(Example(img, lab.astype(np.uint8, copy=False), stem, r, c, 0))
        if train and cfg.DO_AUG:
            for copy in range(1, cfg.AUG_COPIES + 1):
                rng = np.random.default_rng([cfg.SEED, _AUG_STREAM, index, k, copy])
                aug_img, aug_lab = augment_pair(img, lab, rng, cfg)
                examples.append(Example(aug_img, aug_lab.astype(np.uint8, copy=False), stem,
                                        r, c, copy))
    return examples, dropped


def load_scaled_pair(pair: Pair, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """The pair's image and label at the working scale: 1/DOWNSAMPLE of the source grid
    (block-mean image, majority label)."""
    image, label, _ = load_pair(pair, cfg.N_DATA_BANDS, cfg.label_rules,
                                PolygonRules.from_config(cfg), cfg.MAX_IMAGE_PIXELS)
    return (downsample_image(image, cfg.DOWNSAMPLE),
            downsample_label(label, cfg.DOWNSAMPLE))


def _process_source(task: _Task) -> _SourceResult:
    """Worker entry point: load one pair and return the examples of the task's tiles."""
    image, label = load_scaled_pair(task.pair, task.cfg)
    examples, dropped = source_examples(image, label, task.pair.stem, task.split, task.index,
                                        task.cfg, task.fits)
    first = task.fits is None or task.fits.start == 0
    return _SourceResult(task.pair, task.split, first, task.last, examples, dropped)


def _check_source(task: _Task) -> tuple[str | None, str | None, tuple[int, int], str | None]:
    """Worker entry point of the checking pass: (problem or None, image dtype, (H, W), note
    on the image's own polygon label file or None)."""
    cfg = task.cfg
    try:
        image, _, _, facts = load_pair_and_facts(task.pair, cfg.N_DATA_BANDS, cfg.label_rules,
                                                 PolygonRules.from_config(cfg),
                                                 cfg.MAX_IMAGE_PIXELS)
    except UserError as exc:
        return str(exc), None, (0, 0), None
    note = None
    if facts is not None and facts.repaired and not task.pair.shared_label:
        note = repaired_note(facts.labels, facts.repaired)
    return None, image.dtype.name, downsampled_shape(image.shape[:2], cfg.DOWNSAMPLE), note


def _split_tasks(tasks: list[_Task], shapes: list[tuple[int, int]]) -> list[_Task]:
    """One task per source, or several for big scenes in tile mode, so that no task returns
    more than about ``_EXAMPLES_PER_TASK`` examples: memory stays bounded whatever the image
    size. The split is a pure function of the sizes, so the output does not depend on it."""
    out = []
    for task, shape in zip(tasks, shapes, strict=True):
        cfg = task.cfg
        copies = cfg.AUG_COPIES if task.split == "train" and cfg.DO_AUG else 0
        step = max(1, _EXAMPLES_PER_TASK // (1 + copies))
        n = len(fit_origins(shape, cfg))
        out += [dataclasses.replace(task, fits=range(start, min(n, start + step)),
                                    last=start + step >= n) for start in range(0, n, step)]
    return out


def _init_worker(parent_pid: int, log_level: int) -> None:
    """Worker initializer. Ctrl-C is handled by the parent, which cancels pending work and
    cleans up; workers finish their current image instead of dying mid-way. A parent killed
    outright (kill -9) cannot clean up: its workers then end with it, never orphaned.
    Notes are as loud as in the parent (``log_level`` of the res_unet logger)."""
    messages.LOGGER.setLevel(log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _end_with_parent(parent_pid)


def _end_with_parent(parent_pid: int) -> None:
    """End this process when ``parent_pid`` (its parent) dies, whatever killed it.

    Linux: the kernel sends SIGKILL on the parent's death (prctl PR_SET_PDEATHSIG). Elsewhere
    a daemon thread polls the parent id once a second.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
            if os.getppid() != parent_pid:  # the parent died before the call
                os._exit(1)
            return

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="end-with-parent").start()


@dataclass
class _Workers:
    """Spawned worker processes; ``pool`` is None for one worker (run in this process)."""

    count: int
    pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> _Workers:
        if self.count > 1:
            self.pool = ProcessPoolExecutor(max_workers=self.count,
                                            initializer=_init_worker,
                                            initargs=(os.getpid(), messages.LOGGER.level),
                                            mp_context=multiprocessing.get_context("spawn"))
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _ordered_map(fn: Callable[[_Task], T], tasks: list[_Task],
                 workers: _Workers) -> Iterator[T]:
    """``fn(task)`` for every task, in task order, on the worker pool (or in this process).

    At most two tasks per worker are in flight, so memory stays bounded however many
    images there are. Closing the iterator early cancels the tasks not yet started.
    """
    pool = workers.pool
    if pool is None:
        for task in tasks:
            yield fn(task)
        return
    window = 2 * workers.count
    pending: deque[Future[T]] = deque()
    remaining = iter(tasks)
    try:
        for task in islice(remaining, window):
            pending.append(pool.submit(fn, task))
        while pending:
            result = pending.popleft().result()
            task = next(remaining, None)
            if task is not None:
                pending.append(pool.submit(fn, task))
            yield result
    finally:
        for future in pending:
            future.cancel()


def _check_sources(tasks: list[_Task], workers: _Workers) -> list[tuple[int, int]]:
    """Read every pair once before writing anything; raise one UserError listing all bad
    files (one line each) and mixed bit depths, so a bad file near the end is found in
    seconds rather than after the whole build. Returns the image sizes (H, W)."""
    problems: list[str] = []
    dtypes: dict[str, list[Path]] = {}
    shapes = []
    checks = _ordered_map(_check_source, tasks, workers)
    with contextlib.closing(checks):
        for task, (problem, dtype, shape, note) in zip(
                tasks, progress_bar(checks, total=len(tasks), desc="checking"),
                strict=True):
            shapes.append(shape)
            if note:
                messages.note(note)
            if problem:
                problems.extend(problem.splitlines())
            else:
                dtypes.setdefault(str(dtype), []).append(task.pair.image)
    if len(dtypes) > 1:
        (common, _), (rare, files) = sorted(dtypes.items(), key=lambda kv: -len(kv[1]))[:2]
        problems.append(f"{files[0]}: {rare} pixels but most images are {common} "
                        f"({len(files)} {rare} images); convert all images to one bit depth")
    if len(problems) > _MAX_PROBLEMS:
        problems = [*problems[:_MAX_PROBLEMS],
                    f"... and {len(problems) - _MAX_PROBLEMS} more problems"]
    if problems:
        raise UserError("\n".join(problems))
    return shapes


# Building a dataset --------------------------------------------------------------------

def _dataset_files(folder: Path) -> list[Path]:
    """Files of a dataset made by make_tfrecords in ``folder`` (shards, manifest, figure)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.name in (MANIFEST, CONFIG, SAMPLES) or SHARD_PATTERN.match(p.name))


def _check_output(out: Path, overwrite: bool) -> None:
    """Refuse to replace an existing dataset (or our file names in a folder) unless asked."""
    if overwrite:
        return
    ours = _dataset_files(out)
    if any(p.name == MANIFEST or SHARD_PATTERN.match(p.name) for p in ours):
        raise UserError(f"{out}: already holds a dataset (manifest.json or .tfrec shards); "
                        "pass --overwrite to replace it or choose another --out")
    if ours:
        raise UserError(f"{ours[0]}: would be replaced by the dataset's own file; pass "
                        "--overwrite or choose an empty --out folder")


def _staging_dir(out: Path) -> Path:
    """A hidden temp folder beside ``out`` (same file system, so it can be renamed onto it)."""
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UserError(f"{out}: {blocking} is a file, not a folder; choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.{owner_tag()}-partial-",
                                        dir=out.parent))
        # mkdtemp makes a private folder; the dataset gets the permissions of a normal mkdir.
        staging.chmod(usual_mode(directory=True))
        return staging
    except OSError as exc:
        raise UserError(f"{out}: cannot write the dataset here ({exc.strerror or exc}); "
                        "choose a writable --out folder") from None


def _install(staging: Path, out: Path) -> None:
    """Move the finished dataset from ``staging`` into ``out`` (which exists: it holds the
    lock). The old manifest goes first (a folder without one is refused by
    :func:`read_manifest`, so old and new shards are never read together), then the old
    dataset files; the new files follow, the manifest last. Other files in ``out`` are left
    alone.
    """
    (out / MANIFEST).unlink(missing_ok=True)
    for path in _dataset_files(out):
        path.unlink()
    for path in sorted(staging.iterdir()):
        if path.name != MANIFEST:
            os.replace(path, out / path.name)
    os.replace(staging / MANIFEST, out / MANIFEST)


class _DatasetBuilder:
    """Collects source results (in order) into shards, statistics and sample figures."""

    def __init__(self, folder: Path, cfg: Config) -> None:
        self.folder, self.cfg = folder, cfg
        self.n_classes = cfg.n_label_classes
        self.class_counts = np.zeros(self.n_classes, dtype=np.int64)
        self.band_stats = RunningBandStats()
        self.sources: dict[str, list[Pair]] = {s: [] for s in SPLITS}
        self.unaugmented = dict.fromkeys(SPLITS, 0)
        self.empty_dropped = 0
        self.dtype: str | None = None
        self.first_source: Pair | None = None
        self.samples: dict[str, list[tuple[np.ndarray, np.ndarray, str]]] = {
            s: [] for s in SPLITS}

    def add(self, result: _SourceResult, writer: ShardWriter) -> None:
        if result.first:
            self.sources[result.split].append(result.pair)
            self._keep_sample(result)
        self.empty_dropped += result.empty_dropped
        for example in result.examples:
            self._check_dtype(example, result.pair)
            writer.write(serialize_example(example))
            if result.split == "train":
                self.class_counts += np.bincount(example.label.ravel(),
                                                 minlength=self.n_classes)[:self.n_classes]
                if example.copy == 0:
                    self.band_stats.add(example.image)
            self.unaugmented[result.split] += example.copy == 0

    def _check_dtype(self, example: Example, pair: Pair) -> None:
        if self.dtype is None:
            self.dtype, self.first_source = example.image.dtype.name, pair
        elif example.image.dtype.name != self.dtype:
            assert self.first_source is not None
            raise UserError(f"{pair.image}: {example.image.dtype.name} pixels but "
                            f"{self.first_source.image.name} is {self.dtype}; convert all "
                            "images to the same bit depth")

    def _keep_sample(self, result: _SourceResult) -> None:
        """Keep one example per source for the figure: an augmented one in training, and
        the one with the most foreground (tiles are often all background)."""
        kept = self.samples[result.split]
        if len(kept) >= _N_SAMPLES or not result.examples:
            return
        augmented = [e for e in result.examples if e.copy > 0]
        example = max(augmented or result.examples, key=lambda e: np.count_nonzero(e.label))
        title = example.stem + (f" (aug {example.copy})" if example.copy else "")
        if self.cfg.FIT_MODE == "tile":
            title += f" @{example.row},{example.col}"
        kept.append((example.image, example.label, title))

    def manifest(self, writers: dict[str, ShardWriter], images_dir: Path,
                 source: LabelSource, left_out: list[str]) -> Manifest:
        cfg = self.cfg
        if self.band_stats.n == 0:
            raise UserError(f"{images_dir}: no training examples were written (all tiles were "
                            "empty?); lower MIN_FOREGROUND_FRACTION or raise EMPTY_TILE_KEEP")
        band_mean, band_std = self.band_stats.result()
        hasher = hashlib.sha256()
        # One hasher over every shard in order (train, then validation), then the config.
        shards = {split: [dataclasses.replace(s, sha256=file_sha256(self.folder / s.file, hasher))
                          for s in writers[split].shards] for split in SPLITS}
        hasher.update(json.dumps(cfg.to_dict(), sort_keys=True).encode())
        total = int(self.class_counts.sum())
        by_stem = {s: sorted(self.sources[s], key=lambda p: p.stem) for s in SPLITS}
        assert self.dtype is not None  # training examples were written (checked above)
        return Manifest(
            res_unet_version=__version__,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            content_hash="sha256:" + hasher.hexdigest(),
            counts={s: SplitCounts(images=len(self.sources[s]),
                                   examples=sum(x.count for x in shards[s]),
                                   unaugmented=self.unaugmented[s]) for s in SPLITS},
            files={s: [p.image.name for p in by_stem[s]] for s in SPLITS},
            label_files={s: [p.label_name for p in by_stem[s]]
                         for s in SPLITS},
            images_dir=scenes.folder_shown(Path(images_dir)),
            labels_dir=str(source.path.resolve()),
            empty_tiles_dropped=self.empty_dropped,
            class_pixel_counts=self.class_counts.tolist(),
            class_pixel_frequency=(self.class_counts / max(total, 1)).tolist(),
            band_mean=band_mean,
            band_std=band_std,
            n_bands=len(band_mean),
            n_label_classes=self.n_classes,
            nclasses=cfg.NCLASSES,
            target_size=list(cfg.TARGET_SIZE),
            dtype=self.dtype,
            fit_mode=cfg.FIT_MODE,
            downsample=cfg.DOWNSAMPLE,
            compression=cfg.SHARD_COMPRESSION,
            shards=shards,
            samples_figure=SAMPLES if cfg.DOPLOT else None,
            config=cfg.to_dict(),
            pixel_size_m=training_pixel_size([p.image for s in SPLITS for p in by_stem[s]],
                                             cfg.PIXEL_SIZE, cfg.DOWNSAMPLE),
            left_out=left_out,
            label_source=source.record(),
        )


def _tasks(cfg: Config, train: list[Pair], validation: list[Pair]) -> list[_Task]:
    """Training sources in a seeded order (so related images spread over the shards), then
    validation sources by stem."""
    order = np.random.default_rng([cfg.SEED, _ORDER_STREAM]).permutation(len(train))
    return ([_Task(train[i], "train", int(i), cfg) for i in order]
            + [_Task(p, "validation", i, cfg) for i, p in enumerate(validation)])


def make_dataset(cfg: Config, images_dir: str | os.PathLike | scenes.SceneQuery,
                 labels_dir: str | os.PathLike,
                 out_dir: str | os.PathLike, workers: int = 1,
                 overwrite: bool = False) -> Manifest:
    """Build a TFRecord dataset in ``out_dir`` from image and label folders.

    Every pair is read and checked before anything is written (all problems reported at
    once). Then: split (VALIDATION_SPLIT, SPLIT_GROUP_PATTERN, SEED) -> fit to TARGET_SIZE
    (FIT_MODE) -> augment training examples (DO_AUG, AUG_COPIES) -> shards of
    IMS_PER_SHARD, plus ``config.json``, ``samples.png`` (DOPLOT) and ``manifest.json``
    (written last). Uses ``workers`` processes; the output bytes do not depend on it.
    Returns the manifest. ``images_dir`` may be a :class:`res_unet.geo.scenes.SceneQuery`
    (URLs, STAC catalogues): with one shared polygon layer, only the part of each scene
    the labels cover is read.

    Raises UserError for bad input (naming the file) and when ``out_dir`` already holds a
    dataset and ``overwrite`` is false. Nothing in ``out_dir`` changes unless the whole
    dataset was built.
    """
    out = Path(out_dir)
    query = (images_dir if isinstance(images_dir, scenes.SceneQuery)
             else scenes.SceneQuery(str(images_dir)))
    check_output_folder(out, "dataset", [("images", query.images or ""), ("labels", labels_dir),
                                         *(("extra bands", d) for d in cfg.EXTRA_BAND_DIRS)])
    with folder_lock(out, "make_tfrecords"), contextlib.ExitStack() as held:
        _check_output(out, overwrite)
        # What a build killed outright (kill -9) left: its staging folder beside ``out``.
        clean_stale_temporaries(out.parent)
        clean_stale_temporaries(out)
        source = LabelSource.from_config(labels_dir, cfg)
        area = None  # scenes from URLs and catalogues: read only what one layer's labels cover
        if not query.plain_folder and query.bbox is None and query.aoi is None \
                and source.shared_layer:
            area = scenes.layer_area(source.path, source.cfg.LABEL_LAYER)
        images_dir = held.enter_context(scenes.scene_folder(query, area=area)).folder
        pairs = source.pairs(images_dir, cfg.EXTRA_BAND_DIRS)
        if not pairs:
            raise UserError(f"{query.shown}: no image/label pairs found; put images in --images "
                            "and labels with the same names in --labels")
        train, validation = split_pairs(pairs, cfg.VALIDATION_SPLIT, cfg.SEED,
                                        cfg.SPLIT_GROUP_PATTERN, cfg.VALIDATION_GROUPS)
        tasks = _tasks(cfg, train, validation)
        with _Workers(max(1, workers)) as procs:
            tasks = _split_tasks(tasks, _check_sources(tasks, procs))
            staging = _staging_dir(out)
            try:
                manifest = _build(cfg, tasks, procs, staging, Path(images_dir), source,
                                  left_out_images(images_dir, pairs))
                _install(staging, out)
            finally:
                if staging.exists():
                    shutil.rmtree(staging)
    return manifest


def _build(cfg: Config, tasks: list[_Task], procs: _Workers, staging: Path,
           images_dir: Path, source: LabelSource, left_out: list[str]) -> Manifest:
    """Write the whole dataset into ``staging``, manifest last; returns the manifest."""
    builder = _DatasetBuilder(staging, cfg)
    writers = {s: ShardWriter(staging, cfg.ROOT_STRING, s, cfg.IMS_PER_SHARD,
                              cfg.SHARD_COMPRESSION) for s in SPLITS}
    results = _ordered_map(_process_source, tasks, procs)
    progress = progress_bar(total=sum(t.last for t in tasks), desc="make_tfrecords")
    with progress, writers["train"], writers["validation"], contextlib.closing(results):
        for result in results:
            builder.add(result, writers[result.split])
            progress.update(result.last)
    manifest = builder.manifest(writers, images_dir, source, left_out)
    if cfg.DOPLOT:
        report.sample_grid(staging / SAMPLES, builder.samples["train"],
                           builder.samples["validation"], cfg.n_label_classes,
                           cfg.class_names)
    save_config(cfg, staging / CONFIG)
    manifest.write(staging)
    return manifest

