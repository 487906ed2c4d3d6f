"""Segmentation Gym side by side with res_unet on the same lakes images; prints JSON.

    python bench/bench_vs_gym.py --gym-src /work/gym/src --gym-python /work/gym/venv/bin/python
        --data ../shared/data/lakes [--images 154] [--scenes 40] [--warmup 3] [--steps 10]
        [--repeats 2] [--gym-onednn] [--gym-graph] [--lite lite2 ...] [--resunet 6:5 ...]
        [--no-segment]
        [--work DIR] [--out result.json]

Segmentation Gym (github Doodleverse/segmentation_gym) runs from its own source tree and its
own environment (TensorFlow 2.12, doodleverse-utils; see the setup below); res_unet from this
checkout with the interpreter running this script. Nothing of Gym is copied here: its
scripts run as they are, with these substitutions made from outside (``--stage gym-*``, a
driver that this file becomes when Gym's interpreter runs it):
- the tkinter dialogs of seg_images_in_folder.py get stand-ins that return the paths
  (make_dataset and train_model have ``*_no_tkinter.py`` twins that take arguments);
- ``mixed_precision.set_global_policy`` is a no-op, so Gym's forced mixed_float16 (unusably
  slow on CPUs) stays float32 like res_unet;
- ``Model.fit`` runs ``--warmup`` + ``--steps`` steps without validation, times them and
  saves the weights, then stops the script (the rest is evaluation and plots);
- ``doodleverse_utils.prediction_imports.do_seg`` is timed per scene;
- ``ONEDNN_MAX_CPU_ISA=AVX2``: TensorFlow 2.12 corrupts its heap in the first backward pass
  with oneDNN's AVX-512 kernels (no effect on AVX2-only CPUs);
- ``--gym-onednn``: ``TF_ENABLE_ONEDNN_OPTS=1`` for Gym too. res_unet turns TensorFlow's
  oneDNN kernels on itself; TensorFlow leaves them off on CPUs without AVX-512 VNNI/BF16 or
  AMX, so without this flag Gym runs as its users get it, with it both use the same kernels.
Gym writes resized copies beside its inputs and outputs into its scene folder, so it gets
folders of symlinks in the scratch folder (``--work``), never the data itself.

Per repeat, each toolbox in its own fresh processes, alternating Gym, res_unet:
1. dataset: wall time of the whole build process on ``--images`` image/label pairs at 256 x
   256 with 3 augmented copies (Gym make_dataset_no_tkinter.py; res_unet make_tfrecords
   with FIT_MODE resize, split by lake);
2. training: images/s over ``--steps`` batches of 8 after ``--warmup``, read from each
   toolbox's own dataset by its own pipeline: Gym resunet FILTERS 8 KERNEL 7 (6.2 M
   parameters, dice loss, compiled with run_eagerly=True as Gym does; ``--gym-graph`` also
   times it in graph mode) vs the res_unet residual U-Net with KERNEL_SIZE 7, FILTERS 8
   (2.5 M) and FILTERS 13 (6.5 M, size-matched at Gym's depth), its default loss; with
   ``--resunet F:D``, also residual U-Nets of FILTERS F and DEPTH D, KERNEL_SIZE 7 (6:5 is
   5.6 M parameters, 7:5 is 7.6 M: one level deeper and narrower, they bracket Gym's size
   with a quarter to a third of its FLOPs); with ``--lite``, also
   the EfficientNet-Lite U-Nets named (ImageNet encoder; Lite2 5.5 M, the largest the
   toolbox offers offline); forward FLOPs counted from the kernels (Conv2D,
   DepthwiseConv2D, Conv2DTranspose, Dense), training FLOPs = 3x forward, MFU against the
   float32 matmul peak measured in res_unet's processes of this run;
3. segmentation: Mpx/s of the source pixels of ``--scenes`` lakes scenes: Gym's default
   (each scene resized to 256 px and the mask back) vs res_unet seg_images_in_folder on
   full-resolution 256-px tiles (overlap 0.25), without and with TTA (4 flips; ``--no-tta``
   skips it, the longest part); per-scene time covers read, predict and write in both;
   weights: those of step 2, Gym's model and res_unet FILTERS 8 (speed does not depend on
   training).
The figures are medians over the repeats (each repeat's values are listed too).

Setup of Gym (outside the repository):
    git archive of Doodleverse/segmentation_gym into /work/gym/src
    python3.11 -m venv /work/gym/venv
    /work/gym/venv/bin/pip install "tensorflow==2.12.*" "doodleverse-utils==0.0.39" \\
        "transformers==4.37.*" "scikit-image>=0.25,<0.26" natsort tqdm joblib pandas \\
        matplotlib "numpy==1.24.3"
(doodleverse-utils 0.0.39 is the version Gym's pixi.lock pins; its model_imports needs
transformers importable.) Run on an otherwise idle machine; CI does not time anything.
On 2 AVX2 cores (matmul peak about 65 GFLOP/s) the defaults take roughly 35-40 minutes, half
of it res_unet's segmentation (TTA alone about a quarter); ``--images 5 --scenes 1 --warmup
1 --steps 1 --repeats 1`` is a smoke run of about 5 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from common import cpu_flags, matmul_peak

REPO = Path(__file__).resolve().parents[1]
RESULT_TAG = "BENCH_RESULT "
# The SIMD flags that decide TensorFlow's CPU speed.
# Gym derives paths by str.replace of these words anywhere in a path: keep them out of --work.
GYM_PATH_WORDS = ("images", "label", "config", "weights", "modelOut", ".json", ".h5")

SIZE, BATCH, AUG_COPIES, VALIDATION_SPLIT, SEED = 256, 8, 3, 0.2, 42
AUGMENT = {"AUG_ROT": 5, "AUG_ZOOM": 0.05, "AUG_WIDTHSHIFT": 0.05, "AUG_HEIGHTSHIFT": 0.05,
           "AUG_HFLIP": True, "AUG_VFLIP": True}
GYM_CONFIG = {
    "TARGET_SIZE": [SIZE, SIZE], "MODEL": "resunet", "NCLASSES": 2, "KERNEL": 7, "STRIDE": 2,
    "BATCH_SIZE": BATCH, "FILTERS": 8, "N_DATA_BANDS": 3, "DROPOUT": 0.1,
    "DROPOUT_CHANGE_PER_LAYER": 0.0, "DROPOUT_TYPE": "standard",
    "USE_DROPOUT_ON_UPSAMPLING": False, "DO_TRAIN": True, "LOSS": "dice", "PATIENCE": 10,
    "MAX_EPOCHS": 100, "VALIDATION_SPLIT": VALIDATION_SPLIT, "RAMPUP_EPOCHS": 20,
    "SUSTAIN_EPOCHS": 0.0, "EXP_DECAY": 0.9, "START_LR": 1e-7, "MIN_LR": 1e-7, "MAX_LR": 1e-4,
    "FILTER_VALUE": 0, "DOPLOT": True, "ROOT_STRING": "lakes", "USEMASK": False, **AUGMENT,
    "AUG_LOOPS": 1, "AUG_COPIES": AUG_COPIES, "SET_GPU": "-1", "SEED": SEED,
    "TESTTIMEAUG": False, "WRITE_MODELMETADATA": False, "OTSU_THRESHOLD": False}
RES_CONFIG = {
    "TARGET_SIZE": [SIZE, SIZE], "NCLASSES": 2, "CLASS_NAMES": ["land", "water"],
    "N_DATA_BANDS": 3, "FIT_MODE": "resize", "VALIDATION_SPLIT": VALIDATION_SPLIT,
    "SPLIT_GROUP_PATTERN": "^(.*)_s2cloudless", "SEED": SEED, "DO_AUG": True,
    "AUG_COPIES": AUG_COPIES, **AUGMENT, "ROOT_STRING": "lakes", "MODEL": "resunet",
    "FILTERS": 8, "DEPTH": 4, "KERNEL_SIZE": 7, "BATCH_SIZE": BATCH, "PRECISION": "float32",
    "SET_GPU": "-1", "INFER_MODE": "tile"}

# What Gym does that shapes its figures (read from its code, seen in the logs of this bench).
GYM_NOTES = [
    "make_dataset resizes every image to TARGET_SIZE (aspect not kept), writes resized copies "
    "beside its inputs (here: folders of symlinks), splits train/validation at random by "
    "file (not by lake), and plots 2 x 80 sample figures at 200 dpi: all in its build time",
    "train_model compiles with run_eagerly=True and calls tf.config.run_functions_eagerly("
    "True); the eager rows time that, --gym-graph adds the same step as a tf.function",
    "its scripts set mixed_float16 (unusably slow on CPUs); the bench keeps float32 "
    "(policies_gym_asked_for records the request)",
    "seg_images_in_folder passes profile positionally into do_seg's out_dir_name: masks go "
    "to a folder named 'meta' with the 'minimal' profile (only the _predseg.png); the scene "
    "is resized to 256 px for the model and the mask back",
    "TensorFlow 2.12 runs with ONEDNN_MAX_CPU_ISA=AVX2 (its AVX-512 kernels corrupt the heap "
    "in the first backward pass)",
]


# Shared by both sides (stdlib only at import time: Gym's interpreter runs this file too) ---

def cpu_facts() -> dict[str, Any]:
    """CPU model, the flags of common.CPU_FLAGS present (from /proc/cpuinfo) and the core count."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    field = {}
    for line in lines:
        key, _, value = line.partition(":")
        field.setdefault(key.strip(), value.strip())
    return {"model": field.get("model name"), "cpus": os.cpu_count(), "flags": cpu_flags()}



