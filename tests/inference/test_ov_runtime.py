"""Tests for res_unet.inference.openvino: the OpenVINO conversion cache and its integrity check,
float32 twins of mixed-precision models, and what INFER_RUNTIME 'auto' chooses."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import forked
import keras
import numpy as np
import pytest

ov = pytest.importorskip("openvino")

from res_unet.inference.openvino import converted_model, openvino_runner  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def small_model(seed: int = 3) -> keras.Model:
    keras.utils.set_random_seed(seed)
    x = keras.Input((16, 16, 3))
    y = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    y = keras.layers.Conv2D(2, 1, activation="softmax")(y)
    return keras.Model(x, y)


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle: middle + 16] = bytes(b ^ 0xFF for b in data[middle: middle + 16])
    path.write_bytes(bytes(data))


@pytest.fixture
def conversions(monkeypatch) -> list[int]:
    """Grows by one at every ov.convert_model call (a conversion, not a cache read)."""
    calls: list[int] = []
    real_convert = ov.convert_model
    monkeypatch.setattr(ov, "convert_model", lambda m: calls.append(1) or real_convert(m))
    return calls


def test_a_damaged_cache_entry_is_converted_again_with_a_notice(tmp_path, conversions, capsys):
    """The entry records the SHA-256 of model.xml and model.bin; flipped bytes in model.bin
    (which OpenVINO would read without complaint) make the next load convert again, say so
    on stderr naming the folder, rewrite the entry, and give the TensorFlow model's output."""
    model = small_model()
    folder = tmp_path / "cache" / "entry"
    batch = np.random.default_rng(0).uniform(0, 1, (2, 16, 16, 3)).astype(np.float32)
    expected = np.asarray(model(batch))

    converted_model(model, folder)
    digests = json.loads((folder / "sha256.json").read_text())
    assert set(digests) == {"model.xml", "model.bin", "seal"}
    converted_model(model, folder)
    assert len(conversions) == 1 and capsys.readouterr().err == ""

    _flip_bytes(folder / "model.bin")
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


