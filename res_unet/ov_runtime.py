"""The OpenVINO runtime of a loaded model: converting a Keras model (:func:`converted_model`,
through res_unet's conversion cache, :func:`cache_dir`) and compiling it for this CPU
(:func:`openvino_runner`), for :class:`res_unet.runfolder.LoadedModel` and
bench/bench_runtime.py. OpenVINO is imported only when used."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from res_unet.atomic import clean_stale_temporaries, owner_tag, usual_mode


def openvino_runner(converted: Any, options: dict[str, Any] | None = None,
                    info: dict[str, Any] | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """Compile an OpenVINO model for the CPU and return its batch -> float32 probabilities
    call. Compiled in float32 unless ``options`` say otherwise: OpenVINO defaults to bfloat16
    on CPUs with native bf16 (AVX512_BF16, AMX), which moves probabilities by ~1e-2 and flips
    pixels at the threshold. ``options`` add OpenVINO CPU properties (threads, hints);
    ``info``, when given, receives the precision and thread count actually compiled."""
    import openvino as ov

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


def cache_dir() -> Path:
    """Where res_unet keeps what it can rebuild (converted models): RES_UNET_CACHE_DIR, else
    $XDG_CACHE_HOME/res_unet, else ~/.cache/res_unet."""
    if os.environ.get("RES_UNET_CACHE_DIR"):
        return Path(os.environ["RES_UNET_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "res_unet"


def converted_model(model: Any, folder: Path | None = None) -> Any:
    """The Keras ``model`` converted to OpenVINO. With a cache ``folder`` (one per weights
    file, see LoadedModel), read from it when it holds the conversion, else converted and
    written there; a damaged entry is converted again and replaced."""
    import openvino as ov

    if folder is not None and (folder / "model.xml").is_file():
        try:
            return ov.Core().read_model(folder / "model.xml")
        except RuntimeError:  # a damaged entry: convert again and replace it
            shutil.rmtree(folder, ignore_errors=True)
    with warnings.catch_warnings():
        # Keras warns that the traced input's structure differs from its own name.
        warnings.simplefilter("ignore", UserWarning)
        converted = ov.convert_model(model)
    if folder is not None:
        _save_openvino(converted, folder)
    return converted


def _save_openvino(converted: Any, folder: Path) -> None:
    """Write a converted model into the cache as one folder renamed into place (float32
    weights, not OpenVINO's default float16 compression). A cache that cannot be written
    (read-only home, full disk) is skipped: it only saves time."""
    import openvino as ov

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(folder.parent)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.{owner_tag()}-"))
    except OSError:
        return
    try:
        os.chmod(tmp, usual_mode(directory=True))
        ov.save_model(converted, tmp / "model.xml", compress_to_fp16=False)
        os.replace(tmp, folder)
    except (OSError, RuntimeError):
        pass  # another process filled the entry first, or the disk is full
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