def kernel_flops(model: Any) -> int:
    """Forward FLOPs of one image (1 multiply-add = 2): the rule of res_unet's count_flops
    (kernel size x output positions; input positions for transposed convolutions), written
    against the layer attributes Keras 2 and 3 share so it counts both toolboxes' models."""
    macs = 0
    for layer in model.layers:
        if hasattr(layer, "layers"):
            macs += kernel_flops(layer) // 2
            continue
        kernel = getattr(layer, "kernel", None)
        if kernel is None:
            continue
        size = 1
        for d in kernel.shape:
            size *= int(d)
        name = type(layer).__name__
        shape = layer.input.shape if name == "Conv2DTranspose" else layer.output.shape
        positions = 1
        for d in shape[1:-1]:
            positions *= int(d)
        macs += size * positions
    return 2 * macs


def emit(result: dict[str, Any]) -> None:
    """Hand a stage's result to the parent process (one tagged JSON line on stdout)."""
    print(RESULT_TAG + json.dumps(result), flush=True)


# Stages run by Gym's interpreter ---------------------------------------------------------

def _keep_float32(tf: Any) -> list[str]:
    """Make Gym's set_global_policy a no-op; returns the list of policies it asked for."""
    asked: list[str] = []
    tf.keras.mixed_precision.set_global_policy = lambda policy: asked.append(str(policy))
    return asked


