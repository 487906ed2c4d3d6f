"""The user's path through the three commands, with a config that sets nothing a user need
not set: no PRECISION, no INFER_RUNTIME, no TARGET_SIZE (their defaults, resolved by the
machine), unlike tests/helpers.py's presets, which pin PRECISION to float32.

PRECISION 'auto' is walked both ways on this machine by patching the CPU-capability probe
(devices.cpu_supports_bf16): float32 where the CPU has no bf16 units, mixed_bfloat16 where
it has (emulated here: slow, so the model is tiny). Each trained run is then segmented with
INFER_RUNTIME 'auto', with OpenVINO present and absent. Issue 31: a bfloat16 run crashed in
OpenVINO at its whole-scene evaluation and at every later default segmentation."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from res_unet.cli import run_command
from res_unet.training import devices

# What a user writes: the classes and bands of their data, how long to train; the model is
# shrunk (FILTERS, DEPTH) to keep the test fast. Everything else is a default.
USER_CONFIG = {"NCLASSES": 1, "CLASS_NAMES": ["land", "water"], "N_DATA_BANDS": 3,
               "MAX_EPOCHS": 2, "FILTERS": 4, "DEPTH": 2}

pytestmark = pytest.mark.slow  # three commands per precision, bfloat16 emulated: ~1 minute


def command(main, argv: list[str]) -> tuple[int, str]:
    """Run a command's main(argv) in this process as its console script would; returns the
    exit status and everything it printed (stdout and stderr)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        code = run_command(main, argv)
    return code, printed.getvalue()


@pytest.fixture(scope="module")
def user_data(tmp_path_factory) -> tuple[Path, Path]:
    """The user's config file and dataset: 4 synthetic lake scenes through make_tfrecords
    (2 more held out under test/)."""
    from res_unet import make_tfrecords
    from res_unet.config.keys import Config
    from res_unet.demo import make_demo_splits

    root = tmp_path_factory.mktemp("user")
    config = root / "config.json"
    config.write_text(json.dumps(USER_CONFIG))
    assert not {"PRECISION", "INFER_RUNTIME", "TARGET_SIZE"} & set(USER_CONFIG)
    assert Config().TARGET_SIZE == [256, 256]
    make_demo_splits(root / "demo", 4, 2, (128, 128), seed=5)
    code, printed = command(make_tfrecords.main, [
        "--config", str(config), "--images", str(root / "demo/train/images"),
        "--labels", str(root / "demo/train/labels"), "--out", str(root / "dataset")])
    assert code == 0, printed
    return config, root / "dataset"


@pytest.fixture(scope="module", params=[False, True], ids=["no-bf16-units", "bf16-units"])
def user_run(request, user_data) -> tuple[Path, str, str]:
    """(run folder, what train_resunet printed, the precision 'auto' should resolve to),
    trained with the CPU probe saying the CPU has bf16 units or not."""
    from res_unet import train_resunet

    config, dataset = user_data
    bf16 = request.param
    run = dataset.parent / f"run_{'bf16' if bf16 else 'f32'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(devices, "cpu_supports_bf16", lambda *a: bf16)
        patch.setattr(devices, "visible_gpus", lambda: 0)
        try:
            code, printed = command(train_resunet.main, [
                "--config", str(config), "--data", str(dataset), "--out", str(run),
                "--no-export", "--no-progress"])
        finally:
            keras.mixed_precision.set_global_policy("float32")  # train sets it process-wide
    assert code == 0, printed[-3000:]
    return run, printed, "mixed_bfloat16" if bf16 else "float32"


def test_training_resolves_precision_auto_and_evaluates_whole_scenes(user_run):
    """PRECISION 'auto' becomes float32 or mixed_bfloat16 by the CPU; either way the run
    trains, its whole validation scenes are segmented with INFER_RUNTIME 'auto' (where the
    bfloat16 run crashed in OpenVINO), and the warm-up the defaults ask for (RAMPUP_EPOCHS
    10 from START_LR 1e-7) is dropped from the 2-epoch run, with one note."""
    run, printed, precision = user_run
    card = json.loads((run / "model_card.json").read_text())
    assert card["training"]["precision"] == precision
    assert json.loads((run / "config.json").read_text())["PRECISION"] == "auto"
    summary = json.loads(printed[printed.rindex("\n{") + 1:])
    assert summary["validation_scenes"]["images"] >= 1
    assert 0.0 <= summary["validation_scenes"]["mean_iou"] <= 1.0
    assert "Traceback" not in printed
    note = ("note: RAMPUP_EPOCHS 10 does not end within MAX_EPOCHS 2: no warm-up, the run "
            "starts at MAX_LR 0.0001 (set RAMPUP_EPOCHS below MAX_EPOCHS to choose)")
    assert printed.count(note) == 1
    assert "| lr 1.00e-04 |" in printed and "| lr 9.00e-05 |" in printed


def segment_by_default(run: Path, test: Path, out: Path, openvino: bool) -> str:
    """seg_images_in_folder with no runtime flag, OpenVINO installed or hidden (as if it
    were not installed), scoring against the labels; returns what it printed."""
    from res_unet import seg_images_in_folder

    with pytest.MonkeyPatch.context() as patch:
        if not openvino:
            patch.setitem(sys.modules, "openvino", None)
        patch.setattr(devices, "visible_gpus", lambda: 0)
        code, printed = command(seg_images_in_folder.main, [
            "--model", str(run), "--images", str(test / "images"), "--labels",
            str(test / "labels"), "--out", str(out), "--no-progress"])
    assert code == 0, printed[-3000:]
    return printed


@pytest.fixture(scope="module")
def tensorflow_masks(user_run, user_data) -> tuple[Path, str]:
    """The held-out scenes segmented by ``user_run`` with no flags and OpenVINO hidden, so
    runtime 'auto' is TensorFlow: what the OpenVINO masks are compared with, and what the
    command printed (made once per run, for both tests of :func:`test_segmenting_with_the_
    default_runtime`: a separate --runtime tensorflow reference would be the same run)."""
    run, _, _ = user_run
    out = run.parent / f"{run.name}_tensorflow"
    return out, segment_by_default(run, user_data[1].parent / "demo" / "test", out, False)


@pytest.mark.parametrize("openvino", [True, False], ids=["openvino", "no-openvino"])
def test_segmenting_with_the_default_runtime(user_run, user_data, tensorflow_masks, openvino,
                                             tmp_path):
    """seg_images_in_folder with no flags on either run: OpenVINO when it is installed
    (the bfloat16 run through its float32 twin), TensorFlow when not; the masks are the
    same either way, up to pixels at the threshold."""
    run, _, _ = user_run
    test = user_data[1].parent / "demo" / "test"
    reference, printed = tensorflow_masks
    out = reference
    if openvino:
        pytest.importorskip("openvino")
        out = tmp_path / "masks"
        printed = segment_by_default(run, test, out, True)
    runtime = next(line for line in printed.splitlines() if line.startswith("runtime: "))
    if openvino:
        assert runtime.startswith("runtime: openvino (auto: same probabilities as TensorFlow")
    else:
        assert runtime == "runtime: tensorflow (auto: OpenVINO is not installed)"
    labels = sorted(out.glob("*_predseg.png"))
    assert [p.name for p in labels] == ["demo_000_predseg.png", "demo_001_predseg.png"]
    assert "scores (" in printed and "Traceback" not in printed

    from res_unet.geo.rasters import read_label

    for label in labels:
        ours, theirs = read_label(label), read_label(reference / label.name)
        assert ours.shape == theirs.shape == (128, 128)
        assert np.mean(ours != theirs) < 0.01
