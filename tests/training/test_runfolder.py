"""The run-folder format (res_unet/training/runfolder.py): reading model cards, configs and weights
that are not what they should be; LoadedModel's runtimes: a run trained in mixed precision
served by OpenVINO, and what INFER_RUNTIME 'auto' and an explicit runtime do on every kind
of machine (GPU visible or not, OpenVINO present, absent or failing, bf16 units or not)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import BAND_MEAN, BAND_STD, make_config, pixel_model, random_u8, write_run

from res_unet.core.errors import UserError
from res_unet.inference import openvino as ov_runtime
from res_unet.inference.runtime import load_run
from res_unet.training import devices
from res_unet.training.runfolder import CARD, ModelCard, load_weights_checked

TILE = 32


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory) -> Path:
    """A run folder whose model was built and saved under mixed_bfloat16, as
    train_resunet writes it with PRECISION 'auto' on a CPU with bf16 units."""
    from res_unet.models import build_model

    cfg = make_config("model", PRECISION="mixed_bfloat16")
    keras.utils.set_random_seed(2)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = build_model(cfg, BAND_MEAN, BAND_STD)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return write_run(tmp_path_factory.mktemp("bf16") / "run", model, cfg)


@pytest.fixture
def own_cache(tmp_path, monkeypatch) -> Path:
    """A conversion cache of this test's own (tests that convert faulty graphs)."""
    monkeypatch.setenv("RES_UNET_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def batch() -> np.ndarray:
    return random_u8((2, TILE, TILE, 3), seed=4).astype(np.float32)


def float32_probabilities(loaded) -> np.ndarray:
    return np.asarray(ov_runtime.float32_twin(loaded.model)(batch()), np.float32)


def test_auto_serves_a_bfloat16_trained_run_with_openvino(bf16_run):
    """The crash of issue 31: 'auto' on a mixed_bfloat16 run compiled the converted mixed
    graph and OpenVINO raised. Now its float32 twin is converted; the test tile's check is
    against the twin in TensorFlow, so OpenVINO is kept, with the float32 probabilities."""
    pytest.importorskip("openvino")
    loaded = load_run(bf16_run)
    assert "mixed_bfloat16" in {layer.dtype_policy.name for layer in loaded.model.layers}
    loaded.use_runtime("auto")
    assert re.fullmatch(r"openvino \(auto: same probabilities as TensorFlow to \d(\.\d)?e-\d+\)",
                        loaded.prepare())
    probs = loaded(batch())
    np.testing.assert_allclose(probs, float32_probabilities(loaded), atol=1e-5)
    trained = np.asarray(loaded.model(batch()), np.float32)  # bfloat16 arithmetic
    assert probs.shape == trained.shape and np.abs(probs - trained).max() < 0.05


def test_explicit_openvino_serves_a_bfloat16_trained_run(bf16_run):
    pytest.importorskip("openvino")
    loaded = load_run(bf16_run)
    loaded.use_runtime("openvino")
    assert loaded.prepare() == "openvino"
    np.testing.assert_allclose(loaded(batch()), float32_probabilities(loaded), atol=1e-5)


def _without_twin(monkeypatch) -> None:
    """Convert the mixed graph as it is: the OpenVINO failure of issue 31, for real."""
    monkeypatch.setattr(ov_runtime, "float32_twin", lambda model: model)


CAUSE = ("RuntimeError: Unsupported operation of type: Convert name: Transpose_")


def test_an_openvino_failure_under_auto_falls_back_to_tensorflow_naming_it(
        bf16_run, monkeypatch, own_cache, capsys):
    """Any error while converting, compiling or checking OpenVINO leaves TensorFlow running
    the model; the runtime line names the cause, and a model prepared on first use (the
    scene evaluation of train_resunet) says it on stderr, once."""
    pytest.importorskip("openvino")
    _without_twin(monkeypatch)
    loaded = load_run(bf16_run)
    loaded.use_runtime("auto")
    described = loaded.prepare()
    assert described.startswith(f"tensorflow (auto: OpenVINO failed, {CAUSE}")
    assert "\n" not in described and loaded.runtime == "tensorflow"
    expected = np.asarray(loaded.model(batch()), np.float32)
    np.testing.assert_array_equal(loaded(batch()), expected)

    lazy = load_run(bf16_run)
    lazy.use_runtime("auto")
    capsys.readouterr()
    np.testing.assert_array_equal(lazy(batch()), expected)
    lazy(batch())
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"note: runtime tensorflow (auto: OpenVINO failed, {CAUSE}")


