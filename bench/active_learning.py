"""Does labelling the scenes the model is least sure of pay? Simulated labelling rounds.

    nohup nice python bench/active_learning.py --out /tmp/al &

The shared lakes data, split by lake as everywhere else: the 31 validation lakes of
weights/lakes_lite0 (VALIDATION_SPLIT 0.2, SEED 42, grouped by lake name) are a fixed
held-out test set; the other 123 scenes are the pool whose labels are hidden. Each seed starts
from ``--start`` scenes drawn at random from the pool; each round adds ``--k`` scenes chosen by
a strategy, then a model is trained anew with the same budget (MAX_EPOCHS x
STEPS_PER_EPOCH batches, whatever the number of labels) and scored on the held-out lakes
(water IoU over all their pixels). Strategies:

- ``random``: k scenes at random;
- ``uncertainty``: the k scenes at the top of uncertainty.csv (the HEADLINE figure);
- ``diverse``: down uncertainty.csv, at most one scene per lake (the same lake in another
  year adds little), the standard fix when the most uncertain scenes are near duplicates;
- ``disagreement``: the k scenes whose test-time-augmentation views (the four flips, as
  ensemble members) disagree on most pixels (uncertainty.csv's ``disagreement``; the pool is
  segmented with TTA for it), the other standard fix.

Everything runs through the library (make_dataset, train, segment_folder) at a size 2 CPU
cores afford: the scenes are first shrunk to ``--side`` px (longest side; labels by nearest
neighbour) and scored at that size, the model sees them at 128 px (FIT_MODE resize): an
EfficientNet-Lite0 U-Net from the ImageNet encoder (read offline), 200 batches of 8. A
first recipe (a small residual U-Net from scratch, 120 batches) left training noise larger
than any strategy's effect: the same 20 scenes gave water IoU 0.19 to 0.45 across seeds.
The JSON (bench/results/active_learning.json) is rewritten after every round, so a run
stopped early keeps what it measured.
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
    "IMS_PER_SHARD": 500, "DOPLOT": False, "MODEL": "efficientnet_unet", "ENCODER": "lite0",
    "ENCODER_WEIGHTS": "imagenet", "FILTERS": 16, "DROPOUT": 0.0, "BATCH_SIZE": 8,
    "MAX_EPOCHS": 8, "STEPS_PER_EPOCH": 25, "PATIENCE": 100, "START_LR": 1e-3,
    "MAX_LR": 1e-3, "MIN_LR": 1e-4, "RAMPUP_EPOCHS": 0, "EXP_DECAY": 0.75,
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


def train_and_score(cfg, labelled, test, pool, work: Path, seed: int, tta: bool = False
                    ) -> tuple[float, dict]:
    """Train on ``labelled``; (water IoU on ``test``, {figure: {pool image name: value}}),
    the figures of uncertainty.csv (the pool segmented with TTA when ``tta``)."""
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
    figures: dict[str, dict[str, float]] = {}
    if pool:
        pool_images, _ = link(pool, work / "pool")
        pool_cfg = settings.inference_config([work / "run"], None, {"TESTTIMEAUG": tta})
        with quiet():
            summary = segment.segment_folder(pool_cfg, [work / "run"], pool_images,
                                             work / "pool_out", overwrite=True, progress=False)
        with open(summary["uncertainty_file"]) as fh:
            rows = list(csv.DictReader(fh))
        figures = {name: {r["image"]: float(r[name] or 0) for r in rows}
                   for name in ("uncertainty", "disagreement")}
    return float(scored["scores"]["iou"][1]), figures


def choose(strategy: str, pool, figures: dict[str, dict[str, float]], k: int, rng) -> list:
    """The k scenes of ``pool`` a strategy labels next."""
    if strategy == "random":
        return [pool[i] for i in sorted(rng.choice(len(pool), k, replace=False))]
    ranking = figures["disagreement" if strategy == "disagreement" else "uncertainty"]
    ranked = sorted(pool, key=lambda p: -ranking.get(p.image.name, 0.0))
    if strategy in ("uncertainty", "disagreement"):
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
        mine = [r for r in rounds if strategy in r["strategies"]]
        for labels in sorted({r["labels"] for r in mine}):
            ious = [r["water_iou"] for r in mine if r["labels"] == labels]
            row = {"strategy": strategy, "labels": labels, "runs": len(ious),
                   "mean": round(float(np.mean(ious)), 4),
                   "std": round(float(np.std(ious)), 4),
                   "min": round(min(ious), 4), "max": round(max(ious), 4), "better": None}
            curve.append(row)
        table += curve
        curves[strategy] = curve
    # Each strategy against random, seed by seed (same start set, same training seed): the
    # paired difference is steadier than the two means.
    for strategy in strategies:
        if strategy == "random":
            continue
        for labels in sorted({r["labels"] for r in rounds if r["round"] > 0}):
            pairs = [(mine["water_iou"], other["water_iou"])
                     for mine in rounds for other in rounds
                     if strategy in mine["strategies"] and "random" in other["strategies"]
                     and mine["labels"] == other["labels"] == labels
                     and mine["seed"] == other["seed"]]
            if pairs:
                diffs = [a - b for a, b in pairs]
                table.append({"strategy": f"{strategy} - random", "labels": labels,
                              "runs": len(diffs), "mean": round(float(np.mean(diffs)), 4),
                              "std": round(float(np.std(diffs)), 4),
                              "min": round(min(diffs), 4), "max": round(max(diffs), 4),
                              "better": sum(d > 0 for d in diffs)})
    # Labels each strategy needs to reach what random reaches with its most labels.
    reach = {}
    if curves.get("random"):
        target = curves["random"][-1]["mean"]
        reach = {"target_water_iou": target,
                 **{s: labels_to_reach(c, target) for s, c in curves.items()}}
    return table, reach


def findings(rounds: list[dict], table: list[dict]) -> list[str]:
    """Sentences the numbers say: each strategy against random at the most labels, and how
    far two trainings on the same scenes (same seed) land apart, where a merge holds both."""
    out = []
    paired = [r for r in table if r["strategy"].endswith(" - random")]
    if paired:
        most = max(r["labels"] for r in paired)
        parts = [f"{r['strategy'].removesuffix(' - random')} {r['mean']:+.4f} "
                 f"(better in {r['better']} of {r['runs']} seeds, "
                 f"{r['min']:+.4f} to {r['max']:+.4f})"
                 for r in paired if r["labels"] == most]
        out.append(f"At {most} labels, water IoU against random, seed by seed: "
                   + "; ".join(parts) + ".")
    same: dict[tuple, list[float]] = {}
    for r in rounds:
        same.setdefault((r["seed"], tuple(r["labelled"])), []).append(r["water_iou"])
    spreads = [max(v) - min(v) for v in same.values() if len(v) > 1]
    if spreads:
        out.append(f"Training noise: {len(spreads)} label sets trained twice (same scenes, "
                   f"same seed, separate runs) landed {min(spreads):.4f} to "
                   f"{max(spreads):.4f} water IoU apart (mean {np.mean(spreads):.4f}).")
    return out


def write_report(rounds: list[dict], strategies: list[str], args: argparse.Namespace,
                 n_test: int, n_pool: int, peak: float, notes: list[str] | None = None
                 ) -> None:
    table, reach = summarise(rounds, strategies)
    write_result({"benchmark": "active learning (lakes)", "results": table,
                  "labels_to_reach": reach, "settings": SETTINGS,
                  "test_scenes": n_test or 31, "pool_scenes": n_pool or 123,
                  "start": args.start, "k": args.k, "side": args.side,
                  "notes": ["Water IoU on the 31 held-out lakes after each round, mean and "
                            "spread over seeds; each round trains anew (ImageNet encoder) "
                            "with the same budget; round 0 (the start set, the same scenes "
                            "for every strategy of a seed) is trained once per run and "
                            "shared by its strategies (a strategy run on its own and merged "
                            "trains its own). Rows 'S - random': the difference to random "
                            "seed by seed, and in how many seeds S was better.",
                            *findings(rounds, table), *(notes or [])]},
                 args.json_out, peak_gflops=peak)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="scratch folder (required unless --merge); a run stopped "
                                      "early resumes from its rounds.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--start", type=int, default=20)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--side", type=int, default=256,
                        help="longest side of the scenes, px (default 256)")
    parser.add_argument("--strategies", nargs="+", default=["random", "uncertainty", "diverse"],
                        choices=["random", "uncertainty", "diverse", "disagreement"])
    parser.add_argument("--merge", nargs="+", metavar="DIR",
                        help="only write the report from the rounds.json of these --out folders "
                             "(strategies run as separate processes; pairs by seed)")
    add_json_out(parser, "active_learning")
    args = parser.parse_args(argv)
    if args.merge:
        runs = {d: json.loads((Path(d) / "rounds.json").read_text()) for d in args.merge}
        rounds = [r for records in runs.values() for r in records]
        strategies = list(dict.fromkeys(s for r in rounds for s in r["strategies"]))
        made = "; ".join(
            f"python bench/active_learning.py --out {d} --strategies "
            + " ".join(dict.fromkeys(s for r in records for s in r["strategies"]))
            for d, records in runs.items())
        write_report(rounds, strategies, args, 0, 0, matmul_peak(),
                     [f"Merged from runs made by: {made} (the other options at their "
                      "defaults)."])
        return 0
    if not args.out:
        parser.error("--out is required (unless --merge)")

    from res_unet.config.keys import config_from_dict
    from res_unet.core.atomic import write_atomic
    from res_unet.data import pairing
    from res_unet.data.split import split_pairs

    out = Path(args.out)
    cfg, _ = config_from_dict(SETTINGS)
    pairs = shrink(pairing.find_pairs(DATA / "images", DATA / "labels"), out / "scenes",
                   args.side)
    pool_all, test = split_pairs(pairs, 0.2, 42, LAKE.pattern)
    by_name = {p.image.name: p for p in pool_all}
    done_file = out / "rounds.json"
    # Each record: one trained model (seed, round, the strategies sharing it, its labelled
    # scenes, water IoU) and what each of those strategies labels next.
    rounds: list[dict] = json.loads(done_file.read_text()) if done_file.exists() else []
    peak = matmul_peak()
    # Round-major: every seed and strategy reaches a round before any goes further, so a run
    # stopped early compares the strategies over all seeds up to where it got.
    for round_ in range(args.rounds + 1):
        for seed in args.seeds:
            groups = [args.strategies] if round_ == 0 else [[s] for s in args.strategies]
            for strategies in groups:
                if any(r["seed"] == seed and r["round"] == round_
                       and r["strategies"] == strategies for r in rounds):
                    continue  # measured before the run was stopped
                if round_ == 0:
                    rng0 = np.random.default_rng(seed)
                    labelled = [pool_all[i] for i in sorted(
                        rng0.choice(len(pool_all), args.start, replace=False))]
                else:
                    last = next(r for r in rounds if r["seed"] == seed
                                and r["round"] == round_ - 1 and strategies[0] in r["strategies"])
                    labelled = [by_name[n] for n in
                                last["labelled"] + last["next"][strategies[0]]]
                pool = [p for p in pool_all if p not in labelled]
                iou, figures = train_and_score(cfg, labelled, test,
                                               pool if round_ < args.rounds else [],
                                               out / "work", seed,
                                               tta="disagreement" in strategies)
                following = {}
                if round_ < args.rounds:
                    for strategy in strategies:
                        rng = np.random.default_rng([seed, round_, 1000])
                        following[strategy] = sorted(
                            p.image.name for p in choose(strategy, pool, figures, args.k, rng))
                rounds.append({"seed": seed, "round": round_, "strategies": strategies,
                               "labels": len(labelled), "water_iou": round(iou, 4),
                               "labelled": sorted(p.image.name for p in labelled),
                               "next": following})
                print(f"seed {seed} round {round_} {'/'.join(strategies)}: {len(labelled)} "
                      f"labels, water IoU {iou:.4f}", flush=True)
                done_file.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(done_file, json.dumps(rounds))
                write_report(rounds, args.strategies, args, len(test), len(pool_all), peak)
    # Once more at the end: a re-run of a finished --out only rewrites the report.
    write_report(rounds, args.strategies, args, len(test), len(pool_all), peak)
    return 0


if __name__ == "__main__":
    sys.exit(main())
