"""TFRecord datasets: build them from image/label folders, and read them back for training.

Building (:func:`make_dataset`) splits the source images into train/validation first (by
group, seeded), reads every pair once to check it, then fits every image to TARGET_SIZE
(resize-and-pad, or tiles), augments the training split only, and streams the examples
into numbered shards. Worker processes each load one source image at a time and return its
examples (a big scene's tiles in several tasks); the parent writes them in a fixed order,
so the bytes on disk do not depend on the number of workers. Everything is written into a
hidden sibling folder and moved into place only when complete, with ``manifest.json``
last: an interrupted or failed run leaves the output folder as it was.

Shard format: one ``tf.train.Example`` per example with raw little-endian tensors
(``image``: H x W x B uint8 or uint16 bytes, ``label``: H x W uint8 class indices) plus
``height``, ``width``, ``bands``, ``dtype``, ``stem`` (source file stem), ``row``/``col``
(tile origin in the source image; 0, 0 in resize mode) and ``copy`` (0 = unaugmented,
k = k-th augmented copy). Shards are ``{ROOT_STRING}-{split}-{NNNNN}.tfrec``, optionally GZIP.

TensorFlow is imported inside the functions that need it: spawned workers only use numpy,
so they start quickly and stay small.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from tqdm import tqdm

import res_unet
from res_unet import report
from res_unet.atomic import (
    atomic_path,
    check_writable,
    clean_stale_temporaries,
    owner_tag,
    usual_mode,
    write_atomic,
)
from res_unet.augment import augment_pair
from res_unet.config import Config, save_config
from res_unet.errors import UserError
from res_unet.imagery import Pair, find_pairs, load_pair
from res_unet.split import split_pairs
from res_unet.tiling import (
    downsample_image,
    downsample_label,
    downsampled_shape,
    extract_tile,
    resize_to_fit,
    tile_grid,
)

MANIFEST = "manifest.json"
CONFIG = "config.json"
SAMPLES = "samples.png"
SPLITS = ("train", "validation")
FORMAT = "res_unet-tfrecords"
FORMAT_VERSION = 1
SHARD_PATTERN = re.compile(r".+-(train|validation)-\d{5}\.tfrec$")
_DTYPES = ("uint8", "uint16")
# Independent random streams derived from SEED (numpy SeedSequence entropy words).
_ORDER_STREAM, _EMPTY_TILE_STREAM, _AUG_STREAM = 1, 2, 3
_N_SAMPLES = 4
_MAX_PROBLEMS = 20
# Examples one worker task returns at most (big scenes are split into several tasks).
_EXAMPLES_PER_TASK = 256
T = TypeVar("T")
# zlib level of GZIP shards: about 30% less CPU than the default (6) for about 2% larger
# files on aerial image tiles; reading speed is the same.
_GZIP_LEVEL = 1
# Serialised records queued for the background shard writer.
_WRITE_BACKLOG = 32
# Serialised examples held by the reader's shuffle buffer, in bytes.
_SHUFFLE_BYTES = 128 * 2**20


# Examples from one source image (runs in worker processes) ------------------------------

@dataclass
class Example:
    """One fitted (and possibly augmented) example.

    ``image`` (H, W, B) uint8/uint16 raw values, ``label`` (H, W) uint8 class indices;
    ``row``/``col``: origin of the tile in the source image (0, 0 in resize mode);
    ``copy``: 0 for the unaugmented example, k for the k-th augmented copy.
    """

    image: np.ndarray
    label: np.ndarray
    stem: str
    row: int = 0
    col: int = 0
    copy: int = 0


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
    image, label, _ = load_pair(pair, cfg)
    return (downsample_image(image, cfg.DOWNSAMPLE),
            downsample_label(label, cfg.DOWNSAMPLE))


def _process_source(task: _Task) -> _SourceResult:
    """Worker entry point: load one pair and return the examples of the task's tiles."""
    image, label = load_scaled_pair(task.pair, task.cfg)
    examples, dropped = source_examples(image, label, task.pair.stem, task.split, task.index,
                                        task.cfg, task.fits)
    first = task.fits is None or task.fits.start == 0
    return _SourceResult(task.pair, task.split, first, task.last, examples, dropped)