def test_an_entry_whose_record_was_rewritten_to_match_is_converted_again(tmp_path, conversions,
                                                                          capsys):
    """The record of digests is sealed by the Keras model's weights, which never enter the
    cache: flipped bytes in model.bin with sha256.json rewritten to match, or an entry
    copied whole from another model's folder, are converted again with a one-line notice,
    and the output is the Keras model's."""
    model = small_model()
    folder = tmp_path / "cache" / "entry"
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
    telemetry client id and consent files) in the user's home. In a process of its own
    (forked from one that imported TensorFlow and Keras, not OpenVINO: tests/forked.py)."""
    home = tmp_path / "home"
    home.mkdir()
    code = ("import keras\nfrom pathlib import Path\n"
            "from res_unet.inference.openvino import converted_model, openvino_runner\n"
            "x = keras.Input((8, 8, 3))\n"
            "m = keras.Model(x, keras.layers.Conv2D(2, 3, padding='same')(x))\n"
            f"openvino_runner(converted_model(m, Path({str(tmp_path / 'c')!r})))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TF_BUILD", "JENKINS_URL")}
    env.update(HOME=str(home), PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="",
               KERAS_HOME=str(tmp_path / "keras"), MPLCONFIGDIR=str(tmp_path / "mpl"))
    status, _, err = forked.run(["-c", code], env=env, timeout=300)
    assert status == 0, err[-2000:]
    assert (tmp_path / "c" / "model.xml").is_file()
    assert not (home / "intel").exists()


# Mixed-precision models and the 'auto' choice ------------------------------------------------

def mixed_model(policy: str = "mixed_bfloat16", **keys) -> keras.Model:
    """A small res_unet model built under ``policy`` (as train_resunet builds it for
    PRECISION), the global policy restored after."""
    from helpers import BAND_MEAN, BAND_STD, make_config

    from res_unet.models import build_model

    keras.utils.set_random_seed(1)
    keras.mixed_precision.set_global_policy(policy)
    try:
        return build_model(make_config("model", **keys), BAND_MEAN, BAND_STD)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def policies(model: keras.Model) -> set[str]:
    return {layer.dtype_policy.name for layer in model._flatten_layers()}


@pytest.mark.parametrize("keys", [
    pytest.param({"MODEL": "resunet"}, id="resunet"),
    # Tens of seconds each: emulated bfloat16 and a large conversion.
    pytest.param({"MODEL": "efficientnet_unet", "ENCODER": "lite0", "ENCODER_WEIGHTS": None},
                 id="lite0", marks=pytest.mark.slow),
    pytest.param({"MODEL": "efficientnet_unet", "ENCODER": "B0", "ENCODER_WEIGHTS": None},
                 id="B0", marks=pytest.mark.slow),
])
def test_a_mixed_precision_model_runs_in_openvino_as_its_float32_twin(keys):
    """OpenVINO cannot compile a mixed_bfloat16 graph as converted (cpu_convert can't
    convert from f32 precision to dynamic); converted_model converts its float32 twin: the
    same architecture with float32 policies and the same weights, whose TensorFlow
    probabilities OpenVINO gives to 1e-5 and the bf16 model's to bfloat16 rounding."""
    from res_unet.inference.openvino import float32_twin

    model = mixed_model(**keys)
    assert "mixed_bfloat16" in policies(model)
    twin = float32_twin(model)
    assert policies(twin) == {"float32"}
    assert [w.dtype for w in twin.get_weights()] == [w.dtype for w in model.get_weights()]
    for ours, theirs in zip(twin.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    assert keras.config.dtype_policy().name == "float32", "the global policy is restored"
    batch = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    expected = np.asarray(twin(batch))
    np.testing.assert_allclose(np.asarray(model(batch), np.float32), expected, atol=0.05)
    outputs = openvino_runner(converted_model(model))(batch)
    np.testing.assert_allclose(outputs, expected, atol=1e-5)


def test_a_float32_model_is_its_own_twin():
    from res_unet.inference.openvino import float32_twin

    model = mixed_model("float32")
    assert float32_twin(model) is model


def test_failure_cause_keeps_the_line_that_says_what_failed():
    """OpenVINO's messages start with source locations; the cause is the first other line."""
    from res_unet.inference.openvino import failure_cause

    message = ("Exception from src/inference/src/cpp/core.cpp:117:\n"
               "Exception from src/inference/src/dev/plugin.cpp:54:\n"
               "Check 'newNode' failed at src/plugins/intel_cpu/src/node.cpp:1626:\n"
               "Unsupported operation of type: Convert name: Transpose_81\nDetails:\n"
               "Exception from src/plugins/intel_cpu/src/nodes/convert.cpp:61:\n"
               "Not Implemented:\ncpu_convert can't convert from: f32 precision to: dynamic\n")
    assert failure_cause(RuntimeError(message)) == (
        "RuntimeError: Unsupported operation of type: Convert name: Transpose_81")
    assert failure_cause(ValueError("")) == "ValueError"
    assert failure_cause(OSError("disk\nfull")) == "OSError: disk"


def test_class_changes_counts_pixels_that_change_class():
    from res_unet.inference.openvino import class_changes

    ref = np.array([0.1, 0.45, 0.55, 0.9], np.float32).reshape(1, 2, 2, 1)
    moved = np.array([0.1, 0.52, 0.55, 0.9], np.float32).reshape(1, 2, 2, 1)
    assert class_changes(moved, ref) == 0.25
    assert class_changes(moved, ref, threshold=0.6) == 0.0
    multi = np.array([[0.6, 0.4], [0.2, 0.8]], np.float32).reshape(1, 1, 2, 2)
    assert class_changes(multi[..., ::-1], multi) == 1.0 and class_changes(multi, multi) == 0.0


def _fake_bf16_runner(real, flip: float):
    """openvino_runner whose bf16 compilation reports bf16 and moves the probabilities of
    the first ``flip`` share of pixels across 0.5 (float32 compilations stay real)."""

    def runner(converted, options=None, info=None):
        run = real(converted, options, info)
        if (options or {}).get("INFERENCE_PRECISION_HINT") != "bf16":
            return run
        if info is not None:
            info["compiled_precision"] = "bf16"

        def run_bf16(batch):
            out = run(batch).copy()
            flat = out.reshape(-1)
            n = round(flip * flat.size)
            flat[:n] = np.where(flat[:n] > 0.5, 0.0, 1.0)
            # bfloat16 moves every probability a little (away from 0.5: no class changes).
            return np.clip(out + 1e-3 * np.sign(out - 0.5), 0, 1)

        return run_bf16

    return runner


@pytest.mark.parametrize("flip,runtime", [(0.0, "openvino_bf16"), (0.01, "openvino")])
def test_auto_computes_in_bfloat16_only_on_bf16_units_and_when_classes_agree(
        monkeypatch, tmp_path, flip, runtime):
    """On a CPU with bf16 units (the capability probe, patched: this machine has none),
    'auto' keeps OpenVINO bfloat16 when the test tile's class map stays float32's (at most
    AUTO_BF16_CLASS_CHANGES of its pixels change class), else float32 with the reason."""
    from res_unet.inference import openvino as ov_runtime

    model = mixed_model("float32", THRESHOLD=0.5)
    probe = ov_runtime.probe_batch((32, 32), 3)
    monkeypatch.setattr(ov_runtime, "openvino_bf16_units", lambda: True)
    monkeypatch.setattr(ov_runtime, "openvino_runner",
                        _fake_bf16_runner(ov_runtime.openvino_runner, flip))
    run, chosen, note = ov_runtime.auto_openvino(model, tmp_path / "entry", probe, 0.5)
    assert chosen == runtime
    gap = np.abs(run(probe) - np.asarray(model(probe)))
    if runtime == "openvino_bf16":
        assert note == "bfloat16: 0 % of the test tile's pixels changed class against float32"
        assert 5e-4 < gap.max() <= 1e-3 + 1e-5, "the bfloat16 runner is the one kept"
    else:
        assert note.startswith("same probabilities as TensorFlow to ")
        # 10 of the tile's 1024 pixels moved across the threshold
        assert note.endswith("; not bfloat16: 0.98 % of the test tile's pixels changed class")
        assert gap.max() < 1e-4


def test_auto_stays_float32_where_openvino_compiles_bf16_as_f32(monkeypatch):
    """The capability probe says bf16 but OpenVINO compiles f32 (this AVX2 machine): the
    float32 runner is kept, without a bfloat16 claim."""
    from res_unet.inference import openvino as ov_runtime

    model = mixed_model("float32")
    probe = ov_runtime.probe_batch((32, 32), 3)
    monkeypatch.setattr(ov_runtime, "openvino_bf16_units", lambda: True)
    _run, chosen, note = ov_runtime.auto_openvino(model, None, probe)
    assert chosen == "openvino" and note.startswith("same probabilities as TensorFlow to ")
    assert "bfloat16" not in note


def test_openvino_bf16_units_reads_the_cpu_plugin_capabilities():
    """This machine (AVX2) has no bf16 units; the probe says so from OpenVINO's list."""
    from res_unet.inference.openvino import openvino_bf16_units

    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert openvino_bf16_units() is ("BF16" in capabilities)


def test_requests_in_flight_give_the_synchronous_probabilities():
    """With more than one stream the runner keeps one infer request per stream in flight,
    each on its own part of the batch: the probabilities equal the one synchronous request's
    to 1e-6, in the batch's order, for batches smaller, equal to and larger than the number of
    requests, and the returned arrays are not overwritten by the next call. Without options
    a runner has two requests where the process may use two cores or more."""
    model = small_model()
    converted = converted_model(model)
    info: dict = {}
    openvino_runner(converted, None, info)
    assert info["requests"] == min(2, len(os.sched_getaffinity(0)))
    assert info["compiled_precision"] == "f32"
    run_async = openvino_runner(converted, {"PERFORMANCE_HINT": "THROUGHPUT",
                                            "NUM_STREAMS": 2}, info)
    run_sync = openvino_runner(converted, {"PERFORMANCE_HINT": "LATENCY"})
    assert info["requests"] == 2
    rng = np.random.default_rng(5)
    for n in (1, 2, 3, 7):
        batch = rng.uniform(0, 1, (n, 16, 16, 3)).astype(np.float32)
        got = run_async(batch)
        kept = got.copy()
        assert got.shape == (n, 16, 16, 2) and got.dtype == np.float32
        np.testing.assert_allclose(got, run_sync(batch), atol=1e-6, rtol=0)
        np.testing.assert_allclose(got, np.asarray(model(batch)), atol=1e-5)
        run_async(rng.uniform(0, 1, (n, 16, 16, 3)).astype(np.float32))
        np.testing.assert_array_equal(got, kept)
