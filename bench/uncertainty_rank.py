"""Which uncertainty figure ranks the scenes a model gets most wrong first, and what ranking costs.

    python bench/uncertainty_rank.py --out /tmp/uncertainty_rank

Segments held-out labelled scenes exactly as seg_images_in_folder does (the model's own
settings: tiles, DOWNSAMPLE, TTA) with scores, then correlates each per-scene figure of
uncertainty.csv with the scene's error, 1 - mean IoU (scores.csv), by Spearman's rank
correlation (1: the ranking puts the worst scenes first, in order). Also the share of the
worst quarter of scenes found in the top quarter of the ranking.

Sets:
- lakes: the 31 validation lakes of weights/lakes_lite0 (the card's split: VALIDATION_SPLIT
  0.2, SEED 42, grouped by lake name), never seen in training;
- dubai: the 54 scenes of weights/dubai_lite0, which was trained on all six tiles (its
  validation is a cross-validation, not a held-out split), so these are training scenes: the
  figure must still rank the scenes it fits worst first, a weaker test.

Cost: the time spent in the running sums (UncertaintySums.add), the view-disagreement counts
(ViewDisagreement.view, end_batch), the review pictures and the page, against the whole
segmentation time of the same run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from common import add_json_out, write_result  # noqa: E402

import res_unet  # noqa: E402,F401  (before TensorFlow: turns on oneDNN)

DATA = REPO.parent / "shared" / "data"


def _link_folder(pairs, out: Path) -> tuple[Path, Path]:
    """A folder of links to the images and labels of ``pairs``."""
    images, labels = out / "images", out / "labels"
    for folder in (images, labels):
        folder.mkdir(parents=True, exist_ok=True)
    for pair in pairs:
        for src, folder in ((pair.image, images), (pair.label, labels)):
            link = folder / src.name
            if not link.exists():
                link.symlink_to(src.resolve())
    return images, labels


def held_out(name: str, out: Path) -> tuple[Path, Path, Path]:
    """(images, labels, run folder) of one set (module docstring)."""
    from res_unet.config.keys import load_config
    from res_unet.data import pairing
    from res_unet.data.split import split_pairs

    run = REPO / "weights" / f"{name}_lite0"
    data = DATA / name
    pairs = pairing.find_pairs(data / "images", data / "labels")
    if name == "lakes":
        cfg = load_config(run / "config.json")
        _, pairs = split_pairs(pairs, cfg.VALIDATION_SPLIT, cfg.SEED, cfg.SPLIT_GROUP_PATTERN)
    images, labels = _link_folder(pairs, out / f"{name}_scenes")
    return images, labels, run


class Timer:
    """Seconds spent in wrapped functions."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.wrapped: list[tuple[object, str, object]] = []

    def restore(self) -> None:
        for owner, name, inner in self.wrapped:
            setattr(owner, name, inner)

    def wrap(self, owner: object, name: str) -> None:
        inner = getattr(owner, name)
        self.wrapped.append((owner, name, inner))

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        setattr(owner, name, timed)


def rank_set(name: str, out: Path) -> dict:
    from res_unet.inference import review, segment, settings, uncertainty

    images, labels, run = held_out(name, out)
    cfg = settings.inference_config([run], None, {})
    ranking, pictures = Timer(), Timer()
    ranking.wrap(uncertainty.UncertaintySums, "add")
    ranking.wrap(uncertainty.ViewDisagreement, "view")
    ranking.wrap(uncertainty.ViewDisagreement, "end_batch")
    pictures.wrap(review.ScenePictures, "write_prediction")
    pictures.wrap(review.ScenePictures, "write_label")
    pictures.wrap(review, "write_review_page")
    seg_out = out / f"{name}_out"
    t0 = time.perf_counter()
    summary = segment.segment_folder(cfg, [run], images, seg_out, labels_dir=labels,
                                     overwrite=True, progress=False)
    seconds = time.perf_counter() - t0
    ranking.restore()
    pictures.restore()
    settings = json.loads((seg_out / "segmentation_config.json").read_text())
    with open(seg_out / "scores.csv") as fh:
        error = {r["image"]: 1 - float(r["mean_iou"]) for r in csv.DictReader(fh)
                 if r["image"] != "ALL"}
    with open(seg_out / "uncertainty.csv") as fh:
        rows = {Path(r["image"]).stem: r for r in csv.DictReader(fh)}
    names = sorted(error)
    worst = set(sorted(names, key=lambda n: -error[n])[:max(1, len(names) // 4)])
    results = []
    for figure in uncertainty.FIGURES:
        values = [rows[n][figure] for n in names]
        if any(v == "" for v in values):
            continue
        x = [float(v) for v in values]
        top = set(sorted(names, key=lambda n: -float(rows[n][figure]))[:len(worst)])
        results.append({"set": name, "figure": figure,
                        "spearman": round(uncertainty.spearman(x, [error[n] for n in names]), 3),
                        "worst_quarter_in_top_quarter": round(len(top & worst) / len(worst), 3),
                        "scenes": len(names)})
    return {"results": results, "timing": {
        "set": name, "scenes": len(names), "segmentation_seconds": round(seconds, 2),
        "ranking_seconds": round(ranking.seconds, 3),
        "ranking_share": round(ranking.seconds / seconds, 4),
        "pictures_and_page_seconds": round(pictures.seconds, 3),
        "pictures_share": round(pictures.seconds / seconds, 4),
        "tta_views": settings["tta_transforms"], "done": summary["done"],
        "mean_error": round(float(np.mean([error[n] for n in names])), 4)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="scratch folder for the segmentations")
    parser.add_argument("--sets", nargs="+", default=["lakes", "dubai"],
                        choices=["lakes", "dubai"])
    add_json_out(parser, "uncertainty_rank")
    args = parser.parse_args(argv)
    out = Path(args.out)
    results, timing = [], []
    earlier = Path(args.json_out)
    if args.json_out != "-" and earlier.is_file():  # the sets not re-run this time are kept
        kept = json.loads(earlier.read_text())
        results = [r for r in kept.get("results", []) if r["set"] not in args.sets]
        timing = [t for t in kept.get("timing", []) if t["set"] not in args.sets]
    for name in args.sets:
        found = rank_set(name, out)
        results += found["results"]
        timing.append(found["timing"])
        print(found, flush=True)
    best = {}
    for name in sorted({r["set"] for r in results}):
        rows = [r for r in results if r["set"] == name]
        best[name] = max(rows, key=lambda r: r["spearman"])["figure"]
    results.sort(key=lambda r: (r["set"], -r["spearman"]))
    write_result({"benchmark": "uncertainty ranking", "results": results, "timing": timing,
                  "best_figure": best,
                  "notes": ["Spearman rank correlation between each per-scene figure of "
                            "uncertainty.csv and the scene's error (1 - mean IoU); "
                            "lakes: 31 held-out lakes (weights/lakes_lite0); dubai: the 54 "
                            "scenes weights/dubai_lite0 was trained on (no held-out split). "
                            "worst_quarter_in_top_quarter: the share of the quarter of scenes "
                            "with the largest error found in the top quarter of the ranking.",
                            *[f"Cost ({t['set']}, {t['scenes']} scenes, {t['tta_views']} TTA "
                              f"views, {t['segmentation_seconds']:.0f} s of segmentation): "
                              f"the ranking sums {100 * t['ranking_share']:.1f} %, the review "
                              f"pictures and page {100 * t['pictures_share']:.1f} % of it."
                              for t in timing]]},
                 args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
