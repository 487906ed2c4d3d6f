"""Tests for res_unet.inference.review: the review page's data and pictures, and the page itself
in a real headless browser (the system's Chromium through Playwright): every scene listed,
sorting, the large view, untrusted scene names kept as text, thousands of scenes, and no
request leaving the machine."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from res_unet.inference.review import (
    PICTURES,
    ScenePictures,
    picture_names,
    review_file,
    scene_entry,
    write_review_page,
)

EVIL = "<img src=x onerror=alert(1)>&\"' #%?.png"
CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser",
                             "/usr/bin/chrome-headless-shell") if Path(p).is_file()), None)


def page_data(path: Path) -> list[dict]:
    """The scenes the page holds (its JSON data element), as the browser's script reads them."""
    text = path.read_text()
    found = re.search(r'<script type="application/json" id="scenes">(.*?)</script>', text, re.S)
    return json.loads(found.group(1))


def make_scenes(out: Path, n: int = 3) -> list[dict]:
    """``n`` scenes with pictures (one with an untrusted name); uncertainty 0.1, 0.2, ...
    and score 1 - uncertainty, except the last scene, which has no label."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    scenes = []
    for i in range(n):
        name = EVIL if i == 1 else f"scene{i:02d}.png"
        stem = name.rsplit(".", 1)[0]
        pictures = ScenePictures(out, stem, 2)
        image = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
        label = (image[..., 0] > 128).astype(np.uint8)
        pictures.write_prediction(image, label, 1, rng.random((60, 90), dtype=np.float32))
        if i < n - 1:
            pictures.write_label(label)
        (out / f"{stem}_predseg.png").write_bytes(b"png")
        u = 0.1 * (i + 1)
        scenes.append(scene_entry(name, {"uncertainty": u, "entropy": u / 2},
                                  None if i == n - 1 else 1 - u,
                                  {"label": out / f"{stem}_predseg.png",
                                   "vector": out / "missing.gpkg"}, out, stem))
    return scenes



def _wait_until(page, expression: str, seconds: float = 10.0) -> None:
    """Poll ``expression`` with page.evaluate: wait_for_function evaluates a string with
    eval, which the page's Content-Security-Policy (rightly) refuses."""
    import time

    end = time.monotonic() + seconds
    while not page.evaluate(expression):
        assert time.monotonic() < end, f"not true within {seconds} s: {expression}"
        page.wait_for_timeout(50)


def test_pictures_and_entries_of_a_scene(tmp_path):
    scenes = make_scenes(tmp_path, 3)
    names = picture_names("scene00")
    for view in ("image", "prediction", "label", "uncertainty"):
        for size in ("thumb", "preview"):
            assert (tmp_path / PICTURES / names[view][size]).is_file()
    thumb = Image.open(tmp_path / PICTURES / names["image"]["thumb"])
    assert max(thumb.size) <= 160 and thumb.format == "JPEG"
    assert scenes[0]["outputs"] == {"label": "scene00_predseg.png"}  # what exists, by name
    assert "label" not in scenes[2]["pictures"] and scenes[2]["score"] is None
    assert review_file((0, 1)) == "review.html"
    assert review_file((2, 4)) == "review_shard2of4.html"


def test_untrusted_names_stay_data_in_the_page(tmp_path):
    scenes = make_scenes(tmp_path, 3)
    write_review_page(tmp_path / "review.html", scenes, "Review <b>", "3 scenes & more")
    text = (tmp_path / "review.html").read_text()
    assert "<img src=x" not in text and "Review &lt;b&gt;" in text
    data = page_data(tmp_path / "review.html")
    assert [s["name"] for s in data] == ["scene02.png", EVIL, "scene00.png"]  # most unsure first
    assert [s["rank"] for s in data] == [1, 2, 3]
    # Nothing in the page loads from elsewhere: no URL but the folder's own files.
    assert not re.search(r"(src|href)=\"?(https?:|//)", text)
    assert "Content-Security-Policy" in text and "default-src 'none'" in text


# In the browser ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no Chromium installed (apt-get install chromium) to test the review page")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-background-networking", "--disable-component-update",
            "--disable-default-apps", "--disable-sync", "--no-first-run",
            "--disable-domain-reliability", "--metrics-recording-only"])
        yield browser
        browser.close()


def open_page(browser, path: Path):
    """The page at ``path`` with every request recorded (non-file requests are aborted) and
    console errors (CSP violations among them) and dialogs collected."""
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    seen = {"requests": [], "errors": [], "dialogs": []}

    def route(r):
        seen["requests"].append(r.request.url)
        if r.request.url.startswith("file://"):
            r.continue_()
        else:
            r.abort()

    page.route("**/*", route)
    page.on("console", lambda m: seen["errors"].append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: seen["errors"].append(str(e)))
    page.on("dialog", lambda d: (seen["dialogs"].append(d.message), d.dismiss()))
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    return page, seen


def names_shown(page) -> list[str]:
    return page.eval_on_selector_all("#rows td.name", "cells => cells.map(c => c.textContent)")


