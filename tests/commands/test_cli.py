"""The commands' shared front end: one-line errors and exit codes for every kind of failure."""

from __future__ import annotations

import errno
import json

import pytest

from res_unet import cli
from res_unet.core.atomic import check_writable
from res_unet.core.errors import UserError


@pytest.mark.parametrize("module", ["make_tfrecords", "train_resunet", "seg_images_in_folder"])
def test_argument_errors_are_one_line(module, capsys):
    import importlib

    main = importlib.import_module(f"res_unet.{module}").main
    assert cli.run_command(main, ["--bogus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: command line: ")
    assert "--help" in err[0] and "usage:" not in err[0]


def test_make_tfrecords_reads_the_config_before_tensorflow(tmp_path, monkeypatch, capsys):
    """A config typo is reported before TensorFlow is imported (0.1 s, not 5-7 s)."""
    from res_unet import make_tfrecords

    def too_early():
        raise AssertionError("TensorFlow imported before the config was read")

    monkeypatch.setattr(make_tfrecords, "quiet_tensorflow", too_early)
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"TARGET_SIZ": [64, 64]}))
    args = ["--config", str(config), "--images", str(tmp_path), "--labels", str(tmp_path),
            "--out", str(tmp_path / "out")]
    assert cli.run_command(make_tfrecords.main, args) == 2
    assert "TARGET_SIZ" in capsys.readouterr().err


@pytest.mark.parametrize(("module", "flags", "expected"), [
    ("make_tfrecords", ["--layer", ""],
     "error: command line (--layer): LABEL_LAYER is empty; name the layer that holds the "
     "labels, or leave it out (null) to read a file's only layer"),
    ("train_resunet", ["--epochs", "0"],
     "error: command line (--epochs): MAX_EPOCHS=0 is below the minimum 1"),
])
def test_an_invalid_flag_value_is_one_line_naming_the_flag(tmp_path, monkeypatch, capsys,
                                                            module, flags, expected):
    """A flag's value is validated as the config key it sets (config.keys.with_overrides),
    before TensorFlow loads: make_tfrecords --layer used to bypass validation."""
    import importlib

    command = importlib.import_module(f"res_unet.{module}")

    def too_early():
        raise AssertionError("TensorFlow imported before the flags were checked")

    monkeypatch.setattr(command, "quiet_tensorflow", too_early)
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"TARGET_SIZE": [64, 64]}))
    inputs = {"make_tfrecords": ["--images", str(tmp_path), "--labels", str(tmp_path)],
              "train_resunet": ["--data", str(tmp_path)]}[module]
    args = ["--config", str(config), *inputs, "--out", str(tmp_path / "out"), *flags]
    assert cli.run_command(command.main, args) == 2
    assert capsys.readouterr().err.strip().splitlines() == [expected]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_late_disk_errors_are_one_line_naming_the_path(code, capsys):
    def fails(argv):
        raise OSError(code, "simulated", "/data/out/mask_predseg.png")

    assert cli.run_command(fails, []) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: /data/out/mask_predseg.png: simulated;")


def test_other_os_errors_are_not_disguised():
    def fails(argv):
        raise OSError(errno.EIO, "io")

    with pytest.raises(OSError):
        cli.run_command(fails, [])


def test_check_writable(tmp_path):
    check_writable(tmp_path / "new" / "deeper")  # created later; its parent is writable
    assert not (tmp_path / "new").exists(), "the check creates nothing"
    assert not list(tmp_path.iterdir())
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        check_writable(tmp_path / "file" / "out")
    with pytest.raises(UserError, match="cannot write there"):
        check_writable("/proc/res_unet_out")


def test_unwritable_outputs_are_refused_before_any_work(tiny_dataset, trained_run, tmp_path):
    """/proc accepts no new files, as a read-only mount or a folder without permission
    would not: each command says so at once instead of failing after the work."""
    from helpers import make_config

    from res_unet.data import records
    from res_unet.data.dataset import make_dataset
    from res_unet.demo import make_demo_dataset
    from res_unet.inference import segment, settings
    from res_unet.training import train

    manifest = records.read_manifest(tiny_dataset)
    with pytest.raises(UserError, match="/proc/res_unet_run: cannot write there"):
        train.train(make_config(MAX_EPOCHS=1), tiny_dataset, "/proc/res_unet_run",
                    progress=False)
    with pytest.raises(UserError, match="/proc/res_unet_ds: cannot write there"):
        make_dataset(make_config(), manifest.images_dir, manifest.labels_dir,
                     "/proc/res_unet_ds")
    images, _ = make_demo_dataset(tmp_path / "demo", 1, (64, 64), seed=1)
    _, run, _ = trained_run
    cfg = settings.inference_config([run])
    with pytest.raises(UserError, match="/proc/res_unet_seg: cannot write there"):
        segment.segment_folder(cfg, [run], images, "/proc/res_unet_seg", progress=False)


REQUIRED = {"make_tfrecords": ["--config", "c.json", "--images", "i", "--labels", "l",
                               "--out", "o"],
            "train_resunet": ["--config", "c.json", "--data", "d", "--out", "o"],
            "seg_images_in_folder": ["--model", "run", "--images", "i", "--out", "o"]}


@pytest.mark.parametrize("module", sorted(REQUIRED))
def test_every_command_has_the_same_progress_flags(module):
    import importlib

    parser = importlib.import_module(f"res_unet.{module}").build_parser()
    args = parser.parse_args(REQUIRED[module])
    assert args.no_progress is False and args.progress_interval is None
    args = parser.parse_args([*REQUIRED[module], "--no-progress", "--progress-interval", "5"])
    assert args.no_progress is True and args.progress_interval == 5.0
    for bad in ("0", "-1", "soon"):
        with pytest.raises(UserError, match="--progress-interval: a positive number of seconds"):
            parser.parse_args([*REQUIRED[module], "--progress-interval", bad])


@pytest.fixture
def reset_progress():
    from res_unet.core import progress

    yield
    progress.configure()


def test_make_tfrecords_progress_in_a_log(tmp_path, capsys, reset_progress):
    """stderr not a terminal: plain lines and no carriage return; --progress-interval sets
    how often; --no-progress prints none. The summary stays on stdout."""
    from res_unet.demo import make_demo_dataset
    from res_unet.make_tfrecords import main

    images, labels = make_demo_dataset(tmp_path / "data", 4, size=(32, 32), seed=2)
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"TARGET_SIZE": [32, 32], "DO_AUG": False, "DOPLOT": False,
                                  "VALIDATION_SPLIT": 0.5}))
    common = ["--config", str(config), "--images", str(images), "--labels", str(labels)]

    assert cli.run_command(main, [*common, "--out", str(tmp_path / "a")]) == 0
    out, err = capsys.readouterr()
    assert "\r" not in err and "manifest:" in out and "%" not in out
    # Faster than the 30 s interval: one line as each step ends.
    assert [line.split(" [")[0] for line in err.splitlines()] == [
        "checking: 100% 4/4", "make_tfrecords: 100% 4/4"]

    assert cli.run_command(main, [*common, "--out", str(tmp_path / "b"),
                                  "--progress-interval", "0.000001"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" [")[0] for line in lines] == [
        "checking: 25% 1/4", "checking: 50% 2/4", "checking: 75% 3/4", "checking: 100% 4/4",
        "make_tfrecords: 25% 1/4", "make_tfrecords: 50% 2/4", "make_tfrecords: 75% 3/4",
        "make_tfrecords: 100% 4/4"]

    assert cli.run_command(main, [*common, "--out", str(tmp_path / "c"), "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "manifest:" in out
