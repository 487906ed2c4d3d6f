"""Tests for res_unet.core.caches: the cache folder, and Keras'
and matplotlib's files kept in it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Variables that would move the folders under test: the child must start without them.
_MOVED = ("RES_UNET_CACHE_DIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "KERAS_HOME",
          "MPLCONFIGDIR")


def test_cache_dir_follows_the_variables(tmp_path, monkeypatch):
    from res_unet.core.caches import cache_dir

    for name in _MOVED:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "res_unet"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "res_unet"
    monkeypatch.setenv("RES_UNET_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


@pytest.mark.slow
def test_nothing_is_written_in_home_but_the_cache(tmp_path):
    """Importing res_unet, building and training a tiny model and saving a figure leave
    nothing in the home folder outside ~/.cache/res_unet: Keras' keras.json and matplotlib's
    font cache are in it, not in ~/.keras and ~/.cache/matplotlib. A folder the user set
    (KERAS_HOME) is kept."""
    home = tmp_path / "home"
    home.mkdir()
    code = (
        "import sys\nimport numpy as np\nimport res_unet\nimport keras\n"
        "from res_unet.data import report\n"
        "from res_unet.models import build_model\n"
        "from helpers import make_config\n"
        "cfg = make_config(FILTERS=2, DEPTH=2, TARGET_SIZE=[16, 16])\n"
        "model = build_model(cfg, [100.0] * 3, [50.0] * 3)\n"
        # Eagerly: the same training step without the seconds of tracing it into a graph
        # (a traced fit wrote nothing more; autograph's files go to the temporary folder).
        "model.compile(optimizer='adam', loss='binary_crossentropy', run_eagerly=True)\n"
        "x = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype('float32')\n"
        "model.fit(x, (x[..., :1] > 128).astype('float32'), epochs=1, verbose=0)\n"
        "rows = [{'epoch': e, 'loss': 1.0 / (e + 1), 'mean_iou': 0.5, 'val_loss': 1.2, "
        "'val_mean_iou': 0.4, 'val_dice': 0.5} for e in range(2)]\n"
        f"report.plot_history(rows, {str(tmp_path / 'h.png')!r})\n")
    env = {k: v for k, v in os.environ.items() if k not in _MOVED}
    env.update(HOME=str(home), PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]),
               CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "h.png").is_file()
    outside = sorted(str(p.relative_to(home)) for p in home.rglob("*")
                     if not p.is_relative_to(home / ".cache" / "res_unet"))
    assert outside == [".cache"], outside
    cache = home / ".cache" / "res_unet"
    assert (cache / "keras" / "keras.json").is_file()
    assert any((cache / "matplotlib").iterdir()), "matplotlib's font cache"

    env["KERAS_HOME"] = str(tmp_path / "my_keras")
    result = subprocess.run([sys.executable, "-c", "import res_unet, keras"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "my_keras" / "keras.json").is_file()