def _check_source(task: _Task) -> tuple[str | None, str | None, tuple[int, int]]:
    """Worker entry point of the checking pass: (problem or None, image dtype, (H, W))."""
    try:
        image, _, _ = load_pair(task.pair, task.cfg)
    except UserError as exc:
        return str(exc), None, (0, 0)
    return None, image.dtype.name, downsampled_shape(image.shape[:2], task.cfg.DOWNSAMPLE)


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


def _ignore_interrupts() -> None:
    """Worker initializer: Ctrl-C is handled by the parent, which cancels pending work and
    cleans up; workers finish their current image instead of dying mid-way."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclass
class _Workers:
    """Spawned worker processes; ``pool`` is None for one worker (run in this process)."""

    count: int
    pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> _Workers:
        if self.count > 1:
            self.pool = ProcessPoolExecutor(max_workers=self.count,
                                            initializer=_ignore_interrupts,
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
        for task, (problem, dtype, shape) in zip(
                tasks, tqdm(checks, total=len(tasks), unit="image", desc="checking"),
                strict=True):
            shapes.append(shape)
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


# Writing shards ------------------------------------------------------------------------

def serialize_example(example: Example) -> bytes:
    """A ``tf.train.Example`` holding the raw tensors and metadata, serialised."""
    import tensorflow as tf

    image = np.ascontiguousarray(example.image)
    if image.ndim == 2:
        image = image[..., None]
    if image.dtype.name not in _DTYPES:
        raise ValueError(f"{example.stem}: image dtype {image.dtype} is not uint8 or uint16")

    def ints(value: int) -> tf.train.Feature:
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))

    def raw(value: bytes) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    features = {
        "image": raw(image.astype(image.dtype.newbyteorder("<"), copy=False).tobytes()),
        "label": raw(np.ascontiguousarray(example.label, dtype=np.uint8).tobytes()),
        "height": ints(image.shape[0]),
        "width": ints(image.shape[1]),
        "bands": ints(image.shape[2]),
        "dtype": raw(image.dtype.name.encode()),
        "stem": raw(example.stem.encode()),
        "row": ints(example.row),
        "col": ints(example.col),
        "copy": ints(example.copy),
    }
    proto = tf.train.Example(features=tf.train.Features(feature=features))
    # Sorted map keys: identical examples give identical bytes in every process.
    return proto.SerializeToString(deterministic=True)


def parse_example(record: bytes) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Inverse of :func:`serialize_example`: (image (H, W, B) uint, label (H, W) uint8, meta).

    ``meta`` has stem, row, col and copy.
    """
    import tensorflow as tf

    feature = tf.train.Example.FromString(record).features.feature

    def one(name: str) -> Any:
        f = feature[name]
        return f.int64_list.value[0] if f.HasField("int64_list") else f.bytes_list.value[0]

    h, w, b = one("height"), one("width"), one("bands")
    dtype = np.dtype(one("dtype").decode()).newbyteorder("<")
    image = np.frombuffer(one("image"), dtype=dtype).reshape(h, w, b).astype(dtype.name)
    label = np.frombuffer(one("label"), dtype=np.uint8).reshape(h, w).copy()
    meta = {"stem": one("stem").decode(), "row": one("row"), "col": one("col"),
            "copy": one("copy")}
    return image, label, meta


