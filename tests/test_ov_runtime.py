"""Tests for res_unet.ov_runtime: the OpenVINO conversion cache and its integrity check."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

ov = pytest.importorskip("openvino")

from res_unet.ov_runtime import converted_model, openvino_runner  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def small_model(seed: int = 3) -> keras.Model:
    keras.utils.set_random_seed(seed)
    x = keras.Input((16, 16, 3))
    y = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    y = keras.layers.Conv2D(2, 1, activation="softmax")(y)
    return keras.Model(x, y)


def test_a_damaged_cache_entry_is_converted_again_with_a_notice(tmp_path, monkeypatch, capsys):
    """The entry records the SHA-256 of model.xml and model.bin; flipped bytes in model.bin
    (which OpenVINO would read without complaint) make the next load convert again, say so
    on stderr naming the folder, rewrite the entry, and give the TensorFlow model's output."""
    model = small_model()
    folder = tmp_path / "cache" / "entry"
    conversions = []
    real_convert = ov.convert_model
    monkeypatch.setattr(ov, "convert_model", lambda m: conversions.append(1) or real_convert(m))
    batch = np.random.default_rng(0).uniform(0, 1, (2, 16, 16, 3)).astype(np.float32)
    expected = np.asarray(model(batch))

    converted_model(model, folder)
    digests = json.loads((folder / "sha256.json").read_text())
    assert set(digests) == {"model.xml", "model.bin", "seal"}
    converted_model(model, folder)
    assert len(conversions) == 1 and capsys.readouterr().err == ""

    weights = folder / "model.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2: len(data) // 2 + 16] = bytes(b ^ 0xFF for b in
                                                      data[len(data) // 2: len(data) // 2 + 16])
    weights.write_bytes(bytes(data))
    outputs = openvino_runner(converted_model(model, folder))(batch)
    assert len(conversions) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(folder) in err[0] and "converting it again" in err[0]
    np.testing.assert_allclose(outputs, expected, atol=1e-5)
    rewritten = json.loads((folder / "sha256.json").read_text())
    assert rewritten["model.bin"] == digests["model.bin"], "entry rewritten with good weights"
    for name in ("model.xml", "model.bin"):
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == rewritten[name]
    converted_model(model, folder)
    assert len(conversions) == 2, "the rewritten entry is used"

    (folder / "sha256.json").unlink()  # an entry from before the check: converted again
    converted_model(model, folder)
    assert len(conversions) == 3 and str(folder) in capsys.readouterr().err
    assert (folder / "sha256.json").is_file()


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle: middle + 16] = bytes(b ^ 0xFF for b in data[middle: middle + 16])
    path.write_bytes(bytes(data))


def test_an_entry_whose_record_was_rewritten_to_match_is_converted_again(tmp_path, monkeypatch,
                                                                          capsys):
    """The record of digests is sealed by the Keras model's weights, which never enter the
    cache: flipped bytes in model.bin with sha256.json rewritten to match, or an entry
    copied whole from another model's folder, are converted again with a one-line notice,
    and the output is the Keras model's."""
    model = small_model()
    folder = tmp_path / "cache" / "entry"
    conversions = []
    real_convert = ov.convert_model
    monkeypatch.setattr(ov, "convert_model", lambda m: conversions.append(1) or real_convert(m))
    batch = np.random.default_rng(0).uniform(0, 1, (2, 16, 16, 3)).astype(np.float32)
    expected = np.asarray(model(batch))
    converted_model(model, folder)

    _flip_bytes(folder / "model.bin")
    record = json.loads((folder / "sha256.json").read_text())
    record["model.bin"] = hashlib.sha256((folder / "model.bin").read_bytes()).hexdigest()
    (folder / "sha256.json").write_text(json.dumps(record))
    outputs = openvino_runner(converted_model(model, folder))(batch)
    assert len(conversions) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"note: {folder}: the cached OpenVINO model is not usable (sha256.json was "
                   "not written for these weights); converting it again"]
    np.testing.assert_allclose(outputs, expected, atol=1e-5)

    converted_model(small_model(seed=4), tmp_path / "cache" / "other")
    shutil.rmtree(folder)
    shutil.copytree(tmp_path / "cache" / "other", folder)
    outputs = openvino_runner(converted_model(model, folder))(batch)
    assert len(conversions) == 4
    assert "was not written for these weights" in capsys.readouterr().err
    np.testing.assert_allclose(outputs, expected, atol=1e-5)
    converted_model(model, folder)
    assert len(conversions) == 4, "the entry written again is used"


def test_openvino_telemetry_writes_nothing_in_home(tmp_path):
    """Importing OpenVINO and converting through res_unet leaves no intel/ folder (OpenVINO's
    telemetry client id and consent files) in the user's home."""
    home = tmp_path / "home"
    home.mkdir()
    code = ("import keras\nfrom pathlib import Path\n"
            "from res_unet.ov_runtime import converted_model, openvino_runner\n"
            "x = keras.Input((8, 8, 3))\n"
            "m = keras.Model(x, keras.layers.Conv2D(2, 3, padding='same')(x))\n"
            f"openvino_runner(converted_model(m, Path({str(tmp_path / 'c')!r})))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TF_BUILD", "JENKINS_URL")}
    env.update(HOME=str(home), PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="",
               KERAS_HOME=str(tmp_path / "keras"), MPLCONFIGDIR=str(tmp_path / "mpl"))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "c" / "model.xml").is_file()
    assert not (home / "intel").exists()
