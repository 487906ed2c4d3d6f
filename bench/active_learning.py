"""Does labelling the scenes the model is least sure of pay? Simulated labelling rounds.

    nohup nice python bench/active_learning.py --out /tmp/al &

The shared lakes data, split by lake as everywhere else: the 31 validation lakes of
weights/lakes_lite0 (VALIDATION_SPLIT 0.2, SEED 42, grouped by lake name) are a fixed
held-out test set; the other 123 scenes are the pool whose labels are hidden. Each seed starts
from ``--start`` scenes drawn at random from the pool; each round adds ``--k`` scenes chosen by
a strategy, then a model is trained from scratch with the same budget (MAX_EPOCHS x
STEPS_PER_EPOCH batches, whatever the number of labels) and scored on the held-out lakes
(water IoU over all their pixels). Strategies:

- ``random``: k scenes at random;
- ``uncertainty``: the k scenes at the top of uncertainty.csv (the HEADLINE figure);
- ``diverse``: down uncertainty.csv, at most one scene per lake (the same lake in another
  year adds little), the standard fix when the most uncertain scenes are near duplicates.

Everything runs through the library (make_dataset, train, segment_folder) at a size 2 CPU
cores afford: the scenes are first shrunk to ``--side`` px (longest side; labels by nearest
neighbour) and scored at that size, the model sees them at 128 px (FIT_MODE resize), a
small residual U-Net, a few epochs. The JSON (bench/results/active_learning.json) is
rewritten after every round, so a
run stopped early keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import re
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from common import add_json_out, matmul_peak, write_result  # noqa: E402

import res_unet  # noqa: E402,F401  (before TensorFlow: turns on oneDNN)

DATA = REPO.parent / "shared" / "data" / "lakes"
LAKE = re.compile(r"^(.*)_s2cloudless")
SETTINGS = {
    "TARGET_SIZE": [128, 128], "FIT_MODE": "resize", "NCLASSES": 1,
    "CLASS_NAMES": ["land", "water"], "N_DATA_BANDS": 3, "VALIDATION_SPLIT": 0.0,
    "DO_AUG": True, "AUG_COPIES": 1, "AUG_HFLIP": True, "AUG_VFLIP": True, "AUG_ROT90": True,
    "IMS_PER_SHARD": 500, "DOPLOT": False, "MODEL": "resunet", "FILTERS": 8, "DEPTH": 3,
    "DROPOUT": 0.0, "BATCH_SIZE": 8, "MAX_EPOCHS": 10, "STEPS_PER_EPOCH": 12,
    "PATIENCE": 100, "START_LR": 2e-3, "MAX_LR": 2e-3, "MIN_LR": 2e-3, "RAMPUP_EPOCHS": 0,
    "LOSS": {"dice": 1.0, "ce": 1.0}, "PRECISION": "float32", "KEEP_WEIGHTS": "last",
    "TESTTIMEAUG": False, "THRESHOLD": 0.5, "INFER_MODE": "resize",
}


def shrink(pairs, folder: Path, side: int) -> list:
    """Copies of ``pairs`` with the longest side brought to ``side`` px (images bilinear,
    labels nearest), as Pairs of the copies."""
    from PIL import Image

    from res_unet.data import pairing

    images, labels = folder / "images", folder / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(exist_ok=True)
    for pair in pairs:
        for src, dst, resample in ((pair.image, images, Image.Resampling.BILINEAR),
                                   (pair.label, labels, Image.Resampling.NEAREST)):
            target = dst / (src.stem + ".png")
            if not target.exists():
                picture = Image.open(src)
                scale = side / max(picture.size)
                picture.resize((round(picture.width * scale), round(picture.height * scale)),
                               resample).save(target)
    return pairing.find_pairs(images, labels)


def lake(stem: str) -> str:
    match = LAKE.search(stem)
    return match.group(1) if match else stem


def link(pairs, folder: Path) -> tuple[Path, Path]:
    """A fresh folder of links to the images and labels of ``pairs``."""
    shutil.rmtree(folder, ignore_errors=True)
    images, labels = folder / "images", folder / "labels"
    images.mkdir(parents=True)
    labels.mkdir()
    for pair in pairs:
        (images / pair.image.name).symlink_to(pair.image.resolve())
        (labels / pair.label.name).symlink_to(pair.label.resolve())
    return images, labels


@contextlib.contextmanager
def quiet():
    """Keep the library's per-epoch lines out of the log."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def train_and_score(cfg, labelled, test, pool, work: Path, seed: int) -> tuple[float, dict]:
    """Train on ``labelled``; (water IoU on ``test``, {pool image name: uncertainty})."""
    import dataclasses

    from res_unet.data.dataset import make_dataset
    from res_unet.inference import segment, settings
    from res_unet.training.train import train

    cfg = dataclasses.replace(cfg, SEED=seed)
    images, labels = link(labelled, work / "labelled")
    with quiet():
        make_dataset(cfg, images, labels, work / "data", overwrite=True)
        train(cfg, work / "data", work / "run", progress=False, export_saved_model=False,
              overwrite=True)
    infer = settings.inference_config([work / "run"], None, {})
    test_images, test_labels = link(test, work / "test")
    with quiet():
        scored = segment.segment_folder(infer, [work / "run"], test_images, work / "test_out",
                                        labels_dir=test_labels, overwrite=True,
                                        progress=False)
    ranking: dict[str, float] = {}
    if pool:
        pool_images, _ = link(pool, work / "pool")
        with quiet():
            summary = segment.segment_folder(infer, [work / "run"], pool_images,
                                             work / "pool_out", overwrite=True, progress=False)
        with open(summary["uncertainty_file"]) as fh:
            ranking = {r["image"]: float(r["uncertainty"] or 0) for r in csv.DictReader(fh)}
    return float(scored["scores"]["iou"][1]), ranking