class ShardWriter:
    """Writes one split's serialised examples into numbered shards of ``per_shard`` each.

    Use it as a context manager. Each shard is written to a temp file and renamed when
    complete; leaving the ``with`` block by an exception removes the shard in progress.
    Compression and writing run on a background thread (TFRecordWriter releases the GIL), so
    they overlap with preparing the next examples; at most ``_WRITE_BACKLOG`` records wait.
    ``shards`` lists the finished shards (without their sha256).
    """

    def __init__(self, folder: Path, root: str, split: str, per_shard: int,
                 compression: str | None) -> None:
        self.folder, self.root, self.split = folder, root, split
        self.per_shard, self.compression = per_shard, compression
        self.shards: list[Shard] = []
        self._stack: contextlib.ExitStack | None = None
        self._writer: Any = None
        self._count = 0
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"shards-{split}")
        self._backlog: deque[Future[None]] = deque()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is not None:
                self._abort(exc_type, exc, tb)
                return
            try:
                self.close()
            except BaseException as error:
                self._abort(type(error), error, error.__traceback__)
                raise
        finally:
            self._io.shutdown(wait=True)

    def write(self, record: bytes) -> None:
        """Append one serialised example, starting a new shard when the current one is full."""
        if self._stack is None:
            self._open()
        self._backlog.append(self._io.submit(self._writer.write, record))
        self._count += 1
        while len(self._backlog) > _WRITE_BACKLOG:
            self._backlog.popleft().result()
        if self._count == self.per_shard:
            self.close()

    def _open(self) -> None:
        import tensorflow as tf

        self._stack = contextlib.ExitStack()
        name = f"{self.root}-{self.split}-{len(self.shards):05d}.tfrec"
        tmp = self._stack.enter_context(atomic_path(self.folder / name))
        options = tf.io.TFRecordOptions(compression_type=self.compression or "",
                                        compression_level=_GZIP_LEVEL if self.compression
                                        else None)
        self._writer = tf.io.TFRecordWriter(str(tmp), options)
        self._name, self._count = name, 0

    def close(self) -> None:
        """Finish the shard in progress (all records written and flushed, then renamed)."""
        if self._stack is None:
            return
        while self._backlog:
            self._backlog.popleft().result()
        self._writer.close()
        self._stack.close()
        self._stack = None
        self.shards.append(Shard(self._name, self._count))

    def _abort(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """Drop the shard in progress: stop queued writes, close it, delete its temp file."""
        for pending in self._backlog:
            pending.cancel()
        wait(self._backlog)
        self._backlog.clear()
        if self._stack is not None:
            stack, self._stack = self._stack, None
            try:
                self._writer.close()
            finally:
                stack.__exit__(exc_type, exc, tb)


class _RunningBandStats:
    """Per-band mean and standard deviation over many images, merged exactly in float64."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None

    def add(self, image: np.ndarray) -> None:
        x = image.reshape(-1, image.shape[-1]).astype(np.float64)
        n_b, mean_b = x.shape[0], x.mean(axis=0)
        m2_b = ((x - mean_b) ** 2).sum(axis=0)
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        delta = mean_b - self.mean
        total = self.n + n_b
        self.mean = self.mean + delta * n_b / total
        self.m2 = self.m2 + m2_b + delta ** 2 * self.n * n_b / total
        self.n = total

    def result(self) -> tuple[list[float], list[float]]:
        assert self.mean is not None and self.m2 is not None
        return self.mean.tolist(), np.sqrt(self.m2 / self.n).tolist()


def _file_sha256(path: Path, hasher: Any) -> str:
    """Feed ``path``'s bytes to ``hasher`` and return the file's own sha256 hex digest."""
    own = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**20), b""):
            own.update(block)
            hasher.update(block)
    return own.hexdigest()


# Building a dataset --------------------------------------------------------------------

def _dataset_files(folder: Path) -> list[Path]:
    """Files of a dataset made by make_tfrecords in ``folder`` (shards, manifest, figure)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.name in (MANIFEST, CONFIG, SAMPLES) or SHARD_PATTERN.match(p.name))


