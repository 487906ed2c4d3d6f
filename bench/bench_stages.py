"""Where segmentation time goes: a per-stage breakdown of ``seg_images_in_folder``.

    python bench/bench_stages.py [--model weights/lakes_lite0] [--images DIR] [--limit 3]
                                 [--variants plain,tta] [--runtime tensorflow]

Segments a folder the way the command does (``segment_folder``: reading, tiling, the model,
blending, thresholding, clean-up, writing the label PNG and the overlay) with each stage's
functions wrapped in timers. Times are exclusive: a timed function called inside another
counts for its own stage only. Stages:

- read: image files decoded (``pairing.load_image``, windows of ``RasterRows``)
- tiles: tiles cut from the image (``extract_tile``)
- model: the model call (``LoadedModel.__call__``; with TTA, once per transform)
- tta: stacking a batch, the TTA flips and their average (``predict_batch`` minus the model)
- blend: tile probabilities blended into the map (``TileBlender``)
- postprocess: threshold, CRF and clean-up (``postprocess.postprocess``, ``clean_label``,
  ``probs_to_label``), nodata masks
- write: the label PNG, GeoTIFF and overlay (``writers.write_png``, ``write_geotiff``,
  ``report.overlay_image``)
- other: the rest of the wall time (loading the model, checks, Python glue)

Also: Mpx/s, model FLOPs utilisation against a float32 matmul peak measured in the same
run (FLOPs of the tiles the model computed, overlap included), the TTA cost ratio, and the
peak RSS. Default images: ../shared/data/lakes_fullres (three ~14 Mpx scenes). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from common import (
    PeakMemory,
    add_json_out,
    cpu_flags,
    matmul_peak,
    onednn_enabled,
    write_result,
)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
import res_unet  # noqa: E402, F401  (before TensorFlow loads: it turns on the oneDNN kernels)


class StageTimer:
    """Exclusive wall time per stage of wrapped functions (nested timed calls are
    subtracted from their caller), plus call counts."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[float] = []  # time spent in timed children of each open call
        self._undo: list[Callable[[], None]] = []

    def wrap(self, owner: Any, name: str, stage: str) -> None:
        """Time ``owner.name`` (a module function or a class's method) as ``stage``."""
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            self._stack.append(0.0)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                children = self._stack.pop()
                self.seconds[stage] += elapsed - children
                self.calls[stage] += 1
                if self._stack:
                    self._stack[-1] += elapsed

        setattr(owner, name, timed)
        self._undo.append(lambda: setattr(owner, name, original))

    def restore(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


def instrument(timer: StageTimer) -> None:
    """Wrap the functions of each stage of segment_folder."""
    from res_unet.data import pairing, report
    from res_unet.geo import rasters, tiling, writers
    from res_unet.inference import postprocess, predict, runtime, segment

    timer.wrap(pairing, "load_image", "read")
    timer.wrap(rasters.RasterRows, "rows", "read")
    timer.wrap(tiling, "extract_tile", "tiles")
    timer.wrap(runtime.LoadedModel, "__call__", "model")
    timer.wrap(predict, "predict_batch", "tta")
    for method in ("add", "pop_rows", "result"):
        timer.wrap(tiling.TileBlender, method, "blend")
    for name in ("postprocess", "clean_label", "probs_to_label"):
        timer.wrap(postprocess, name, "postprocess")
    timer.wrap(predict, "nodata_mask", "postprocess")
    timer.wrap(writers, "write_png", "write")
    timer.wrap(writers, "write_geotiff", "write")
    timer.wrap(report, "overlay_image", "write")
    del segment  # imported so that its module-level names are bound before wrapping


def run_variant(model_dir: Path, images: Path, limit: int, tta: bool, runtime: str,
                peak_gflops: float) -> dict[str, Any]:
    """Segment up to ``limit`` images of ``images`` with timers; the stage table."""
    from res_unet.data import pairing
    from res_unet.inference.runtime import LoadedModel, load_run
    from res_unet.inference.segment import segment_folder
    from res_unet.inference.settings import inference_config
    from res_unet.models.helpers import count_flops

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        pairs = pairing.find_images(images)[:limit]
        for pair in pairs:
            (folder / pair.image.name).symlink_to(pair.image.resolve())
        cfg = inference_config([model_dir], None, {"TESTTIMEAUG": tta, "INFER_RUNTIME": runtime})
        model = load_run(model_dir, cfg.TARGET_SIZE)
        model.use_runtime(runtime)
        model(np.zeros((1, *cfg.TARGET_SIZE, model.n_bands), "float32"))  # warm up
        timer = StageTimer()
        counted = {"tiles": 0}
        call = LoadedModel.__call__

        def counting(self: LoadedModel, batch: np.ndarray) -> np.ndarray:
            counted["tiles"] += len(batch)
            return call(self, batch)

        LoadedModel.__call__ = counting
        instrument(timer)
        try:
            with PeakMemory() as memory:
                start = time.perf_counter()
                summary = segment_folder(cfg, [model], folder, Path(tmp) / "out", progress=False)
                wall = time.perf_counter() - start
        finally:
            timer.restore()
            LoadedModel.__call__ = call
    if summary["failed"]:
        raise SystemExit(f"segmentation failed: {summary['failures']}")
    # Model FLOPs: every tile the model computed (TTA transforms and overlap included).
    gflop = counted["tiles"] * count_flops(model.model) / 1e9
    stages = dict(timer.seconds)
    stages["other"] = wall - sum(stages.values())
    mpx = summary["megapixels"]
    return {"tta": tta, "images": len(pairs), "megapixels": round(mpx, 2),
            "seconds": round(wall, 2), "mpx_per_second": round(mpx / wall, 3),
            "tiles_computed": counted["tiles"], "model_gflop": round(gflop, 1),
            "mfu_of_wall": round(gflop / wall / peak_gflops, 3),
            "mfu_in_model_calls": round(gflop / stages["model"] / peak_gflops, 3),
            "peak_rss_mb": round(memory.peak / 2**20),
            "stages_seconds": {k: round(v, 2) for k, v in sorted(stages.items())},
            "stages_share": {k: round(v / wall, 3) for k, v in sorted(stages.items())},
            "calls": dict(timer.calls)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "weights" / "lakes_lite0")
    parser.add_argument("--images", type=Path, default=DATA / "lakes_fullres" / "images")
    parser.add_argument("--limit", type=int, default=3, help="images to segment")
    parser.add_argument("--variants", default="plain,tta", help="plain (no TTA) and/or tta")
    parser.add_argument("--runtime", default="tensorflow", choices=("tensorflow", "openvino"))
    add_json_out(parser, "stages")
    args = parser.parse_args(argv)
    if not args.images.is_dir():
        print(f"{args.images}: not found (the shared data); pass --images", file=sys.stderr)
        return 2
    import tensorflow as tf

    peak = matmul_peak(tf.float32)
    out: dict[str, Any] = {"model": str(args.model), "runtime": args.runtime,
                           "cpu_flags": cpu_flags(), "cpus": os.cpu_count(),
                           "onednn": onednn_enabled(),
                           "matmul_fp32_gflops": round(peak, 1), "variants": {}}
    for variant in args.variants.split(","):
        out["variants"][variant] = run_variant(args.model, args.images, args.limit,
                                               variant == "tta", args.runtime, peak)
        print(f"{variant}: {out['variants'][variant]['mpx_per_second']} Mpx/s",
              file=sys.stderr, flush=True)
    if {"plain", "tta"} <= set(out["variants"]):
        out["tta_cost_ratio"] = round(out["variants"]["tta"]["seconds"]
                                      / out["variants"]["plain"]["seconds"], 2)
    out["matmul_fp32_gflops_end"] = round(matmul_peak(tf.float32), 1)
    write_result(out, args.json_out, peak)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