def choose(strategy: str, pool, ranking: dict[str, float], k: int, rng) -> list:
    """The k scenes of ``pool`` a strategy labels next."""
    if strategy == "random":
        return [pool[i] for i in sorted(rng.choice(len(pool), k, replace=False))]
    ranked = sorted(pool, key=lambda p: -ranking.get(p.image.name, 0.0))
    if strategy == "uncertainty":
        return ranked[:k]
    chosen, lakes = [], set()
    for pair in ranked:  # diverse: one scene per lake, down the ranking
        if lake(pair.stem) not in lakes:
            chosen.append(pair)
            lakes.add(lake(pair.stem))
        if len(chosen) == k:
            break
    return chosen + [p for p in ranked if p not in chosen][:k - len(chosen)]


def labels_to_reach(curve: list[dict], target: float) -> int | None:
    """The fewest labels whose mean IoU reaches ``target`` (None: never)."""
    return next((row["labels"] for row in curve if row["mean"] >= target), None)


def summarise(rounds: list[dict], strategies: list[str]) -> tuple[list[dict], dict]:
    table, curves = [], {}
    for strategy in strategies:
        curve = []
        mine = [r for r in rounds if strategy in r.get("strategies", [r["strategy"]])]
        for labels in sorted({r["labels"] for r in mine}):
            ious = [r["water_iou"] for r in mine if r["labels"] == labels]
            row = {"strategy": strategy, "labels": labels, "runs": len(ious),
                   "mean": round(float(np.mean(ious)), 4),
                   "std": round(float(np.std(ious)), 4),
                   "min": round(min(ious), 4), "max": round(max(ious), 4)}
            curve.append(row)
        table += curve
        curves[strategy] = curve
    # Labels each strategy needs to reach what random reaches with its most labels.
    reach = {}
    if curves.get("random"):
        target = curves["random"][-1]["mean"]
        reach = {"target_water_iou": target,
                 **{s: labels_to_reach(c, target) for s, c in curves.items()}}
    return table, reach


