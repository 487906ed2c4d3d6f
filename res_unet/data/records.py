"""The TFRecord dataset format, and the readers training and evaluation use.

Why this module is long: the example codec, the shard writer, the manifest and the tf.data
reader are one format and must agree byte for byte, so they live together.

A dataset folder holds shards, ``manifest.json`` (:class:`Manifest`: counts, source files,
class and band statistics, shard checksums, the building config), ``config.json`` and
``samples.png``. Datasets are built by :func:`res_unet.data.dataset.make_dataset`.

Shard format: one ``tf.train.Example`` per example with raw little-endian tensors
(``image``: H x W x B uint8 or uint16 bytes, ``label``: H x W uint8 class indices) plus
``height``, ``width``, ``bands``, ``dtype``, ``stem`` (source file stem), ``row``/``col``
(tile origin in the source image; 0, 0 in resize mode) and ``copy`` (0 = unaugmented,
k = k-th augmented copy). Shards are ``{ROOT_STRING}-{split}-{NNNNN}.tfrec``, optionally GZIP.

TensorFlow is imported inside the functions that need it, so that dataset-building worker
processes, which only use numpy, start quickly and stay small.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from res_unet.core.atomic import atomic_path, write_atomic
from res_unet.core.errors import UserError
from res_unet.core.folders import check_plain_name, loads_json, read_small_text
from res_unet.data.augment import photometric_jitter

MANIFEST = "manifest.json"
CONFIG = "config.json"
SAMPLES = "samples.png"
SPLITS = ("train", "validation")
FORMAT = "res_unet-tfrecords"
# The manifest's layout version. Bump it when the layout changes (a field renamed, removed or
# given another meaning), with an upgrade from the version before in _MANIFEST_UPGRADES.
FORMAT_VERSION = 1
SHARD_PATTERN = re.compile(r".+-(train|validation)-\d{5}\.tfrec$")
_DTYPES = ("uint8", "uint16")
# zlib level of GZIP shards: about 30% less CPU than the default (6) for about 2% larger
# files on aerial image tiles; reading speed is the same.
_GZIP_LEVEL = 1
# Serialised records queued for the background shard writer.
_WRITE_BACKLOG = 32
# Serialised examples held by the reader's shuffle buffer, in bytes.
_SHUFFLE_BYTES = 128 * 2**20


# Writing shards ------------------------------------------------------------------------

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


class RunningBandStats:
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


def file_sha256(path: Path, hasher: Any = None) -> str:
    """The file's sha256 hex digest; its bytes also go to ``hasher`` when one is given."""
    own = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**20), b""):
            own.update(block)
            if hasher is not None:
                hasher.update(block)
    return own.hexdigest()


# The manifest --------------------------------------------------------------------------

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
    sha256: str | None = None  # hex digest of its bytes; None: not recorded


@dataclass(frozen=True, kw_only=True)
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
    downsample: int = 1  # DOWNSAMPLE of the examples
    compression: str | None  # "GZIP" or None
    shards: dict[str, list[Shard]]
    samples_figure: str | None
    config: dict[str, Any]
    pixel_size_m: float | None = None  # of the examples (sources' x DOWNSAMPLE); None: unknown
    # Image files of images_dir without examples: a shared polygon layer touches none of them.
    left_out: list[str] = dataclasses.field(default_factory=list)
    # Where the labels came from (labelsource.LabelSource.record): kind ("folder" or
    # "layer"), path, layer and the label keys; None: not recorded.
    label_source: dict[str, Any] | None = None

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
        version = data.get("format_version")
        if not isinstance(version, int) or version not in _MANIFEST_UPGRADES:
            raise UserError(f"{path}: dataset format version {version}, but this res_unet "
                            f"reads version {FORMAT_VERSION}; {fix}")
        for step in range(version, FORMAT_VERSION + 1):
            data = _MANIFEST_UPGRADES[step](data)
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.name not in data
                   and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise UserError(f"{path}: the manifest has no {', '.join(missing)}; {fix}")
        values = {f.name: data[f.name] for f in fields if f.name in data}
        try:
            values["counts"] = {s: SplitCounts(**data["counts"][s]) for s in SPLITS}
            values["shards"] = {s: [Shard(**one) for one in data["shards"][s]] for s in SPLITS}
        except (KeyError, TypeError) as exc:
            raise UserError(f"{path}: damaged counts or shards in the manifest ({exc}); "
                            f"{fix}") from None
        for shard in (s for split in SPLITS for s in values["shards"][split]):
            check_plain_name(shard.file, f"{path}: shard file")  # paths stay in the folder
        return cls(**values)


def _upgrade_manifest_v1(data: dict[str, Any]) -> dict[str, Any]:
    """A version-1 manifest as this release writes version 1: the fields releases of version
    1 added get the value a manifest without them meant."""
    data = {"downsample": 1,  # built at full resolution (before DOWNSAMPLE)
            "pixel_size_m": None,  # unknown
            "left_out": [],  # no image left out
            "label_source": None,  # not recorded
            **data}
    shards = data.get("shards")
    if isinstance(shards, dict):  # shards without a checksum are not checked
        data["shards"] = {split: [{"sha256": None, **one} if isinstance(one, dict) else one
                                  for one in listed] if isinstance(listed, list) else listed
                          for split, listed in shards.items()}
    return data


