"""What every benchmark needs: the CPU's flags, its measured matmul peak, peak memory.

Imported by the scripts beside it (``python bench/NAME.py`` puts this folder on the path).
Standard library only at import time: bench_vs_gym.py also runs under Segmentation Gym's own
interpreter, which has TensorFlow but not psutil.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

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
