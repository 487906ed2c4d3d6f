"""Benchmark make_dataset on the shared lakes data: speed, output size and peak memory.

    python bench/bench_make_tfrecords.py [--limit N] [--modes tile resize] [--workers 1 2]

Each variant (FIT_MODE x workers) runs in a fresh Python process so that timings include
start-up and imports (what a user waits for) and memory peaks do not carry over. Peak memory
is sampled (every 0.1 s) as the sum of the RSS of the process and all its worker processes;
``ru_maxrss`` of the parent process is reported too (the children's ``ru_maxrss`` is not: it
counts pages shared with the parent at fork). Prints one JSON document. Needs
../shared/data/lakes next to the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import add_json_out, write_result

REPO = Path(__file__).resolve().parents[1]
LAKES = REPO.parent / "shared/data/lakes"
GROUP_PATTERN = "^(.*)_s2cloudless"


def _sample_peak_rss(stop: threading.Event, peak: list[int]) -> None:
    """Track the largest summed RSS of this process and its children until ``stop``."""
    import psutil

    me = psutil.Process()
    while not stop.is_set():
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                continue
        peak[0] = max(peak[0], total)
        stop.wait(0.1)


def run_variant(fit_mode: str, workers: int, limit: int | None) -> dict:
    """Build one dataset in a temp folder (this process); returns its measurements."""
    sys.path.insert(0, str(REPO))
    from res_unet.cli import quiet_tensorflow

    quiet_tensorflow()
    from res_unet.config.keys import config_from_dict
    from res_unet.data.dataset import make_dataset

    cfg, _ = config_from_dict({"TARGET_SIZE": [256, 256], "FIT_MODE": fit_mode,
                               "AUG_COPIES": 3, "SPLIT_GROUP_PATTERN": GROUP_PATTERN})
    with tempfile.TemporaryDirectory(prefix="bench_tfrec_") as tmp:
        images, labels = LAKES / "images", LAKES / "labels"
        if limit:
            images, labels = Path(tmp) / "images", Path(tmp) / "labels"
            images.mkdir()
            labels.mkdir()
            for src in sorted((LAKES / "images").glob("*.jpg"))[:limit]:
                os.symlink(src, images / src.name)
                os.symlink(LAKES / "labels" / f"{src.stem}.png", labels / f"{src.stem}.png")
        stop, peak = threading.Event(), [0]
        sampler = threading.Thread(target=_sample_peak_rss, args=(stop, peak), daemon=True)
        sampler.start()
        start = time.perf_counter()
        manifest = make_dataset(cfg, images, labels, Path(tmp) / "ds", workers=workers)
        wall = time.perf_counter() - start
        stop.set()
        sampler.join()
        out_bytes = sum(p.stat().st_size for p in (Path(tmp) / "ds").iterdir())
    n_images = sum(c.images for c in manifest.counts.values())
    n_examples = sum(c.examples for c in manifest.counts.values())
    return {
        "fit_mode": fit_mode, "workers": workers, "source_images": n_images,
        "examples": n_examples, "wall_s": round(wall, 2),
        "images_per_s": round(n_images / wall, 3), "examples_per_s": round(n_examples / wall, 2),
        "output_mb": round(out_bytes / 2**20, 1),
        "peak_rss_mb_total": round(peak[0] / 2**20, 1),
        "maxrss_mb_parent": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None,
                        help="use only the first N lakes images (reduced run)")
    parser.add_argument("--modes", nargs="+", default=["tile", "resize"])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--variant", nargs=2, metavar=("MODE", "WORKERS"), help=argparse.SUPPRESS)
    add_json_out(parser, "make_tfrecords")
    args = parser.parse_args()
    if not LAKES.exists():
        sys.exit(f"{LAKES}: shared lakes data not found; this benchmark needs it")
    if args.variant:
        print(json.dumps(run_variant(args.variant[0], int(args.variant[1]), args.limit)))
        return
    results = []
    for mode in args.modes:
        for workers in args.workers:
            cmd = [sys.executable, __file__, "--variant", mode, str(workers)]
            if args.limit:
                cmd += ["--limit", str(args.limit)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), file=sys.stderr)
    report = {"benchmark": "make_tfrecords", "data": str(LAKES),
                      "config": {"TARGET_SIZE": [256, 256], "AUG_COPIES": 3,
                                 "SPLIT_GROUP_PATTERN": GROUP_PATTERN},
                      "cpu_count": os.cpu_count(),
                      "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
                      "results": results}
    write_result(report, args.json_out)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