def _check_output(out: Path, overwrite: bool) -> None:
    """Refuse to replace an existing dataset (or our file names in a folder) unless asked."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another --out")
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
    """Move the finished dataset from ``staging`` to ``out``.

    A new folder is one rename. In an existing folder the old manifest goes first (a folder
    without one is refused by :func:`read_manifest`, so old and new shards are never read
    together), then the old dataset files; the new files follow, the manifest last. Other
    files in ``out`` are left alone.
    """
    if not out.exists():
        os.rename(staging, out)
        return
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
        self.band_stats = _RunningBandStats()
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
                 labels_dir: Path) -> Manifest:
        cfg = self.cfg
        if self.band_stats.n == 0:
            raise UserError(f"{images_dir}: no training examples were written (all tiles were "
                            "empty?); lower MIN_FOREGROUND_FRACTION or raise EMPTY_TILE_KEEP")
        band_mean, band_std = self.band_stats.result()
        hasher = hashlib.sha256()
        # One hasher over every shard in order (train, then validation), then the config.
        shards = {split: [dataclasses.replace(s, sha256=_file_sha256(self.folder / s.file,
                                                                     hasher))
                          for s in writers[split].shards] for split in SPLITS}
        hasher.update(json.dumps(cfg.to_dict(), sort_keys=True).encode())
        total = int(self.class_counts.sum())
        by_stem = {s: sorted(self.sources[s], key=lambda p: p.stem) for s in SPLITS}
        assert self.dtype is not None  # training examples were written (checked above)
        return Manifest(
            res_unet_version=res_unet.__version__,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            content_hash="sha256:" + hasher.hexdigest(),
            counts={s: SplitCounts(images=len(self.sources[s]),
                                   examples=sum(x.count for x in shards[s]),
                                   unaugmented=self.unaugmented[s]) for s in SPLITS},
            files={s: [p.image.name for p in by_stem[s]] for s in SPLITS},
            label_files={s: [p.label.name if p.label else None for p in by_stem[s]]
                         for s in SPLITS},
            images_dir=str(Path(images_dir).resolve()),
            labels_dir=str(Path(labels_dir).resolve()),
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
        )


def _tasks(cfg: Config, train: list[Pair], validation: list[Pair]) -> list[_Task]:
    """Training sources in a seeded order (so related images spread over the shards), then
    validation sources by stem."""
    order = np.random.default_rng([cfg.SEED, _ORDER_STREAM]).permutation(len(train))
    return ([_Task(train[i], "train", int(i), cfg) for i in order]
            + [_Task(p, "validation", i, cfg) for i, p in enumerate(validation)])


def make_dataset(cfg: Config, images_dir: str | os.PathLike, labels_dir: str | os.PathLike,
                 out_dir: str | os.PathLike, workers: int = 1,
                 overwrite: bool = False) -> Manifest:
    """Build a TFRecord dataset in ``out_dir`` from image and label folders.

    Every pair is read and checked before anything is written (all problems reported at
    once). Then: split (VALIDATION_SPLIT, SPLIT_GROUP_PATTERN, SEED) -> fit to TARGET_SIZE
    (FIT_MODE) -> augment training examples (DO_AUG, AUG_COPIES) -> shards of
    IMS_PER_SHARD, plus ``config.json``, ``samples.png`` (DOPLOT) and ``manifest.json``
    (written last). Uses ``workers`` processes; the output bytes do not depend on it.
    Returns the manifest.

    Raises UserError for bad input (naming the file) and when ``out_dir`` already holds a
    dataset and ``overwrite`` is false. Nothing in ``out_dir`` changes unless the whole
    dataset was built.
    """
    out = Path(out_dir)
    _check_output(out, overwrite)
    inputs = [("images", images_dir), ("labels", labels_dir),
              *(("extra bands", d) for d in cfg.EXTRA_BAND_DIRS)]
    for role, folder in inputs:
        if out.resolve() == Path(folder).resolve():
            raise UserError(f"{out}: is also the {role} folder; write the dataset to another "
                            "--out (its files would be read as input next time)")
    check_writable(out)
    # What a build killed outright (kill -9) left: its staging folder beside ``out``.
    clean_stale_temporaries(out.parent)
    clean_stale_temporaries(out)
    pairs = find_pairs(images_dir, labels_dir, usemask=cfg.USEMASK,
                       extra_band_dirs=cfg.EXTRA_BAND_DIRS)
    if not pairs:
        raise UserError(f"{images_dir}: no image/label pairs found; put images in --images "
                        "and labels with the same names in --labels")
    train, validation = split_pairs(pairs, cfg.VALIDATION_SPLIT, cfg.SEED,
                                    cfg.SPLIT_GROUP_PATTERN)
    tasks = _tasks(cfg, train, validation)
    with _Workers(max(1, workers)) as procs:
        tasks = _split_tasks(tasks, _check_sources(tasks, procs))
        staging = _staging_dir(out)
        try:
            manifest = _build(cfg, tasks, procs, staging, Path(images_dir), Path(labels_dir))
            _install(staging, out)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    return manifest


def _build(cfg: Config, tasks: list[_Task], procs: _Workers, staging: Path,
           images_dir: Path, labels_dir: Path) -> Manifest:
    """Write the whole dataset into ``staging``, manifest last; returns the manifest."""
    builder = _DatasetBuilder(staging, cfg)
    writers = {s: ShardWriter(staging, cfg.ROOT_STRING, s, cfg.IMS_PER_SHARD,
                              cfg.SHARD_COMPRESSION) for s in SPLITS}
    results = _ordered_map(_process_source, tasks, procs)
    progress = tqdm(total=sum(t.last for t in tasks), unit="image", desc="make_tfrecords")
    with progress, writers["train"], writers["validation"], contextlib.closing(results):
        for result in results:
            builder.add(result, writers[result.split])
            progress.update(result.last)
    manifest = builder.manifest(writers, images_dir, labels_dir)
    if cfg.DOPLOT:
        report.sample_grid(staging / SAMPLES, builder.samples["train"],
                           builder.samples["validation"], cfg.n_label_classes,
                           cfg.class_names)
    save_config(cfg, staging / CONFIG)
    manifest.write(staging)
    return manifest


# The manifest ------------------------------------------------------------------------------

@dataclass(frozen=True)
class SplitCounts:
    """What one split of a dataset holds."""

    images: int  # source images
    examples: int  # examples written, augmented copies included
    unaugmented: int  # examples that are not augmented copies


@dataclass(frozen=True)
class Shard:
    """One shard file of a split."""

    file: str  # name in the dataset folder
    count: int  # examples in it
    sha256: str | None = None  # hex digest of its bytes; None in datasets made before hashing


@dataclass(kw_only=True)
class Manifest:
    """``manifest.json``: what a dataset holds and how it was made, written last by
    make_tfrecords. The JSON keys are the field names, in this order.

    ``counts``, ``files`` (image file names, sorted by stem), ``label_files`` (None for an
    image without a label) and ``shards`` are keyed by split. ``class_pixel_counts`` and
    ``class_pixel_frequency`` count the label pixels of the training examples (augmented
    copies included); ``band_mean`` and ``band_std`` are per band over the raw pixels of
    the unaugmented training examples. ``config`` is the building config as a dict.
    """

    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    res_unet_version: str
    created: str  # ISO 8601, UTC, to the second
    content_hash: str  # "sha256:" + digest of every shard's bytes in order, then the config
    counts: dict[str, SplitCounts]
    files: dict[str, list[str]]
    label_files: dict[str, list[str | None]]
    images_dir: str
    labels_dir: str
    empty_tiles_dropped: int
    class_pixel_counts: list[int]
    class_pixel_frequency: list[float]
    band_mean: list[float]
    band_std: list[float]
    n_bands: int
    n_label_classes: int
    nclasses: int
    target_size: list[int]
    dtype: str  # "uint8" or "uint16"
    fit_mode: str
    downsample: int = 1  # absent from datasets made before DOWNSAMPLE existed
    compression: str | None  # "GZIP" or None
    shards: dict[str, list[Shard]]
    samples_figure: str | None
    config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """The manifest as JSON-ready data (nested dataclasses as dicts)."""
        return dataclasses.asdict(self)

    def write(self, folder: Path) -> None:
        """Write ``folder``/manifest.json atomically."""
        write_atomic(folder / MANIFEST, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: Any, path: Path) -> Manifest:
        """Parse the JSON data of ``path``; raises UserError (one line, naming ``path``) for
        a file that is not a manifest, of another format version or missing a field."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UserError(f"{path}: is not a manifest written by make_tfrecords; run "
                            "make_tfrecords first")
        fix = "run make_tfrecords again with --overwrite"
        if data.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{path}: dataset format version {data.get('format_version')}, but "
                            f"this res_unet reads version {FORMAT_VERSION}; {fix}")
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields
                   if f.name not in data and f.default is dataclasses.MISSING]
        if missing:
            raise UserError(f"{path}: the manifest has no {', '.join(missing)}; {fix}")
        values = {f.name: data[f.name] for f in fields if f.name in data}
        try:
            values["counts"] = {s: SplitCounts(**data["counts"][s]) for s in SPLITS}
            values["shards"] = {s: [Shard(**shard) for shard in data["shards"][s]]
                                for s in SPLITS}
        except (KeyError, TypeError) as exc:
            raise UserError(f"{path}: damaged counts or shards in the manifest ({exc}); "
                            f"{fix}") from None
        return cls(**values)


