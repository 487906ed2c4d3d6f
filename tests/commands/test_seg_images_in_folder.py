"""End-to-end tests of the seg_images_in_folder command on tiny run folders."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from helpers import BAND_MEAN, BAND_STD, make_config, pixel_model, pixel_prob, write_run
from rasterio.crs import CRS
from rasterio.transform import from_origin

from res_unet.cli import run_command
from res_unet.data import pairing
from res_unet.geo import rasters, writers
from res_unet.seg_images_in_folder import main

BRIGHT, DARK = 200, 50  # the pixel model says foreground (p 0.97) / background (p 0.02)


def seg(*args: str) -> int:
    return run_command(main, [*map(str, args), "--no-progress"])


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A binary run folder whose model is p = sigmoid(0.05 (band0 - 128)), threshold 0.3."""
    return write_run(tmp_path_factory.mktemp("runs") / "run", pixel_model(), make_config("model"),
                     threshold=0.3)


def half_image(h: int, w: int, split: int) -> np.ndarray:
    """Bright (foreground) columns < split, dark after."""
    img = np.full((h, w, 3), DARK, np.uint8)
    img[:, :split] = BRIGHT
    return img


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    writers.write_png(folder / "a.png", half_image(32, 32, 16))
    writers.write_png(folder / "b.png", half_image(70, 90, 30))
    rng = np.random.default_rng(0)
    writers.write_png(folder / "c.png", rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    return folder


def no_temp_files(folder: Path) -> bool:
    """No hidden file but the records of finished images (.NAME.segmented), no .tmp."""
    return not [p for p in folder.rglob("*") if (p.name.startswith(".")
                and not p.name.endswith(".segmented")) or ".tmp" in p.name]


def test_segments_every_image(run, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert seg("--model", run, "--images", images, "--out", out) == 0
    for stem, shape in (("a", (32, 32)), ("b", (70, 90)), ("c", (40, 50))):
        label = rasters.read_label(out / f"{stem}_predseg.png")
        overlay, _ = rasters.read_image(out / f"{stem}_overlay.png")
        assert label.shape == shape and overlay.shape == (*shape, 3)
        image, _ = rasters.read_image(images / f"{stem}.png")
        np.testing.assert_array_equal(label, pixel_prob(image)[..., 0] >= 0.3)
    assert not (out / "a_predseg.tif").exists()
    config = json.loads((out / "segmentation_config.json").read_text())
    assert config["threshold"] == 0.3 and config["models"][0]["run_dir"] == str(run.resolve())
    out_text, err = capsys.readouterr()
    assert "3 done, 0 skipped" in out_text
    assert "%" not in err and "\r" not in err, "--no-progress: no progress line or bar"
    assert no_temp_files(out)


def test_progress_in_a_log_is_plain_lines(run, images, tmp_path, capsys):
    """stderr not a terminal: progress lines at --progress-interval, no carriage return;
    the summary stays on stdout."""
    from res_unet.core import progress

    try:
        assert run_command(main, ["--model", str(run), "--images", str(images), "--out",
                                  str(tmp_path / "out"), "--progress-interval", "1e-6"]) == 0
    finally:
        progress.configure()
    out, err = capsys.readouterr()
    assert "\r" not in err and "%" not in out and "3 done, 0 skipped" in out
    assert [line.split(" [")[0] for line in err.splitlines() if "%" in line] == [
        "progress: 33% 1/3", "progress: 67% 2/3", "progress: 100% 3/3"]


def test_threshold_out_of_range_names_the_flag(run, images, tmp_path, capsys):
    assert seg("--model", run, "--images", images, "--out", tmp_path / "o",
               "--threshold", "2.0") == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: command line: argument --threshold: 2.0 must be between 0 and 1 "
                   "(or 'otsu') (see seg_images_in_folder --help)")


def test_threshold_flag_overrides_card(run, images, tmp_path):
    out = tmp_path / "out"
    assert seg("--model", run, "--images", images, "--out", out, "--threshold", "0.9") == 0
    image, _ = rasters.read_image(images / "c.png")
    label = rasters.read_label(out / "c_predseg.png")
    np.testing.assert_array_equal(label, pixel_prob(image)[..., 0] >= 0.9)
    assert json.loads((out / "segmentation_config.json").read_text())["threshold"] == 0.9


def test_geotiff_round_trip(run, tmp_path):
    folder = tmp_path / "geo"
    folder.mkdir()
    img = half_image(48, 64, 20)
    img[:5] = 0  # nodata rows
    transform = from_origin(500000.0, 4200000.0, 10.0, 10.0)
    with rasterio.open(folder / "scene.tif", "w", driver="GTiff", height=48, width=64, count=3,
                       dtype="uint8", crs="EPSG:32633", transform=transform, nodata=0) as ds:
        ds.write(np.moveaxis(img, -1, 0))
    out = tmp_path / "out"
    assert seg("--model", run, "--images", folder, "--out", out, "--save-probs",
               "--geojson") == 0
    with rasterio.open(out / "scene_predseg.tif") as ds:
        assert ds.crs == CRS.from_epsg(32633)
        assert ds.transform == transform
        assert ds.nodata == 255
        label = ds.read(1)
    assert np.all(label[:5] == 255)
    np.testing.assert_array_equal(label[5:, :20], 1)
    np.testing.assert_array_equal(label[5:, 20:], 0)
    np.testing.assert_array_equal(rasters.read_label(out / "scene_predseg.png"), label)
    with rasterio.open(out / "scene_probs.tif") as ds:
        assert ds.dtypes[0] == "float32" and ds.crs == CRS.from_epsg(32633)
        probs = ds.read(1)
    assert np.all(np.isnan(probs[:5])) and np.all(probs[5:, :20] > 0.9)
    polygons = json.loads((out / "scene_predseg.geojson").read_text())
    assert len(polygons["features"]) == 1
    assert polygons["features"][0]["properties"]["area_px"] == 43 * 20
    assert "crs" not in polygons  # RFC 7946: WGS 84 longitude/latitude (UTM 33N is 9-21 E)
    ring = np.array(polygons["features"][0]["geometry"]["coordinates"][0])
    assert 14 < ring[:, 0].min() < ring[:, 0].max() < 16 and 37 < ring[:, 1].min() < 38.5
    assert polygons["features"][0]["properties"]["area_m2"] == 43 * 20 * 100.0
    assert no_temp_files(out)


def test_nodata_zero_flag(run, tmp_path):
    folder = tmp_path / "images"
    img = half_image(40, 40, 20)
    img[30:, 30:] = 0
    writers.write_png(folder / "z.png", img)
    out = tmp_path / "out"
    assert seg("--model", run, "--images", folder, "--out", out, "--nodata-zero") == 0
    label = rasters.read_label(out / "z_predseg.png")
    assert np.all(label[30:, 30:] == 255) and np.all(label[:30, 20:] == 0)


def test_resume_skips_done_images_and_overwrite_redoes_them(run, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert seg("--model", run, "--images", images, "--out", out) == 0
    old = 1_000_000_000
    for path in out.glob("*.png"):
        os.utime(path, (old, old))
    capsys.readouterr()
    assert seg("--model", run, "--images", images, "--out", out) == 0
    assert "0 done, 3 skipped" in capsys.readouterr().out
    assert all(p.stat().st_mtime == old for p in out.glob("*.png"))
    (out / "b_overlay.png").unlink()
    assert seg("--model", run, "--images", images, "--out", out) == 0
    assert "1 done, 2 skipped" in capsys.readouterr().out
    assert (out / "b_predseg.png").stat().st_mtime != old
    assert (out / "a_predseg.png").stat().st_mtime == old
    assert seg("--model", run, "--images", images, "--out", out, "--overwrite") == 0
    assert "3 done, 0 skipped" in capsys.readouterr().out
    assert all(p.stat().st_mtime != old for p in out.glob("*.png"))


def test_resume_refuses_outputs_of_another_model_or_setting(run, images, tmp_path, capsys):
    """Re-running into a folder made by another model (or threshold) would skip its images
    and score the old masks as the new model's: it stops with one line instead, and
    --overwrite redoes every image with the new model."""
    out = tmp_path / "out"
    assert seg("--model", run, "--images", images, "--out", out) == 0
    before = {p.name: p.read_bytes() for p in out.glob("*.png")}
    other = write_run(tmp_path / "other", pixel_model(gain=-0.05), make_config("model"),
                      threshold=0.3)
    capsys.readouterr()
    assert seg("--model", other, "--images", images, "--out", out) == 2
    err = capsys.readouterr().err
    assert "holds segmentations made with other model weights" in err
    assert "pass --overwrite" in err and len(err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == before
    assert seg("--model", run, "--images", images, "--out", out, "--threshold", "0.6") == 2
    assert "with other threshold" in capsys.readouterr().err
    assert seg("--model", other, "--images", images, "--out", out, "--overwrite") == 0
    assert "3 done, 0 skipped" in capsys.readouterr().out
    # the inverted model marks the dark half: the masks really are the new model's
    label = rasters.read_label(out / "a_predseg.png")
    assert np.all(label[:, 16:] == 1) and np.all(label[:, :16] == 0)
    assert seg("--model", other, "--images", images, "--out", out) == 0
    assert "0 done, 3 skipped" in capsys.readouterr().out


def test_corrupt_image_is_skipped_and_others_written(run, images, tmp_path, capsys):
    (images / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    out = tmp_path / "out"
    assert seg("--model", run, "--images", images, "--out", out) == 1
    captured = capsys.readouterr()
    failed = [line for line in captured.err.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "bad.png" in failed[0]
    assert "3 done, 0 skipped (already done), 1 failed" in captured.out
    assert all((out / f"{s}_predseg.png").exists() for s in "abc")
    assert not list(out.glob("bad_*"))
    assert no_temp_files(out)


def test_band_mismatch_is_a_failure_for_that_file(run, images, tmp_path, capsys):
    writers.write_png(images / "grey.png", np.full((40, 40), 100, np.uint8))
    assert seg("--model", run, "--images", images, "--out", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "grey.png: 1 band found but the model takes 3 bands (as it was trained)" in err
    assert "N_DATA_BANDS" not in err, "a trained model's band count cannot be configured"


def test_image_of_another_bit_depth_is_refused(run, images, tmp_path, capsys):
    """The run was trained on 8-bit imagery: a 16-bit scene is not segmented into
    confident nonsense but fails with the fix; the 8-bit ones are still done."""
    import tifffile

    tifffile.imwrite(images / "wide.tif", np.full((40, 40, 3), 3000, np.uint16))
    out = tmp_path / "out"
    assert seg("--model", run, "--images", images, "--out", out) == 1
    captured = capsys.readouterr()
    assert "wide.tif: 16-bit (uint16) image but the model was trained on 8-bit (uint8)" in (
        captured.err)
    assert "3 done" in captured.out and not list(out.glob("wide_*"))


def test_label_of_another_size_leaves_that_image_unscored(run, images, tmp_path, capsys):
    """The image is segmented (its mask is written); only its score is missing, and the
    summary says so instead of counting it both done and failed."""
    labels = tmp_path / "labels"
    writers.write_png(labels / "a.png", np.zeros((32, 32), np.uint8))
    writers.write_png(labels / "b.png", np.zeros((10, 10), np.uint8))  # image is 90x70
    writers.write_png(labels / "c.png", np.zeros((40, 50), np.uint8))
    out = tmp_path / "out"
    assert seg("--model", run, "--images", images, "--labels", labels, "--out", out) == 1
    captured = capsys.readouterr()
    unscored = [line for line in captured.err.splitlines() if line.startswith("not scored:")]
    assert len(unscored) == 1 and not [line for line in captured.err.splitlines()
                                       if line.startswith("failed:")]
    assert "b.png: label size 10x10 (WxH)" in unscored[0] and "(90x70)" in unscored[0]
    assert "3 done, 0 skipped (already done), 0 failed, 1 not scored" in captured.out
    assert (out / "b_predseg.png").exists()
    with open(out / "scores.csv") as fh:
        assert [row["image"] for row in csv.DictReader(fh)] == ["a", "c", "ALL"]


def test_shards_are_disjoint_and_complete(run, images, tmp_path):
    outs = []
    for i in range(2):
        out = tmp_path / f"out{i}"
        assert seg("--model", run, "--images", images, "--out", out, "--shard", f"{i}/2") == 0
        outs.append({p.name for p in out.glob("*_predseg.png")})
    assert outs[0].isdisjoint(outs[1])
    assert outs[0] | outs[1] == {"a_predseg.png", "b_predseg.png", "c_predseg.png"}
    assert seg("--model", run, "--images", images, "--out", tmp_path / "x", "--shard",
               "2/2") == 2


@pytest.mark.slow
def test_two_shard_processes_into_one_folder_equal_one_process(run, tmp_path):
    """Two processes (as two SLURM array tasks would) write --shard 0/2 and 1/2 into one
    folder at the same time: the outputs equal those of one process, byte for byte."""
    import forked

    images, labels = tmp_path / "images", tmp_path / "labels"
    rng = np.random.default_rng(5)
    for k in range(5):
        image = half_image(40 + 8 * k, 48, 8 + 4 * k)
        image[..., 1] = rng.integers(0, 256, image.shape[:2])
        writers.write_png(images / f"s{k}.png", image)
        writers.write_png(labels / f"s{k}.png", (image[..., 0] == BRIGHT).astype(np.uint8))
    args = ["--model", str(run), "--images", str(images), "--labels", str(labels),
            "--no-progress"]
    command = ["-m", "res_unet.seg_images_in_folder", *args]
    procs = [forked.start([*command, "--out", str(tmp_path / "both"), "--shard", f"{i}/2"])
             for i in range(2)]
    for proc in procs:
        assert proc.wait(600) == 0, proc.output()[1]
    assert seg(*args, "--out", tmp_path / "one") == 0
    one, both = tmp_path / "one", tmp_path / "both"
    outputs = sorted(p.name for p in one.glob("s*_*.png"))
    assert len(outputs) == 10 and outputs == sorted(p.name for p in both.glob("s*_*.png"))
    for name in outputs:
        assert (one / name).read_bytes() == (both / name).read_bytes(), name

    def rows(path: Path) -> dict[str, dict[str, str]]:
        with open(path) as fh:
            return {row["image"]: row for row in csv.DictReader(fh) if row["image"] != "ALL"}

    merged = {**rows(both / "scores_shard0of2.csv"), **rows(both / "scores_shard1of2.csv")}
    assert merged == rows(one / "scores.csv")
    assert no_temp_files(both)


def write_scene_tif(path: Path, image: np.ndarray, nodata: float | None = 0) -> None:
    """A tiled, compressed, georeferenced GeoTIFF, as orthomosaics come."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", height=image.shape[0],
                       width=image.shape[1], count=image.shape[2], dtype=image.dtype.name,
                       crs="EPSG:32633", transform=from_origin(5e5, 4.2e6, 0.5, 0.5),
                       nodata=nodata, tiled=True, blockxsize=64, blockysize=64,
                       compress="deflate") as ds:
        ds.write(np.moveaxis(image, -1, 0))


@pytest.mark.parametrize("downsample, settings", [(1, {}), (2, {}), (1, {"MIN_OBJECT_AREA": 4})])
def test_large_geotiff_read_in_windows_equals_the_whole_image(run, tmp_path, monkeypatch,
                                                              downsample, settings):
    """A scene segmented from windows of its GeoTIFF (never read whole) gives the same
    outputs as the same scene read whole and segmented in memory: label strips streamed
    to the files as they come, or (with a clean-up step, which needs whole components) a
    label map held whole."""
    from res_unet.inference import segment
    from res_unet.inference.settings import inference_config
    from res_unet.training.runfolder import ModelCard

    if downsample > 1:
        scaled = tmp_path / "run_ds"
        shutil.copytree(run, scaled)
        card = ModelCard.read(scaled)
        card.input.downsample = downsample
        card.write(scaled)
        run = scaled
    rng = np.random.default_rng(8)
    image = half_image(300, 260, 100)
    image[..., 1] = rng.integers(0, 256, image.shape[:2])
    image[:7] = 0  # a nodata collar
    write_scene_tif(tmp_path / "images" / "scene.tif", image)
    cfg = inference_config([run], overrides=settings)
    streamed = []
    monkeypatch.setattr(writers, "png_writer", lambda *a, real=writers.png_writer: (
        streamed.append(a[0]), real(*a))[1])

    def segment_to(out: Path, **kwargs) -> dict:
        return segment.segment_folder(cfg, [run], tmp_path / "images", out, save_probs=True,
                                      progress=False, **kwargs)

    assert segment_to(tmp_path / "whole")["done"] == 1

    def no_whole_reads(*args, **kwargs):
        raise AssertionError("the scene was read whole")

    monkeypatch.setattr(pairing, "load_image", no_whole_reads)
    assert segment_to(tmp_path / "windows", full_max_values=0)["done"] == 1
    assert len(streamed) == (0 if settings else 1), "label strips go straight to the files"
    assert (tmp_path / "whole" / "scene_overlay.png").read_bytes() == (
        tmp_path / "windows" / "scene_overlay.png").read_bytes()
    np.testing.assert_array_equal(rasters.read_label(tmp_path / "whole" / "scene_predseg.png"),
                                  rasters.read_label(tmp_path / "windows" / "scene_predseg.png"))
    for name in ("scene_predseg.tif", "scene_probs.tif"):
        with rasterio.open(tmp_path / "whole" / name) as a, \
                rasterio.open(tmp_path / "windows" / name) as b:
            assert (a.crs, a.transform) == (b.crs, b.transform)
            np.testing.assert_equal(a.nodata, b.nodata)
            np.testing.assert_array_equal(a.read(), b.read())
    label = rasters.read_label(tmp_path / "windows" / "scene_predseg.png")
    assert np.all(label[:7] == 255) and np.all(label[10:, :96] == 1)


@pytest.mark.slow
def test_large_geotiff_memory_does_not_grow_with_the_scene(tmp_path):
    """Scenes of 2000 x 6000 and 8000 x 6000 RGB pixels (36 and 144 MB) segmented from
    windows of their GeoTIFFs, label strips streamed to the files: the peak memory of the
    process grows by about as much for both (a band of tiles, the model), not with the
    scene, which is never held whole, nor its label map. bench/bench_big_scene.py measures
    30000 x 30000 scenes. Each scene is segmented in a process of its own (forked:
    tests/forked.py), its allocator limited to two arenas as MALLOC_ARENA_MAX=2 would."""
    import forked

    width, tile = 6000, 512
    write_run(tmp_path / "run", pixel_model(size=tile),
              make_config("model", TARGET_SIZE=[tile, tile]), threshold=0.5)
    grew = {}
    for height in (2000, 8000):
        rows = np.arange(height, dtype=np.float32)[:, None]
        cols = np.arange(width, dtype=np.float32)[None, :]
        band = (128 + 100 * np.sin(rows / 700) * np.cos(cols / 900)).astype(np.uint8)
        folder = tmp_path / f"images{height}"
        write_scene_tif(folder / "scene.tif", np.stack([band, band // 2, 255 - band], -1),
                        nodata=None)
        del band
        code = f"""
import ctypes, resource, tracemalloc
import numpy as np
ctypes.CDLL(None).mallopt(-8, 2)  # M_ARENA_MAX
from res_unet.data import pairing
from res_unet.inference import runtime, segment, settings
def no_whole_reads(*args, **kwargs):
    raise AssertionError("the scene was read whole")
pairing.load_image = no_whole_reads
run = {str(tmp_path / "run")!r}
cfg = settings.inference_config([run])
model = runtime.load_run(run, cfg.TARGET_SIZE)
model(np.zeros((cfg.BATCH_SIZE, {tile}, {tile}, 3), np.float32))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
summary = segment.segment_folder(cfg, [model], {str(folder)!r}, {str(folder) + "_out"!r},
                                 progress=False, full_max_values=1_000_000)
peak = tracemalloc.get_traced_memory()[1]
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(summary["done"], before, after, peak)
"""
        status, out, err = forked.run(["-c", code], timeout=600)
        assert status == 0, err[-2000:]
        done, before, after, peak = map(int, out.split()[-4:])
        assert done == 1
        grew[height] = ((after - before) / 1024, peak / 2**20)
    # Arrays (numpy, traced exactly): a band of tiles, a strip of probabilities and, the
    # largest part, the overlay (12 M pixels for both scenes: the 2000-row one whole, the
    # 8000-row one, over OVERLAY_MAX_PIXELS, from every other row and column). Holding the
    # scene or its label would add 137 + 46 MB to the 8000-row figure.
    assert grew[8000][1] - grew[2000][1] < 40, grew
    # Resident memory (TensorFlow's and GDAL's allocations too; allocator noise is tens of
    # MB): holding the scene or its label would add at least the extra rows' bytes.
    assert grew[8000][0] - grew[2000][0] < (8000 - 2000) * width * 4 / 2**20, grew
    print(f"(peak RSS growth, numpy peak) in MB by height: {grew}")


def test_evaluation_scores(run, tmp_path, capsys):
    images, labels = tmp_path / "images", tmp_path / "labels"
    # Image 1: prediction = columns < 16, truth = columns < 8: foreground IoU 8/16, background
    # IoU 16/24. Image 2: everything foreground in both: IoU 1, background absent.
    writers.write_png(images / "one.png", half_image(32, 32, 16))
    truth = np.zeros((32, 32), np.uint8)
    truth[:, :8] = 1
    writers.write_png(labels / "one.png", truth)
    writers.write_png(images / "two.png", half_image(32, 32, 32))
    writers.write_png(labels / "two.png", np.ones((32, 32), np.uint8))
    out = tmp_path / "out"
    assert seg("--model", run, "--images", images, "--labels", labels, "--out", out) == 0
    with open(out / "scores.csv") as fh:
        rows = {row["image"]: row for row in csv.DictReader(fh)}
    assert set(rows) == {"one", "two", "ALL"}
    assert float(rows["one"]["iou_1"]) == pytest.approx(0.5)
    assert float(rows["one"]["iou_0"]) == pytest.approx(2 / 3)
    assert float(rows["one"]["mean_iou"]) == pytest.approx(7 / 12)
    assert float(rows["one"]["dice_1"]) == pytest.approx(2 / 3)
    assert float(rows["one"]["pixel_accuracy"]) == pytest.approx(0.75)
    assert float(rows["two"]["iou_1"]) == pytest.approx(1.0) and rows["two"]["iou_0"] == ""
    # ALL from the summed confusion matrix: foreground 1280 / 1536, background 512 / 768.
    assert float(rows["ALL"]["iou_1"]) == pytest.approx(1280 / 1536)
    assert float(rows["ALL"]["iou_0"]) == pytest.approx(512 / 768)
    assert int(rows["ALL"]["n_pixels"]) == 2048
    printed = capsys.readouterr().out
    assert "mean IoU 0.750, IoU class 0 0.667, class 1 0.833" in printed
    assert (out / "examples.png").is_file() and "examples.png" in printed
    # Resumed runs score the existing predictions.
    assert seg("--model", run, "--images", images, "--labels", labels, "--out", out) == 0
    assert "0 done, 2 skipped" in capsys.readouterr().out
    with open(out / "scores.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 3


def test_not_a_run_folder_is_a_usage_error(images, tmp_path, capsys):
    assert seg("--model", tmp_path, "--images", images, "--out", tmp_path / "out") == 2
    assert "not a run folder" in capsys.readouterr().err


def test_ensemble_members_must_agree(run, images, tmp_path, capsys):
    multi_cfg = make_config("model", NCLASSES=3)
    from res_unet.models import build_model

    other = write_run(tmp_path / "multi", build_model(multi_cfg, BAND_MEAN, BAND_STD), multi_cfg)
    assert seg("--model", run, "--model", other, "--images", images, "--out",
               tmp_path / "out") == 2
    assert "same classes" in capsys.readouterr().err


def test_ensemble_of_same_run_matches_single(run, images, tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    assert seg("--model", run, "--images", images, "--out", single) == 0
    assert seg("--model", run, "--model", run, "--images", images, "--out", double,
               "--tta") == 0
    for stem in "abc":
        np.testing.assert_array_equal(rasters.read_label(single / f"{stem}_predseg.png"),
                                      rasters.read_label(double / f"{stem}_predseg.png"))


def test_runtime_flag_openvino_gives_the_same_masks(run, images, tmp_path):
    pytest.importorskip("openvino")
    assert seg("--model", run, "--images", images, "--out", tmp_path / "tf") == 0
    assert seg("--model", run, "--images", images, "--out", tmp_path / "ov",
               "--runtime", "openvino") == 0
    for stem in ("a", "b", "c"):
        np.testing.assert_array_equal(rasters.read_label(tmp_path / "tf" / f"{stem}_predseg.png"),
                                      rasters.read_label(tmp_path / "ov" / f"{stem}_predseg.png"))
    config = json.loads((tmp_path / "ov" / "segmentation_config.json").read_text())
    assert config["config"]["INFER_RUNTIME"] == "openvino"


def test_resume_across_runtimes_only_where_the_masks_are_the_same(run, images, tmp_path,
                                                                   capsys):
    """Float32 runtimes make the same masks, so a folder begun with one is finished with
    another; bfloat16 ('openvino_bf16') moves a few pixels, so it is refused there."""
    pytest.importorskip("openvino")
    out = tmp_path / "out"
    assert seg("--model", run, "--images", images, "--out", out, "--runtime", "openvino") == 0
    (out / "b_predseg.png").unlink()
    capsys.readouterr()
    assert seg("--model", run, "--images", images, "--out", out,
               "--runtime", "tensorflow") == 0
    assert "1 done, 2 skipped" in capsys.readouterr().out
    assert seg("--model", run, "--images", images, "--out", out,
               "--runtime", "openvino_bf16") == 2
    err = capsys.readouterr().err
    assert "with other precision" in err and len(err.strip().splitlines()) == 1
    bf16 = tmp_path / "bf16"
    assert seg("--model", run, "--images", images, "--out", bf16,
               "--runtime", "openvino_bf16") == 0
    config = json.loads((bf16 / "segmentation_config.json").read_text())
    assert config["config"]["INFER_RUNTIME"] == "openvino_bf16"
    assert config["fingerprint"]["precision"] == "bfloat16"
    capsys.readouterr()
    assert seg("--model", run, "--images", images, "--out", bf16,
               "--runtime", "openvino_bf16") == 0
    assert "0 done, 3 skipped" in capsys.readouterr().out


def test_a_folder_in_use_is_refused_with_one_line(run, images, tmp_path, capsys):
    """A second segmentation into a folder another one is writing stops at once, naming the
    running one, whether it is a whole run or a shard; the folder is left as it was."""
    from res_unet.core.folders import folder_lock

    out = tmp_path / "out"
    assert seg("--model", run, "--images", images, "--out", out) == 0
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    with folder_lock(out, "seg_images_in_folder"):
        for extra in ([], ["--shard", "0/2"], ["--overwrite"]):
            assert seg("--model", run, "--images", images, "--out", out, *extra) == 2
            err = capsys.readouterr().err
            assert f"in use by seg_images_in_folder (PID {os.getpid()} on " in err, extra
            assert len(err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_shards_of_another_model_are_refused_while_shards_run(run, images, tmp_path, capsys):
    """--shard processes share a folder only with shards of the same model and settings:
    one of another model is refused even with --overwrite, even before any mask exists."""
    from res_unet.core.folders import folder_lock, settings_lock

    out = tmp_path / "out"
    other = write_run(tmp_path / "other", pixel_model(gain=-0.05), make_config("model"),
                      threshold=0.3)
    with folder_lock(out, "seg_images_in_folder", shared=True), \
            settings_lock(out, {"weights": ["some other model"]}, "seg_images_in_folder"):
        for model in (run, other):
            assert seg("--model", model, "--images", images, "--out", out, "--shard", "1/2",
                       "--overwrite") == 2
            err = capsys.readouterr().err
            assert "shards with other models or settings are writing here" in err
    assert not out.exists() or not any(out.glob("*_predseg.png"))
    assert seg("--model", other, "--images", images, "--out", out, "--shard", "1/2") == 0


# Scenes at another pixel size ------------------------------------------------------------

def disc_scene(shape_hw: tuple[int, int]) -> np.ndarray:
    """A bright disc (radius 0.3 of the height) on a dark ground, any size, same extent."""
    rows, cols = np.mgrid[0:shape_hw[0], 0:shape_hw[1]]
    inside = (((rows + 0.5) / shape_hw[0] - 0.5) ** 2
              + ((cols + 0.5) / shape_hw[1] - 0.5) ** 2) < 0.3 ** 2
    image = np.full((*shape_hw, 3), DARK, np.uint8)
    image[inside] = BRIGHT
    return image


def write_geotiff(path: Path, image: np.ndarray, pixel: float) -> Path:
    """A GeoTIFF in UTM 33N covering 960 m x 960 m whatever its pixel size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", height=image.shape[0], width=image.shape[1],
                       count=3, dtype="uint8", crs="EPSG:32633",
                       transform=from_origin(5e5, 4.2e6, pixel, pixel)) as dst:
        dst.write(np.moveaxis(image, -1, 0))
    return path


@pytest.fixture(scope="module")
def run_10m(tmp_path_factory) -> Path:
    """The pixel model as a run whose card says it sees 10 m pixels."""
    run = write_run(tmp_path_factory.mktemp("runs") / "run10", pixel_model(),
                    make_config("model"), threshold=0.5)
    card = json.loads((run / "model_card.json").read_text())
    card["input"]["pixel_size_m"] = 10.0
    (run / "model_card.json").write_text(json.dumps(card))
    return run


@pytest.mark.parametrize("pixel", [5.0, 20.0, 7.5, 30.0])
def test_scenes_at_another_pixel_size_are_segmented_at_the_models(run_10m, tmp_path, capsys,
                                                                   pixel):
    """The same 960 m scene at 5, 20, 7.5 and 30 m per pixel: each is brought to the model's
    10 m (block average for whole ratios, resampling otherwise), predicted there, and its
    mask written on the scene's own grid and CRS, agreeing with the 10 m result."""
    reference = write_geotiff(tmp_path / "ref" / "scene.tif", disc_scene((96, 96)), 10.0)
    assert seg("--model", run_10m, "--images", reference.parent, "--out",
               tmp_path / "ref_out") == 0
    truth = rasters.read_label(tmp_path / "ref_out" / "scene_predseg.png")
    n = round(960 / pixel)
    scene = write_geotiff(tmp_path / "in" / "scene.tif", disc_scene((n, n)), pixel)
    out = tmp_path / "out"
    capsys.readouterr()
    assert seg("--model", run_10m, "--images", scene.parent, "--out", out) == 0
    assert "no pixel size" not in capsys.readouterr().err
    label = rasters.read_label(out / "scene_predseg.png")
    assert label.shape == (n, n)
    with rasterio.open(out / "scene_predseg.tif") as src:
        assert src.crs == CRS.from_epsg(32633) and src.transform.a == pixel
    # on the reference grid the two masks agree but for the disc's rim
    on_ref = label[(np.arange(96) * n // 96)[:, None], (np.arange(96) * n // 96)[None, :]]
    assert np.mean(on_ref == truth) > 0.97
    fingerprint = json.loads((out / "segmentation_config.json").read_text())["fingerprint"]
    assert fingerprint["pixel_size"] == 10.0


def test_rescaled_scenes_say_how_and_large_enlargements_are_refused(run_10m, tmp_path, capsys):
    """Every scene brought to the model's 10 m gets one note saying how; a 50 m scene (5x,
    25 times the pixels) is refused with one line naming both sizes and the key that allows
    it, and segmented once MAX_ENLARGEMENT allows it."""
    for pixel, how in [(5.0, "1/2"), (30.0, "3x"), (7.5, "1/1.33")]:
        n = round(960 / pixel)
        write_geotiff(tmp_path / f"in{pixel:g}" / f"s{pixel:g}.tif", disc_scene((n, n)), pixel)
        capsys.readouterr()
        assert seg("--model", run_10m, "--images", tmp_path / f"in{pixel:g}", "--out",
                   tmp_path / f"out{pixel:g}") == 0
        err = capsys.readouterr().err
        assert err.count(f"note: s{pixel:g}.tif at {pixel:g} m, model at 10 m: segmented at "
                         f"{how}") == 1, err
    write_geotiff(tmp_path / "coarse" / "s50.tif", disc_scene((19, 19)), 960 / 19)
    assert seg("--model", run_10m, "--images", tmp_path / "coarse", "--out",
               tmp_path / "refused") == 1
    out = capsys.readouterr().out
    assert ("s50.tif: 50.5 m pixels but the model sees 10 m per pixel: it would be enlarged "
            "5.05x (25.5 times the pixels), beyond MAX_ENLARGEMENT 4; use a model trained "
            'nearer 50.5 m, or allow it with "MAX_ENLARGEMENT": 6 in a JSON given with '
            "--config") in out
    assert not (tmp_path / "refused" / "s50_predseg.png").exists()
    allow = tmp_path / "allow.json"
    allow.write_text(json.dumps({"MAX_ENLARGEMENT": 6}))
    assert seg("--model", run_10m, "--images", tmp_path / "coarse", "--out",
               tmp_path / "allowed", "--config", allow) == 0
    assert "segmented at 5.05x" in capsys.readouterr().err
    assert rasters.read_label(tmp_path / "allowed" / "s50_predseg.png").shape == (19, 19)


def test_segmenter_picks_block_averaging_or_resampling(run_10m):
    from res_unet.inference import runtime
    from res_unet.inference.predict import Segmenter

    seg10 = Segmenter([runtime.load_run(run_10m)], make_config("model"))
    assert seg10.for_scene(None) is seg10 and seg10.for_scene((10.5, 10.5)) is seg10
    quarter = seg10.for_scene((2.5, 2.5))
    assert (quarter.downsample, quarter.resample) == (4, None)
    assert quarter.window.downsample == 4 and seg10.downsample == 1
    odd = seg10.for_scene((7.0, 7.0))
    assert odd.downsample == 1 and odd.resample == ((7.0, 7.0), 10.0)
    coarse = seg10.for_scene((20.0, 20.0))
    assert coarse.resample == ((20.0, 20.0), 10.0)
    big = np.full((8000, 8000, 3), DARK, np.uint8)
    assert not odd.uses_strips(big.shape[:2]), "resampling works on the whole scene"


def test_plain_scenes_and_models_without_a_pixel_size_say_so_once(run, run_10m, images,
                                                                 tmp_path, capsys):
    assert seg("--model", run, "--images", images, "--out", tmp_path / "a") == 0
    err = capsys.readouterr().err
    assert err.count("the model card records no pixel size") == 1
    assert seg("--model", run_10m, "--images", images, "--out", tmp_path / "b") == 0
    err = capsys.readouterr().err
    assert err.count("has no pixel size (not a GeoTIFF in a CRS)") == 1
    # --pixel-size says what plain scenes are: 5 m scenes are worked on at half size
    before = rasters.read_label(tmp_path / "b" / "b_predseg.png")
    assert seg("--model", run_10m, "--images", images, "--out", tmp_path / "c",
               "--pixel-size", "5") == 0
    assert "no pixel size" not in capsys.readouterr().err
    after = rasters.read_label(tmp_path / "c" / "b_predseg.png")
    assert after.shape == before.shape and np.mean(after == before) > 0.95
    fingerprint = json.loads((tmp_path / "c" / "segmentation_config.json").read_text())
    assert fingerprint["fingerprint"]["settings"]["SCENE_PIXEL_SIZE"] == 5.0


def test_max_image_pixels_from_a_segmentation_config(run, images, tmp_path, capsys):
    """MAX_IMAGE_PIXELS in a segmentation --config stops the images above it (one line each
    with the fix; the others are segmented, exit 1); raised, the same folder is completed
    without being refused as made with other settings."""
    config = tmp_path / "limit.json"
    config.write_text(json.dumps({"MAX_IMAGE_PIXELS": 1999}))
    out = tmp_path / "out"
    assert seg("--model", run, "--images", images, "--out", out, "--config", config) == 1
    text = capsys.readouterr()
    assert "1 done, 0 skipped (already done), 2 failed" in text.out
    for name, size in (("b", "90x70"), ("c", "50x40")):
        assert (f"{images / name}.png: {size} px (3 bands) is more than can be decoded at once "
                "(1999 px, MAX_IMAGE_PIXELS); convert it to a tiled GeoTIFF") in text.err
    assert (out / "a_predseg.png").is_file() and not (out / "b_predseg.png").exists()
    config.write_text(json.dumps({"MAX_IMAGE_PIXELS": 6300}))
    assert seg("--model", run, "--images", images, "--out", out, "--config", config) == 0
    assert "2 done, 1 skipped" in capsys.readouterr().out


@pytest.mark.parametrize("size", ["1e9", "0", "1e-6"])
def test_a_pixel_size_out_of_range_is_one_line_with_the_range(run_10m, images, tmp_path,
                                                                capsys, size):
    """--pixel-size 1e9 (a terabyte raster) or 1e-6 (a scene of no pixel) stop before any
    image is read, with the valid range; no output folder is made."""
    assert seg("--model", run_10m, "--images", images, "--out", tmp_path / "a",
               "--pixel-size", size) == 2
    err = capsys.readouterr().err.strip().splitlines()
    side = "above the maximum 100000.0" if size == "1e9" else "below the minimum 0.001"
    assert err == [f"error: command line (--pixel-size): SCENE_PIXEL_SIZE={float(size)} is "
                   f"{side} (valid: 0.001 to 100000)"]
    assert not (tmp_path / "a").exists()


def test_the_command_says_which_runtime_it_used(run, images, tmp_path, capsys):
    pytest.importorskip("openvino")
    assert seg("--model", run, "--images", images, "--out", tmp_path / "a") == 0
    assert "runtime: openvino (auto: same probabilities as TensorFlow to " in \
        capsys.readouterr().err
    assert seg("--model", run, "--images", images, "--out", tmp_path / "b",
               "--runtime", "tensorflow") == 0
    assert "runtime: tensorflow\n" in capsys.readouterr().err


def test_layer_without_labels_is_a_usage_error(run, images, tmp_path, capsys):
    assert seg("--model", run, "--images", images, "--out", tmp_path / "out",
               "--layer", "lakes") == 2
    assert capsys.readouterr().err.strip() == (
        "error: command line: --layer names the layer of --labels; pass --labels LAYER_FILE "
        "too (see seg_images_in_folder --help)")
