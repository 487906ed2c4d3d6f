"""Fault injection: each command is killed with SIGKILL at seeded random moments, then re-run.

kill -9 gives a process no chance to clean up. After it, re-running the same command must
finish, give the outputs of an uninterrupted run, and leave no temporary file or folder of
ours behind (the next run removes what the killed one left). Dataset shards and label maps
are deterministic and compared byte for byte; training on a CPU is not bit-reproducible, so
a resumed run is checked for completeness (all epochs, every output file) instead.

Only the killed runs need a process of their own: the reference runs and the re-runs call
the same command's ``main`` in this process (:func:`run_here`). The processes of their own
are forked from a server that has imported TensorFlow (tests/forked.py), which spares each
the import (6-12 s of CPU here). The module is one xdist group, so its fixtures are built
once.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import forked
import numpy as np
import pytest

from res_unet.cli import run_command
from res_unet.config.keys import save_config
from res_unet.demo import make_demo_dataset

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}
# When each command is killed: once its first output exists (so there is partial state to
# leave behind), plus a seeded random delay in seconds, one for each killed command. Two
# delays per command doubled these tests' time (the forked starts, the re-runs) for kills
# a fraction of a second apart in the same phase of the same command. A shard's 8 small
# masks take about a second: its delay is drawn from 0-0.2 s so that it dies mid-way.
_DELAYS = np.random.default_rng(20261202).uniform(0.0, 0.6, size=4)
KILL_POINTS = {"make_tfrecords": _DELAYS[0], "seg_images_in_folder": _DELAYS[1],
               "train_resunet": _DELAYS[2], "shard": _DELAYS[3] / 3}

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("fault_injection")]


def command(module: str, *args: object) -> list[str]:
    quiet = [] if module == "make_tfrecords" else ["--no-progress"]
    return [sys.executable, "-m", f"res_unet.{module}", *map(str, args), *quiet]


def run_here(cmd: list[str]) -> None:
    """Run a :func:`command` line through its module's ``main`` in this process, as the
    module's entry point does; exit code 0, or 1 for images it could not segment."""
    module, args = cmd[2], cmd[3:]
    code = run_command(importlib.import_module(module).main, args)
    assert code in (0, 1), f"{module} exited with {code}"


def start_until(cmd: list[str], ready: Callable[[forked.Forked], bool],
                what: str) -> forked.Forked:
    """Start ``cmd`` in a process of its own and return it once ``ready(process)`` holds.
    Fails, naming ``what`` it was waiting for, if the command ends first or takes 300 s."""
    proc = forked.start(cmd, cwd=REPO, env=ENV)
    deadline = time.monotonic() + 300
    while not ready(proc):
        if proc.poll() is not None:
            pytest.fail(f"{cmd[2]} ended (exit {proc.returncode}) before {what}:\n"
                        f"{proc.output()[1][-3000:]}")
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return proc


def run_and_kill(cmd: list[str], started: Path, pattern: str, after: float,
                 since: float | None = None) -> None:
    """Start ``cmd``; once ``started`` holds a file matching ``pattern`` (modified after
    the time ``since``, when given), wait ``after`` seconds more and SIGKILL it. Fails if
    the command finished before being killed."""
    def written(_: forked.Forked) -> bool:
        return started.exists() and any(since is None or p.stat().st_mtime > since
                                        for p in started.glob(pattern))

    proc = start_until(cmd, written, "writing anything")
    try:
        proc.wait(timeout=after)
    except TimeoutError:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "killed before it finished"


def digest(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip}


def temporaries(*folders: Path) -> list[Path]:
    """Hidden files or folders of our temporary naming (.NAME.PID@HOST-...)."""
    return [p for folder in folders if folder.exists() for p in folder.rglob(".*")
            if "@" in p.name]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("faults")
    images, labels = make_demo_dataset(root / "data", 16, (192, 192), seed=5)
    from helpers import make_config

    config = root / "config.json"
    save_config(make_config(AUG_COPIES=2, MAX_EPOCHS=3, STEPS_PER_EPOCH=6), config)
    return Path(images), Path(labels), config


