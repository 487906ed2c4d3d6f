"""The train_resunet command: it parses its flags, calls the library function users call
(``res_unet.train_model``) and prints a summary of the card it returns."""

from __future__ import annotations

import json
from types import SimpleNamespace

from res_unet import train_resunet, workflow


def _fake_card(scenes: dict | None) -> SimpleNamespace:
    """What train_resunet reads of the ModelCard that train_model() returns."""
    tiles = {"mean_iou": 0.9, "iou": [0.95, 0.85]}
    validation = {"scores_at_threshold": tiles, "scores": tiles}
    if scenes is not None:
        validation["scenes"] = scenes
    return SimpleNamespace(
        validation=validation,
        training=SimpleNamespace(epochs_run=1, best_epoch=1, train_seconds=1.0,
                                 averaged_epochs=None, kept_epoch=None),
        class_names=["land", "water"], threshold=0.35 if scenes else 0.5)


def test_the_command_calls_train_model_and_prints_its_card(tmp_path, monkeypatch, capsys):
    """train_resunet is train_model plus flags: --no-scene-eval turns the scene evaluation
    off, the others pass through; the summary's threshold and scene scores are the card's."""
    config = tmp_path / "c.json"
    config.write_text("{}")
    scenes = {"images": 3, "scores": {"mean_iou": 0.7, "iou": [0.8, 0.6]},
              "optimal_threshold": 0.35,
              "scores_at_optimal_threshold": {"mean_iou": 0.75, "iou": [0.82, 0.68]}}
    calls = []

    def train_model(cfg, data, out, **kwargs):
        calls.append((cfg.MAX_EPOCHS, data, out, kwargs))
        return _fake_card(scenes if kwargs["scene_evaluation"] else None)

    monkeypatch.setattr(workflow, "train_model", train_model)
    args = ["--config", str(config), "--data", "ds", "--out", "run", "--epochs", "2",
            "--no-progress"]
    assert train_resunet.main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert calls == [(2, "ds", "run", {"progress": False, "export_saved_model": True,
                                       "overwrite": False, "scene_evaluation": True})]
    assert summary["threshold"] == 0.35
    assert summary["validation_scenes"] == {"images": 3, "mean_iou": 0.75,
                                            "iou": {"land": 0.82, "water": 0.68}}
    assert summary["validation_mean_iou"] == 0.9
    assert train_resunet.main([*args, "--no-scene-eval", "--no-export", "--overwrite"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert calls[-1][3] == {"progress": False, "export_saved_model": False, "overwrite": True,
                            "scene_evaluation": False}
    assert summary["threshold"] == 0.5 and "validation_scenes" not in summary
