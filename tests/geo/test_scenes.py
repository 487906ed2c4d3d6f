"""Scenes from anywhere (res_unet.geo.scenes, .stac, .remote): URLs, lists and STAC
catalogues over a local HTTP server, areas of interest, overviews, refusals, resuming."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
from helpers import make_config, pixel_model, write_run
from rasterio.transform import from_origin
from rasterio.warp import transform_bounds

from res_unet.core.errors import UserError
from res_unet.geo import remote, scenes, stac

CRS = "EPSG:32633"
ORIGIN = (500000.0, 5000000.0)


def write_scene(path: Path, array: np.ndarray, pixel: float = 10.0, blocksize: int = 256
                ) -> Path:
    """``array`` (B, H, W) uint8 as a COG in UTM 33N, top-left corner at ORIGIN."""
    bands, height, width = array.shape
    with rasterio.open(path, "w", driver="COG", width=width, height=height, count=bands,
                       dtype=array.dtype.name, crs=CRS, transform=from_origin(*ORIGIN, pixel,
                                                                              pixel),
                       BLOCKSIZE=blocksize, COMPRESS="DEFLATE",
                       OVERVIEW_RESAMPLING="AVERAGE") as ds:
        ds.write(array)
    return path


def random_scene(shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def item(item_id: str, assets: dict[str, str], date: str = "2024-05-01T10:00:00Z") -> dict:
    """A STAC Item whose assets are COGs at the given hrefs."""
    return {"type": "Feature", "stac_version": "1.0.0", "id": item_id, "bbox": None,
            "geometry": None, "properties": {"datetime": date}, "links": [],
            "assets": {k: {"href": h, "roles": ["data"],
                           "type": "image/tiff; application=geotiff; profile=cloud-optimized"}
                       for k, h in assets.items()}}


def write_json(path: Path, value: dict) -> Path:
    path.write_text(json.dumps(value), encoding="utf-8")
    return path


def collection(items: list[dict]) -> dict:
    return {"type": "FeatureCollection", "features": items}


def lonlat_of(window: tuple[int, int, int, int], pixel: float = 10.0, inset: float = 2.0
              ) -> tuple[float, float, float, float]:
    """W,S,E,N (degrees) just inside the pixel window (col, row, width, height)."""
    col, row, width, height = window
    left, top = ORIGIN[0] + col * pixel + inset, ORIGIN[1] - row * pixel - inset
    right, bottom = left + width * pixel - 2 * inset, top - height * pixel + 2 * inset
    # A box in lon/lat around a UTM box is larger than it: shrink by the inset's worth.
    return transform_bounds(CRS, "EPSG:4326", left + 30, bottom + 30, right - 30, top - 30)


# Small pure functions ------------------------------------------------------------------------

def test_urls_become_gdal_paths_and_lose_their_credentials():
    assert remote.gdal_path("https://h.org/a/b.tif") == "/vsicurl/https://h.org/a/b.tif"
    assert remote.gdal_path("s3://bucket/k/x.tif") == "/vsis3/bucket/k/x.tif"
    assert remote.gdal_path("gs://b/x.tif") == "/vsigs/b/x.tif"
    assert remote.gdal_path("az://c/x.tif") == "/vsiaz/c/x.tif"
    assert remote.gdal_path("/data/x.tif") == "/data/x.tif"
    assert remote.redact_url("https://user:pw@h.org:8443/x.tif?sig=SECRET&se=1#f") == \
        "https://h.org:8443/x.tif"
    assert remote.redact_url("/vsicurl/https://h.org/x.tif?token=SECRET") == \
        "/vsicurl/https://h.org/x.tif"
    text = remote.redact("'/vsicurl/https://u:p@h.org/x.tif?X-Amz-Signature=abc' failed")
    assert text == "'/vsicurl/https://h.org/x.tif' failed"
    assert remote.is_remote("s3://b/k") and remote.is_remote("/vsis3/b/k")
    assert not remote.is_remote("/data/x.tif") and not remote.is_remote("file:///x.tif")


def test_datetime_ranges_and_plain_names():
    start, end = stac.parse_datetime_range("2024-05-01/2024-05-31")
    assert (start.isoformat(), end.isoformat()) == ("2024-05-01T00:00:00+00:00",
                                                    "2024-05-31T23:59:59.999999+00:00")
    assert stac.parse_datetime_range("../2024-01-01T12:00:00Z")[0] is None
    with pytest.raises(UserError, match="--datetime 2024-13-01: '2024-13-01' is not a date"):
        stac.parse_datetime_range("2024-13-01")
    assert stac.plain_name("S2B_33UUP_20240501_0_L2A", "cat") == "S2B_33UUP_20240501_0_L2A"
    for bad in ("../evil", ".hidden", "a/b", "a b", ""):
        with pytest.raises(UserError, match="is not a plain file name"):
            stac.plain_name(bad, "cat.json")


# Catalogues, lists, refusals -------------------------------------------------------------------

def test_catalogue_filters_items_and_names_them(server, http_root):
    for name in ("a", "b", "c"):
        write_scene(http_root / f"{name}.tif", random_scene((3, 64, 64), 1))
    write_json(http_root / "items.json", collection([
        item("a", {"visual": "a.tif"}, "2024-04-01T00:00:00Z"),
        item("b", {"visual": "https://elsewhere.example/b.tif"}, "2024-05-02T00:00:00Z"),
        item("c", {"visual": "./c.tif"}, "2024-05-03T00:00:00Z")]))
    found = stac.catalogue_scenes(server.url("items.json"), datetime="2024-05-01/..")
    assert [(s.name, s.hrefs, s.assets) for s in found] == [
        ("b", ("https://elsewhere.example/b.tif",), ("visual",)),
        ("c", (server.url("c.tif"),), ("visual",))]
    assert [s.name for s in stac.catalogue_scenes(server.url("items.json"), max_items=1)] == ["a"]
    with pytest.raises(UserError, match="item a has no asset 'red'; its assets are visual"):
        stac.catalogue_scenes(server.url("items.json"), assets=["red"])


def test_static_catalogue_is_followed_through_its_links(server, http_root):
    write_scene(http_root / "x.tif", random_scene((3, 32, 32), 2))
    (http_root / "items" / "x").mkdir(parents=True)
    write_json(http_root / "catalog.json", {
        "type": "Catalog", "stac_version": "1.0.0", "id": "root", "description": "test",
        "links": [{"rel": "item", "href": "./items/x/x.json", "type": "application/json"}]})
    write_json(http_root / "items" / "x" / "x.json", {**item("x", {"visual": "../../x.tif"}),
                                                    "links": []})
    found = stac.catalogue_scenes(server.url("catalog.json"))
    assert [(s.name, s.hrefs) for s in found] == [("x", (server.url("x.tif"),))]


@pytest.mark.parametrize("href, what", [
    ("file:///etc/hostname", "a local file"), ("/etc/hostname", "a local file"),
    ("/vsicurl/http://127.0.0.1:1/x.tif", "a local file"),
    ("../../outside.tif", "a file outside the catalogue's folder")])
def test_remote_catalogue_naming_a_local_file_is_refused(server, http_root, href, what,
                                                        tmp_path, capsys):
    (http_root / "cat").mkdir()
    write_json(http_root / "cat" / "items.json", collection([item("x", {"visual": href})]))
    with pytest.raises(UserError) as caught:
        stac.catalogue_scenes(server.url("cat/items.json") + "?token=SECRET")
    message = str(caught.value)
    assert message.startswith(f"{server.url('cat/items.json')}: refers to {what}")
    assert "SECRET" not in message and "\n" not in message
    # Through the command: one line, exit status 2, nothing written.
    from res_unet.cli import run_command
    from res_unet.seg_images_in_folder import main

    run = write_run(tmp_path / "run", pixel_model(), make_config("model"))
    code = run_command(main, ["--model", str(run), "--images", server.url("cat/items.json"),
                              "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"refers to {what}" in err[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.png"))


def test_remote_catalogue_linking_to_local_files_or_odd_ids_is_refused(server, http_root,
                                                                       tmp_path):
    secret = tmp_path / "private.json"
    write_json(secret, item("private", {"visual": "/etc/hostname"}))
    write_json(http_root / "catalog.json", {
        "type": "Catalog", "stac_version": "1.0.0", "id": "root", "description": "test",
        "links": [{"rel": "item", "href": secret.as_uri(), "type": "application/json"}]})
    with pytest.raises(UserError, match=r"catalog.json: refers to a local file \(file://"):
        stac.catalogue_scenes(server.url("catalog.json"))
    write_json(http_root / "items.json", collection([item("../evil", {"visual": "x.tif"})]))
    with pytest.raises(UserError, match=r"items.json: item id '../evil' is not a plain file"):
        stac.catalogue_scenes(server.url("items.json"))


def test_items_are_filtered_by_their_bbox_2d_or_3d(tmp_path):
    items = [{**item(name, {"visual": f"{name}.tif"}), "bbox": box}
             for name, box in (("here", [24.0, 41.9, 24.2, 42.1]),
                               ("there", [10.0, 50.0, 0.0, 10.5, 50.5, 100.0]),
                               ("here3d", [23.9, 41.8, 0.0, 24.1, 42.0, 10.0]))]
    write_json(tmp_path / "items.json", collection(items))
    found = stac.catalogue_scenes(str(tmp_path / "items.json"), bbox=(24.05, 41.95, 24.1, 42.0))
    assert [s.name for s in found] == ["here", "here3d"]


def test_local_catalogue_may_name_local_files(tmp_path):
    write_scene(tmp_path / "x.tif", random_scene((3, 32, 32), 3))
    write_json(tmp_path / "item.json", item("x", {"visual": "x.tif"}))
    found = stac.catalogue_scenes(str(tmp_path / "item.json"))
    assert found[0].hrefs == (str(tmp_path / "x.tif"),)


def test_list_file_and_single_url(server, http_root, tmp_path):
    write_scene(http_root / "one.tif", random_scene((3, 32, 32), 4))
    write_scene(tmp_path / "two.tif", random_scene((3, 32, 32), 5))
    listing = tmp_path / "scenes.txt"
    listing.write_text(f"# scenes\n{server.url('one.tif')}?sig=SECRET\n\ntwo.tif\n")
    refs = scenes.resolve_scenes(scenes.SceneQuery(str(listing)))
    assert [(r.name, r.shown) for r in refs] == [("one", server.url("one.tif")),
                                                 ("two", str(tmp_path / "two.tif"))]
    assert refs[0].sources == (f"/vsicurl/{server.url('one.tif')}?sig=SECRET",)
    assert "SECRET" not in refs[0].key and refs[0].key.startswith(server.url("one.tif") + "|")
    single = scenes.resolve_scenes(scenes.SceneQuery(server.url("one.tif")))
    assert [r.name for r in single] == ["one"]
    (tmp_path / "my scene.tif").write_bytes((tmp_path / "two.tif").read_bytes())
    assert [r.name for r in scenes.resolve_scenes(scenes.SceneQuery(
        str(tmp_path / "my scene.tif")))] == ["my scene"], "local names are the user's own"
    with pytest.raises(UserError, match="no such folder, file or URL"):
        scenes.resolve_scenes(scenes.SceneQuery(str(tmp_path / "missing")))


# Windows, areas, bands, overviews ---------------------------------------------------------------

def test_area_of_interest_over_a_quarter_fetches_under_half_the_bytes(server, http_root):
    array = random_scene((3, 1024, 1024), 6)
    size = write_scene(http_root / "big.tif", array).stat().st_size
    write_json(http_root / "item.json", item("big", {"visual": "big.tif"}))
    query = scenes.SceneQuery(server.url("item.json"), bbox=lonlat_of((0, 0, 512, 512)))
    with scenes.scene_folder(query) as found, rasterio.open(found.folder / "big.vrt") as ds:
        window = scenes.scene_record(found.folder / "big.vrt")["window"]
        pixels = ds.read()
        bounds = ds.bounds
    col, row, width, height = window
    assert 0 <= col and 0 <= row and col + width <= 512 and row + height <= 512
    assert width > 480 and height > 480
    np.testing.assert_array_equal(pixels, array[:, row:row + height, col:col + width])
    assert bounds.left == ORIGIN[0] + 10 * col and bounds.top == ORIGIN[1] - 10 * row
    fraction = server.bytes_sent("/big.tif") / size
    print(f"AOI over a quarter of the scene: {fraction:.3f} of the file's bytes fetched")
    assert fraction < 0.4


def test_area_that_misses_a_scene_skips_it_with_one_note(server, http_root, capsys):
    write_scene(http_root / "a.tif", random_scene((3, 64, 64), 7))
    write_json(http_root / "items.json", collection([item("a", {"visual": "a.tif"})]))
    query = scenes.SceneQuery(server.url("items.json"), bbox=(0.0, 0.0, 1.0, 1.0))
    with pytest.raises(UserError, match="touches none of the 1 scenes read"), \
            scenes.scene_folder(query):
        pass
    assert "note: the area of interest misses 1 of 1 scenes (a); skipped" in \
        capsys.readouterr().err


def test_aoi_from_a_polygon_layer_is_reprojected(tmp_path, monkeypatch):
    from res_unet.geo.vector_files import load_pyogrio

    monkeypatch.delenv("GDAL_DISABLE_READDIR_ON_OPEN", raising=False)

    array = random_scene((3, 128, 128), 8)
    write_scene(tmp_path / "s.tif", array)
    w, s, e, n = lonlat_of((64, 32, 32, 32))
    pyogrio = load_pyogrio()
    geometry = np.array([shapely.to_wkb(shapely.box(w, s, e, n))], dtype=object)
    pyogrio.raw.write(tmp_path / "aoi.gpkg", geometry, field_data=[], fields=[],
                      geometry_type="Polygon", crs="EPSG:4326", driver="GPKG")
    query = scenes.SceneQuery(str(tmp_path / "s.tif"), aoi=str(tmp_path / "aoi.gpkg"))
    with scenes.scene_folder(query) as found, rasterio.open(found.folder / "s.vrt") as ds:
        col, row, width, height = scenes.scene_record(found.folder / "s.vrt")["window"]
        np.testing.assert_array_equal(ds.read(), array[:, row:row + height, col:col + width])
    assert 64 <= col <= 68 and 32 <= row <= 36 and 22 <= width <= 32 and 22 <= height <= 32
    # Local scenes only: GDAL still lists folders (a local scene's .tfw stays visible).
    assert "GDAL_DISABLE_READDIR_ON_OPEN" not in os.environ


def test_band_assets_are_stacked_on_the_first_ones_grid(server, http_root):
    red, nir = random_scene((1, 64, 64), 9), random_scene((1, 32, 32), 10)
    write_scene(http_root / "red.tif", red, pixel=10.0, blocksize=128)
    write_scene(http_root / "nir.tif", nir, pixel=20.0, blocksize=128)
    write_json(http_root / "item.json", item("s", {"red": "red.tif", "nir": "nir.tif"}))
    query = scenes.SceneQuery(server.url("item.json"), assets=("red", "nir"))
    with scenes.scene_folder(query) as found, rasterio.open(found.folder / "s.vrt") as ds:
        assert (ds.count, ds.height, ds.width) == (2, 64, 64)
        pixels = ds.read()
    np.testing.assert_array_equal(pixels[0], red[0])
    # The 20 m band resampled (bilinear) onto the 10 m grid: close to the 2x upsampled band.
    coarse = pixels[1].reshape(32, 2, 32, 2).mean(axis=(1, 3))
    assert np.abs(coarse[2:-2, 2:-2] - nir[0, 2:-2, 2:-2]).mean() < 40


def test_coarser_model_reads_the_matching_overview(server, http_root):
    array = random_scene((3, 1024, 1024), 11)
    size = write_scene(http_root / "ov.tif", array).stat().st_size
    write_json(http_root / "item.json", item("ov", {"visual": "ov.tif"}))
    query = scenes.SceneQuery(server.url("item.json"))
    with scenes.scene_folder(query, model_pixel_size=40.0) as found, \
            rasterio.open(found.folder / "ov.vrt") as ds:
        assert scenes.scene_record(found.folder / "ov.vrt")["overview"] == 4
        assert (ds.height, ds.width, ds.res) == (256, 256, (40.0, 40.0))
        pixels = ds.read()
    with rasterio.open(http_root / "ov.tif", overview_level=1) as ov:
        np.testing.assert_array_equal(pixels, ov.read())
    fraction = server.bytes_sent("/ov.tif") / size
    print(f"model at 4x the scene's pixel size: {fraction:.3f} of the file's bytes fetched")
    assert fraction < 0.15


# Segmentation from catalogues -------------------------------------------------------------------

@pytest.fixture
def pixel_run(tmp_path):
    return write_run(tmp_path / "run", pixel_model(), make_config("model"))


def two_scenes(http_root: Path, signature: str = "") -> list[np.ndarray]:
    """Scenes north and south, and items.json listing them (asset hrefs + ``signature``)."""
    arrays = [random_scene((3, 80, 96), 20 + i) for i in range(2)]
    for name, array in zip(("north", "south"), arrays, strict=True):
        write_scene(http_root / f"{name}.tif", array, blocksize=128)
    write_json(http_root / "items.json", collection([
        item(name, {"visual": f"{name}.tif{signature}"}) for name in ("north", "south")]))
    return arrays


def test_catalogue_over_http_gives_the_same_masks_as_the_files_on_disk(
        server, http_root, pixel_run, tmp_path):
    from res_unet.inference import segment, settings

    two_scenes(http_root)
    cfg = settings.inference_config([pixel_run])
    local = segment.segment_folder(cfg, [pixel_run], http_root, tmp_path / "local",
                                   progress=False, full_max_values=0)
    url = server.url("items.json") + "?token=SECRET"
    remote_run = segment.segment_folder(cfg, [pixel_run], scenes.SceneQuery(url),
                                        tmp_path / "remote", progress=False, full_max_values=0)
    assert (local["done"], remote_run["done"], remote_run["failed"]) == (2, 2, 0)
    for name in ("north", "south"):
        for suffix in ("_predseg.png", "_predseg.tif"):
            with rasterio.open(tmp_path / "local" / f"{name}{suffix}") as a, \
                    rasterio.open(tmp_path / "remote" / f"{name}{suffix}") as b:
                np.testing.assert_array_equal(a.read(), b.read())
                assert (a.crs, a.transform) == (b.crs, b.transform)
    assert server.bytes_sent("/north.tif") > 0
    written = "".join(p.read_text(errors="replace") for p in (tmp_path / "remote").iterdir()
                      if p.suffix in (".json", ".segmented", ".csv") or p.name.startswith("."))
    assert "SECRET" not in written
    recorded = json.loads((tmp_path / "remote" / "segmentation_config.json").read_text())
    assert recorded["options"]["images"] == server.url("items.json")


def test_remote_scenes_resume_by_etag(server, http_root, pixel_run, tmp_path):
    from res_unet.inference import segment, settings

    arrays = two_scenes(http_root)
    cfg = settings.inference_config([pixel_run])
    query = scenes.SceneQuery(server.url("items.json"))
    first = segment.segment_folder(cfg, [pixel_run], query, tmp_path / "out", progress=False)
    again = segment.segment_folder(cfg, [pixel_run], query, tmp_path / "out", progress=False)
    assert (first["done"], again["done"], again["skipped"]) == (2, 0, 2)
    # The server's file changes (a new ETag): that scene is redone, the other skipped.
    write_scene(http_root / "south.tif", 255 - arrays[1], blocksize=128)
    os.utime(http_root / "south.tif", ns=(1, 10**18))
    changed = segment.segment_folder(cfg, [pixel_run], scenes.SceneQuery(
        server.url("items.json") + "?v=2"), tmp_path / "out", progress=False)
    assert (changed["done"], changed["skipped"]) == (1, 1)


def test_shards_split_catalogue_items(server, http_root, pixel_run, tmp_path):
    from res_unet.inference import segment, settings

    two_scenes(http_root)
    cfg = settings.inference_config([pixel_run])
    query = scenes.SceneQuery(server.url("items.json"))
    done = []
    for index in range(2):
        summary = segment.segment_folder(cfg, [pixel_run], query, tmp_path / "out",
                                         shard=(index, 2), progress=False)
        assert (summary["images"], summary["done"]) == (1, 1)
        done.append(sorted(p.name for p in (tmp_path / "out").glob("*_predseg.png")))
    assert done == [["north_predseg.png"], ["north_predseg.png", "south_predseg.png"]]


def test_server_dropping_connections_fails_that_scene_only(server, http_root, pixel_run,
                                                           tmp_path, capsys):
    from res_unet.cli import run_command
    from res_unet.seg_images_in_folder import main

    two_scenes(http_root, signature="?X-Amz-Signature=SECRET")
    server.drop.add("/south.tif")
    code = run_command(main, ["--model", str(pixel_run), "--images",
                              server.url("items.json") + "?token=SECRET",
                              "--out", str(tmp_path / "out"), "--no-progress"])
    out, err = capsys.readouterr()
    failed = [line for line in err.splitlines() if line.startswith("failed:")]
    assert code == 1 and len(failed) == 1
    assert failed[0].startswith(f"failed: {server.url('south.tif')}: cannot be read (")
    assert failed[0].endswith("check the address and the network, then run again (finished "
                              "scenes are skipped)")
    assert "2 images: 1 done, 0 skipped (already done), 1 failed" in out
    assert f"  {failed[0]}" in out.splitlines(), "the summary repeats the one line"
    assert "SECRET" not in out + err
    assert (tmp_path / "out" / "north_predseg.png").is_file()
    assert not (tmp_path / "out" / "south_predseg.png").exists()
    assert server.requests["/south.tif"] == 2, "GDAL retried once (GDAL_HTTP_MAX_RETRY 1)"


# Training from catalogues -----------------------------------------------------------------------

def test_make_tfrecords_from_remote_items_reads_only_what_the_labels_cover(
        server, http_root, tmp_path, capsys):
    from res_unet.cli import run_command
    from res_unet.config.keys import config_from_dict, save_config
    from res_unet.data import records
    from res_unet.geo.vector_files import load_pyogrio
    from res_unet.make_tfrecords import main

    sizes = {}
    for i, name in enumerate(("spring", "autumn")):
        sizes[name] = write_scene(http_root / f"{name}.tif", random_scene((3, 512, 512), 30 + i),
                                  blocksize=128).stat().st_size
    write_json(http_root / "items.json", collection([
        item(name, {"visual": f"{name}.tif", "thumbnail": f"{name}.png"})
        for name in ("spring", "autumn")]))
    # Two lakes in the scenes' top-left 96 x 96 px.
    lakes = [shapely.box(*lonlat_of((8, 8, 40, 40))), shapely.box(*lonlat_of((50, 50, 40, 40)))]
    load_pyogrio().raw.write(tmp_path / "survey.gpkg", shapely.to_wkb(np.array(lakes, object)),
                             [], [], driver="GPKG", geometry_type="Polygon", crs="EPSG:4326")
    cfg, _ = config_from_dict({**make_config("model").to_dict(), "FIT_MODE": "tile",
                               "DO_AUG": False, "DOPLOT": False, "VALIDATION_SPLIT": 0.5,
                               "IMS_PER_SHARD": 8, "SEED": 2})
    save_config(cfg, tmp_path / "config.json")
    code = run_command(main, ["--config", str(tmp_path / "config.json"), "--images",
                              server.url("items.json") + "?token=SECRET", "--asset", "visual",
                              "--labels", str(tmp_path / "survey.gpkg"),
                              "--out", str(tmp_path / "ds")])
    out, err = capsys.readouterr()
    assert code == 0, err
    manifest = records.read_manifest(tmp_path / "ds")
    assert manifest.images_dir == server.url("items.json")
    assert sorted(manifest.files["train"] + manifest.files["validation"]) == [
        "autumn.vrt", "spring.vrt"]
    # Only the labels' windows were read: about 96 x 96 px of 512 x 512, their tiles and header.
    tiles = manifest.counts["train"].unaugmented + manifest.counts["validation"].unaugmented
    assert 2 * 4 <= tiles <= 2 * 9, tiles  # 32 px tiles of a window of 80..96 px a side
    assert 0 < manifest.class_pixel_frequency[1] < 1
    for name, size in sizes.items():
        fraction = server.bytes_sent(f"/{name}.tif") / size
        assert 0 < fraction < 0.2, (name, fraction)
    assert "SECRET" not in (tmp_path / "ds" / "manifest.json").read_text() + out + err


def test_stac_api_search_goes_through_pystac_client(server, http_root, monkeypatch):
    """--stac-search URL --collection NAME: the search pystac-client is asked for, and its
    items read as a catalogue's (a stand-in client: the tests have no network)."""
    import sys
    import types

    import pystac

    write_scene(http_root / "x.tif", random_scene((3, 32, 32), 40))
    asked = {}

    def search(**kwargs):
        asked.update(kwargs)
        found = [item("x", {"visual": server.url("x.tif")}),
                 item("y", {"visual": "file:///etc/hostname"})][:kwargs["max_items"]]
        return types.SimpleNamespace(items=lambda: iter(pystac.Item.from_dict(f)
                                                        for f in found))

    client = types.SimpleNamespace(open=lambda url: asked.update(url=url) or
                                   types.SimpleNamespace(search=search))
    monkeypatch.setitem(sys.modules, "pystac_client", types.SimpleNamespace(Client=client))
    query = scenes.SceneQuery(None, stac_search="https://api.example/v1?key=SECRET",
                              collection="sentinel-2-l2a", bbox=(24.0, 41.9, 24.1, 42.0),
                              datetime="2024-07-01/2024-07-31", max_items=1)
    refs = scenes.resolve_scenes(query)
    assert asked == {"url": "https://api.example/v1?key=SECRET",
                     "collections": ["sentinel-2-l2a"], "bbox": (24.0, 41.9, 24.1, 42.0),
                     "datetime": "2024-07-01/2024-07-31", "max_items": 1}
    assert [(r.name, r.shown) for r in refs] == [("x", server.url("x.tif"))]
    assert query.shown == "https://api.example/v1"
    with pytest.raises(UserError, match="v1: refers to a local file"):
        scenes.resolve_scenes(scenes.SceneQuery(None, stac_search="https://api.example/v1",
                                                collection="c", max_items=2))