def manifest_without_time(folder: Path) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.pop("created")
    return manifest


def test_make_tfrecords_killed_then_rerun(sources, trained, tmp_path):
    point = KILL_POINTS["make_tfrecords"]
    images, labels, config = sources
    reference, _ = trained  # the same command's uninterrupted output
    out = tmp_path / "data" / "dataset"
    # killed while shards are written into the staging folder beside --out
    run_and_kill(command("make_tfrecords", "--config", config, "--images", images,
                         "--labels", labels, "--out", out), out.parent, ".dataset.*/*.tfrec",
                 point)
    if not (out / "manifest.json").exists():
        assert temporaries(out.parent), "the killed build left its staging folder"
    run_here(command("make_tfrecords", "--config", config, "--images", images, "--labels",
                     labels, "--out", out, "--overwrite"))
    assert digest(out, ("manifest.json",)) == digest(reference, ("manifest.json",))
    assert manifest_without_time(out) == manifest_without_time(reference)
    assert temporaries(out.parent) == []


@pytest.fixture(scope="module")
def trained(sources, tmp_path_factory) -> tuple[Path, Path]:
    images, labels, config = sources
    root = tmp_path_factory.mktemp("trained")
    run_here(command("make_tfrecords", "--config", config, "--images", images, "--labels",
                     labels, "--out", root / "dataset"))
    run_here(command("train_resunet", "--config", config, "--data", root / "dataset", "--out",
                     root / "run", "--no-export"))
    return root / "dataset", root / "run"


@pytest.fixture(scope="module")
def segmented(sources, trained, tmp_path_factory) -> Path:
    """The uninterrupted seg_images_in_folder output the killed runs are compared with."""
    images, _, _ = sources
    _, run_dir = trained
    reference = tmp_path_factory.mktemp("segmented") / "reference"
    run_here(command("seg_images_in_folder", "--model", run_dir, "--images", images, "--out",
                     reference))
    return reference


def test_seg_images_in_folder_killed_then_rerun(sources, trained, segmented, tmp_path):
    point = KILL_POINTS["seg_images_in_folder"]
    images, _, _ = sources
    _, run_dir = trained
    reference = segmented
    out = tmp_path / "out"
    run_and_kill(command("seg_images_in_folder", "--model", run_dir, "--images", images,
                         "--out", out), out, "*_predseg.png", point)
    run_here(command("seg_images_in_folder", "--model", run_dir, "--images", images, "--out",
                     out))
    skip = ("segmentation_config.json",)
    assert digest(out, skip) == digest(reference, skip)
    assert temporaries(out) == []


def test_train_resunet_killed_then_rerun(sources, trained, tmp_path):
    point = KILL_POINTS["train_resunet"]
    _, _, config = sources
    dataset, _ = trained
    out = tmp_path / "run"
    # killed after the first epoch's backup, while later epochs train
    run_and_kill(command("train_resunet", "--config", config, "--data", dataset, "--out", out,
                         "--no-export"), out / "backup", "*.json", point)
    assert not (out / "model_card.json").exists()
    run_here(command("train_resunet", "--config", config, "--data", dataset, "--out", out,
                     "--no-export"))
    card = json.loads((out / "model_card.json").read_text())
    assert card["training"]["epochs_run"] == 3
    assert {p.name for p in out.iterdir()} >= {
        "best.weights.h5", "model.keras", "config.json", "history.csv", "evaluation.json",
        "model_card.json"}
    assert not (out / "backup").exists()
    assert [int(line.split(",")[0]) for line in
            (out / "history.csv").read_text().splitlines()[1:]] == [1, 2, 3]
    assert temporaries(out) == []