def write_report(rounds: list[dict], strategies: list[str], args: argparse.Namespace,
                 n_test: int, n_pool: int, peak: float) -> None:
    table, reach = summarise(rounds, strategies)
    write_result({"benchmark": "active learning (lakes)", "results": table,
                  "labels_to_reach": reach, "settings": SETTINGS,
                  "test_scenes": n_test or 31, "pool_scenes": n_pool or 123,
                  "start": args.start, "k": args.k, "side": args.side,
                  "notes": ["Water IoU on the 31 held-out lakes after each round, mean and "
                            "spread over seeds; each round trains from scratch with the same "
                            "budget; round 0 (the start set) is shared by every strategy."]},
                 args.json_out, peak_gflops=peak)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="scratch folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--start", type=int, default=20)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--side", type=int, default=256,
                        help="longest side of the scenes, px (default 256)")
    parser.add_argument("--strategies", nargs="+", default=["random", "uncertainty", "diverse"],
                        choices=["random", "uncertainty", "diverse"])
    parser.add_argument("--round0-from", metavar="DIR",
                        help="take round 0 (the same for every strategy: the start set) from "
                             "this earlier --out: its rounds.json and "
                             "round0_seed{SEED}_pool_uncertainty.csv")
    parser.add_argument("--merge", nargs="+", metavar="DIR",
                        help="only write the report from the rounds.json of these --out "
                             "folders (strategies run as separate processes)")
    add_json_out(parser, "active_learning")
    args = parser.parse_args(argv)
    if args.merge:
        rounds = [r for d in args.merge for r in json.loads((Path(d) / "rounds.json").read_text())
                  if r["round"] > 0 or d == args.merge[0]]
        strategies = sorted({r["strategy"] for r in rounds})
        for r in rounds:  # round 0 is every strategy's
            r["strategies"] = strategies if r["round"] == 0 else [r["strategy"]]
        write_report(rounds, strategies, args, 0, 0, matmul_peak())
        return 0

    from res_unet.config.keys import config_from_dict
    from res_unet.data import pairing
    from res_unet.data.split import split_pairs

    out = Path(args.out)
    cfg, _ = config_from_dict(SETTINGS)
    pairs = shrink(pairing.find_pairs(DATA / "images", DATA / "labels"), out / "scenes",
                   args.side)
    pool_all, test = split_pairs(pairs, 0.2, 42, LAKE.pattern)
    done_file = out / "rounds.json"
    rounds: list[dict] = []
    peak = matmul_peak()
    for seed in args.seeds:
        rng0 = np.random.default_rng(seed)
        start = [pool_all[i] for i in sorted(rng0.choice(len(pool_all), args.start,
                                                         replace=False))]
        for strategy in args.strategies:
            rng = np.random.default_rng(1000 + seed)
            labelled = list(start)
            for round_ in range(args.rounds + 1):
                pool = [p for p in pool_all if p not in labelled]
                earlier = (Path(args.round0_from) if args.round0_from and round_ == 0
                           else None)
                if earlier is not None:
                    iou = next(r["water_iou"] for r in json.loads(
                        (earlier / "rounds.json").read_text())
                        if r["seed"] == seed and r["round"] == 0)
                    with open(earlier / f"round0_seed{seed}_pool_uncertainty.csv") as fh:
                        ranking = {r["image"]: float(r["uncertainty"] or 0)
                                   for r in csv.DictReader(fh)}
                else:
                    iou, ranking = train_and_score(cfg, labelled, test,
                                                   pool if round_ < args.rounds else [],
                                                   out / "work", seed)
                    if round_ == 0:
                        shutil.copy(out / "work" / "pool_out" / "uncertainty.csv",
                                    out / f"round0_seed{seed}_pool_uncertainty.csv")
                rounds.append({"strategy": strategy, "seed": seed, "round": round_,
                               "labels": len(labelled), "water_iou": round(iou, 4),
                               "labelled": sorted(p.image.name for p in labelled)})
                print(f"seed {seed} {strategy} round {round_}: {len(labelled)} labels, "
                      f"water IoU {iou:.4f}", flush=True)
                done_file.parent.mkdir(parents=True, exist_ok=True)
                done_file.write_text(json.dumps(rounds))
                write_report(rounds, args.strategies, args, len(test), len(pool_all), peak)
                if round_ < args.rounds:
                    labelled += choose(strategy, pool, ranking, args.k, rng)
    return 0


if __name__ == "__main__":
    sys.exit(main())
