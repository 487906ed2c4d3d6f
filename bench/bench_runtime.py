"""Optimised CPU runtimes for the exported model: speed and mask agreement; prints JSON.

    python bench/bench_runtime.py [--models weights/lakes_lite0 weights/lakes_resunet]
        [--configs 4x384 1x768 1x1024] [--runtimes tf tf_xla openvino openvino_t1
        onnxruntime onnxruntime_t1] [--rounds 5] [--calls 2] [--images 5] [--fullres 1]
        [--data ../shared/data] [--bf16] [--skip-throughput] [--skip-agreement] [--out FILE]
    python bench/bench_runtime.py --segment-with openvino --models weights/lakes_lite0

Needs the optional runtimes: ``pip install openvino onnxruntime tf2onnx`` (ONNX export goes
SavedModel -> ``python -m tf2onnx.convert``: Keras' own ``export(format="onnx")`` leaves the
Normalization layer's constants as extra graph inputs).

Reports, in one process:

- the machine: CPU model and the SIMD / bfloat16 flags of /proc/cpuinfo, TensorFlow's thread
  settings, and a measured fp32 matmul peak (2048 x 2048, GFLOP/s) at the start and the end;
- forward throughput (images/s, Mpx/s of model input, GFLOP/s, model FLOPs utilisation
  against the matmul peak) of each run folder at each tile configuration (BATCHxSIZE) for each
  runtime: ``tf`` (the tf.function of LoadedModel.__call__), ``tf_xla`` (jit_compile=True),
  ``openvino`` (res_unet.inference.openvino.openvino_runner of the converted Keras model: CPU, f32,
  LATENCY hint, 2 threads),
  ``onnxruntime`` (CPUExecutionProvider, 2 intra-op threads); ``*_t1`` are the same with one
  thread. Runtimes are timed in interleaved rounds (the order rotating every round) so that
  machine drift hits each alike; the medians are quoted with min and max;
- ``--bf16``: whether bfloat16 is native here: OpenVINO's capabilities and the precision it
  actually compiles with under INFERENCE_PRECISION_HINT bf16, and the throughput of the
  model rebuilt under Keras' mixed_bfloat16 policy against fp32, in the same rounds;
- mask agreement on real scenes: ``res_unet.inference.predict.Segmenter`` with the run's inference
  config (TTA off, the model card's threshold) segments lakes images and full-resolution
  scenes with the TensorFlow model and again with each other runtime in place of the model
  call; the fraction of pixels whose label differs and the largest probability difference.

``--segment-with RUNTIME`` only segments the agreement images with that runtime (model load
and conversion included) and prints the seconds: for timing whole processes against each other.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Run from a checkout without installing: make the repository's package importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import res_unet  # noqa: F401  (before TensorFlow loads: it turns on the oneDNN kernels)

# isort: split
import keras
import numpy as np
import tensorflow as tf
from common import add_json_out, matmul_peak, write_result

from res_unet.geo.rasters import read_image
from res_unet.inference.openvino import converted_model, import_openvino, openvino_runner
from res_unet.inference.predict import Segmenter
from res_unet.inference.runtime import LoadedModel, load_run
from res_unet.inference.settings import inference_config
from res_unet.models import build_model
from res_unet.models.helpers import count_flops
from res_unet.training.runfolder import run_config

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
CPU_FLAGS = ("sse4_2", "fma", "avx", "avx2", "avx512f", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
DEFAULT_RUNTIMES = ("tf", "tf_xla", "openvino", "openvino_t1", "onnxruntime", "onnxruntime_t1")
Runner = Callable[[np.ndarray], np.ndarray]


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


# Machine -------------------------------------------------------------------------------------

def machine() -> dict:
    """CPU model, the flags that matter for inference, cores and library versions."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model, flags = "", set()
    for line in text.splitlines():
        if line.startswith("model name") and not model:
            model = line.split(":", 1)[1].strip()
        if line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
    model = model or platform.processor() or "CPU"
    versions = {"python": platform.python_version(), "tensorflow": tf.__version__,
                "keras": keras.__version__, "numpy": np.__version__}
    for name in ("openvino", "onnxruntime", "onnx", "tf2onnx"):
        try:
            versions[name] = __import__(name).__version__
        except Exception as exc:  # an optional runtime that is absent or broken
            versions[name] = f"unavailable ({type(exc).__name__}: {str(exc)[:80]})"
    return {"cpu": model, "flags": {f: f in flags for f in CPU_FLAGS},
            "bf16_native": "avx512_bf16" in flags or "amx_bf16" in flags,
            "cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "tf_inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
            "load_average": list(os.getloadavg()), "versions": versions}


# Runtimes ------------------------------------------------------------------------------------