def test_make_tfrecords_workers_end_with_a_killed_parent(sources, tmp_path):
    """kill -9 of make_tfrecords --workers 2 mid-build: its worker processes end with it
    within seconds instead of living on as orphans."""
    import psutil

    images, labels, config = sources
    out = tmp_path / "data" / "dataset"
    proc = forked.start(command("make_tfrecords", "--config", config, "--images", images,
                                "--labels", labels, "--out", out, "--workers", "2"),
                        cwd=REPO, env=ENV)
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + 120
    workers: list[psutil.Process] = []
    while len(workers) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "no workers started"
        # the spawn context's resource tracker is a child too; the workers run our module
        workers = [c for c in parent.children(recursive=True)
                   if "spawn_main" in " ".join(c.cmdline())]
        time.sleep(0.05)
    everyone = parent.children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(everyone, timeout=10)
    assert not alive, f"orphaned workers still running: {[p.pid for p in alive]}"
    # and the next build runs as usual
    run_here(command("make_tfrecords", "--config", config, "--images", images, "--labels",
                     labels, "--out", out, "--overwrite"))
    assert (out / "manifest.json").is_file() and temporaries(out.parent) == []


def test_two_segmentations_into_one_folder_never_mix(sources, trained, tmp_path):
    """Two seg_images_in_folder runs with different models started together into one --out:
    one finishes, the other stops with one line (exit 2), and every mask in the folder is
    the finished one's, so a later run of that model resumes and scores nothing mixed."""
    images, _, _ = sources
    _, run_dir = trained
    other = tmp_path / "other"
    from helpers import make_config, pixel_model, write_run

    write_run(other, pixel_model(size=64), make_config("model", TARGET_SIZE=[64, 64]),
              threshold=0.5)
    out = tmp_path / "out"
    procs = {name: forked.start(command("seg_images_in_folder", "--model", model,
                                        "--images", images, "--out", out), cwd=REPO, env=ENV)
             for name, model in (("trained", run_dir), ("other", other))}
    results = {name: (proc.wait(timeout=600), proc.output()[1])
               for name, proc in procs.items()}
    codes = sorted(code for code, _ in results.values())
    assert codes == [0, 2], results
    winner = next(name for name, (code, _) in results.items() if code == 0)
    loser_err = next(err for code, err in results.values() if code == 2)
    assert ("in use by seg_images_in_folder (PID" in loser_err
            or "holds segmentations made with other model weights" in loser_err), loser_err
    # the winner's model alone made the folder: re-running it skips every image and the
    # masks equal those of a clean folder segmented by it
    winner_run = {"trained": run_dir, "other": other}[winner]
    clean = tmp_path / "clean"
    run_here(command("seg_images_in_folder", "--model", winner_run, "--images", images,
                     "--out", clean))
    skip = ("segmentation_config.json",)
    assert digest(out, skip) == digest(clean, skip)
    assert not (out / ".res_unet.lock").exists()


