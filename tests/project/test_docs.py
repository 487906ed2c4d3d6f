"""The documentation: generated pages are current, the README stays a short guide without
dates, every relative link leads to a file, and the README's Python example runs."""

import importlib.util
import os
import re
from pathlib import Path

import numpy as np
import pytest

from res_unet.demo import synthesize_scene
from res_unet.geo import rasters, writers

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]


def _generator():
    spec = importlib.util.spec_from_file_location("docs_generate", REPO / "docs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_docs_are_current():
    generate = _generator()
    expected = generate.outputs()
    assert {REPO / "docs" / n for n in ("config.md", "models.md", "benchmarks.md")} <= set(
        expected)
    stale = [str(p.relative_to(REPO)) for p, text in expected.items()
             if not p.exists() or p.read_text() != text]
    assert not stale, f"out of date: {stale}; run python docs/generate.py"


def test_every_shipped_model_is_in_the_generated_tables():
    text = README.read_text()
    models = (REPO / "docs" / "models.md").read_text()
    for card in sorted((REPO / "weights").glob("*/model_card.json")):
        name = card.parent.name
        assert f"weights/{name}/README.md" in text and f"{name}/README.md" in models
        assert "<!-- generated:card" in (card.parent / "README.md").read_text()


def test_readme_is_short_and_undated():
    lines = README.read_text().splitlines()
    assert len(lines) < 250, f"README.md has {len(lines)} lines; move detail into docs/"
    dated = [line for line in lines if re.search(r"\b\d{4}-\d{2}-\d{2}\b", line)]
    assert not dated, f"README.md has dated lines (history belongs in docs/): {dated}"
    assert not re.search(r"\b(at|commit) [0-9a-f]{7,40}\b", README.read_text())


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_no_page_names_a_path_of_one_machine(page):
    """Commands and paths in the docs run from a clone: no /work/..., /tmp/..., /home/..."""
    found = re.findall(r"(?<![\w.~])/(?:work|tmp|root|home|Users)/[^\s`)\]]*", page.read_text())
    assert not found, f"{page.name}: paths of one machine: {found}"


CURRENT = [p for p in PAGES if p.name != "changelog.md"]  # the changelog is history


@pytest.mark.parametrize("page", CURRENT, ids=[p.name for p in CURRENT])
def test_pages_name_test_files_that_exist(page):
    """tests/... paths a page names (tests mirror the packages) lead to files."""
    named = set(re.findall(r"\btests/[\w/]+\.py", page.read_text()))
    missing = sorted(n for n in named if not (REPO / n).exists())
    assert not missing, f"{page.name}: names missing test files: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_lead_to_files(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    broken = [t for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")
              and not (page.parent / t.split("#")[0]).exists()]
    assert not broken, f"{page.name}: links to missing files: {broken}"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's Python block, as written, on a small synthetic scene."""
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    image, _ = synthesize_scene(np.random.default_rng(0), (200, 260))
    writers.write_png(tmp_path / "my_scenes" / "scene.png", image)
    os.symlink(REPO / "weights", tmp_path / "weights")
    monkeypatch.chdir(tmp_path)
    namespace = {"image": image}
    exec(compile(block, "README.md", "exec"), namespace)
    label = namespace["label"]
    assert label.shape == (200, 260) and label.dtype == np.uint8
    assert set(np.unique(label)) <= {0, 1}
    written = rasters.read_label(tmp_path / "my_masks" / "scene_predseg.png")
    np.testing.assert_array_equal(written, label)
