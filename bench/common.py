"""What every benchmark needs: the CPU's flags, its measured matmul peak, peak memory, and
one place to keep its results.

Imported by the scripts beside it (``python bench/NAME.py`` puts this folder on the path).
Each script writes its JSON report to ``bench/results/NAME.json`` (``--json-out PATH`` for
another file, ``--json-out -`` for none); ``python docs/generate.py`` turns that folder into
``docs/benchmarks.md``, one table per file, headed by the machine, its CPU flags and the
matmul peak measured in the same run.
Standard library only at import time: bench_vs_gym.py also runs under Segmentation Gym's own
interpreter, which has TensorFlow but not psutil.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

# The SIMD flags that decide TensorFlow's CPU speed and whether bfloat16 is native.
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_flags() -> list[str]:
    """The flags of CPU_FLAGS this CPU has (from /proc/cpuinfo; [] where it is absent)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    return sorted(f for f in flags if f in CPU_FLAGS)


def onednn_enabled() -> bool | None:
    """Whether TensorFlow runs its oneDNN kernels in this process (importing res_unet turns
    them on, see res_unet/__init__.py); None when this TensorFlow build cannot say."""
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:
        return None
    return bool(_pywrap_util_port.IsMklEnabled())


def matmul_peak(dtype=None, n: int = 2048, repeats: int = 20) -> float:
    """Measured matmul GFLOP/s of ``dtype`` (default float32) for n x n matrices, best of
    three timings: the peak that model FLOPs utilisation is quoted against."""
    import tensorflow as tf

    dtype = dtype or tf.float32
    a = tf.cast(tf.random.uniform((n, n), dtype=tf.float32), dtype)
    step = tf.function(lambda x: tf.matmul(x, x))
    step(a).numpy()
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            out = step(a)
        out.numpy()
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9)
    return best


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("CPU" where it is absent)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "CPU"
    return next((line.split(":", 1)[1].strip() for line in text.splitlines()
                 if line.startswith("model name")), "CPU")


def add_json_out(parser: argparse.ArgumentParser, name: str) -> None:
    """Add ``--json-out``: where the report goes (default ``bench/results/NAME.json``)."""
    parser.add_argument("--json-out", default=str(RESULTS / f"{name}.json"), metavar="PATH",
                        help=f"write the JSON report here ('-': nowhere; default: "
                             f"bench/results/{name}.json, which docs/benchmarks.md shows)")


def write_result(report: dict[str, Any], json_out: str, peak_gflops: float | None = None
                 ) -> None:
    """Write ``report`` to ``json_out`` (unless '-') with a ``host`` record: CPU model, cores,
    flags, the command, and the float32 matmul peak (GFLOP/s) of this process (measured
    now when the script did not pass the one it measured)."""
    if json_out == "-":
        return
    if peak_gflops is None:
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # the kernels res_unet runs on
        peak_gflops = matmul_peak()
    script = Path(sys.argv[0])
    report = {"host": {
        "cpu": cpu_model(), "cpus": len(os.sched_getaffinity(0)), "cpu_flags": cpu_flags(),
        "matmul_fp32_gflops": round(peak_gflops, 1),
        "command": shlex.join(["python", f"bench/{script.name}", *sys.argv[1:]]),
    }, **report}
    path = Path(json_out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


class PeakMemory:
    """Peak resident set size (bytes) of this process while the block runs (sampled in a
    thread, so TensorFlow's own allocations count)."""

    def __init__(self, interval: float = 0.02) -> None:
        import psutil

        self.interval = interval
        self.process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self.start = self.process.memory_info().rss
        self.peak = self.start
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