def tf_runner(model: keras.Model, jit: bool) -> Runner:
    """The model call of LoadedModel.__call__ (optionally XLA-compiled)."""
    spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.float32)
    fn = tf.function(lambda x: tf.cast(model(x, training=False), tf.float32),
                     input_signature=[spec], jit_compile=jit)
    return lambda batch: fn(tf.constant(batch, tf.float32)).numpy()


def bench_openvino_runner(model: keras.Model, threads: int, precision: str = "f32",
                          info: dict | None = None) -> Runner:
    """The library's OpenVINO conversion and runner with a LATENCY hint, ``threads`` threads
    and ``precision`` (batch dimension left dynamic)."""
    return openvino_runner(converted_model(model), {
        "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
        "INFERENCE_PRECISION_HINT": precision}, info)


def export_onnx(model: keras.Model, folder: Path) -> Path:
    """SavedModel, then tf2onnx (opset 17): raises RuntimeError with tf2onnx's last lines."""
    saved = folder / "saved_model"
    model.export(str(saved), format="tf_saved_model", verbose=False)
    path = folder / "model.onnx"
    done = subprocess.run([sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(saved),
                           "--output", str(path), "--opset", "17"],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0 or not path.is_file():
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise RuntimeError(f"tf2onnx failed ({done.returncode}): {tail[:400]}")
    return path


def onnxruntime_runner(path: Path, threads: int) -> Runner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise RuntimeError(f"ONNX graph has {len(inputs)} inputs: {[i.name for i in inputs]}")
    name = inputs[0].name
    return lambda batch: session.run(None, {name: np.asarray(batch, np.float32)})[0]


def bf16_model(loaded: LoadedModel) -> keras.Model:
    """The same network under Keras' mixed_bfloat16 policy, with the fp32 model's weights."""
    assert loaded.run_dir is not None and loaded.card is not None
    cfg = dataclasses.replace(run_config(loaded.run_dir), ENCODER_WEIGHTS=None)
    spec = loaded.card.input
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = build_model(cfg, spec.band_mean, spec.band_std,
                            input_shape=tuple(loaded.model.input_shape[1:]))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    model.set_weights(loaded.model.get_weights())
    return model


def make_runners(names: list[str], loaded: LoadedModel, work: Path,
                 notes: dict) -> dict[str, Runner]:
    """Runner per runtime name; failures are noted in ``notes`` and left out."""
    model = loaded.model
    runners: dict[str, Runner] = {}
    onnx_path: Path | None = None
    for name in names:
        start = time.perf_counter()
        info: dict[str, Any] = {}
        try:
            if name in ("tf", "tf_xla"):
                runners[name] = tf_runner(model, jit=name == "tf_xla")
            elif name.startswith("openvino"):
                precision = "bf16" if "bf16" in name else "f32"
                runners[name] = bench_openvino_runner(model, 1 if name.endswith("_t1") else 2,
                                                      precision, info)
            elif name.startswith("onnxruntime"):
                if onnx_path is None:
                    folder = Path(tempfile.mkdtemp(dir=work))
                    onnx_path = export_onnx(model, folder)
                    info["export_seconds"] = round(time.perf_counter() - start, 1)
                runners[name] = onnxruntime_runner(onnx_path, 1 if name.endswith("_t1") else 2)
            elif name == "tf_mixed_bfloat16":
                runners[name] = tf_runner(bf16_model(loaded), jit=False)
            else:
                raise ValueError(f"unknown runtime {name}")
        except Exception as exc:
            notes[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            log(f"  {name}: FAILED {notes[name]['error']}")
            continue
        info["setup_seconds"] = round(time.perf_counter() - start, 1)
        notes[name] = info
    return runners


# Throughput ----------------------------------------------------------------------------------

def interleaved(runners: dict[str, Runner], x: np.ndarray, rounds: int, calls: int
                ) -> dict[str, list[float]]:
    """Seconds per call of every runner, timed in rounds whose order rotates each round."""
    names = list(runners)
    for name in names:  # warm-up: tracing, compilation, first allocations
        runners[name](x)
        runners[name](x)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            for _ in range(calls):
                runners[name](x)
            times[name].append((time.perf_counter() - start) / calls)
    return times


def throughput(run_dir: Path, batch: int, size: int, names: list[str], rounds: int,
               calls: int, peak: float, work: Path) -> list[dict]:
    loaded = load_run(run_dir, (size, size))
    flops = count_flops(loaded.model)
    notes: dict[str, dict] = {}
    runners = make_runners(names, loaded, work, notes)
    x = np.random.default_rng(0).uniform(0, 255, (batch, size, size, loaded.n_bands)
                                         ).astype(np.float32)
    reference = runners["tf"](x) if "tf" in runners else None
    times = interleaved(runners, x, rounds, calls)
    tf_median = statistics.median(times["tf"]) if "tf" in times else None
    rows = []
    for name in names:
        row: dict[str, Any] = {"model": run_dir.name, "tile": size, "batch": batch,
                               "runtime": name, **notes.get(name, {})}
        if name in times:
            seconds = statistics.median(times[name])
            ips = batch / seconds
            row.update({
                "seconds_per_batch": [round(min(times[name]), 4), round(seconds, 4),
                                      round(max(times[name]), 4)],
                "images_per_second": round(ips, 3),
                "megapixels_per_second": round(ips * size * size / 1e6, 3),
                "gflops_per_image": round(flops / 1e9, 3),
                "achieved_gflops_per_second": round(ips * flops / 1e9, 2),
                "mfu": round(ips * flops / 1e9 / peak, 4),
                "speedup_vs_tf": None if tf_median is None else round(tf_median / seconds, 3),
            })
            if reference is not None:
                row["max_abs_diff_vs_tf"] = float(np.abs(runners[name](x) - reference).max())
        rows.append(row)
        log("  ", json.dumps(row))
    return rows


# Mask agreement ------------------------------------------------------------------------------

@dataclasses.dataclass
class RuntimeModel(LoadedModel):
    """A LoadedModel whose forward pass is another runtime's."""

    runner: Any = None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.runner(np.asarray(batch, np.float32)).astype(np.float32, copy=False)


def swap_runtime(loaded: LoadedModel, runner: Runner) -> RuntimeModel:
    values = {f.name: getattr(loaded, f.name) for f in dataclasses.fields(LoadedModel)}
    return RuntimeModel(**values, runner=runner)


def scene_paths(data: Path, n_images: int, n_fullres: int) -> list[Path]:
    """``n_images`` lakes images spread over the sorted list, then the first full-res scenes."""
    lakes = sorted((data / "lakes" / "images").glob("*.jpg"))
    step = max(1, len(lakes) // max(1, n_images))
    full = sorted((data / "lakes_fullres" / "images").glob("*.jpg"))
    return lakes[::step][:n_images] + full[:n_fullres]


def segment_all(segmenter: Segmenter, images: list[tuple[str, np.ndarray]]
                ) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """(label, probabilities, seconds) of each image."""
    out = []
    for _, image in images:
        pieces: list[np.ndarray] = []
        start = time.perf_counter()
        label = segmenter.segment(image, (), lambda r0, p, pieces=pieces: pieces.append(p.copy()))
        seconds = time.perf_counter() - start
        out.append((label, np.concatenate(pieces, axis=0), seconds))
    return out


def agreement(run_dir: Path, names: list[str], paths: list[Path], work: Path) -> dict:
    loaded = load_run(run_dir)
    cfg = inference_config([run_dir], overrides={"TESTTIMEAUG": False})
    images = [(p.name, read_image(p)[0]) for p in paths]
    reference = Segmenter([loaded], cfg)
    notes: dict[str, dict] = {}
    others = [n for n in names if n not in ("tf", "tf_mixed_bfloat16")]
    runners = make_runners(others, loaded, work, notes)
    base = segment_all(reference, images[:1])  # warm-up of every shape the scenes use
    base = segment_all(reference, images)
    result: dict[str, Any] = {"model": run_dir.name, "tile": list(loaded.tile_hw),
                              "downsample": loaded.downsample,
                              "threshold": reference.threshold_setting,
                              "tta": cfg.TESTTIMEAUG, "batch_size": cfg.BATCH_SIZE,
                              "tf_seconds": [round(s, 2) for _, _, s in base],
                              "scenes": [{"name": n, "shape": list(im.shape[:2])}
                                         for n, im in images], "runtimes": {}}
    for name, runner in runners.items():
        segmenter = Segmenter([swap_runtime(loaded, runner)], cfg)
        segment_all(segmenter, images[:1])
        rows = segment_all(segmenter, images)
        again = segment_all(reference, images)  # TF again, right after: drift-paired timing
        per_scene = []
        for (ref_label, ref_prob, _), (label, prob, seconds), (_, _, tf_s) in zip(
                base, rows, again, strict=True):
            per_scene.append({
                "differing_pixels": int((label != ref_label).sum()),
                "fraction_differing": float((label != ref_label).mean()),
                "max_abs_prob_diff": float(np.nanmax(np.abs(prob - ref_prob))),
                "seconds": round(seconds, 2), "tf_seconds_after": round(tf_s, 2)})
        total = sum(r[0].size for r in base)
        differing = sum(s["differing_pixels"] for s in per_scene)
        result["runtimes"][name] = {
            **notes.get(name, {}), "fraction_differing_all": differing / total,
            "worst_scene_fraction": max(s["fraction_differing"] for s in per_scene),
            "max_abs_prob_diff": max(s["max_abs_prob_diff"] for s in per_scene),
            "seconds_total": round(sum(s["seconds"] for s in per_scene), 2),
            "tf_seconds_total_after": round(sum(s["tf_seconds_after"] for s in per_scene), 2),
            "per_scene": per_scene}
        log("  ", name, json.dumps({k: v for k, v in result["runtimes"][name].items()
                                    if k != "per_scene"}))
    for name in others:
        if name not in runners:
            result["runtimes"][name] = notes.get(name, {})
    return result


# bfloat16 ------------------------------------------------------------------------------------

def bf16_probe(run_dir: Path, size: int, batch: int, rounds: int, calls: int,
               work: Path) -> dict:
    """Whether bfloat16 helps here: OpenVINO's view, and TF mixed_bfloat16 vs fp32."""
    out: dict[str, Any] = {}
    try:
        core = import_openvino().Core()
        out["openvino_capabilities"] = list(core.get_property("CPU",
                                                              "OPTIMIZATION_CAPABILITIES"))
    except Exception as exc:
        out["openvino_capabilities"] = f"unavailable: {exc}"
    names = ["tf", "tf_mixed_bfloat16", "openvino", "openvino_bf16"]
    out["throughput"] = throughput(run_dir, batch, size, names, rounds, calls,
                                   matmul_peak(), work)
    out["matmul_gflops"] = {"float32": round(matmul_peak(), 1),
                            "bfloat16": round(matmul_peak(dtype=tf.bfloat16), 1)}
    return out


# Main ----------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", type=Path,
                        default=[REPO / "weights" / "lakes_lite0",
                                 REPO / "weights" / "lakes_resunet"])
    parser.add_argument("--configs", nargs="+", default=["4x384", "1x768", "1x1024"],
                        help="BATCHxSIZE tile configurations for throughput")
    parser.add_argument("--runtimes", nargs="+", default=list(DEFAULT_RUNTIMES))
    parser.add_argument("--agreement-runtimes", nargs="+",
                        default=["tf_xla", "openvino", "onnxruntime"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2, help="calls per runtime per round")
    parser.add_argument("--images", type=int, default=5, help="lakes images for agreement")
    parser.add_argument("--fullres", type=int, default=1, help="lakes_fullres scenes")
    parser.add_argument("--data", type=Path, default=DATA,
                        help="shared data folder with lakes/ and lakes_fullres/")
    parser.add_argument("--bf16", action="store_true", help="probe bfloat16 (first model)")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-agreement", action="store_true")
    parser.add_argument("--segment-with", metavar="RUNTIME",
                        help="only segment the agreement images with RUNTIME (first model)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    add_json_out(parser, "runtime")
    args = parser.parse_args()
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench_runtime_"))
    paths = scene_paths(args.data, args.images, args.fullres)
    if not paths and (args.segment_with or not args.skip_agreement):
        parser.error(f"{args.data}: no lakes images for the agreement check; pass --data "
                     "(the shared data folder) or --skip-agreement")

    if args.segment_with:
        run_dir = args.models[0]
        loaded = load_run(run_dir)
        cfg = inference_config([run_dir], overrides={"TESTTIMEAUG": False})
        model: LoadedModel = loaded
        if args.segment_with != "tf":
            runner = make_runners([args.segment_with], loaded, work, {})
            model = swap_runtime(loaded, runner[args.segment_with])
        rows = segment_all(Segmenter([model], cfg), [(p.name, read_image(p)[0]) for p in paths])
        print(json.dumps({"runtime": args.segment_with, "model": run_dir.name,
                          "seconds": [round(s, 2) for _, _, s in rows],
                          "water_fraction": [round(float(lab.mean()), 4) for lab, _, _ in rows],
                          "wall_seconds": round(time.perf_counter() - start, 1)}))
        return

    report: dict[str, Any] = {"benchmark": "runtime", "machine": machine()}
    peak = matmul_peak()
    report["matmul_fp32_gflops_start"] = round(peak, 1)
    log("machine", json.dumps(report))
    if not args.skip_throughput:
        report["throughput"] = []
        for run_dir in args.models:
            for config in args.configs:
                batch, size = (int(v) for v in config.lower().split("x"))
                log(f"throughput {run_dir.name} {batch}x{size}")
                report["throughput"] += throughput(run_dir, batch, size, args.runtimes,
                                                   args.rounds, args.calls, peak, work)
    if args.bf16:
        log("bfloat16")
        report["bf16"] = bf16_probe(args.models[0], 384, 4, max(3, args.rounds // 2),
                                    1, work)
    if not args.skip_agreement:
        report["agreement"] = []
        for run_dir in args.models:
            log(f"agreement {run_dir.name}")
            report["agreement"].append(agreement(run_dir, args.agreement_runtimes, paths, work))
    report["matmul_fp32_gflops_end"] = round(matmul_peak(), 1)
    report["load_average_end"] = list(os.getloadavg())
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    write_result(report, args.json_out, peak)
    print(text)


if __name__ == "__main__":
    main()
