"""The OpenVINO runtime of a loaded model: converting a Keras model (:func:`converted_model`,
through res_unet's conversion cache, :func:`cache_dir`; a mixed-precision model as its
float32 twin, :func:`float32_twin`) and compiling it for this CPU (:func:`openvino_runner`),
for :class:`res_unet.inference.runtime.LoadedModel` and bench/bench_runtime.py. OpenVINO is
imported only when used, through :func:`import_openvino`, with its telemetry turned off."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import importlib.util
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from res_unet.core import messages
from res_unet.core.atomic import clean_stale_temporaries, owner_tag, usual_mode
from res_unet.core.caches import cache_dir  # noqa: F401 (the conversion cache lives in it)
from res_unet.data.records import file_sha256

# The SHA-256 of each file of a cache entry, and their seal by the weights (_seal), written
# into the entry with the files.
DIGESTS = "sha256.json"
_ENTRY_FILES = ("model.xml", "model.bin")


@contextlib.contextmanager
def _telemetry_off() -> Iterator[None]:
    """OpenVINO's converter (imported with ``openvino``, called by convert_model) sends usage
    telemetry and writes a client id into ~/intel unless told otherwise. It creates its
    openvino_telemetry client with ``disable_in_ci=True``, which declines when the CI
    environment variable is 'true': set just while OpenVINO runs its checks, so nothing is
    written outside the user's folders and the cache, and nothing is sent."""
    before = os.environ.get("CI")
    os.environ["CI"] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CI", None)
        else:
            os.environ["CI"] = before


def import_openvino() -> Any:
    """The ``openvino`` module, imported with its telemetry off (see _telemetry_off)."""
    with _telemetry_off():
        import openvino

    return openvino


def openvino_installed() -> bool:
    """Whether the ``openvino`` package can be imported."""
    return importlib.util.find_spec("openvino") is not None


def openvino_bf16_units() -> bool:
    """Whether OpenVINO computes in bfloat16 on this CPU when asked (its CPU plugin lists
    BF16 among its capabilities only on CPUs with AVX512-BF16 or AMX units)."""
    ov = import_openvino()

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


# The lines of OpenVINO's messages that only say where in its sources the error was raised.
_SOURCE_LINE = re.compile(r"^(Exception from |Check '.*' failed at )\S+:\d+:?$|^Details:$")


