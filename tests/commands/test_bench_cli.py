"""The bench scripts' command lines: bad arguments are one line naming the argument and the
fix (exit 2), found before any work is done."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def grouped_data(tmp_path_factory) -> tuple[Path, Path]:
    """(config, data folder) with images in the groups tile1 and tile2."""
    root = tmp_path_factory.mktemp("cv")
    for sub in ("images", "labels"):
        (root / "data" / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for stem in ("tile1_a", "tile1_b", "tile2_a"):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
            root / "data" / "images" / f"{stem}.png")
        Image.fromarray(rng.integers(0, 2, (16, 16), dtype=np.uint8)).save(
            root / "data" / "labels" / f"{stem}.png")
    config = root / "c.json"
    config.write_text(json.dumps({"TARGET_SIZE": [16, 16], "NCLASSES": 1,
                                  "SPLIT_GROUP_PATTERN": "^(tile\\d+)_"}))
    return config, root / "data"


def run_cross_validate(config: Path, data: Path, out: Path, *extra: str
                       ) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, str(REPO / "bench" / "cross_validate.py"),
                           "--config", str(config), "--data", str(data), "--out", str(out),
                           *extra], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("extra,named,fix", [
    (["--folds", "tile1", "tile9"], "'tile9'", "tile1, tile2"),
    (["--folds", "tile1", ""], "--folds", "names of the groups"),
    (["--folds", "tile1,", "tile2"], "--folds", "names of the groups"),
    (["--folds", "data/images/tile1_a.png"], "'data/images/tile1_a.png'", "--data"),
    (["--folds", "tile1", "--set", "{KEEP_WEIGHTS: best}"], "--set", "JSON object"),
    (["--folds", "tile1", "--set", "[1, 2]"], "--set", "JSON object"),
    (["--folds", "tile1", "--set", '{"KEEP_WEIGHT": "best"}'], "KEEP_WEIGHT", "KEEP_WEIGHTS"),
    (["--folds", "tile1,tile2"], "--folds", "fewer groups"),
], ids=["no-such-group", "empty-fold", "empty-group", "path", "set-not-json",
        "set-not-object", "set-unknown-key", "every-group"])
def test_cross_validate_bad_arguments_are_one_line_before_any_work(grouped_data, tmp_path,
                                                                   extra, named, fix):
    config, data = grouped_data
    out = tmp_path / "out"
    result = run_cross_validate(config, data, out, *extra)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert named in lines[0] and fix in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not out.exists(), "work started before the arguments were checked"


def test_default_path_variants_name_the_openvino_hint(monkeypatch):
    """bench_segment --default-variants: 'latency' / 'throughput' set OpenVINO's
    PERFORMANCE_HINT and combine with the other parts; an unknown part stops the run."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    from bench_segment import parse_variant

    assert parse_variant("before:latency") == {"name": "before:latency", "before": True,
                                               "hint": "LATENCY"}
    assert parse_variant("throughput:streams=2:batch=4") == {
        "name": "throughput:streams=2:batch=4", "hint": "THROUGHPUT", "streams": 2, "batch": 4}
    with pytest.raises(SystemExit, match="unknown variant part 'fast'"):
        parse_variant("default:fast")