class _Measured(Exception):
    """Raised from the timed fit to stop Gym's training script once the steps are timed."""


def gym_train_stage(args: argparse.Namespace) -> None:
    """Run Gym's train_model_script_no_tkinter.py with a timed, shortened fit."""
    import runpy

    import tensorflow as tf

    asked = _keep_float32(tf)
    peak = matmul_peak()
    original_fit = tf.keras.Model.fit
    result: dict[str, Any] = {"matmul_peak_gflops": round(peak, 1)}

    def timed_fit(model: Any, x: Any = None, *unused: Any, **kwargs: Any) -> None:
        rows = [("eager", False)] + ([("graph", True)] if args.graph else [])
        for mode, graph in rows:
            if graph:  # the same model, loss and metrics as a tf.function step
                tf.config.run_functions_eagerly(False)
                model.run_eagerly = False
            ends: list[float] = []

            def batch_end(batch: int, logs: dict, ends: list[float] = ends) -> None:
                float(logs["loss"])  # wait for the step
                ends.append(time.perf_counter())

            timer = tf.keras.callbacks.LambdaCallback(on_train_batch_end=batch_end)
            original_fit(model, x, steps_per_epoch=args.warmup + args.steps, epochs=1,
                         callbacks=[timer], verbose=0)
            seconds = ends[-1] - ends[args.warmup - 1]
            result[mode] = {"images_per_second": round(args.steps * BATCH / seconds, 3),
                            "step_seconds": round(seconds / args.steps, 3),
                            "run_eagerly": bool(model.run_eagerly)}
        result.update({"parameters": int(model.count_params()),
                       "tensorflow": tf.__version__,
                       "doodleverse_utils": version("doodleverse-utils"),
                       "forward_flops_per_image": kernel_flops(model),
                       "compute_dtype": model.layers[-1].compute_dtype,
                       "policies_gym_asked_for": asked})
        model.save_weights(args.weights)
        raise _Measured

    tf.keras.Model.fit = timed_fit
    script = str(Path(args.gym_src) / "train_model_script_no_tkinter.py")
    sys.argv = [script, "--train_data_dir", args.train_dir, "--val_data_dir", args.val_dir,
                "--config_file", args.config]
    try:
        runpy.run_path(script, run_name="__main__")
    except _Measured:
        emit(result)
        return
    raise RuntimeError("Gym's training script ended without calling Model.fit")