def test_a_new_scene_source_is_one_registration(tmp_path, monkeypatch):
    """A kind of --images registered in SCENE_SOURCES is listed with nothing else changed;
    kinds that are not catalogues refuse --asset."""
    calls = []

    def from_bucket_listing(query):
        calls.append(query.images)
        return [scenes.SceneRef("a", ("/vsimem/a.tif",), "bucket:a", "k1"),
                scenes.SceneRef("b", ("/vsimem/b.tif",), "bucket:b", "k2")]

    source = scenes.SceneSource("bucket listing", lambda q: (q.images or "").startswith(
        "bucket:"), from_bucket_listing)
    monkeypatch.setattr(scenes, "SCENE_SOURCES", (source, *scenes.SCENE_SOURCES))
    refs = scenes.resolve_scenes(scenes.SceneQuery("bucket:lakes"))
    assert [r.name for r in refs] == ["a", "b"] and calls == ["bucket:lakes"]
    with pytest.raises(UserError, match="--asset, --datetime and --max-items pick items"):
        scenes.resolve_scenes(scenes.SceneQuery("bucket:lakes", assets=("red",)))
    with pytest.raises(UserError, match="no such folder, file or URL"):
        scenes.resolve_scenes(scenes.SceneQuery(str(tmp_path / "missing")))