# Reading a dataset ---------------------------------------------------------------------

def read_manifest(dataset_dir: str | os.PathLike) -> Manifest:
    """The manifest of a dataset folder, after checking that every listed shard exists.

    Raises UserError when the folder is not a complete dataset made by make_tfrecords, or
    one of another format version.
    """
    folder = Path(dataset_dir)
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder}: is not a dataset made by make_tfrecords (no {MANIFEST}); "
                        "run make_tfrecords first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable manifest ({exc}); run make_tfrecords again with "
                        "--overwrite") from None
    manifest = Manifest.from_dict(data, path)
    for split in SPLITS:
        for shard in manifest.shards[split]:
            if not (folder / shard.file).is_file():
                raise UserError(f"{folder / shard.file}: shard listed in {MANIFEST} is "
                                "missing; run make_tfrecords again with --overwrite")
    return manifest


def verify_shards(dataset_dir: str | os.PathLike, manifest: Manifest) -> None:
    """Check every shard against the SHA-256 the manifest recorded for it (about 1 s per
    500 MB); raises UserError naming the first damaged or changed shard."""
    folder = Path(dataset_dir)
    for split in SPLITS:
        for shard in manifest.shards[split]:
            if shard.sha256 is None:  # datasets made before shards were hashed
                continue
            path = folder / shard.file
            if _file_sha256(path, hashlib.sha256()) != shard.sha256:
                raise UserError(f"{path}: shard is damaged or changed since make_tfrecords "
                                f"wrote it (its checksum differs from {MANIFEST}); rebuild "
                                "the dataset with make_tfrecords --overwrite")


