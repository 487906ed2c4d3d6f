"""res_unet.train_model (res_unet/workflow.py) does what train_resunet does: the same run
folder and model card, scene evaluation and threshold included, written by one writer while
the folder is locked."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import tensorflow as tf

import res_unet
from res_unet import train_resunet
from res_unet.config.keys import save_config
from res_unet.core.errors import UserError
from res_unet.core.folders import folder_lock
from res_unet.data import records
from res_unet.inference import scoring


def _without_wall_times(card_or_evaluation: dict) -> dict:
    """A model card's or evaluation.json's dict without the wall times (the run's and the
    scene evaluation's seconds), which two evaluations of the same weights do not share."""
    out = json.loads(json.dumps(card_or_evaluation))
    out.pop("wall_seconds", None)
    for holder in (out, out.get("validation", {})):
        if "scenes" in holder:
            del holder["scenes"]["seconds"]
    return out


def _read(path):
    return json.loads(path.read_text())


def test_train_model_and_train_resunet_write_the_same_run_folder(trained_run, tiny_dataset,
                                                                 tmp_path, capsys):
    """The shared trained run re-evaluated twice (training is not bit-reproducible on a CPU;
    evaluation is): once by the library call, once by the command. Both cards carry the
    scene evaluation and its threshold, and agree field by field but for wall times; so do
    the evaluation.json files; the card train_model returns is the one it wrote."""
    cfg, trained, _ = trained_run
    lib, cmd = tmp_path / "lib", tmp_path / "cmd"
    shutil.copytree(trained, lib)
    shutil.copytree(trained, cmd)
    evaluate_only = dataclasses.replace(cfg, DO_TRAIN=False)
    card = res_unet.train_model(evaluate_only, tiny_dataset, lib, progress=False,
                                export_saved_model=False)
    save_config(cfg, tmp_path / "config.json")
    assert train_resunet.main(["--config", str(tmp_path / "config.json"), "--data",
                               str(tiny_dataset), "--out", str(cmd), "--evaluate-only",
                               "--no-progress", "--no-export"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{\n"):])

    lib_card, cmd_card = _read(lib / "model_card.json"), _read(cmd / "model_card.json")
    assert set(lib_card) == set(cmd_card)
    same_lib, same_cmd = _without_wall_times(lib_card), _without_wall_times(cmd_card)
    for field in lib_card:
        assert same_lib.get(field) == same_cmd.get(field), field
    assert _without_wall_times(_read(lib / "evaluation.json")) == \
        _without_wall_times(_read(cmd / "evaluation.json"))
    assert json.loads(json.dumps(card.to_dict(), default=float)) == lib_card

    validation = records.read_manifest(tiny_dataset).files["validation"]
    evaluation = _read(lib / "evaluation.json")
    assert lib_card["threshold_source"] == "whole validation scenes"
    assert lib_card["threshold"] == evaluation["scenes"]["optimal_threshold"] == \
        summary["threshold"]
    assert lib_card["validation"]["scenes"]["images"] == len(validation) == \
        summary["validation_scenes"]["images"]
    assert "threshold_sweep" in evaluation["scenes"]
    assert "threshold_sweep" not in lib_card["validation"]["scenes"]
    # The tile evaluation stays beside it, as training wrote it.
    assert evaluation["scores"] == _read(trained / "evaluation.json")["scores"]
    assert not list(lib.glob(".*tmp*")) and not list(cmd.glob(".*tmp*"))


SCENES = {"images": 3, "megapixels": 0.05, "seconds": 1.0, "downsample": 1, "tta": False,
          "tile_overlap": 0.0, "scores": {"mean_iou": 0.6, "iou": [0.7, 0.5]},
          "threshold_sweep": {"thresholds": [0.3, 0.5], "iou": [0.55, 0.5]},
          "optimal_threshold": 0.3,
          "scores_at_optimal_threshold": {"mean_iou": 0.65, "iou": [0.72, 0.58]}}


def test_only_the_process_that_writes_the_run_folder_scores_it_while_locked(
        trained_run, tiny_dataset, tmp_path, monkeypatch):
    """A worker of a multi-worker run writes nothing and scores nothing; the chief scores
    the written folder while it holds its lock (no other command can write it meanwhile),
    and the scene evaluation lands in evaluation.json and the card."""
    cfg, trained, _ = trained_run
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    calls = []

    def evaluate_scenes(run_dir, data_dir, progress=True):
        with pytest.raises(UserError, match="in use by train_resunet"), \
                folder_lock(run_dir, "seg_images_in_folder"):
            pass
        calls.append((run_dir, data_dir, progress))
        return json.loads(json.dumps(SCENES))

    monkeypatch.setattr(scoring, "evaluate_scenes", evaluate_scenes)
    evaluate_only = dataclasses.replace(cfg, DO_TRAIN=False)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    monkeypatch.setenv("TF_CONFIG", json.dumps({
        "cluster": {"worker": ["localhost:1", "localhost:2"]},
        "task": {"type": "worker", "index": 1}}))
    # (The default strategy: this worker has no cluster to join.)
    card = res_unet.train_model(evaluate_only, tiny_dataset, run, progress=False,
                                export_saved_model=False, strategy=tf.distribute.get_strategy())
    assert calls == []
    assert "scenes" not in card.validation and card.threshold_source is None
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before

    monkeypatch.delenv("TF_CONFIG")
    card = res_unet.train_model(evaluate_only, tiny_dataset, run, progress=False,
                                export_saved_model=False)
    assert calls == [(run, tiny_dataset, False)]
    assert card.threshold == 0.3 and card.threshold_source == "whole validation scenes"
    assert card.validation["scenes"] == {k: v for k, v in SCENES.items()
                                         if k != "threshold_sweep"}
    assert _read(run / "model_card.json")["threshold"] == 0.3
    assert _read(run / "evaluation.json")["scenes"] == SCENES
    assert res_unet.load_run(run).threshold == 0.3

    # Skipped (None, with its notice) or switched off: the card keeps the tile threshold.
    monkeypatch.setattr(scoring, "evaluate_scenes", lambda *a, **k: None)
    card = res_unet.train_model(evaluate_only, tiny_dataset, run, progress=False,
                                export_saved_model=False)
    tile_threshold = _read(run / "evaluation.json")["optimal_threshold"]
    assert card.threshold == tile_threshold and card.threshold_source is None
    assert "scenes" not in _read(run / "evaluation.json")
    card = res_unet.train_model(evaluate_only, tiny_dataset, run, progress=False,
                                export_saved_model=False, scene_evaluation=False)
    assert "scenes" not in card.validation and card.threshold == tile_threshold