def failure_cause(exc: BaseException) -> str:
    """A one-line account of why converting or running a model failed: the first line of
    the message that is not one of OpenVINO's source locations, with the exception's type."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not _SOURCE_LINE.match(line)]
    first = (useful or lines or [""])[0][:200]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


# Dtypes and dtype policies a float32 twin replaces (integer dtypes stay).
_LOW_PRECISION = ("bfloat16", "float16", "mixed_bfloat16", "mixed_float16")


def _float32_config(value: Any) -> Any:
    """A Keras model config with every float16/bfloat16 dtype and mixed dtype policy made
    float32 (layers' policies, and the input dtypes of nested models such as an encoder)."""
    if isinstance(value, list | tuple):
        return type(value)(_float32_config(item) for item in value)
    if not isinstance(value, dict):
        return value
    out = {}
    for key, item in value.items():
        name = item
        if key == "dtype" and isinstance(item, dict) and str(
                item.get("class_name", "")).endswith("DTypePolicy"):
            name = item.get("config", {}).get("name")
        low = key == "dtype" and isinstance(name, str) and name in _LOW_PRECISION
        out[key] = "float32" if low else _float32_config(item)
    return out


def float32_twin(model: Any) -> Any:
    """``model`` itself when it computes in float32, else the same architecture built under
    float32 dtype policies holding the same weights (the variables of a mixed-precision model
    are float32 already). OpenVINO's CPU plugin cannot compile the casts a mixed_bfloat16 or
    mixed_float16 graph holds; the twin converts cleanly and gives the float32 probabilities."""
    import keras

    try:
        config = model.get_config()
    except NotImplementedError:  # a subclassed model without a config: converted as it is
        return model
    twin_config = _float32_config(config)
    if twin_config == config:
        return model
    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        twin = model.__class__.from_config(twin_config)
    finally:
        keras.config.set_dtype_policy(before)
    twin.set_weights(model.get_weights())
    return twin


def default_streams() -> dict[str, Any]:
    """The CPU properties a runner is compiled with unless told otherwise: two streams (each
    with half the cores) with one infer request in flight each, where the CPU has two cores
    or more. On 2 cores this segmented the lakes scenes 10-25 % faster than one LATENCY
    request on both cores when other processes shared the cores, level on a quiet machine,
    with the same probabilities (bench/results/default_path_streams*.json); two and not
    OpenVINO's THROUGHPUT choice, which on many cores makes more streams than a scene's
    batch of tiles has tiles."""
    if len(os.sched_getaffinity(0)) < 2:
        return {}
    return {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": 2}


def openvino_runner(converted: Any, options: dict[str, Any] | None = None,
                    info: dict[str, Any] | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """Compile an OpenVINO model for the CPU and return its batch -> float32 probabilities
    call. Compiled in float32 unless ``options`` say otherwise: OpenVINO defaults to bfloat16
    on CPUs with native bf16 (AVX512_BF16, AMX), which moves probabilities by ~1e-2 and flips
    pixels at the threshold. ``options`` add OpenVINO CPU properties (threads, hints; without
    a PERFORMANCE_HINT or NUM_STREAMS, :func:`default_streams`); ``info``, when given,
    receives the precision, thread count and number of infer requests compiled.

    When the compiled model wants more than one infer request in flight (a THROUGHPUT hint
    or NUM_STREAMS > 1: one stream of threads per request), a batch is split into that many
    parts run at once (AsyncInferQueue), so each stream works on its own tiles; otherwise
    one synchronous request runs the whole batch. The probabilities are the same either
    way (each tile is computed alone)."""
    ov = import_openvino()

    options = dict(options or {})
    if "PERFORMANCE_HINT" not in options and "NUM_STREAMS" not in options:
        options = {**default_streams(), **options}
    compiled = ov.Core().compile_model(converted, "CPU",
                                       {"INFERENCE_PRECISION_HINT": "f32", **options})
    jobs = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
    if info is not None:
        precision = compiled.get_property("INFERENCE_PRECISION_HINT")
        info["compiled_precision"] = getattr(precision, "get_type_name", precision.__str__)()
        info["threads"] = int(compiled.get_property("INFERENCE_NUM_THREADS"))
        info["requests"] = jobs
    if jobs == 1:
        request = compiled.create_infer_request()

        def run(batch: np.ndarray) -> np.ndarray:
            request.infer({0: np.ascontiguousarray(batch, np.float32)})
            # The output tensor is the request's buffer, reused by the next call: copy it.
            return np.array(request.get_output_tensor(0).data, np.float32)

        return run

    queue = ov.AsyncInferQueue(compiled, jobs)
    parts: dict[int, np.ndarray] = {}

    def done(request: Any, index: int) -> None:
        # Copied in the callback: the request's buffer is reused by its next job.
        parts[index] = np.array(request.get_output_tensor(0).data, np.float32)

    queue.set_callback(done)

    def run_async(batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, np.float32)
        parts.clear()
        pieces = [p for p in np.array_split(batch, min(jobs, len(batch))) if len(p)]
        for index, piece in enumerate(pieces):
            queue.start_async({0: piece}, index)
        queue.wait_all()
        return np.concatenate([parts[i] for i in range(len(pieces))])

    return run_async


def converted_model(model: Any, folder: Path | None = None) -> Any:
    """The Keras ``model`` converted to OpenVINO. With a cache ``folder`` (one per weights
    file, see LoadedModel), read from it when it holds the conversion and its files match
    the SHA-256 digests recorded with them, else converted and written there; a damaged or
    unverifiable entry is converted again and replaced, with a one-line notice on stderr.
    A mixed-precision model is converted as its :func:`float32_twin`."""
    ov = import_openvino()

    if folder is not None and (folder / "model.xml").is_file():
        problem = _entry_problem(folder, model)
        if problem is None:
            try:
                return ov.Core().read_model(folder / "model.xml")
            except RuntimeError:
                problem = "OpenVINO cannot read it"
        messages.note(f"{folder}: the cached OpenVINO model is not usable ({problem}); "
                      "converting it again")
        shutil.rmtree(folder, ignore_errors=True)
    with warnings.catch_warnings(), _telemetry_off():
        # Keras warns that the traced input's structure differs from its own name.
        warnings.simplefilter("ignore", UserWarning)
        converted = ov.convert_model(float32_twin(model))
    if folder is not None:
        _save_openvino(converted, folder, model)
    return converted


def _seal(model: Any, digests: dict[str, str]) -> str:
    """The HMAC-SHA256 of an entry's file digests keyed by the SHA-256 of ``model``'s weight
    values: what binds an entry to the weights it was converted from. The key never enters
    the cache, so rewriting the entry's files and their record cannot make it match, nor
    can an entry copied from another model's folder."""
    key = hashlib.sha256()
    for weight in model.weights:
        values = np.ascontiguousarray(np.asarray(weight))
        key.update(f"{values.dtype.str}{values.shape};".encode())
        key.update(values.tobytes())
    message = json.dumps({name: digests.get(name) for name in _ENTRY_FILES}, sort_keys=True)
    return hmac.new(key.digest(), message.encode(), hashlib.sha256).hexdigest()


def _entry_problem(folder: Path, model: Any) -> str | None:
    """Why the cache entry in ``folder`` cannot be trusted for ``model``, or None when its
    files match the SHA-256 digests recorded with them and the record is sealed by the
    model's weights (:func:`_seal`)."""
    try:
        recorded = json.loads((folder / DIGESTS).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {DIGESTS}: written before entries were checked"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{DIGESTS} unreadable: {exc}"
    if not isinstance(recorded, dict):
        return f"{DIGESTS} is not a record of digests"
    for name in _ENTRY_FILES:
        try:
            actual = file_sha256(folder / name)
        except OSError as exc:
            return f"{name} unreadable: {exc.strerror or exc}"
        if recorded.get(name) != actual:
            return f"{name} does not match its recorded SHA-256"
    if not hmac.compare_digest(str(recorded.get("seal", "")), _seal(model, recorded)):
        return f"{DIGESTS} was not written for these weights"
    return None


def _save_openvino(converted: Any, folder: Path, model: Any) -> None:
    """Write a converted model into the cache as one folder renamed into place (float32
    weights, not OpenVINO's default float16 compression), with the SHA-256 of its files and
    their seal by the Keras ``model``'s weights (:func:`_seal`) written after them. A cache
    that cannot be written (read-only home, full disk) is skipped: it only saves time."""
    ov = import_openvino()

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(folder.parent)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.{owner_tag()}-"))
    except OSError:
        return
    try:
        os.chmod(tmp, usual_mode(directory=True))
        ov.save_model(converted, tmp / "model.xml", compress_to_fp16=False)
        digests = {name: file_sha256(tmp / name) for name in _ENTRY_FILES}
        digests["seal"] = _seal(model, digests)
        (tmp / DIGESTS).write_text(json.dumps(digests, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, folder)
    except (OSError, RuntimeError):
        pass  # another process filled the entry first, or the disk is full
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# Choosing a runtime ('auto') -------------------------------------------------------------------

# 'auto' keeps OpenVINO when its probabilities are TensorFlow's to this (float32 rounding
# gives about 1e-5; bfloat16 arithmetic or a conversion fault far more).
AUTO_TOLERANCE = 1e-3
# On a CPU with bf16 units 'auto' computes in bfloat16 when at most this share of the test
# tile's pixels changes class against float32 (on scenes 0.05-0.25 % do).
AUTO_BF16_CLASS_CHANGES = 0.001


def float32_runner(loaded: Any) -> Callable[[np.ndarray], np.ndarray]:
    """INFER_RUNTIME 'openvino': a :class:`~res_unet.inference.runtime.LoadedModel` converted
    through its cache folder (converting 5-12 s, reading 0.01) and compiled in float32."""
    return openvino_runner(converted_model(loaded.model, loaded.openvino_cache()))


def bf16_runner(loaded: Any) -> Callable[[np.ndarray], np.ndarray]:
    """INFER_RUNTIME 'openvino_bf16': as :func:`float32_runner`, computing in bfloat16 where
    the CPU has bf16 units (float32 elsewhere)."""
    return openvino_runner(converted_model(loaded.model, loaded.openvino_cache()),
                           {"INFERENCE_PRECISION_HINT": "bf16"})


def probe_batch(tile_hw: tuple[int, int], n_bands: int, input_dtype: str | None = None
                ) -> np.ndarray:
    """The test batch 'auto' checks a runtime on: one seeded random tile of raw pixels,
    0-255 (0-4000 for uint16 models), float32 (1, *tile_hw, n_bands)."""
    top = 4000 if input_dtype == "uint16" else 255
    return np.random.default_rng(0).uniform(0, top, (1, *tile_hw, n_bands)).astype(np.float32)


def class_changes(probabilities: np.ndarray, reference: np.ndarray,
                  threshold: float | None = None) -> float:
    """The share of pixels (0..1) whose class differs between two probability batches
    (N, H, W, C): with C = 1 (binary) at ``threshold`` (None: 0.5), else the most probable."""
    if probabilities.shape[-1] == 1:
        cut = 0.5 if threshold is None else threshold
        return float(np.mean((probabilities[..., 0] > cut) != (reference[..., 0] > cut)))
    return float(np.mean(probabilities.argmax(-1) != reference.argmax(-1)))


def auto_openvino(model: Any, cache: Path | None, probe: np.ndarray,
                  threshold: float | None = None
                  ) -> tuple[Callable[[np.ndarray], np.ndarray] | None, str, str]:
    """What INFER_RUNTIME 'auto' runs a float32 Keras ``model`` with, checked on the test
    batch ``probe``: (runner, runtime, note). OpenVINO float32 when it converts (through the
    ``cache`` folder), compiles and gives the model's TensorFlow probabilities to
    AUTO_TOLERANCE; then, on a CPU with bf16 units (:func:`openvino_bf16_units`), OpenVINO
    bfloat16 when at most AUTO_BF16_CLASS_CHANGES of the probe's pixels change class
    (binary at ``threshold``). Otherwise runner None and runtime 'tensorflow': any failure
    leaves TensorFlow, which works, and the note names the cause."""
    try:
        expected = np.asarray(model(probe, training=False), np.float32)
        run = openvino_runner(converted_model(model, cache))
        gap = float(np.max(np.abs(run(probe) - expected)))
    except Exception as exc:  # whatever OpenVINO raises, TensorFlow works
        return None, "tensorflow", f"OpenVINO failed, {failure_cause(exc)}"
    if not gap <= AUTO_TOLERANCE:
        return None, "tensorflow", (f"OpenVINO's probabilities differed from TensorFlow's by "
                                    f"{gap:.2g} on a test tile")
    note = f"same probabilities as TensorFlow to {gap:.0e}"
    info: dict[str, Any] = {}
    try:
        if not openvino_bf16_units():
            return run, "openvino", note
        run_bf16 = openvino_runner(converted_model(model, cache),
                                   {"INFERENCE_PRECISION_HINT": "bf16"}, info)
        changed = class_changes(run_bf16(probe), expected, threshold)
    except Exception as exc:  # float32 OpenVINO works: keep it
        return run, "openvino", f"{note}; bfloat16 failed, {failure_cause(exc)}"
    if info.get("compiled_precision") != "bf16":
        return run, "openvino", note
    if changed > AUTO_BF16_CLASS_CHANGES:
        return run, "openvino", (f"{note}; not bfloat16: {100 * changed:.2g} % of the test "
                                 "tile's pixels changed class")
    return run_bf16, "openvino_bf16", (f"bfloat16: {100 * changed:.2g} % of the test tile's "
                                       "pixels changed class against float32")
