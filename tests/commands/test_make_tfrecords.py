"""End-to-end tests of the make_tfrecords command: outputs, manifest, safety, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import read_examples, shared_data

from res_unet.cli import run_command
from res_unet.config.keys import config_from_dict, load_config
from res_unet.core.errors import UserError
from res_unet.data import dataset, records
from res_unet.data.pairing import find_pairs, load_pair
from res_unet.demo import make_demo_dataset
from res_unet.geo.tiling import resize_to_fit, tile_grid
from res_unet.geo.writers import write_png
from res_unet.make_tfrecords import main

DEMO_CONFIG = {"TARGET_SIZE": [64, 64], "AUG_COPIES": 2, "IMS_PER_SHARD": 8,
               "VALIDATION_SPLIT": 0.25, "SEED": 3}
FAST_CONFIG = {"TARGET_SIZE": [32, 32], "DO_AUG": False, "DOPLOT": False,
               "IMS_PER_SHARD": 2, "VALIDATION_SPLIT": 0.5}


def write_config(path: Path, values: dict) -> Path:
    path.write_text(json.dumps(values))
    return path


def argv(config: Path, images: Path, labels: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(config), "--images", str(images), "--labels", str(labels),
            "--out", str(out), *extra]


def folder_digest(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file below ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def partial_dirs(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(".") and "partial-" in p.name]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """12 synthetic 64x64 scenes built into a dataset with one worker."""
    root = tmp_path_factory.mktemp("demo")
    images, labels = make_demo_dataset(root / "data", 12, size=(64, 64), seed=1)
    config = write_config(root / "config.json", DEMO_CONFIG)
    assert main(argv(config, images, labels, root / "ds")) == 0
    return {"root": root, "images": images, "labels": labels, "config": config,
            "out": root / "ds", "manifest": records.read_manifest(root / "ds")}


@pytest.fixture
def small(tmp_path):
    """Four 32x40 demo scenes and a fast config (no augmentation, no figure)."""
    images, labels = make_demo_dataset(tmp_path / "data", 4, size=(32, 40), seed=2)
    config = write_config(tmp_path / "fast.json", FAST_CONFIG)
    return {"images": images, "labels": labels, "config": config, "out": tmp_path / "ds",
            "tmp": tmp_path}


# A complete run on demo data --------------------------------------------------------------

def test_demo_run_writes_dataset_and_summary(demo, capsys, tmp_path):
    out, manifest = demo["out"], demo["manifest"]
    shard_files = sorted(p.name for p in out.glob("*.tfrec"))
    listed = [s.file for split in records.SPLITS for s in manifest.shards[split]]
    assert shard_files == sorted(listed)
    assert all(re.fullmatch(r"data-(train|validation)-\d{5}\.tfrec", f) for f in listed)
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_config(out / "config.json").to_dict() == manifest.config
    train, validation = manifest.counts["train"], manifest.counts["validation"]
    assert train.images + validation.images == 12
    assert validation.images == 3
    assert train.examples == 3 * train.images  # 1 + AUG_COPIES
    assert validation.examples == validation.images
    assert [s.count for s in manifest.shards["train"]] == [8, 8, 8, 3]
    assert not set(manifest.files["train"]) & set(manifest.files["validation"])
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", manifest.content_hash)
    assert manifest.target_size == [64, 64] and manifest.dtype == "uint8"
    assert manifest.n_bands == 3 and manifest.n_label_classes == 2
    assert manifest.res_unet_version
    assert partial_dirs(demo["root"]) == []
    # The command's own summary, via the module entry point's main().
    assert main(argv(demo["config"], demo["images"], demo["labels"], tmp_path / "ds")) == 0
    printed = capsys.readouterr().out
    assert "train: 27 examples from 9 images" in printed
    assert f"manifest: {tmp_path / 'ds' / 'manifest.json'}" in printed
    assert "samples.png" in printed


def test_manifest_statistics_match_the_examples(demo):
    manifest = demo["manifest"]
    train = list(read_examples(demo["out"], "train"))
    assert len(train) == manifest.counts["train"].examples
    counts = sum(np.bincount(lab.ravel(), minlength=2) for _, lab, _ in train)
    assert manifest.class_pixel_counts == counts.tolist()
    assert sum(manifest.class_pixel_frequency) == pytest.approx(1.0)
    assert manifest.class_pixel_frequency == pytest.approx((counts / counts.sum()).tolist())
    originals = np.stack([img for img, _, meta in train if meta["copy"] == 0])
    assert len(originals) == manifest.counts["train"].unaugmented == 9
    flat = originals.reshape(-1, 3).astype(np.float64)
    assert manifest.band_mean == pytest.approx(flat.mean(axis=0).tolist(), rel=1e-9)
    assert manifest.band_std == pytest.approx(flat.std(axis=0).tolist(), rel=1e-9)


def test_validation_is_the_fitted_sources_unaugmented(demo):
    cfg = load_config(demo["config"])
    pairs = {p.image.name: p for p in find_pairs(demo["images"], demo["labels"])}
    val = list(read_examples(demo["out"], "validation"))
    assert [meta["stem"] + ".png" for _, _, meta in val] == demo["manifest"].files["validation"]
    for image, label, meta in val:
        source_image, source_label, _ = load_pair(pairs[meta["stem"] + ".png"],
                                                  cfg.N_DATA_BANDS, cfg.label_rules)
        assert meta["copy"] == 0
        assert np.array_equal(image, resize_to_fit(source_image, (64, 64), order=1)[0])
        assert np.array_equal(label, resize_to_fit(source_label, (64, 64), order=0)[0])


def test_two_workers_write_identical_bytes(demo, tmp_path):
    out = tmp_path / "ds2"
    assert main(argv(demo["config"], demo["images"], demo["labels"], out,
                     "--workers", "2")) == 0
    manifest = records.read_manifest(out)
    assert manifest.content_hash == demo["manifest"].content_hash
    for shard in demo["out"].glob("*.tfrec"):
        assert (out / shard.name).read_bytes() == shard.read_bytes()


def test_help_and_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "res_unet.make_tfrecords", "--help"],
                          capture_output=True, text=True, cwd=Path(__file__).parents[2],
                          timeout=60)
    assert done.returncode == 0
    assert "--overwrite" in done.stdout and "--workers" in done.stdout


# Output safety ----------------------------------------------------------------------------

def test_existing_dataset_needs_overwrite(small, capsys):
    args = argv(small["config"], small["images"], small["labels"], small["out"])
    assert main(args) == 0
    (small["out"] / "notes.txt").write_text("mine")
    before = folder_digest(small["out"])
    assert run_command(main, args) == 2
    err = capsys.readouterr().err
    assert "already holds a dataset" in err and "--overwrite" in err
    assert folder_digest(small["out"]) == before
    # With --overwrite and bigger shards the old, now surplus shards disappear.
    write_config(small["config"], dict(FAST_CONFIG, IMS_PER_SHARD=10))
    assert main([*args, "--overwrite"]) == 0
    names = sorted(p.name for p in small["out"].iterdir())
    assert names == ["config.json", "data-train-00000.tfrec", "data-validation-00000.tfrec",
                     "manifest.json", "notes.txt"]
    assert (small["out"] / "notes.txt").read_text() == "mine"
    assert records.read_manifest(small["out"]).config["IMS_PER_SHARD"] == 10


def test_out_folder_that_is_an_input_is_refused(small, capsys):
    for role in ("images", "labels"):
        args = argv(small["config"], small["images"], small["labels"], small[role])
        before = folder_digest(small[role])
        assert run_command(main, args) == 2
        err = capsys.readouterr().err
        assert f"is also the {role} folder" in err and len(err.strip().splitlines()) == 1
        assert folder_digest(small[role]) == before


def test_our_file_names_in_a_plain_folder_need_overwrite(small, capsys):
    small["out"].mkdir()
    (small["out"] / "config.json").write_text("{}")
    args = argv(small["config"], small["images"], small["labels"], small["out"])
    assert run_command(main, args) == 2
    assert "config.json" in capsys.readouterr().err
    assert (small["out"] / "config.json").read_text() == "{}"


def test_interrupted_run_leaves_no_output(small, monkeypatch):
    # Augmentation runs once per training example; interrupt after the first shard is done.
    config = write_config(small["config"], dict(FAST_CONFIG, DO_AUG=True, AUG_COPIES=1,
                                                IMS_PER_SHARD=1))
    cfg = load_config(config)
    real_augment = dataset.augment_pair
    calls = []

    def augment_then_interrupt(*args):
        calls.append([p for p in small["tmp"].glob(".ds.*partial-*/*.tfrec")
                      if not p.name.startswith(".")])  # finished shards, not temp files
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_augment(*args)

    monkeypatch.setattr(dataset, "augment_pair", augment_then_interrupt)
    sources = folder_digest(small["tmp"] / "data")
    with pytest.raises(KeyboardInterrupt):
        dataset.make_dataset(cfg, small["images"], small["labels"], small["out"])
    assert calls[-1], "the interruption should come after a finished shard"
    assert not small["out"].exists()
    assert list(small["tmp"].rglob("*.tfrec")) == [] and partial_dirs(small["tmp"]) == []
    assert list(small["tmp"].rglob("manifest.json")) == []
    assert folder_digest(small["tmp"] / "data") == sources


def test_failed_overwrite_keeps_the_old_dataset(small, monkeypatch):
    args = argv(small["config"], small["images"], small["labels"], small["out"])
    assert main(args) == 0
    before = folder_digest(small["out"])
    real_write = records.ShardWriter.write
    written = []

    def write_then_fail(self, record):
        written.append(record)
        if len(written) == 3:
            raise OSError("disk full")
        real_write(self, record)

    monkeypatch.setattr(records.ShardWriter, "write", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        main([*args, "--overwrite"])
    assert folder_digest(small["out"]) == before
    assert partial_dirs(small["tmp"]) == []
    assert records.read_manifest(small["out"]).counts["train"].examples == 2


# Tile mode --------------------------------------------------------------------------------

def test_tile_mode_counts_and_empty_tile_dropping(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    rng = np.random.default_rng(0)
    for stem in ("a", "b"):
        write_png(tmp_path / f"images/{stem}.png",
                  rng.integers(0, 255, (300, 500, 3), dtype=np.uint8))
        label = np.zeros((300, 500), np.uint8)
        label[:100, :100] = 1  # foreground in the first tile only
        write_png(tmp_path / f"labels/{stem}.png", label)
    n_tiles = len(tile_grid((300, 500), (128, 128), 0.0))
    base = dict(FAST_CONFIG, TARGET_SIZE=[128, 128], FIT_MODE="tile", TILE_OVERLAP=0.0)
    cfg = config_from_dict(base)[0]
    manifest = dataset.make_dataset(cfg, tmp_path / "images", tmp_path / "labels",
                                    tmp_path / "all")
    assert n_tiles == 12
    assert {s: c.examples for s, c in manifest.counts.items()} == {
        "train": n_tiles, "validation": n_tiles}
    origins = [(m["row"], m["col"]) for _, _, m in read_examples(tmp_path / "all",
                                                                         "train")]
    assert origins == tile_grid((300, 500), (128, 128), 0.0)

    cfg = config_from_dict(dict(base, MIN_FOREGROUND_FRACTION=0.1, EMPTY_TILE_KEEP=0.0))[0]
    manifest = dataset.make_dataset(cfg, tmp_path / "images", tmp_path / "labels",
                                    tmp_path / "dropped")
    assert manifest.counts["train"].examples == 1
    assert manifest.counts["validation"].examples == n_tiles
    assert manifest.empty_tiles_dropped == n_tiles - 1


# Bad input: one line naming the file, and no output ---------------------------------------

def _bad_input_case(case: str, tmp: Path) -> tuple[list[str], str]:
    """Set up one kind of bad input; returns (argv, text the error must contain)."""
    images, labels = make_demo_dataset(tmp / "data", 3, size=(32, 32), seed=4)
    values = dict(FAST_CONFIG, VALIDATION_SPLIT=0.3)
    out = tmp / "ds"
    expect = ""
    if case == "empty folder":
        for p in images.iterdir():
            p.unlink()
        expect = str(images)
    elif case == "not an image":
        (images / "demo_001.png").write_text("this is text, not a PNG")
        expect = "demo_001.png"
    elif case == "corrupt jpeg":
        jpeg = images / "demo_002.jpg"
        write_png(tmp / "tmp.png", np.zeros((32, 32, 3), np.uint8))
        from PIL import Image
        Image.open(tmp / "tmp.png").save(jpeg, format="JPEG")
        jpeg.write_bytes(jpeg.read_bytes()[:300])
        (images / "demo_002.png").unlink()
        expect = "demo_002.jpg"
    elif case == "missing label":
        (labels / "demo_001.png").unlink()
        expect = "demo_001.png"
    elif case == "wrong band count":
        values["N_DATA_BANDS"] = 4
        expect = "demo_000.png"
    elif case == "label out of range":
        write_png(labels / "demo_002.png", np.full((32, 32), 7, np.uint8))
        expect = "demo_002.png"
    elif case == "unknown validation group":
        values["VALIDATION_GROUPS"] = ["demo_007"]
        expect = "VALIDATION_GROUPS names 'demo_007'"
    elif case == "unwritable output":
        (tmp / "afile").write_text("x")
        out = tmp / "afile" / "ds"
        expect = str(out)
    config = write_config(tmp / "config.json", values)
    return argv(config, images, labels, out), expect


@pytest.mark.parametrize("case", ["empty folder", "not an image", "corrupt jpeg",
                                  "missing label", "wrong band count", "label out of range",
                                  "unknown validation group", "unwritable output"])
def test_bad_input_is_one_clear_error_and_no_output(tmp_path, capsys, case):
    args, expect = _bad_input_case(case, tmp_path)
    assert run_command(main, args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    # Every image has 3 bands: each is listed, one line per file.
    assert len(lines) == (3 if case == "wrong band count" else 1), err
    assert expect in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "ds").exists() and partial_dirs(tmp_path) == []
    assert list(tmp_path.rglob("*.tfrec")) == []


def test_all_bad_files_are_listed_before_anything_is_written(small, capsys, monkeypatch):
    write_png(small["labels"] / "demo_000.png", np.full((32, 40), 9, np.uint8))
    write_png(small["labels"] / "demo_003.png", np.full((32, 40), 8, np.uint8))
    monkeypatch.setattr(dataset, "_staging_dir", None)  # must not be reached
    args = argv(small["config"], small["images"], small["labels"], small["out"])
    assert run_command(main, args) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(lines) == 2
    assert "demo_000.png" in lines[0] and "demo_003.png" in lines[1]


def test_named_validation_groups_go_to_validation(small):
    values = json.loads(small["config"].read_text())
    values.update(VALIDATION_SPLIT=0.0, VALIDATION_GROUPS=["demo_001", "demo_003"])
    config = write_config(small["config"], values)
    assert main(argv(config, small["images"], small["labels"], small["out"])) == 0
    manifest = records.read_manifest(small["out"])
    assert [Path(f).stem for f in manifest.files["validation"]] == ["demo_001", "demo_003"]
    assert "demo_001" not in {Path(f).stem for f in manifest.files["train"]}


# Real data --------------------------------------------------------------------------------

def test_lakes_subset_split_by_lake_in_tile_mode(tmp_path):
    lakes = shared_data("lakes")
    names = sorted(p.stem for p in (lakes / "images").glob("*.jpg"))[:10]
    for kind, suffix in (("images", ".jpg"), ("labels", ".png")):
        (tmp_path / kind).mkdir()
        for name in names:
            os.symlink(lakes / kind / f"{name}{suffix}", tmp_path / kind / f"{name}"
                       f"{suffix}")
    config = write_config(tmp_path / "lakes.json", {
        "TARGET_SIZE": [256, 256], "FIT_MODE": "tile", "SPLIT_GROUP_PATTERN":
        "^(.*)_s2cloudless", "VALIDATION_SPLIT": 0.3, "DO_AUG": False, "IMS_PER_SHARD": 50,
        "SHARD_COMPRESSION": None})
    assert main(argv(config, tmp_path / "images", tmp_path / "labels", tmp_path / "ds")) == 0
    manifest = records.read_manifest(tmp_path / "ds")
    lake = re.compile(r"^(.*)_s2cloudless")
    lakes = {s: {lake.match(f).group(1) for f in manifest.files[s]} for s in records.SPLITS}
    assert lakes["train"] and lakes["validation"]
    assert not lakes["train"] & lakes["validation"]
    assert sum(c.images for c in manifest.counts.values()) == 10
    assert manifest.counts["validation"].examples > manifest.counts["validation"].images
    assert 0.0 < manifest.class_pixel_frequency[1] < 0.5
    assert (tmp_path / "ds/samples.png").exists()
    assert all(p.is_symlink() for p in (tmp_path / "images").iterdir())


def test_a_dataset_folder_in_use_is_refused_and_left_alone(small, capsys):
    """Two builds into one --out at once: the second stops with one line naming the first
    (its lock is held here, as the running build would hold it) and writes nothing."""
    from res_unet.core.folders import folder_lock

    args = argv(small["config"], small["images"], small["labels"], small["out"])
    with folder_lock(small["out"], "make_tfrecords"):
        assert run_command(main, args) == 2
        err = capsys.readouterr().err
        assert f"in use by make_tfrecords (PID {os.getpid()} on " in err
        assert len(err.strip().splitlines()) == 1
        assert [p.name for p in small["out"].iterdir()] == [".res_unet.lock"]
    assert not small["out"].exists(), "the lock holder's exit leaves no empty folder"
    assert main(args) == 0
    assert not (small["out"] / ".res_unet.lock").exists()


@pytest.mark.parametrize("root", ["../outside", "/tmp/abs", "sub/dir", ".hidden"])
def test_root_string_must_be_a_plain_name(small, capsys, root):
    """ROOT_STRING names the shard files: a path in it would write outside --out."""
    write_config(small["config"], dict(FAST_CONFIG, ROOT_STRING=root))
    args = argv(small["config"], small["images"], small["labels"], small["out"])
    assert run_command(main, args) == 2
    err = capsys.readouterr().err
    assert "ROOT_STRING" in err and "must be a plain file name" in err
    assert len(err.strip().splitlines()) == 1
    assert not small["out"].exists()
    assert sorted(p.name for p in small["tmp"].iterdir()) == ["data", "fast.json"]


def test_a_manifest_naming_a_shard_outside_its_folder_is_refused(small):
    assert main(argv(small["config"], small["images"], small["labels"], small["out"])) == 0
    path = small["out"] / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["shards"]["train"][0]["file"] = "../../etc/passwd"
    path.write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"manifest.json: shard file='../../etc/passwd' must "
                                        "be a plain file name"):
        records.read_manifest(small["out"])


def test_the_manifest_records_the_pixel_size_of_the_examples(small, tmp_path, capsys):
    """GeoTIFF sources give their own pixel size, plain images the config's PIXEL_SIZE; the
    manifest records what the model will see (times DOWNSAMPLE), None when unknown."""
    import rasterio
    from rasterio.transform import from_origin

    assert main(argv(small["config"], small["images"], small["labels"], small["out"])) == 0
    assert records.read_manifest(small["out"]).pixel_size_m is None
    write_config(small["config"], dict(FAST_CONFIG, PIXEL_SIZE=40, DOWNSAMPLE=2))
    assert main(argv(small["config"], small["images"], small["labels"], tmp_path / "p")) == 0
    assert records.read_manifest(tmp_path / "p").pixel_size_m == 80.0
    geo = tmp_path / "geo"
    (geo / "images").mkdir(parents=True)
    (geo / "labels").mkdir()
    rules = config_from_dict(FAST_CONFIG)[0].label_rules
    for k, pair in enumerate(find_pairs(small["images"], small["labels"])):
        image = load_pair(pair, 3, rules)[0]
        pixel = 3.0 if k == 0 else 2.0  # one odd image out
        with rasterio.open(geo / "images" / f"{pair.stem}.tif", "w", driver="GTiff",
                           height=image.shape[0], width=image.shape[1], count=3,
                           dtype="uint8", crs="EPSG:32633",
                           transform=from_origin(5e5, 4.2e6, pixel, pixel)) as dst:
            dst.write(np.moveaxis(image, -1, 0))
        (geo / "labels" / pair.label.name).write_bytes(pair.label.read_bytes())
    write_config(small["config"], FAST_CONFIG)
    capsys.readouterr()
    assert main(argv(small["config"], geo / "images", geo / "labels", tmp_path / "g")) == 0
    assert records.read_manifest(tmp_path / "g").pixel_size_m == 2.0
    assert "1 training images are not at the median pixel size of 2 m" in capsys.readouterr().err


def test_max_image_pixels_stops_images_too_large_to_read_whole(small, capsys):
    """MAX_IMAGE_PIXELS reaches every image read: below the demo scenes' 40 x 32 px, each
    is named with the fix, nothing is written; at their size the dataset builds."""
    config = write_config(small["tmp"] / "limit.json", dict(FAST_CONFIG, MAX_IMAGE_PIXELS=1279))
    args = argv(config, small["images"], small["labels"], small["out"])
    assert run_command(main, args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "demo_" in line]
    assert len(err) == 4, err
    assert all("40x32 px (3 bands) is more than can be decoded at once (1279 px, "
               "MAX_IMAGE_PIXELS); convert it to a tiled GeoTIFF" in line for line in err)
    assert not small["out"].exists()
    write_config(config, dict(FAST_CONFIG, MAX_IMAGE_PIXELS=1280))
    assert main(args) == 0
