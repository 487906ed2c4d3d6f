"""Tests for res_unet.inference.outputs: the registry of per-image outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from helpers import make_config, pixel_model, pixel_prob, write_run
from rasterio.transform import from_origin

from res_unet.data.pairing import Pair
from res_unet.geo import rasters
from res_unet.inference import outputs, segment, settings
from res_unet.inference.outputs import OUTPUTS, Output, Wanted, output_paths

TILE = 64


def _pair(name: str) -> Pair:
    return Pair(stem=Path(name).stem, image=Path("in") / name, label=None)


def test_output_paths_follow_the_registry():
    out = Path("out")
    assert output_paths(out, _pair("a.jpg")) == {
        "label": out / "a_predseg.png", "overlay": out / "a_overlay.png"}
    assert output_paths(out, _pair("s.tif"), Wanted(save_probs=True, vector="gpkg",
                                                    save_uncertainty=True)) == {
        "label": out / "s_predseg.png", "overlay": out / "s_overlay.png",
        "geotiff": out / "s_predseg.tif", "probs": out / "s_probs.tif",
        "uncertainty": out / "s_uncertainty.tif", "vector": out / "s_predseg.gpkg"}
    assert output_paths(out, _pair("a.png"), Wanted(save_probs=True, vector="geojson",
                                                    save_uncertainty=True)) == {
        "label": out / "a_predseg.png", "overlay": out / "a_overlay.png",
        "probs": out / "a_probs.npy", "uncertainty": out / "a_uncertainty.png",
        "vector": out / "a_predseg.geojson"}
    with pytest.raises(ValueError, match="vector format 'kml'"):
        output_paths(out, _pair("a.png"), Wanted(vector="kml"))


def test_every_output_feeds_on_something_it_can_write():
    for key, output in OUTPUTS.items():
        assert output.feeds in {"labels", "probabilities", "overlay", "ranking"}, key
        if output.feeds == "labels":
            assert output.write is not None, key
        if output.feeds == "probabilities":
            assert output.stream is not None, key


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    cfg = make_config("model", TARGET_SIZE=[TILE, TILE])
    return write_run(tmp_path_factory.mktemp("runs") / "pixel", pixel_model(size=TILE), cfg)


@pytest.fixture
def scene_folder(tmp_path) -> tuple[Path, np.ndarray]:
    """A 200 x 150 GeoTIFF whose band 0 ramps across the pixel model's threshold."""
    image = np.zeros((200, 150, 3), np.uint8)
    image[..., 0] = np.linspace(60, 200, 150).astype(np.uint8)[None, :]
    image[..., 1] = np.arange(200, dtype=np.uint8)[:, None]
    folder = tmp_path / "images"
    folder.mkdir()
    with rasterio.open(folder / "s.tif", "w", driver="GTiff", height=200, width=150, count=3,
                       dtype="uint8", crs="EPSG:32633",
                       transform=from_origin(500_000, 4_200_000, 10, 10)) as ds:
        ds.write(np.moveaxis(image, -1, 0))
    return folder, image


def test_a_new_output_is_one_registration(run, scene_folder, tmp_path, monkeypatch):
    """A label output and a probability output registered in OUTPUTS are written for every
    scene with nothing else changed: the label one gets the whole map, the probability one
    every row once."""
    folder, image = scene_folder
    seen: dict[str, np.ndarray] = {}

    def write_counts(path: Path, label: np.ndarray, scene: outputs.Scene) -> None:
        counts = np.bincount(label[label != 255].ravel(), minlength=2)
        path.write_text(f"{scene.shape_hw} {counts.tolist()}\n")
        seen["label"] = label

    class RowMeans:
        def __init__(self, path: Path, scene: outputs.Scene):
            self.path, self.rows = path, np.full(scene.shape_hw[0], np.nan)

        def __enter__(self):
            return self.add

        def add(self, r0: int, prob: np.ndarray) -> None:
            assert np.all(np.isnan(self.rows[r0:r0 + len(prob)])), "a row written twice"
            self.rows[r0:r0 + len(prob)] = prob[..., 0].mean(axis=1)

        def __exit__(self, *exc):
            np.save(self.path, self.rows)
            return False

    monkeypatch.setitem(OUTPUTS, "counts", Output(
        name=lambda stem, tiff, wanted: f"{stem}_counts.txt",
        wanted=lambda wanted, tiff: True, feeds="labels", write=write_counts))
    monkeypatch.setitem(OUTPUTS, "row_means", Output(
        name=lambda stem, tiff, wanted: f"{stem}_row_means.npy",
        wanted=lambda wanted, tiff: tiff, feeds="probabilities", stream=RowMeans))
    cfg = settings.inference_config([run], None, {"TESTTIMEAUG": False})
    summary = segment.segment_folder(cfg, [run], folder, tmp_path / "out", progress=False)
    assert summary["done"] == 1 and summary["failed"] == 0
    label = rasters.read_label(tmp_path / "out" / "s_predseg.png")
    prob = pixel_prob(image)[..., 0]
    sure = np.abs(prob - 0.5) > 1e-3  # the column at 0.5 may round either way
    np.testing.assert_array_equal(label[sure], (prob[sure] > 0.5).astype(np.uint8))
    np.testing.assert_array_equal(seen["label"], label)
    counts = np.bincount(label.ravel(), minlength=2).tolist()
    assert (tmp_path / "out" / "s_counts.txt").read_text() == f"(200, 150) {counts}\n"
    np.testing.assert_allclose(np.load(tmp_path / "out" / "s_row_means.npy"),
                               pixel_prob(image)[..., 0].mean(axis=1), atol=1e-5)
