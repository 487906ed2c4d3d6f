"""Tests for res_unet.data.records: the shard format, the manifest and the dataset readers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from helpers import expected_tiles, make_config, parse_example, read_examples, write_sources

from res_unet.core.errors import UserError
from res_unet.data import augment, dataset, records
from res_unet.geo.writers import write_png

# Shard format -----------------------------------------------------------------------------

@pytest.mark.parametrize(("dtype", "bands"), [("uint8", 3), ("uint16", 6)])
def test_serialize_parse_round_trip(dtype, bands):
    rng = np.random.default_rng(0)
    image = rng.integers(0, np.iinfo(dtype).max, (5, 7, bands), dtype=dtype)
    label = rng.integers(0, 4, (5, 7), dtype=np.uint8)
    record = records.serialize_example(records.Example(image, label, "stem_x", 3, 9, 2))
    assert record == records.serialize_example(records.Example(image, label, "stem_x", 3, 9, 2))
    out_image, out_label, meta = parse_example(record)
    assert out_image.dtype == dtype and np.array_equal(out_image, image)
    assert out_label.dtype == np.uint8 and np.array_equal(out_label, label)
    assert meta == {"stem": "stem_x", "row": 3, "col": 9, "copy": 2}


@pytest.mark.parametrize("compression", ["GZIP", None])
def test_shard_writer_splits_and_round_trips(tmp_path, compression):
    rng = np.random.default_rng(1)
    examples = [records.Example(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8),
                                rng.integers(0, 2, (4, 4), dtype=np.uint8), f"s{i}")
                for i in range(7)]
    with records.ShardWriter(tmp_path, "lakes", "train", 3, compression) as writer:
        for e in examples:
            writer.write(records.serialize_example(e))
    assert writer.shards == [records.Shard(f"lakes-train-0000{i}.tfrec", n)
                             for i, n in enumerate((3, 3, 1))]
    assert sorted(p.name for p in tmp_path.iterdir()) == [s.file for s in writer.shards]
    files = [str(tmp_path / s.file) for s in writer.shards]
    raw = tf.data.TFRecordDataset(files, compression_type=compression or "")
    back = [parse_example(r) for r in raw.as_numpy_iterator()]
    assert [m["stem"] for _, _, m in back] == [e.stem for e in examples]
    assert all(np.array_equal(i, e.image) and np.array_equal(lab, e.label)
               for (i, lab, _), e in zip(back, examples, strict=True))


def test_shard_writer_interrupted_leaves_only_finished_shards(tmp_path):
    record = records.serialize_example(
        records.Example(np.zeros((2, 2, 1), np.uint8), np.zeros((2, 2), np.uint8), "s"))
    with pytest.raises(KeyboardInterrupt),  \
            records.ShardWriter(tmp_path, "d", "train", 2, "GZIP") as writer:
        for _ in range(3):
            writer.write(record)
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["d-train-00000.tfrec"]


def test_band_stats_match_numpy():
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 65535, (5 + i, 3, 4), dtype=np.uint16) for i in range(4)]
    stats = records.RunningBandStats()
    for im in images:
        stats.add(im)
    mean, std = stats.result()
    flat = np.concatenate([im.reshape(-1, 4) for im in images]).astype(np.float64)
    assert np.allclose(mean, flat.mean(axis=0), rtol=1e-12)
    assert np.allclose(std, flat.std(axis=0), rtol=1e-10)


# Whole datasets: bit-exact round trip through both readers --------------------------------

@pytest.mark.parametrize("compression", ["GZIP", None])
@pytest.mark.parametrize(("dtype", "bands"), [("uint8", 3), ("uint16", 6)])
def test_dataset_round_trip_bit_exact(tmp_path, dtype, bands, compression):
    sources = write_sources(tmp_path / "src", dtype, bands)
    cfg = make_config("tiles16", N_DATA_BANDS=bands, SHARD_COMPRESSION=compression)
    manifest = dataset.make_dataset(cfg, tmp_path / "src/images", tmp_path / "src/labels",
                                    tmp_path / "ds")
    assert manifest.dtype == dtype and manifest.n_bands == bands
    assert manifest.compression == compression
    for split in records.SPLITS:
        [stem] = [Path(f).stem for f in manifest.files[split]]
        expected = expected_tiles(*sources[stem])
        got = list(read_examples(tmp_path / "ds", split))
        assert len(got) == len(expected) == manifest.counts[split].examples == 6
        assert records.example_stems(tmp_path / "ds", split) == [m["stem"] for _, _, m in got]
        for (img, lab, meta), (exp_img, exp_lab) in zip(got, expected, strict=True):
            assert img.dtype == dtype and np.array_equal(img, exp_img)
            assert np.array_equal(lab, exp_lab) and meta["stem"] == stem
        batches = list(records.load_dataset(tmp_path / "ds", split, batch_size=4,
                                            shuffle=False).as_numpy_iterator())
        assert [x.shape[0] for x, _ in batches] == [4, 2]
        images = np.concatenate([x for x, _ in batches])
        labels = np.concatenate([y for _, y in batches])
        assert images.dtype == np.float32 and labels.shape == (6, 16, 16, 1)
        assert np.array_equal(images, np.stack([e[0] for e in expected]).astype(np.float32))
        assert np.array_equal(labels[..., 0], np.stack([e[1] for e in expected]))


def test_load_dataset_one_hot_flips_repeat(tmp_path):
    rng = np.random.default_rng(3)
    (tmp_path / "src/images").mkdir(parents=True)
    (tmp_path / "src/labels").mkdir(parents=True)
    for i in range(2):
        image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        write_png(tmp_path / f"src/images/s{i}.png", image)
        # Labels are a function of the pixel, so any flip must keep them consistent.
        write_png(tmp_path / f"src/labels/s{i}.png", (image[..., 0] // 86).astype(np.uint8))
    cfg = make_config("tiles16", NCLASSES=3, VALIDATION_SPLIT=0.0)
    dataset.make_dataset(cfg, tmp_path / "src/images", tmp_path / "src/labels", tmp_path / "ds")
    plain = np.concatenate([x for x, _ in records.load_dataset(
        tmp_path / "ds", "train", 8, shuffle=False).as_numpy_iterator()])
    ds = records.load_dataset(tmp_path / "ds", "train", 3, shuffle=True, flips=True,
                              repeat=True, seed=1)
    seen = []
    for x, y in ds.take(6).as_numpy_iterator():
        assert x.shape == (3, 16, 16, 3) and y.shape == (3, 16, 16, 3)
        assert np.array_equal(y.sum(axis=-1), np.ones((3, 16, 16)))
        assert np.array_equal(y.argmax(axis=-1), x[..., 0].astype(np.uint8) // 86)
        seen.extend(x)
    flips = {"none": lambda a: a, "lr": lambda a: a[:, ::-1], "ud": lambda a: a[::-1],
             "both": lambda a: a[::-1, ::-1]}
    kinds = {kind for s in seen for kind, f in flips.items()
             if any(np.array_equal(f(s), p) for p in plain)}
    assert kinds == set(flips)  # independent left-right and up-down flips
    empty = records.load_dataset(tmp_path / "ds", "validation", 2, shuffle=False)
    assert list(empty.as_numpy_iterator()) == []
    assert list(read_examples(tmp_path / "ds", "validation")) == []
    assert records.example_stems(tmp_path / "ds", "validation") == []


def test_photometric_jitter_bounds_and_nodata():
    tf.random.set_seed(5)
    strength = 0.4
    # A constant image: contrast has no effect, so each band is the value times its gain.
    flat = np.full((8, 8, 4), 100.0, np.float32)
    flat[0, 0] = 0.0  # nodata in every band stays nodata
    flat[1, 1, 2] = 0.0  # a zero in one band only is an ordinary dark value
    gains = []
    for _ in range(200):
        out = augment.photometric_jitter(tf.constant(flat), strength, "uint8").numpy()
        assert np.array_equal(out[0, 0], np.zeros(4))
        assert np.all(out[1, 1] >= 0) and np.all(out[1, 1, [0, 1, 3]] > 0)
        gains.append(out[4, 4] / 100.0)
        assert np.all((out >= 0) & (out <= 255))
    gains = np.array(gains)
    # The nodata pixel stays out of the mean: a flat image's valid pixels keep equal values.
    assert np.allclose(out[2:, 2:], out[4, 4], rtol=1e-5)
    log = np.log(gains[np.all(gains < 2.55, axis=1)])  # unclipped draws
    assert np.abs(log).max() <= 1.25 * strength + 1e-5
    assert log.std() > 0.15  # brightness varies from draw to draw ...
    assert np.abs(log - log.mean(axis=1, keepdims=True)).max() > 0.02  # ... and so does tint
    # Contrast about the mean: the mean moves only with the gain, the spread with both.
    two = np.zeros((8, 8, 1), np.float32) + 60.0
    two[:4] = 140.0
    contrasts = []
    for _ in range(100):
        out = augment.photometric_jitter(tf.constant(two), strength, "uint16").numpy()
        contrasts.append((np.ptp(out) / 80.0) / (out.mean() / 100.0))
    assert np.abs(np.log(contrasts)).max() <= strength / 2 + 1e-4
    assert min(contrasts) < 0.92 and max(contrasts) > 1.08
    # Clipped to the stored type's range.
    bright = np.full((4, 4, 3), 250.0, np.float32)
    outs = [augment.photometric_jitter(tf.constant(bright), 1.0, "uint8").numpy()
            for _ in range(20)]
    assert max(o.max() for o in outs) == 255.0


def test_load_dataset_color_jitters_images_not_labels(tmp_path):
    rng = np.random.default_rng(4)
    (tmp_path / "src/images").mkdir(parents=True)
    (tmp_path / "src/labels").mkdir(parents=True)
    image = rng.integers(1, 255, (16, 16, 3), dtype=np.uint8)
    write_png(tmp_path / "src/images/s.png", image)
    write_png(tmp_path / "src/labels/s.png", (image[..., 0] > 128).astype(np.uint8))
    cfg = make_config("tiles16", NCLASSES=1, VALIDATION_SPLIT=0.0, DO_AUG=False)
    dataset.make_dataset(cfg, tmp_path / "src/images", tmp_path / "src/labels", tmp_path / "ds")
    (plain, label), = records.load_dataset(tmp_path / "ds", "train", 1,
                                           shuffle=False).as_numpy_iterator()
    ds = records.load_dataset(tmp_path / "ds", "train", 1, shuffle=True, repeat=True, seed=2,
                              color=0.5)
    seen = list(ds.take(4).as_numpy_iterator())
    for x, y in seen:
        assert np.array_equal(y, label) and not np.array_equal(x, plain)
        assert x.min() >= 0 and x.max() <= 255
    assert not np.array_equal(seen[0][0], seen[1][0])  # fresh draws every time


def test_read_manifest_refuses_non_datasets(tmp_path):
    with pytest.raises(UserError, match="run make_tfrecords first"):
        records.read_manifest(tmp_path)
    with pytest.raises(UserError, match="is not a dataset made by make_tfrecords"):
        records.load_dataset(tmp_path, "train", batch_size=1)
    sources = tmp_path / "src"
    write_sources(sources, "uint8", 3)
    dataset.make_dataset(make_config("tiles16"), sources / "images", sources / "labels",
                         tmp_path / "ds")
    manifest = json.loads((tmp_path / "ds/manifest.json").read_text())
    (tmp_path / "ds" / manifest["shards"]["train"][0]["file"]).unlink()
    with pytest.raises(UserError, match="missing"):
        records.read_manifest(tmp_path / "ds")


MANIFEST_KEYS = [
    "format", "format_version", "res_unet_version", "created", "content_hash", "counts",
    "files", "label_files", "images_dir", "labels_dir", "empty_tiles_dropped",
    "class_pixel_counts", "class_pixel_frequency", "band_mean", "band_std", "n_bands",
    "n_label_classes", "nclasses", "target_size", "dtype", "fit_mode", "downsample",
    "compression", "shards", "samples_figure", "config", "pixel_size_m", "left_out",
    "label_source"]


def test_manifest_file_is_the_typed_manifest(tmp_path):
    """manifest.json keeps its keys and their order, and reads back to the same JSON."""
    sources = tmp_path / "src"
    write_sources(sources, "uint8", 3)
    built = dataset.make_dataset(make_config("tiles16"), sources / "images", sources / "labels",
                                 tmp_path / "ds")
    text = (tmp_path / "ds/manifest.json").read_text()
    data = json.loads(text)
    assert list(data) == MANIFEST_KEYS
    assert list(data["counts"]["train"]) == ["images", "examples", "unaugmented"]
    assert list(data["shards"]["train"][0]) == ["file", "count", "sha256"]
    assert data["label_source"] == {
        "kind": "folder", "path": str((sources / "labels").resolve()), "layer": None,
        "USEMASK": False, "NCLASSES": 1, "CLASS_NAMES": [], "REMAP_CLASSES": {},
        "IGNORE_CLASS": None, "LABEL_ATTRIBUTE": None, "LABEL_LAYER": None,
        "LABEL_PRIORITY": []}
    manifest = records.read_manifest(tmp_path / "ds")
    assert manifest == built
    assert json.dumps(manifest.to_dict(), indent=2) + "\n" == text


def test_manifest_of_another_version_or_missing_a_field_is_refused(tmp_path):
    sources = tmp_path / "src"
    write_sources(sources, "uint8", 3)
    dataset.make_dataset(make_config("tiles16"), sources / "images", sources / "labels",
                         tmp_path / "ds")
    path = tmp_path / "ds/manifest.json"
    good = json.loads(path.read_text())

    def read_with(drop=(), **changes):
        data = {k: v for k, v in {**good, **changes}.items() if k not in drop}
        path.write_text(json.dumps(data))
        return records.read_manifest(tmp_path / "ds")

    with pytest.raises(UserError, match=r"manifest.json: dataset format version 2, but this "
                                        r"res_unet reads version 1; run make_tfrecords again "
                                        r"with --overwrite$"):
        read_with(format_version=2)
    with pytest.raises(UserError, match=r"manifest.json: the manifest has no band_mean, "
                                        r"n_bands; run make_tfrecords again with --overwrite$"):
        read_with(drop=("band_mean", "n_bands"))
    with pytest.raises(UserError, match="damaged counts or shards"):
        read_with(counts={"train": {"images": 1}})
    # Datasets made before DOWNSAMPLE, shard checksums or left_out existed still read.
    unhashed = {s: [{"file": x["file"], "count": x["count"]} for x in good["shards"][s]]
                for s in records.SPLITS}
    old = read_with(drop=("downsample", "left_out"), shards=unhashed)
    assert old.downsample == 1 and old.shards["train"][0].sha256 is None
    assert old.left_out == []
    records.verify_shards(tmp_path / "ds", old)


def test_the_version_1_manifest_upgrade_fills_only_what_is_absent():
    """Manifests written by releases of version 1 before a field existed read with the value
    its absence meant; present values are kept."""
    assert sorted(records._MANIFEST_UPGRADES) == list(range(1, records.FORMAT_VERSION + 1))
    old = {"format_version": 1, "shards": {"train": [{"file": "a", "count": 2}],
                                           "validation": []}}
    new = records._MANIFEST_UPGRADES[1](old)
    assert new == {"downsample": 1, "pixel_size_m": None, "left_out": [],
                   "label_source": None, "format_version": 1,
                   "shards": {"train": [{"sha256": None, "file": "a", "count": 2}],
                              "validation": []}}
    assert "sha256" not in old["shards"]["train"][0]
    kept = records._MANIFEST_UPGRADES[1]({"downsample": 2, "left_out": ["x.tif"],
                                          "shards": {"train": [{"sha256": "ab"}]}})
    assert (kept["downsample"], kept["left_out"], kept["shards"]["train"][0]["sha256"]) == (
        2, ["x.tif"], "ab")