def _tkinter_stand_in(folder: str, weights: str) -> None:
    """Answer seg_images_in_folder.py's dialogs: the scene folder, the weights, 'no more'."""
    import types

    class Tk:
        filename = ""

        def withdraw(self) -> None:
            pass

    filedialog = types.SimpleNamespace(askdirectory=lambda **kw: folder,
                                       askopenfilename=lambda **kw: weights)
    messagebox = types.SimpleNamespace(askquestion=lambda *a, **kw: "no")
    tkinter = types.ModuleType("tkinter")
    tkinter.Tk, tkinter.filedialog, tkinter.messagebox = Tk, filedialog, messagebox
    tkinter.__all__ = ["Tk"]
    sys.modules.update({"tkinter": tkinter, "tkinter.filedialog": filedialog,
                        "tkinter.messagebox": messagebox})


def gym_seg_stage(args: argparse.Namespace) -> None:
    """Run Gym's seg_images_in_folder.py on a folder of scenes, timing each do_seg call."""
    import runpy

    _tkinter_stand_in(args.scenes_dir, args.weights)
    import tensorflow as tf
    from doodleverse_utils import prediction_imports
    from PIL import Image

    asked = _keep_float32(tf)
    original = prediction_imports.do_seg
    scenes: list[dict[str, Any]] = []

    def timed_do_seg(f: str, *rest: Any, **kwargs: Any) -> Any:
        with Image.open(f) as im:
            width, height = im.size
        start = time.perf_counter()
        try:
            out = original(f, *rest, **kwargs)
        except Exception as exc:  # Gym's loop swallows it: record it, so no figure hides it
            scenes.append({"image": Path(f).name, "error": repr(exc)[:200]})
            raise
        scenes.append({"image": Path(f).name, "pixels": width * height,
                       "seconds": time.perf_counter() - start})
        return out

    prediction_imports.do_seg = timed_do_seg
    sys.argv = [str(Path(args.gym_src) / "seg_images_in_folder.py")]
    runpy.run_path(sys.argv[0], run_name="__main__")
    failed = [s for s in scenes if "error" in s]
    done = [s for s in scenes if "error" not in s]
    emit({"scenes": len(done), "failed": failed,
          "megapixels": round(sum(s["pixels"] for s in done) / 1e6, 3),
          "seconds": round(sum(s["seconds"] for s in done), 3),
          "policies_gym_asked_for": asked,
          "compute_dtype": tf.keras.mixed_precision.global_policy().compute_dtype})


# Stages run by res_unet's interpreter -----------------------------------------------------