def test_the_page_lists_sorts_and_opens_scenes_offline(browser, tmp_path):
    scenes = make_scenes(tmp_path, 4)
    write_review_page(tmp_path / "review.html", scenes, "Review")
    page, seen = open_page(browser, tmp_path / "review.html")
    assert names_shown(page) == ["scene03.png", "scene02.png", EVIL, "scene00.png"]
    page.click("button[data-key=name]")
    assert names_shown(page) == sorted(names_shown(page))
    assert names_shown(page)[0] == EVIL  # '<' sorts first
    page.click("button[data-key=score]")  # best score first; the unscored scene last
    assert names_shown(page) == ["scene00.png", EVIL, "scene02.png", "scene03.png"]
    page.click("button[data-key=score]")
    assert names_shown(page) == ["scene02.png", EVIL, "scene00.png", "scene03.png"]
    page.click("button[data-key=uncertainty]")
    assert names_shown(page)[0] == "scene03.png"
    # A click opens the scene large; the toggles switch its picture.
    assert not page.is_visible("#large")
    page.click("#rows tr:nth-child(3) td.name")
    assert page.is_visible("#large")
    assert EVIL in page.text_content("#title")
    big = page.locator("#big")
    _wait_until(page, "document.getElementById('big').naturalWidth > 0")
    assert big.get_attribute("src").endswith(
        "_prediction.jpg") and "%3Cimg" in big.get_attribute("src")
    page.click("#large button[data-view=uncertainty]")
    _wait_until(page, "document.getElementById('big').naturalWidth > 0")
    assert big.get_attribute("src").endswith("_uncertainty.png")
    links = page.eval_on_selector_all("#links a", "as => as.map(a => a.textContent)")
    assert links == ["label"]  # outputs that exist, linked
    page.keyboard.press("Escape")
    assert not page.is_visible("#large")
    # The unscored scene has no label picture: its toggle is off.
    page.click("#rows tr:nth-child(1) td.name")
    assert page.is_disabled("#large button[data-view=label]")
    # Nothing left the machine, nothing was blocked or ran from a scene name.
    assert all(url.startswith("file://") for url in seen["requests"]), seen["requests"]
    assert seen["errors"] == [] and seen["dialogs"] == []
    assert page.evaluate("document.querySelectorAll('img[src=x]').length") == 0
    page.close()


@pytest.mark.slow
def test_thousands_of_scenes_render_fast_and_load_thumbnails_lazily(browser, tmp_path):
    one = make_scenes(tmp_path, 1)[0]
    scenes = []
    for i in range(3000):
        scene = json.loads(json.dumps(one))
        scene.update(name=f"tile_{i:05d}.tif", uncertainty=(i * 7919 % 3000) / 3000,
                     score=i / 3000)
        scenes.append(scene)
    write_review_page(tmp_path / "review.html", scenes, "Review")
    start = time.perf_counter()
    page, seen = open_page(browser, tmp_path / "review.html")
    page.wait_for_selector("#rows tr")
    assert page.evaluate("document.querySelectorAll('#rows tr').length") == 3000
    elapsed = time.perf_counter() - start
    assert elapsed < 20, f"the page of 3000 scenes took {elapsed:.1f} s to open"
    # Lazy loading: only the thumbnails near the screen are fetched, not 3 x 3000.
    thumbs = [u for u in seen["requests"] if "_thumb." in u]
    assert len(thumbs) < 300, len(thumbs)
    first = int(page.get_attribute("body", "data-render-ms"))
    page.click("button[data-key=name]")
    assert names_shown(page)[:2] == ["tile_00000.tif", "tile_00001.tif"]
    again = int(page.get_attribute("body", "data-render-ms"))
    # The page's own timing of building and of re-sorting the list (a loaded 2-core machine).
    assert first < 5000 and again < 2000, (first, again)
    page.close()


@pytest.mark.slow
def test_segmenting_writes_a_page_listing_every_scene(tmp_path):
    """Through segment_folder: the page lists every segmented scene with its pictures."""
    from helpers import make_config, pixel_model, write_run

    from res_unet.cli import run_command
    from res_unet.geo.writers import write_png
    from res_unet.seg_images_in_folder import main

    run = write_run(tmp_path / "run", pixel_model(), make_config("model"))
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for i, value in enumerate((250, 128, 140)):
        write_png(tmp_path / "images" / f"s{i}.png", np.full((40, 50, 3), value, np.uint8))
        write_png(tmp_path / "labels" / f"s{i}.png", np.ones((40, 50), np.uint8))
    out = tmp_path / "out"
    assert run_command(main, ["--model", str(run), "--images", str(tmp_path / "images"),
                              "--labels", str(tmp_path / "labels"), "--out", str(out),
                              "--no-progress"]) == 0
    data = page_data(out / "review.html")
    assert [s["name"] for s in data] == ["s1.png", "s2.png", "s0.png"]
    assert all(s["score"] is not None and set(s["pictures"]) == {
        "image", "prediction", "label", "uncertainty"} for s in data)
    assert data[0]["outputs"]["overlay"] == "s1_overlay.png"
    assert (out / PICTURES / data[0]["pictures"]["label"]["thumb"]).is_file()
