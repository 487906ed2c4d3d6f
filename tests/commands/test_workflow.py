"""res_unet.train_model (res_unet/workflow.py) does what train_resunet does: the same run
folder and model card, scene evaluation and threshold included, written by one writer while
the folder is locked."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import tensorflow as tf
from helpers import make_config

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


def _evaluate_only(trained_run, tmp_path, *names):
    """(the trained run's config for re-evaluating it, without figures; copies of its run
    folder named ``names``)."""
    cfg, trained, _ = trained_run
    for name in names:
        shutil.copytree(trained, tmp_path / name)
    return dataclasses.replace(cfg, DO_TRAIN=False, DOPLOT=False)


@pytest.mark.slow
def test_train_model_and_train_resunet_write_the_same_run_folder(trained_run, tiny_dataset,
                                                                 tmp_path, monkeypatch, capsys):
    """The shared trained run re-evaluated twice (training is not bit-reproducible on a CPU;
    evaluation is): once by the library call, once by the command. Both cards carry the
    scene evaluation and its threshold, and agree field by field but for wall times; so do
    the evaluation.json files; the card train_model returns is the one it wrote. The scenes
    are scored while the run folder is locked: no other command can write it meanwhile."""
    cfg = _evaluate_only(trained_run, tmp_path, "lib", "cmd")
    lib, cmd = tmp_path / "lib", tmp_path / "cmd"
    real, locked = scoring.evaluate_scenes, []

    def evaluate_scenes(run_dir, data_dir, progress=True):
        with pytest.raises(UserError, match="in use by train_resunet"), \
                folder_lock(run_dir, "seg_images_in_folder"):
            pass
        locked.append(run_dir)
        return real(run_dir, data_dir, progress)

    monkeypatch.setattr(scoring, "evaluate_scenes", evaluate_scenes)
    card = res_unet.train_model(cfg, tiny_dataset, lib, progress=False,
                                export_saved_model=False)
    save_config(cfg, tmp_path / "config.json")
    assert train_resunet.main(["--config", str(tmp_path / "config.json"), "--data",
                               str(tiny_dataset), "--out", str(cmd), "--evaluate-only",
                               "--no-progress", "--no-export"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{\n"):])
    assert locked == [lib, cmd]

    lib_card, cmd_card = _read(lib / "model_card.json"), _read(cmd / "model_card.json")
    assert set(lib_card) == set(cmd_card)
    same_lib, same_cmd = _without_wall_times(lib_card), _without_wall_times(cmd_card)
    for field in same_lib:
        assert same_lib[field] == same_cmd[field], field
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
    assert evaluation["scores"] == _read(trained_run[1] / "evaluation.json")["scores"]
    assert not list(lib.glob(".*tmp*")) and not list(cmd.glob(".*tmp*"))


@pytest.mark.slow
def test_a_worker_scores_nothing_and_a_skipped_scene_evaluation_keeps_the_tile_threshold(
        trained_run, tiny_dataset, tmp_path, monkeypatch):
    """A worker of a multi-worker run writes nothing into the run folder and scores nothing;
    a scene evaluation that cannot run (None, after its notice) leaves the card with the
    tile-optimal threshold and evaluation.json without scenes."""
    cfg = _evaluate_only(trained_run, tmp_path, "run")
    run = tmp_path / "run"
    calls = []
    monkeypatch.setattr(scoring, "evaluate_scenes", lambda *a, **k: calls.append((a, k)))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    monkeypatch.setenv("TF_CONFIG", json.dumps({
        "cluster": {"worker": ["localhost:1", "localhost:2"]},
        "task": {"type": "worker", "index": 1}}))
    # (The default strategy: this worker has no cluster to join.)
    card = res_unet.train_model(cfg, tiny_dataset, run, progress=False,
                                export_saved_model=False, strategy=tf.distribute.get_strategy())
    assert calls == []
    assert "scenes" not in card.validation and card.threshold_source is None
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before

    monkeypatch.delenv("TF_CONFIG")
    card = res_unet.train_model(cfg, tiny_dataset, run, progress=False,
                                export_saved_model=False)
    assert calls == [((run, tiny_dataset), {"progress": False})]
    evaluation = _read(run / "evaluation.json")
    assert "scenes" not in evaluation and "scenes" not in card.validation
    assert card.threshold == evaluation["optimal_threshold"] == \
        _read(run / "model_card.json")["threshold"]
    assert card.threshold_source is None


def test_train_model_hands_training_the_scene_evaluation_unless_told_not_to(monkeypatch):
    """What train_model passes to training: its arguments, and a scorer of the written run
    folder on the dataset's scenes (none with scene_evaluation=False)."""
    from res_unet.training import train

    calls = []
    monkeypatch.setattr(train, "train", lambda *a, **k: calls.append((a, k)) or "card")
    monkeypatch.setattr(scoring, "evaluate_scenes", lambda *a, **k: ("scored", a, k))
    assert res_unet.train_model("cfg", "ds", "run", progress=False, overwrite=True) == "card"
    args, kwargs = calls[-1]
    score = kwargs.pop("score_scenes")
    assert args == ("cfg", "ds", "run")
    assert kwargs == {"strategy": None, "progress": False, "export_saved_model": True,
                      "overwrite": True}
    assert score("written") == ("scored", ("written", "ds"), {"progress": False})
    res_unet.train_model("cfg", "ds", "run", scene_evaluation=False)
    assert calls[-1][1]["score_scenes"] is None


# What a card says of its weights' numbers: two trainings on a CPU differ there (they are
# not bit-reproducible), never in what these fields hold or in the fields' names.
TRAINED_NUMBERS = ("wall_seconds", "threshold", "training", "validation")


def _keys(value, prefix=""):
    """Every key path of a nested JSON object (list items not entered)."""
    if not isinstance(value, dict):
        return set()
    return {p for k, v in value.items() for p in {f"{prefix}{k}", *_keys(v, f"{prefix}{k}.")}}


@pytest.mark.slow
def test_a_run_trained_by_train_model_and_by_train_resunet_has_the_same_card(
        tiny_dataset, tmp_path, capsys):
    """A one-step run trained each way: the cards have the same fields, both with the scene
    evaluation and the threshold chosen on it, and agree on everything but the numbers the
    trained weights give (their exact equality is the evaluate-only test's above)."""
    cfg = make_config(MAX_EPOCHS=1, STEPS_PER_EPOCH=1)
    lib, cmd = tmp_path / "lib", tmp_path / "cmd"
    res_unet.train_model(cfg, tiny_dataset, lib, progress=False, export_saved_model=False)
    save_config(cfg, tmp_path / "config.json")
    assert train_resunet.main(["--config", str(tmp_path / "config.json"), "--data",
                               str(tiny_dataset), "--out", str(cmd), "--no-progress",
                               "--no-export"]) == 0
    capsys.readouterr()
    lib_card, cmd_card = _read(lib / "model_card.json"), _read(cmd / "model_card.json")
    assert _keys(lib_card) == _keys(cmd_card)
    assert "validation.scenes.scores_at_optimal_threshold" in _keys(lib_card)
    for field in set(lib_card) - set(TRAINED_NUMBERS):
        assert lib_card[field] == cmd_card[field], field
    for card in (lib_card, cmd_card):
        assert card["threshold_source"] == "whole validation scenes"
        assert card["threshold"] == card["validation"]["scenes"]["optimal_threshold"]
        assert card["training"]["epochs_run"] == 1
    assert {p.name for p in lib.iterdir()} == {p.name for p in cmd.iterdir()}
    assert _keys(_read(lib / "evaluation.json")) == _keys(_read(cmd / "evaluation.json"))