def res_train_stage(args: argparse.Namespace) -> None:
    """Time the res_unet training step (res_unet.training.train.Trainer, as train_resunet runs it)
    on the dataset make_tfrecords built; optionally write a run folder for segmentation."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(REPO))
    import res_unet  # noqa: F401  (before TensorFlow loads: it turns on the oneDNN kernels)

    # isort: split
    import tensorflow as tf

    from res_unet.config.keys import config_from_dict, save_config
    from res_unet.data import records
    from res_unet.models.helpers import count_flops
    from res_unet.training.runfolder import CardInput, ModelCard, TrainingFacts
    from res_unet.training.train import Trainer

    peak = matmul_peak()
    values = {**RES_CONFIG, "FILTERS": args.filters or 8, "DEPTH": args.depth or 4}
    if args.encoder:
        values.update(MODEL="efficientnet_unet", ENCODER=args.encoder,
                      ENCODER_WEIGHTS="imagenet", KERNEL_SIZE=3)
    cfg, _ = config_from_dict(values)
    manifest = records.read_manifest(args.dataset)
    trainer = Trainer(cfg, manifest, tf.distribute.get_strategy(), "float32")
    dataset = records.load_dataset(args.dataset, "train", cfg.BATCH_SIZE, shuffle=True,
                                   flips=True, repeat=True, cache=True, seed=cfg.SEED)
    iterator = iter(dataset)
    trainer.train_epoch(iterator, args.warmup, 0, progress=False)
    _, _, seconds, wait = trainer.train_epoch(iterator, args.steps, 1, progress=False)
    model = trainer.model
    flops = kernel_flops(model)
    if args.run_out:
        run = Path(args.run_out)
        run.mkdir(parents=True)
        model.save(run / "model.keras")
        model.save_weights(run / "best.weights.h5")
        save_config(cfg, run / "config.json")
        ModelCard(
            res_unet_version="bench", model=cfg.MODEL, encoder=None,
            parameters=model.count_params(), flops_per_image=flops,
            input=CardInput(size=list(cfg.TARGET_SIZE), bands=cfg.N_DATA_BANDS,
                            dtype=manifest.dtype, band_mean=list(manifest.band_mean),
                            band_std=list(manifest.band_std)),
            classes=cfg.n_label_classes, class_names=cfg.class_names, binary=False,
            ignore_class=None, threshold=None, dataset={},
            training=TrainingFacts(epochs_run=0, best_epoch=0, best_val_loss=None,
                                   train_seconds=seconds, images_per_second=None,
                                   precision="float32", strategy="bench", replicas=1),
            validation={}, versions={}, device="bench", wall_seconds=0.0, files={},
            config=cfg.to_dict()).write(run)
    emit({"images_per_second": round(args.steps * BATCH / seconds, 3),
          "step_seconds": round(seconds / args.steps, 3),
          "input_wait_fraction": round(wait / seconds, 4),
          "parameters": int(model.count_params()), "forward_flops_per_image": flops,
          "count_flops_check": int(count_flops(model)),
          "compute_dtype": model.layers[-1].compute_dtype,
          "matmul_peak_gflops": round(peak, 1), "tensorflow": tf.__version__})


# The parent: scratch folders, processes, timings, JSON -----------------------------------

def run_process(command: list[str], log: Path, cwd: Path, env: dict[str, str]
                ) -> tuple[float, dict[str, Any] | None, str]:
    """Run a whole process; returns (wall seconds, its tagged result or None, its stdout).
    Stops with the log's tail when the process fails."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    log.write_text(f"$ {' '.join(command)}\n--- stdout\n{done.stdout}\n--- stderr\n"
                   f"{done.stderr}")
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise SystemExit(f"failed (exit {done.returncode}): {' '.join(command)}\n{tail}\n"
                         f"log: {log}")
    result = None
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
    if result is None and "--stage" in command:
        raise SystemExit(f"no result from {' '.join(command)}; log: {log}")
    return seconds, result, done.stdout


def link_files(sources: list[Path], folder: Path) -> Path:
    """A folder of symlinks to ``sources`` (so no tool writes beside the real data)."""
    folder.mkdir(parents=True)
    for source in sources:
        (folder / source.name).symlink_to(source)
    return folder


def pairs_of(data: Path, count: int) -> tuple[list[Path], list[Path]]:
    """The first ``count`` image/label pairs of the lakes folder, in name order."""
    images = sorted((data / "images").glob("*.jpg"))[:count]
    labels = [data / "labels" / (p.stem + ".png") for p in images]
    missing = [str(p) for p in labels if not p.is_file()]
    if missing:
        raise SystemExit(f"labels missing: {missing[:3]}")
    return images, labels