def _shard_paths(folder: Path, manifest: Manifest, split: str) -> list[str]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [str(folder / s.file) for s in manifest.shards[split]]


def read_examples(dataset_dir: str | os.PathLike,
                  split: str) -> Iterator[tuple[np.ndarray, np.ndarray, dict[str, Any]]]:
    """Every example of a split in shard order, as numpy: (image (H, W, B) uint8/uint16,
    label (H, W) uint8, meta {stem, row, col, copy}). For tests and evaluation.

    Raises UserError at once (not on first iteration) when the folder is not a dataset.
    """
    import tensorflow as tf

    folder = Path(dataset_dir)
    manifest = read_manifest(folder)
    files = _shard_paths(folder, manifest, split)
    records = tf.data.TFRecordDataset(tf.constant(files, dtype=tf.string),
                                      compression_type=manifest.compression or "")
    return (parse_example(record) for record in records.as_numpy_iterator())


def load_dataset(dataset_dir: str | os.PathLike, split: str, batch_size: int,
                 shuffle: bool = True, flips: bool = False, repeat: bool = False,
                 cache: bool = False, seed: int | None = None) -> Any:
    """A ``tf.data.Dataset`` of batches (image, label) for training or evaluation.

    image: float32 (batch, H, W, B) raw pixel values (the model normalises). label: float32
    (batch, H, W, 1) 0/1 for binary datasets (NCLASSES=1), one-hot (batch, H, W, N)
    otherwise; an empty split gives an empty dataset. Without ``shuffle`` examples come in
    shard order; with it shards are read interleaved in parallel and shuffled, and so are
    examples (buffer of about 128 MB). ``flips`` applies the same random horizontal and
    vertical flips to image and label; ``cache`` keeps the decompressed records in memory
    after the first pass; ``repeat`` repeats forever and drops the last incomplete batch.
    """
    import tensorflow as tf

    folder = Path(dataset_dir)
    manifest = read_manifest(folder)
    files = _shard_paths(folder, manifest, split)
    h, w = manifest.target_size
    bands, n_classes = manifest.n_bands, manifest.n_label_classes
    binary = manifest.nclasses == 1
    dtype = tf.uint8 if manifest.dtype == "uint8" else tf.uint16
    compression = manifest.compression or ""
    count = manifest.counts[split].examples
    autotune = tf.data.AUTOTUNE

    # An empty split (no validation) gives an empty dataset, not an error.
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(files, dtype=tf.string))
    if shuffle and files:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
        ds = ds.interleave(lambda f: tf.data.TFRecordDataset(f, compression_type=compression),
                           cycle_length=min(len(files), 8), num_parallel_calls=autotune,
                           deterministic=seed is not None)
    else:
        # Unshuffled data comes in shard order, like read_examples (evaluation, figures).
        ds = ds.flat_map(lambda f: tf.data.TFRecordDataset(f, compression_type=compression))
    if cache:
        ds = ds.cache()
    if shuffle:
        example_bytes = h * w * (bands * np.dtype(manifest.dtype).itemsize + 1)
        buffer = int(min(count, max(4 * batch_size, _SHUFFLE_BYTES // example_bytes)))
        ds = ds.shuffle(max(buffer, 1), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    spec = {"image": tf.io.FixedLenFeature([], tf.string),
            "label": tf.io.FixedLenFeature([], tf.string)}

    def decode(record: Any) -> tuple[Any, Any]:
        parsed = tf.io.parse_single_example(record, spec)
        image = tf.reshape(tf.io.decode_raw(parsed["image"], dtype, little_endian=True),
                           [h, w, bands])
        label = tf.reshape(tf.io.decode_raw(parsed["label"], tf.uint8), [h, w])
        if binary:
            label = tf.cast(label, tf.float32)[..., None]
        else:
            label = tf.one_hot(tf.cast(label, tf.int32), n_classes, dtype=tf.float32)
        return tf.cast(image, tf.float32), label

    def flip(image: Any, label: Any) -> tuple[Any, Any]:
        both = tf.concat([image, label], axis=-1)
        # Different op seeds: equal ones would make the two flips always coincide.
        both = tf.image.random_flip_left_right(both, seed=seed)
        both = tf.image.random_flip_up_down(both, seed=None if seed is None else seed + 1)
        return both[..., :bands], both[..., bands:]

    ds = ds.map(decode, num_parallel_calls=autotune)
    if flips:
        ds = ds.map(flip, num_parallel_calls=autotune)
    ds = ds.batch(batch_size, drop_remainder=repeat, num_parallel_calls=autotune)
    return ds.prefetch(autotune)


def dataset_summary(manifest: Manifest, out_dir: str | os.PathLike) -> str:
    """A few lines for the user: examples and sources per split, shards, where things are."""
    out = Path(out_dir)
    lines = []
    for split in SPLITS:
        counts = manifest.counts[split]
        lines.append(f"{split:>10}: {counts.examples} examples from {counts.images} images "
                     f"in {len(manifest.shards[split])} shards")
    if manifest.empty_tiles_dropped:
        lines.append(f"{'':>10}  ({manifest.empty_tiles_dropped} empty training tiles "
                     "dropped)")
    freq = ", ".join(f"{f:.3f}" for f in manifest.class_pixel_frequency)
    lines.append(f"class pixel frequency (train): {freq}")
    lines.append(f"manifest: {out / MANIFEST}")
    if manifest.samples_figure:
        lines.append(f"samples:  {out / manifest.samples_figure}")
    return "\n".join(lines)