def test_an_explicit_openvino_that_cannot_run_is_one_line_and_exit_2(
        bf16_run, monkeypatch, own_cache, tmp_path, capsys):
    """seg_images_in_folder --runtime openvino on a model OpenVINO cannot compile: one line
    naming the weights file, the cause and the fix, exit status 2, no traceback."""
    pytest.importorskip("openvino")
    from res_unet.cli import run_command
    from res_unet.geo.writers import write_png
    from res_unet.seg_images_in_folder import main

    _without_twin(monkeypatch)
    images = tmp_path / "images"
    images.mkdir()
    write_png(images / "a.png", random_u8((TILE, TILE, 3)))
    capsys.readouterr()
    code = run_command(main, ["--model", str(bf16_run), "--images", str(images), "--out",
                              str(tmp_path / "out"), "--runtime", "openvino", "--no-progress"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: {bf16_run / 'model.keras'}: INFER_RUNTIME 'openvino' "
                             f"cannot run this model ({CAUSE}")
    assert err[0].endswith("); use --runtime tensorflow (or auto)")
    with pytest.raises(UserError, match="cannot run this model"):
        loaded = load_run(bf16_run)
        loaded.use_runtime("openvino_bf16")
        loaded.prepare()


def test_auto_is_tensorflow_when_a_gpu_is_visible(bf16_run, monkeypatch):
    """With a GPU visible (the listing, patched) 'auto' runs TensorFlow (on the GPU), not
    OpenVINO on the CPU; an explicit 'openvino' is still OpenVINO."""
    pytest.importorskip("openvino")
    monkeypatch.setattr(devices, "visible_gpus", lambda: 1)
    loaded = load_run(bf16_run)
    loaded.use_runtime("auto")
    assert loaded.runtime == "tensorflow"
    assert loaded.prepare() == "tensorflow (auto: TensorFlow sees a GPU)"
    loaded.use_runtime("openvino")
    assert loaded.runtime == "openvino" and loaded.prepare() == "openvino"


def test_auto_is_tensorflow_without_openvino(bf16_run, monkeypatch):
    """The openvino package absent (an import of it fails): 'auto' is TensorFlow and says
    why; asking for OpenVINO is one line naming the package to install."""
    monkeypatch.setitem(sys.modules, "openvino", None)
    loaded = load_run(bf16_run)
    loaded.use_runtime("auto")
    assert loaded.prepare() == "tensorflow (auto: OpenVINO is not installed)"
    with pytest.raises(UserError, match=r"^INFER_RUNTIME 'openvino' needs the openvino "
                                        r"package: pip install 'res_unet\[openvino\]'"):
        loaded.use_runtime("openvino")


def test_auto_bfloat16_is_recorded_in_the_output_fingerprint(monkeypatch, own_cache, tmp_path,
                                                             capsys):
    """When 'auto' chooses OpenVINO bfloat16 (bf16 units and agreeing class maps, both
    patched: this machine has no bf16 units), the runtime line says so and the output
    folder's fingerprint records bfloat16, so float32 outputs are never mixed with it."""
    pytest.importorskip("openvino")
    from helpers import pixel_model

    from res_unet.geo.writers import write_png
    from res_unet.inference.segment import segment_folder
    from res_unet.inference.settings import inference_config

    run = write_run(tmp_path / "run", pixel_model(), make_config("model"))
    images = tmp_path / "images"
    images.mkdir()
    write_png(images / "a.png", random_u8((TILE, TILE, 3)))
    real = ov_runtime.openvino_runner

    def reports_bf16(converted, options=None, info=None):
        run_ = real(converted, options, info)
        if info is not None and (options or {}).get("INFERENCE_PRECISION_HINT") == "bf16":
            info["compiled_precision"] = "bf16"
        return run_

    monkeypatch.setattr(ov_runtime, "openvino_bf16_units", lambda: True)
    monkeypatch.setattr(ov_runtime, "openvino_runner", reports_bf16)
    cfg = inference_config([run])
    assert cfg.INFER_RUNTIME == "auto"
    segment_folder(cfg, [run], images, tmp_path / "out", progress=False)
    assert ("runtime: openvino_bf16 (auto: bfloat16: 0 % of the test tile's pixels changed "
            "class against float32)") in capsys.readouterr().err
    summary = json.loads((tmp_path / "out" / "segmentation_config.json").read_text())
    assert summary["fingerprint"]["precision"] == "bfloat16"

    monkeypatch.setattr(ov_runtime, "openvino_bf16_units", lambda: False)
    with pytest.raises(UserError, match="holds segmentations made with other precision"):
        segment_folder(cfg, [run], images, tmp_path / "out", progress=False)


def test_the_cached_conversion_of_a_bfloat16_run_is_its_float32_twin(bf16_run, own_cache,
                                                                     monkeypatch):
    """The conversion cache holds the twin's conversion under a key of its own (the weights
    file, tile size, versions and 'float32 twin'): the next load reads it without
    converting and it compiles; another tile size is another entry."""
    ov = pytest.importorskip("openvino")
    first = load_run(bf16_run)
    first.use_runtime("auto")
    assert first.prepare().startswith("openvino (auto: same probabilities")
    entries = [p for p in (own_cache / "openvino").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1
    # The mixed graph converted as it is holds casts to an unknown type ("dynamic" in the
    # model.xml), which OpenVINO's CPU plugin cannot compile.
    types = set(re.findall(r'(?:destination_type|precision|element_type)="([^"]*)"',
                           (entries[0] / "model.xml").read_text()))
    assert types and not types & {"dynamic", "UNSPECIFIED", "bf16", "BF16"}

    conversions = []
    real = ov.convert_model
    monkeypatch.setattr(ov, "convert_model", lambda m: conversions.append(1) or real(m))
    again = load_run(bf16_run)
    again.use_runtime("openvino")
    assert again.prepare() == "openvino" and conversions == []
    np.testing.assert_allclose(again(batch()), float32_probabilities(again), atol=1e-5)
    other = load_run(bf16_run, (64, 64))
    assert other.openvino_cache() != entries[0] and other.weights.name == "best.weights.h5"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("runs") / "run", pixel_model(),
                     make_config("model"), threshold=0.5)


def test_a_model_card_nested_thousands_deep_is_one_line(run, tmp_path):
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    (copy / CARD).write_text('{"card_version": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(UserError) as info:
        ModelCard.read(copy)
    assert str(info.value) == (
        f"{copy / CARD}: nested too deeply to be a model card (lists or objects inside each "
        "other thousands of times); pass the right file")


def test_a_fifo_or_device_as_card_config_or_weights_is_refused(run, tmp_path, no_hang):
    """A FIFO would hang the command reading it, /dev/zero would never end: refused before
    reading, one line each (the model card, the run's config, HOT_START weights)."""
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    (copy / CARD).unlink()
    os.mkfifo(copy / CARD)
    with pytest.raises(UserError, match=f"{copy / CARD}: is a FIFO \\(named pipe\\), not a "
                                        "model card file"):
        ModelCard.read(copy)
    (copy / CARD).unlink()
    (copy / CARD).symlink_to("/dev/zero")
    with pytest.raises(UserError, match="is a device, not a model card file"):
        load_run(copy)
    fifo = tmp_path / "weights.weights.h5"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match=f"{fifo}: is a FIFO \\(named pipe\\), not a weights "
                                        "file; pass the weights file itself"):
        load_weights_checked(pixel_model(), fifo)


# Card versions ---------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["lakes_resunet", "lakes_lite0", "dubai_lite0"])
def test_shipped_version_1_cards_read_through_the_version_1_upgrade(name):
    """The shipped cards (version 1, written before tta_views, kept_epoch ... existed) read
    with the values their absence meant, and are not rewritten."""
    path = REPO / "weights" / name / CARD
    before = path.read_bytes()
    raw = json.loads(before)
    card = ModelCard.read(path.parent)
    assert card.card_version == 1 and raw["card_version"] == 1
    assert card.tta_views == raw.get("tta_views")  # lakes_lite0 lists two; others: None
    assert card.training.kept_epoch is None and card.training.averaged_epochs == raw[
        "training"].get("averaged_epochs")
    assert card.input.downsample == raw["input"]["downsample"]
    assert card.input.pixel_size_m == raw["input"]["pixel_size_m"]
    assert card.threshold == raw["threshold"] and card.classes == raw["classes"]
    assert path.read_bytes() == before


def test_the_version_1_upgrade_fills_only_what_is_absent():
    from res_unet.training.runfolder import _CARD_UPGRADES, CARD_VERSION

    assert sorted(_CARD_UPGRADES) == list(range(1, CARD_VERSION + 1))
    old = {"threshold": 0.4, "input": {"size": [8, 8]}, "training": {"epochs_run": 2}}
    new = _CARD_UPGRADES[1](old)
    assert new == {"threshold_source": None, "tta_views": None, "threshold": 0.4,
                   "card_version": 1,
                   "input": {"downsample": 1, "pixel_size_m": None, "size": [8, 8]},
                   "training": {"averaged_epochs": None, "kept_epoch": None, "epochs_run": 2}}
    assert old == {"threshold": 0.4, "input": {"size": [8, 8]}, "training": {"epochs_run": 2}}
    kept = _CARD_UPGRADES[1]({"tta_views": ["identity"], "input": {"downsample": 2},
                              "training": {"kept_epoch": 3}})
    assert (kept["tta_views"], kept["input"]["downsample"], kept["training"]["kept_epoch"]
            ) == (["identity"], 2, 3)


def test_a_card_of_a_newer_version_is_one_line():
    raw = json.loads((REPO / "weights/lakes_resunet" / CARD).read_text())
    with pytest.raises(UserError, match=r"^x.json: written by a newer res_unet \(card version "
                                        r"2; this one reads up to 1\); upgrade res_unet$"):
        ModelCard.from_dict({**raw, "card_version": 2}, "x.json")
