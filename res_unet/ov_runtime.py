"""The OpenVINO runtime of a loaded model: converting a Keras model (:func:`converted_model`,
through res_unet's conversion cache, :func:`cache_dir`) and compiling it for this CPU
(:func:`openvino_runner`), for :class:`res_unet.runfolder.LoadedModel` and
bench/bench_runtime.py. OpenVINO is imported only when used, through :func:`import_openvino`,
with its telemetry turned off."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from res_unet.atomic import clean_stale_temporaries, owner_tag, usual_mode
from res_unet.caches import cache_dir  # noqa: F401 (the conversion cache lives in it)
from res_unet.records import file_sha256

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


def openvino_runner(converted: Any, options: dict[str, Any] | None = None,
                    info: dict[str, Any] | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """Compile an OpenVINO model for the CPU and return its batch -> float32 probabilities
    call. Compiled in float32 unless ``options`` say otherwise: OpenVINO defaults to bfloat16
    on CPUs with native bf16 (AVX512_BF16, AMX), which moves probabilities by ~1e-2 and flips
    pixels at the threshold. ``options`` add OpenVINO CPU properties (threads, hints);
    ``info``, when given, receives the precision and thread count actually compiled."""
    ov = import_openvino()

    compiled = ov.Core().compile_model(converted, "CPU",
                                       {"INFERENCE_PRECISION_HINT": "f32", **(options or {})})
    if info is not None:
        precision = compiled.get_property("INFERENCE_PRECISION_HINT")
        info["compiled_precision"] = getattr(precision, "get_type_name", precision.__str__)()
        info["threads"] = int(compiled.get_property("INFERENCE_NUM_THREADS"))
    request = compiled.create_infer_request()

    def run(batch: np.ndarray) -> np.ndarray:
        request.infer({0: np.ascontiguousarray(batch, np.float32)})
        # The output tensor is the request's buffer, reused by the next call: copy it.
        return np.array(request.get_output_tensor(0).data, np.float32)

    return run


def converted_model(model: Any, folder: Path | None = None) -> Any:
    """The Keras ``model`` converted to OpenVINO. With a cache ``folder`` (one per weights
    file, see LoadedModel), read from it when it holds the conversion and its files match
    the SHA-256 digests recorded with them, else converted and written there; a damaged or
    unverifiable entry is converted again and replaced, with a one-line notice on stderr."""
    ov = import_openvino()

    if folder is not None and (folder / "model.xml").is_file():
        problem = _entry_problem(folder, model)
        if problem is None:
            try:
                return ov.Core().read_model(folder / "model.xml")
            except RuntimeError:
                problem = "OpenVINO cannot read it"
        print(f"note: {folder}: the cached OpenVINO model is not usable ({problem}); "
              "converting it again", file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)
    with warnings.catch_warnings(), _telemetry_off():
        # Keras warns that the traced input's structure differs from its own name.
        warnings.simplefilter("ignore", UserWarning)
        converted = ov.convert_model(model)
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