def median_of(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return round(statistics.median(values), 3) if values else None


def gym_env_settings(args: argparse.Namespace) -> dict[str, str]:
    """The environment variables Gym's processes get on top of this one's: the AVX2 limit,
    and with ``--gym-onednn`` TensorFlow's oneDNN kernels, which res_unet turns on itself
    and TensorFlow 2.12 enables by default only on AVX-512 VNNI/BF16 or AMX CPUs."""
    settings = {"ONEDNN_MAX_CPU_ISA": "AVX2"}
    if args.gym_onednn:
        settings["TF_ENABLE_ONEDNN_OPTS"] = "1"
    return settings


class Harness:
    """The scratch folders, environments and timings of one benchmark run."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        from PIL import Image

        self.args, self.work = args, work
        self.me = str(Path(__file__).resolve())
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update({"TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "-1",
                    "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        # Importing res_unet (here or in filters_depth) sets TF_ENABLE_ONEDNN_OPTS for this
        # process; Gym gets oneDNN only when --gym-onednn asks for it.
        gym_env = {k: v for k, v in env.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
        self.gym_env = {**gym_env, **gym_env_settings(args)}
        self.res_env = {**env, "PYTHONPATH": str(REPO)}
        self.images, self.labels = pairs_of(args.data, args.images)
        self.scenes = sorted((args.data / "images").glob("*.jpg"))[:args.scenes]
        self.scene_mpx = 0.0
        for path in self.scenes:
            with Image.open(path) as im:
                self.scene_mpx += im.size[0] * im.size[1] / 1e6
        self.res_images = link_files(self.images, work / "res_inputs" / "images")
        self.res_labels = link_files(self.labels, work / "res_inputs" / "labels")
        self.res_scenes = link_files(self.scenes, work / "res_scenes")
        self.res_config = work / "res_config.json"
        self.res_config.write_text(json.dumps(RES_CONFIG, indent=1))
        self.rows: dict[str, list[dict[str, Any]]] = {}

    def record(self, name: str, row: dict[str, Any]) -> None:
        self.rows.setdefault(name, []).append(row)
        print(f"{name}: {json.dumps(row)[:300]}", file=sys.stderr, flush=True)

    def gym(self, command: list[str], log: Path, cwd: Path) -> tuple[float, Any]:
        seconds, result, _ = run_process([str(self.args.gym_python), *command], log, cwd,
                                         self.gym_env)
        return seconds, result

    def res(self, command: list[str], log: Path) -> tuple[float, Any, str]:
        return run_process([sys.executable, *command], log, REPO, self.res_env)

    def repeat(self, rep: Path) -> None:
        """One round of every stage, Gym first, in ``rep``."""
        args = self.args
        gym, res = rep / "gym", rep / "res"
        gym_images = link_files(self.images, gym / "in" / "images")
        gym_labels = link_files(self.labels, gym / "in" / "labels")
        gym_run, gym_data = gym / "run", gym / "dataset"
        (gym_run / "config").mkdir(parents=True)
        gym_data.mkdir(parents=True)
        gym_cfg = gym_run / "config" / "gym.json"
        gym_cfg.write_text(json.dumps(GYM_CONFIG, indent=1))
        gym_weights = gym_run / "weights" / "gym.h5"
        res.mkdir(parents=True)

        # 1. dataset build, whole process
        seconds, _ = self.gym([str(args.gym_src / "make_dataset_no_tkinter.py"),
                               "-o", str(gym_data), "-c", str(gym_cfg), "-l", str(gym_labels),
                               "-i", str(gym_images)], rep / "gym_dataset.log", gym)
        train_npz = gym_data / "train_data" / "train_npzs"
        val_npz = gym_data / "val_data" / "val_npzs"
        self.record("dataset/gym", {"seconds": round(seconds, 2),
                                    "train_examples": len(list(train_npz.glob("lakes*.npz"))),
                                    "validation_examples": len(list(val_npz.glob("*.npz")))})
        seconds, _, _ = self.res(["-m", "res_unet.make_tfrecords", "--config",
                                  str(self.res_config), "--images", str(self.res_images),
                                  "--labels", str(self.res_labels), "--out",
                                  str(res / "dataset")], rep / "res_dataset.log")
        manifest = json.loads((res / "dataset" / "manifest.json").read_text())
        self.record("dataset/res_unet", {"seconds": round(seconds, 2),
                                         "counts": manifest["counts"]})

        # 2. training steps
        steps = ["--warmup", str(args.warmup), "--steps", str(args.steps)]
        seconds, result = self.gym(
            [self.me, "--stage", "gym-train", "--gym-src", str(args.gym_src), "--config",
             str(gym_cfg), "--train-dir", str(train_npz), "--val-dir", str(val_npz),
             "--weights", str(gym_weights), *steps] + (["--graph"] if args.gym_graph else []),
            rep / "gym_train.log", gym_run)
        shared = {k: v for k, v in result.items() if k not in ("eager", "graph")}
        for mode in ("eager", "graph"):
            if mode in result:
                self.record(f"train/gym_resunet_f8_k7_{mode}",
                            {**result[mode], **shared, "process_seconds": round(seconds, 1)})
        # (row name, log name, model arguments); FILTERS 8's weights segment in step 3.
        models = [("res_unet_f8_k7", "f8", ["--filters", "8", "--run-out", str(res / "run_f8")]),
                  ("res_unet_f13_k7", "f13", ["--filters", "13"])]
        models += [(f"res_unet_f{f}_d{d}_k7", f"f{f}d{d}", ["--filters", str(f), "--depth", str(d)])
                   for f, d in args.resunet]
        models += [(f"res_unet_{e}_unet", e, ["--encoder", e]) for e in args.lite]
        for name, log, model_args in models:
            seconds, result, _ = self.res(
                [self.me, "--stage", "res-train", "--dataset", str(res / "dataset"),
                 *model_args, *steps], rep / f"res_train_{log}.log")
            self.record(f"train/{name}", {**result, "process_seconds": round(seconds, 1)})
        if args.no_segment:
            return

        # 3. segmentation of the scenes
        seconds, result = self.gym(
            [self.me, "--stage", "gym-seg", "--gym-src", str(args.gym_src), "--scenes-dir",
             str(link_files(self.scenes, gym / "scenes")), "--weights", str(gym_weights)],
            rep / "gym_seg.log", gym)
        if result["failed"] or result["scenes"] != len(self.scenes):
            raise SystemExit(f"Gym segmented {result['scenes']} of {len(self.scenes)} scenes: "
                             f"{result['failed'][:3]}")
        self.record("segment/gym_resize256", {
            "mpx_per_second": round(result["megapixels"] / result["seconds"], 3),
            "loop_seconds": result["seconds"], "process_seconds": round(seconds, 1),
            "compute_dtype": result["compute_dtype"]})
        variants = [("tiles", "--no-tta")] + ([] if args.no_tta else [("tiles_tta", "--tta")])
        for variant, flag in variants:
            seconds, _, out = self.res(
                ["-m", "res_unet.seg_images_in_folder", "--model", str(res / "run_f8"),
                 "--images", str(self.res_scenes), "--out", str(res / f"seg_{variant}"),
                 "--mode", "tile", "--no-crf", "--no-progress", flag],
                rep / f"res_seg_{variant}.log")
            # "40 images: 40 done, 0 skipped (already done), 0 failed; 52.3 s, 0.63 Mpx/s; ..."
            summary = [line for line in out.splitlines() if " Mpx/s" in line][-1]
            if f"{len(self.scenes)} done" not in summary:
                raise SystemExit(f"res_unet did not segment every scene: {summary}")
            loop = float(summary.split(" failed; ")[1].split(" s,")[0])
            self.record(f"segment/res_unet_{variant}", {
                "mpx_per_second": round(self.scene_mpx / loop, 3), "loop_seconds": loop,
                "process_seconds": round(seconds, 1)})

    def report(self) -> dict[str, Any]:
        """Medians over the repeats, FLOPs and MFU, settings: the JSON report."""
        args, rows = self.args, self.rows
        peak = statistics.median(r["matmul_peak_gflops"] for name, group in rows.items()
                                 if name.startswith("train/res_unet") for r in group)
        results: dict[str, Any] = {}
        for name, group in rows.items():
            summary: dict[str, Any] = {}
            for key in ("seconds", "images_per_second", "mpx_per_second"):
                if key in group[0]:
                    summary[key] = median_of(group, key)
            if "images_per_second" in group[0]:
                flops = group[0]["forward_flops_per_image"]
                achieved = 3 * flops * summary["images_per_second"] / 1e9
                summary.update({"parameters": group[0]["parameters"],
                                "forward_gflops_per_image": round(flops / 1e9, 3),
                                "achieved_gflops_per_second": round(achieved, 2),
                                "mfu": round(achieved / peak, 4),
                                "own_process_matmul_peak_gflops": median_of(
                                    group, "matmul_peak_gflops")})
            results[name] = {**summary, "runs": group}
        commit = args.gym_src / "COMMIT"  # written beside the extracted tree, if at all
        return {
            "benchmark": "Segmentation Gym vs res_unet on the lakes images",
            "cpu": cpu_facts(), "load_average_at_start": args.load_at_start,
            "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
            "gym_commit": commit.read_text().strip() if commit.is_file() else None,
            "settings": {"images": len(self.images), "scenes": len(self.scenes),
                         "scene_megapixels": round(self.scene_mpx, 3), "size": SIZE,
                         "batch": BATCH, "warmup_steps": args.warmup, "steps": args.steps,
                         "repeats": args.repeats, "precision": "float32",
                         "gym_env": gym_env_settings(args),
                         "gym_config": GYM_CONFIG, "res_unet_config": RES_CONFIG},
            "segmentation_models": "the weights of each toolbox's timed training steps: Gym "
                                   "resunet FILTERS 8 KERNEL 7, res_unet FILTERS 8 "
                                   "KERNEL_SIZE 7",
            "matmul_peak_gflops": round(peak, 1),
            "gym_notes": GYM_NOTES,
            "mfu_note": "training FLOPs = 3 x forward kernel FLOPs; MFU against the median "
                        "float32 matmul peak of res_unet's training processes (TensorFlow "
                        f"{rows['train/res_unet_f8_k7'][0]['tensorflow']}); Gym's processes "
                        "(TensorFlow 2.12, AVX2 kernels) measured the peak given per row",
            "results": results}


def filters_depth(text: str) -> tuple[int, int]:
    """'6:5' -> (6, 5): a residual U-Net's FILTERS and DEPTH for ``--resunet``."""
    try:
        filters, depth = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not FILTERS:DEPTH, e.g. 6:5") from None
    sys.path.insert(0, str(REPO))
    from res_unet.config.keys import config_from_dict
    from res_unet.core.errors import UserError

    try:  # the config's own bounds (FILTERS 1-1024, DEPTH 1-7)
        config_from_dict({"FILTERS": filters, "DEPTH": depth}, source=f"--resunet {text}")
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return filters, depth


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gym-src", type=Path, default=Path("/work/gym/src"),
                        help="Segmentation Gym's source tree")
    parser.add_argument("--gym-python", type=Path, default=Path("/work/gym/venv/bin/python"),
                        help="interpreter of Gym's environment (TensorFlow 2.12)")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "lakes",
                        help="lakes folder with images/ and labels/")
    parser.add_argument("--images", type=int, default=154, help="image/label pairs")
    parser.add_argument("--scenes", type=int, default=40, help="scenes to segment")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-tta", action="store_true",
                        help="skip res_unet's TTA segmentation (about half the run time)")
    parser.add_argument("--gym-onednn", action="store_true",
                        help="run Gym with TF_ENABLE_ONEDNN_OPTS=1 too (res_unet sets it)")
    parser.add_argument("--lite", nargs="*", default=[], choices=("lite0", "lite1", "lite2"),
                        help="also time the training step of these Lite U-Nets (ImageNet "
                             "encoder, the shipped recipe's model) on the same dataset")
    parser.add_argument("--resunet", nargs="*", default=[], type=filters_depth,
                        metavar="F:D",
                        help="also time residual U-Nets of FILTERS F and DEPTH D (KERNEL_SIZE "
                             "7), e.g. 6:5 and 7:5, which bracket Gym's parameter count")
    parser.add_argument("--no-segment", action="store_true",
                        help="skip the segmentation stage (datasets and training only)")
    parser.add_argument("--gym-graph", action="store_true",
                        help="also time Gym's training step in graph mode (run_eagerly off)")
    parser.add_argument("--work", type=Path,
                        help="scratch folder, kept (default: a temporary one, removed)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    # Internal: one stage in a child process.
    parser.add_argument("--stage", choices=("gym-train", "gym-seg", "res-train"),
                        help=argparse.SUPPRESS)
    for name in ("--config", "--train-dir", "--val-dir", "--weights", "--scenes-dir",
                 "--dataset", "--run-out"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    parser.add_argument("--filters", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--encoder", help=argparse.SUPPRESS)
    parser.add_argument("--graph", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stages = {"gym-train": gym_train_stage, "gym-seg": gym_seg_stage,
              "res-train": res_train_stage}
    if args.stage:
        stages[args.stage](args)
        return 0
    for path, what in ((args.data / "images", "lakes images"), (args.gym_src, "Gym source"),
                       (args.gym_python, "Gym interpreter")):
        if not path.exists():
            print(f"error: {what} not found at {path}", file=sys.stderr)
            return 2
    if args.warmup < 1 or args.steps < 1 or args.images < 5 or args.scenes < 1:
        # Gym's validation share is int(0.2 * images): below 5 images it is empty and its
        # training script stops.
        print("error: --warmup, --steps and --scenes must be at least 1, --images at least 5",
              file=sys.stderr)
        return 2
    args.gym_src, args.data = args.gym_src.resolve(), args.data.resolve()
    args.load_at_start = [round(v, 2) for v in os.getloadavg()]
    if args.load_at_start[0] > 0.5:
        print(f"warning: load average {args.load_at_start[0]} at start: another process is "
              "busy, the figures will be low (the JSON records the load)", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench_vs_gym_") as tmp:
        work = (args.work or Path(tmp)).resolve()
        clash = [w for w in GYM_PATH_WORDS if w in str(work)]
        if clash or (args.work and work.exists() and any(work.iterdir())):
            print(f"error: --work {work} must be new or empty and its path free of "
                  f"{clash or GYM_PATH_WORDS} (Gym rewrites paths containing them)",
                  file=sys.stderr)
            return 2
        work.mkdir(parents=True, exist_ok=True)
        harness = Harness(args, work)
        for r in range(args.repeats):
            harness.repeat(work / f"repeat{r}")
        report = harness.report()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
