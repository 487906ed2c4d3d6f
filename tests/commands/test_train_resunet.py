"""The train_resunet command: what it calls after training, and on which process."""

from __future__ import annotations

import json
from types import SimpleNamespace

from res_unet import train_resunet
from res_unet.inference import scoring
from res_unet.training import train


def _fake_card() -> SimpleNamespace:
    """What train_resunet reads of the ModelCard that train() returns."""
    scores = {"mean_iou": 0.9, "iou": [0.95, 0.85]}
    return SimpleNamespace(
        validation={"scores_at_threshold": scores, "scores": scores},
        training=SimpleNamespace(epochs_run=1, best_epoch=1, train_seconds=1.0,
                                 averaged_epochs=None, kept_epoch=None),
        class_names=["land", "water"], threshold=0.5)


def test_only_the_chief_scores_whole_scenes(tmp_path, monkeypatch, capsys):
    """A worker that did not write the run folder must not evaluate (or rewrite) it."""
    config = tmp_path / "c.json"
    config.write_text("{}")
    calls = []
    monkeypatch.setattr(train, "train", lambda *a, **k: _fake_card())
    monkeypatch.setattr(scoring, "evaluate_scenes", lambda *a, **k: calls.append(a) or None)
    args = ["--config", str(config), "--data", str(tmp_path), "--out", str(tmp_path / "run"),
            "--no-progress"]
    monkeypatch.setenv("TF_CONFIG", json.dumps({
        "cluster": {"worker": ["localhost:1", "localhost:2"]},
        "task": {"type": "worker", "index": 1}}))
    assert train_resunet.main(args) == 0
    assert calls == []
    monkeypatch.setenv("TF_CONFIG", json.dumps({
        "cluster": {"worker": ["localhost:1", "localhost:2"]},
        "task": {"type": "worker", "index": 0}}))
    assert train_resunet.main(args) == 0
    assert len(calls) == 1
    assert capsys.readouterr().out.count('"run_folder"') == 2