@contextlib.contextmanager
def held_by(cmd: list[str], lock: Path) -> Iterator[forked.Forked]:
    """Start ``cmd`` and freeze it (SIGSTOP) as soon as it holds ``lock`` (a folder's lock
    file, naming its holder), so it keeps the lock however fast it would otherwise finish;
    the frozen holder is killed and reaped when the block ends."""
    def holds(proc: forked.Forked) -> bool:
        try:
            return json.loads(lock.read_text())["pid"] == proc.pid
        except (OSError, ValueError, KeyError):
            return False

    proc = start_until(cmd, holds, "taking the lock")
    proc.send_signal(signal.SIGSTOP)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def refused(cmd: list[str], capsys) -> str:
    """Run ``cmd`` here; it must stop with exit status 2 and one line, which is returned."""
    capsys.readouterr()
    module, args = cmd[2], cmd[3:]
    assert run_command(importlib.import_module(module).main, args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


def test_a_dataset_being_trained_on_is_not_replaced(sources, trained, tmp_path, capsys):
    """make_tfrecords --overwrite on the --data folder of a running train_resunet stops with
    one line naming the training (PID) and changes nothing; once the training is gone the
    dataset can be rebuilt."""
    images, labels, config = sources
    dataset = tmp_path / "dataset"
    shutil.copytree(trained[0], dataset)
    before = digest(dataset, (".res_unet.lock",))
    with held_by(
        command("train_resunet", "--config", config, "--data", dataset, "--out",
                tmp_path / "run", "--no-export"), dataset / ".res_unet.lock") as training:
        rebuild = command("make_tfrecords", "--config", config, "--images", images,
                          "--labels", labels, "--out", dataset, "--overwrite")
        line = refused(rebuild, capsys)
        assert line.startswith(f"error: {dataset}: in use by train_resunet, reading it (PID "
                               f"{training.pid} on "), line
        assert digest(dataset, (".res_unet.lock",)) == before
    run_here(rebuild)  # the reader is gone: its lock went with it
    assert digest(dataset, ("manifest.json",)) == digest(trained[0], ("manifest.json",))


def test_a_run_folder_being_segmented_with_is_not_retrained(sources, trained, tmp_path,
                                                             capsys):
    """train_resunet --overwrite into the run folder a running seg_images_in_folder reads
    stops with one line naming it; a segmentation reading a run folder that a training
    writes stops with one line naming the training."""
    images, _, config = sources
    run, dataset = tmp_path / "run", tmp_path / "dataset"  # copies: the lock files of the
    shutil.copytree(trained[1], run)  # killed commands stay behind in them
    shutil.copytree(trained[0], dataset)
    before = digest(run, (".res_unet.lock",))
    with held_by(
        command("seg_images_in_folder", "--model", run, "--images", images, "--out",
                tmp_path / "out"), run / ".res_unet.lock") as seg:
        line = refused(command("train_resunet", "--config", config, "--data", dataset,
                               "--out", run, "--overwrite", "--no-export"), capsys)
        assert line.startswith(f"error: {run}: in use by seg_images_in_folder, reading it "
                               f"(PID {seg.pid} on "), line
        assert digest(run, (".res_unet.lock",)) == before
    with held_by(
        command("train_resunet", "--config", config, "--data", dataset, "--out", run,
                "--overwrite", "--no-export"), run / ".res_unet.lock") as training:
        line = refused(command("seg_images_in_folder", "--model", run, "--images", images,
                               "--out", tmp_path / "out2"), capsys)
        assert line.startswith(f"error: {run}: being written by train_resunet (PID "
                               f"{training.pid} on "), line
        assert line.endswith("wait until it has finished, then run seg_images_in_folder again")
        assert not (tmp_path / "out2").exists()


def plant_links(folder: Path, names: list[str], elsewhere: Path) -> dict[Path, str]:
    """A symbolic link at each of ``names`` in ``folder`` to a file of ``elsewhere`` holding
    a user's text; returns {target: text}."""
    folder.mkdir(parents=True, exist_ok=True)
    elsewhere.mkdir(parents=True, exist_ok=True)
    targets = {}
    for name in names:
        target = elsewhere / f"precious_{name.lstrip('.')}"
        target.write_text(f"the user's {name}\n")
        (folder / name).symlink_to(target)
        targets[target] = target.read_text()
    return targets


def assert_untouched(folder: Path, names: list[str], targets: dict[Path, str]) -> None:
    """Every target keeps its text and every name is now a file of ours, not the link."""
    assert {t: t.read_text() for t in targets} == targets
    replaced = [n for n in names if (folder / n).is_file() and not (folder / n).is_symlink()]
    assert replaced == names


def test_links_planted_at_output_names_are_replaced_never_written_through(
        sources, trained, segmented, tmp_path, capsys):
    """A symbolic link planted at the name of any file a command writes (dataset shards,
    manifest, figures, run files, masks, records, scores...) is replaced by the new file:
    the file it pointed to keeps its bytes, a dangling link's target is not created. A link
    at backup/ (which TensorFlow writes file by file) is refused with one line."""
    images, labels, _ = sources
    reference_dataset, run_dir = trained
    elsewhere = tmp_path / "elsewhere"
    config = tmp_path / "config.json"
    from helpers import make_config

    save_config(make_config(AUG_COPIES=2, MAX_EPOCHS=1, STEPS_PER_EPOCH=2, DOPLOT=True), config)

    # make_tfrecords --overwrite: every file of a dataset
    dataset = tmp_path / "dataset"
    names = [*sorted(p.name for p in reference_dataset.iterdir()
                     if not p.name.startswith(".")), "samples.png"]
    targets = plant_links(dataset, names, elsewhere / "dataset")
    run_here(command("make_tfrecords", "--config", config, "--images", images, "--labels",
                     labels, "--out", dataset, "--overwrite"))
    assert_untouched(dataset, names, targets)

    # seg_images_in_folder --overwrite: masks, overlays, records, segmentation_config.json
    out = tmp_path / "out"
    names = sorted(p.name for p in segmented.iterdir()
                   if p.name != ".res_unet.lock" and p.is_file())
    assert sum(n.endswith(".segmented") for n in names) == 16, "the images' records too"
    targets = plant_links(out, names, elsewhere / "out")
    (out / "review_files").symlink_to(elsewhere / "out" / "pictures")  # a folder's name too
    run_here(command("seg_images_in_folder", "--model", run_dir, "--images", images, "--out",
                     out, "--labels", labels, "--overwrite"))
    assert_untouched(out, names, targets)
    assert (out / "review_files").is_dir() and not (out / "review_files").is_symlink()
    assert not (elsewhere / "out" / "pictures").exists()
    assert (out / "scores.csv").is_file()

    # train_resunet into a new run folder: every file of a run (the card a dangling link)
    run = tmp_path / "run"
    names = ["best.weights.h5", "model.keras", "config.json", "history.csv", "curves.png",
             "lr_schedule.png", "val_examples.png", "evaluation.json"]
    targets = plant_links(run, names, elsewhere / "run")
    (run / "model_card.json").symlink_to(elsewhere / "run" / "created_by_the_card")
    run_here(command("train_resunet", "--config", config, "--data", dataset, "--out", run,
                     "--no-export"))
    assert_untouched(run, [*names, "model_card.json"], targets)
    assert not (elsewhere / "run" / "created_by_the_card").exists()

    # a link at backup/: refused before anything is written through it
    (elsewhere / "backup").mkdir()
    other = tmp_path / "run2"
    other.mkdir()
    (other / "backup").symlink_to(elsewhere / "backup")
    line = refused(command("train_resunet", "--config", config, "--data", dataset, "--out",
                           other, "--no-export"), capsys)
    assert line.startswith(f"error: {other / 'backup'}: is a symbolic link inside the output "
                           "folder, where res_unet writes its own files; nothing was written "
                           "through it"), line
    assert list((elsewhere / "backup").iterdir()) == []


def test_a_shard_overwritten_with_another_model_and_killed_leaves_no_mix(
        sources, trained, segmented, tmp_path):
    """A folder segmented by one model; one shard of another model with --overwrite is
    killed mid-way, then finished; a plain run of the new model then redoes every image the
    old model made (never skipping one as its own), and the folder equals one segmented by
    the new model alone, with no temporary left (issue: shards with --overwrite)."""
    images, _, _ = sources
    from helpers import make_config, pixel_model, write_run

    other = write_run(tmp_path / "other", pixel_model(size=64),
                      make_config("model", TARGET_SIZE=[64, 64]), threshold=0.5)
    out = tmp_path / "out"
    shutil.copytree(segmented, out)
    shard = command("seg_images_in_folder", "--model", other, "--images", images, "--out", out,
                    "--shard", "1/2", "--overwrite")
    # killed once the shard has written its first mask, among the old model's
    run_and_kill(shard, out, "*_predseg.png", KILL_POINTS["shard"], since=time.time())
    run_here(shard)
    run_here(command("seg_images_in_folder", "--model", other, "--images", images, "--out",
                     out))
    clean = tmp_path / "clean"
    run_here(command("seg_images_in_folder", "--model", other, "--images", images, "--out",
                     clean))
    def outputs(folder: Path) -> dict[str, str]:
        """Every file but the folder's own locks and a shard's own summaries (its
        uncertainty_shardIofN.csv and review_shardIofN.html, which list its scenes)."""
        return {name: sha for name, sha in digest(folder, ("segmentation_config.json",)).items()
                if not name.endswith(".lock") and not re.search(r"_shard\d+of\d+\.", name)}

    assert outputs(out) == outputs(clean)
    assert temporaries(out) == []
