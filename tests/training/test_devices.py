"""res_unet.training.devices and the oneDNN default that importing res_unet sets."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Whether TensorFlow runs its oneDNN kernels in a fresh process that imported res_unet.
PROBE = ("import res_unet, tensorflow, os; from tensorflow.python.util import _pywrap_util_port; "
         "print(os.environ['TF_ENABLE_ONEDNN_OPTS'], bool(_pywrap_util_port.IsMklEnabled()))")


@pytest.mark.parametrize("setting,expected", [(None, "1 True"), ("0", "0 False")])
def test_importing_res_unet_turns_onednn_on_unless_the_user_chose(setting, expected):
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if setting is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = setting
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                          text=True, timeout=300, check=True)
    assert done.stdout.split()[-2:] == expected.split()


# Machine-dependent defaults: every way each resolves ----------------------------------------

@pytest.mark.parametrize("flags,expected", [
    ("fpu sse avx2 avx512f avx512_bf16 avx512_vnni", True),    # Zen 4, Cooper Lake
    ("fpu sse avx2 avx512f amx_bf16 amx_tile amx_int8", True),  # Sapphire Rapids and later
    ("fpu sse avx avx2 fma", False),                            # this machine: emulated
])
def test_cpu_supports_bf16_reads_the_flags(tmp_path, flags, expected):
    from res_unet.training.devices import cpu_supports_bf16

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n")
    assert cpu_supports_bf16(cpuinfo) is expected


def test_cpu_supports_bf16_is_false_without_cpuinfo(tmp_path):
    """Not Linux (no /proc/cpuinfo): no bf16 claimed, so PRECISION 'auto' stays float32."""
    from res_unet.training.devices import cpu_supports_bf16

    assert cpu_supports_bf16(tmp_path / "absent") is False


@pytest.mark.parametrize("precision,gpus,bf16,expected,note", [
    ("auto", 1, False, "mixed_float16", False),   # a GPU: float16 with loss scaling
    ("auto", 1, True, "mixed_float16", False),    # the GPU wins over the CPU's units
    ("auto", 0, True, "mixed_bfloat16", False),   # AVX512-BF16 / AMX CPU
    ("auto", 0, False, "float32", False),         # any other CPU (bf16 would be emulated)
    ("float32", 1, True, "float32", False),       # an explicit value is kept ...
    ("mixed_bfloat16", 0, False, "mixed_bfloat16", False),
    ("mixed_float16", 1, False, "mixed_float16", False),
    ("mixed_float16", 0, False, "mixed_float16", True),  # ... with a note where it is slow
])
def test_precision_resolves_by_machine(monkeypatch, capsys, precision, gpus, bf16, expected,
                                       note):
    from helpers import make_config

    from res_unet.training import devices

    monkeypatch.setattr(devices, "visible_gpus", lambda: gpus)
    monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: bf16)
    assert devices.resolve_precision(make_config(PRECISION=precision)) == expected
    out = capsys.readouterr().err
    assert out == ("note: PRECISION mixed_float16 without a GPU is very slow; consider "
                   "mixed_bfloat16 or float32\n" if note else "")


def test_precision_default_is_auto():
    from res_unet.config.keys import config_from_dict

    cfg, _ = config_from_dict({})
    assert (cfg.PRECISION, cfg.INFER_RUNTIME, cfg.SET_GPU) == ("auto", "auto", "")


class _Strategy:
    """Stands for a distribution strategy whose construction would need the devices."""

    def __init__(self, *args, **kwargs):
        pass


@pytest.mark.parametrize("workers,gpus,expected", [
    (2, 0, "MultiWorkerMirroredStrategy"),  # TF_CONFIG naming several workers
    (0, 2, "MirroredStrategy"),             # several GPUs on one machine
    (0, 1, "default"),                      # one GPU
    (0, 0, "default"),                      # the CPU
    (1, 0, "default"),                      # TF_CONFIG with a single worker
])
def test_strategy_resolves_by_machine(monkeypatch, workers, gpus, expected):
    import tensorflow as tf

    from res_unet.training import devices

    monkeypatch.setattr(devices, "visible_gpus", lambda: gpus)
    fakes = {name: type(name, (_Strategy,), {})
             for name in ("MultiWorkerMirroredStrategy", "MirroredStrategy")}
    for name, fake in fakes.items():
        monkeypatch.setattr(tf.distribute, name, fake)
    if workers:
        monkeypatch.setenv("TF_CONFIG", json.dumps({
            "cluster": {"worker": [f"host{i}:1" for i in range(workers)]},
            "task": {"type": "worker", "index": 0}}))
    else:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    strategy = devices.make_strategy()
    if expected == "default":
        assert strategy is tf.distribute.get_strategy()
    else:
        assert type(strategy) is fakes[expected]


@pytest.mark.parametrize("tf_config,chief", [
    (None, True),                                                           # one process
    ({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 0}}, True),
    ({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}, False),
    ({"cluster": {"chief": ["c:1"], "worker": ["a:1"]}, "task": {"type": "chief", "index": 0}},
     True),
    ({"cluster": {"chief": ["c:1"], "worker": ["a:1"]}, "task": {"type": "worker", "index": 0}},
     False),
])
def test_the_chief_writes_the_run_folder(monkeypatch, tf_config, chief):
    from res_unet.training import devices

    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", json.dumps(tf_config))
    assert devices.is_chief() is chief


@pytest.mark.parametrize("gpus", [0, 2])
def test_device_description_by_machine(monkeypatch, gpus):
    from res_unet.training import devices

    monkeypatch.setattr(devices, "visible_gpus", lambda: gpus)
    described = devices.device_description()
    assert described == "2 GPU(s)" if gpus else described.endswith(f", {os.cpu_count()} cores")


def test_visible_gpus_counts_tensorflows_logical_gpus(monkeypatch):
    import tensorflow as tf

    from res_unet.training import devices

    monkeypatch.setattr(tf.config, "list_logical_devices",
                        lambda kind: ["/gpu:0", "/gpu:1"] if kind == "GPU" else [])
    assert devices.visible_gpus() == 2


@pytest.mark.parametrize("set_gpu,visible", [("", None), ("-1", "-1"), ("0,1", "0,1")])
def test_set_gpu_chooses_the_devices_tensorflow_sees(monkeypatch, set_gpu, visible):
    """SET_GPU '' leaves the GPUs as they are (all visible), '-1' hides them, '0,1' picks."""
    from res_unet.cli import select_devices

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    select_devices(set_gpu)
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == visible