# One upgrade per format version, applied in order from a manifest's own version up to
# FORMAT_VERSION: each brings a manifest written under its version (by any release) to the
# layout this release writes, and (once there is a next version) on to that one.
_MANIFEST_UPGRADES = {1: _upgrade_manifest_v1}


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
        data = loads_json(read_small_text(path, "manifest"), path, "manifest")
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
            if file_sha256(path) != shard.sha256:
                raise UserError(f"{path}: shard is damaged or changed since make_tfrecords "
                                f"wrote it (its checksum differs from {MANIFEST}); rebuild "
                                "the dataset with make_tfrecords --overwrite")


def _shard_paths(folder: Path, manifest: Manifest, split: str) -> list[str]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [str(folder / s.file) for s in manifest.shards[split]]


def load_dataset(dataset_dir: str | os.PathLike, split: str, batch_size: int,
                 shuffle: bool = True, flips: bool = False, repeat: bool = False,
                 cache: bool = False, seed: int | None = None, color: float = 0.0) -> Any:
    """A ``tf.data.Dataset`` of batches (image, label) for training or evaluation.

    image: float32 (batch, H, W, B) raw pixel values (the model normalises). label: float32
    (batch, H, W, 1) 0/1 for binary datasets (NCLASSES=1), one-hot (batch, H, W, N)
    otherwise; an empty split gives an empty dataset. Without ``shuffle`` examples come in
    shard order; with it shards are read interleaved in parallel and shuffled, and so are
    examples (buffer of about 128 MB). ``flips``: the same random flips of image and label;
    ``color`` > 0: :func:`photometric_jitter` of that strength; ``cache`` keeps the records
    in memory after the first pass; ``repeat`` repeats forever, dropping the last part batch.
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
        # Unshuffled data comes in shard order (evaluation, figures).
        ds = ds.flat_map(lambda f: tf.data.TFRecordDataset(f, compression_type=compression))
    if cache:
        ds = ds.cache()
    if shuffle:
        example_bytes = h * w * (bands * np.dtype(manifest.dtype).itemsize + 1)
        buffer = int(min(count, max(4 * batch_size, _SHUFFLE_BYTES // example_bytes)))
        ds = ds.shuffle(max(buffer, 1), seed=seed, reshuffle_each_iteration=True)
    ds = ds.repeat() if repeat else ds
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
    if color > 0:
        ds = ds.map(lambda x, y: (photometric_jitter(x, color, manifest.dtype), y),
                    num_parallel_calls=autotune)
    ds = ds.batch(batch_size, drop_remainder=repeat, num_parallel_calls=autotune)
    return ds.prefetch(autotune)


def empty_classes_warning(manifest: Manifest) -> str | None:
    """The warning (without its ``warning:`` prefix) naming the classes (IGNORE_CLASS aside)
    without a single pixel in the training examples, which the model cannot learn; None when
    every class has some."""
    ignore = manifest.config.get("IGNORE_CLASS")
    names = manifest.config.get("CLASS_NAMES") or []
    empty = [k for k, n in enumerate(manifest.class_pixel_counts) if n == 0 and k != ignore]
    if not empty:
        return None
    listed = ", ".join(f"{k} ({names[k]})" if k < len(names) else str(k) for k in empty)
    one = len(empty) == 1
    return (f"class{'' if one else 'es'} {listed} {'has' if one else 'have'} no "
            "pixels in the training examples, so the model cannot learn "
            f"{'it' if one else 'them'}; check the labels and REMAP_CLASSES (with polygon "
            "labels, pixels no polygon covers are class 0)")


def dataset_summary(manifest: Manifest, out_dir: str | os.PathLike) -> str:
    """A few lines for the user: examples and sources per split, shards, where things are."""
    out = Path(out_dir)
    lines = []
    for split in SPLITS:
        counts = manifest.counts[split]
        lines.append(f"{split:>10}: {counts.examples} examples from {counts.images} images "
                     f"in {len(manifest.shards[split])} shards")
    if manifest.empty_tiles_dropped:
        lines.append(f"{'':>10}  ({manifest.empty_tiles_dropped} empty training tiles dropped)")
    freq = ", ".join(f"{f:.3f}" for f in manifest.class_pixel_frequency)
    lines += [f"class pixel frequency (train): {freq}", f"manifest: {out / MANIFEST}"]
    if manifest.samples_figure:
        lines.append(f"samples:  {out / manifest.samples_figure}")
    return "\n".join(lines)



def example_stems(dataset_dir: str | os.PathLike, split: str) -> list[str]:
    """The source image (stem) of every example of a dataset's ``split``, in the order
    :func:`load_dataset` gives them unshuffled. Reads only the ``stem`` feature."""
    import tensorflow as tf

    manifest = read_manifest(dataset_dir)
    files = [str(Path(dataset_dir) / s.file) for s in manifest.shards[split]]
    if not files:
        return []
    spec = {"stem": tf.io.FixedLenFeature([], tf.string)}
    stems = tf.data.TFRecordDataset(tf.constant(files, dtype=tf.string),
                                    compression_type=manifest.compression or "").map(
        lambda record: tf.io.parse_single_example(record, spec)["stem"])
    return [stem.decode() for stem in stems.as_numpy_iterator()]
