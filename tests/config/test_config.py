"""Config loading: defaults, every class of error, Gym upgrades, the reference table."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from res_unet.config.keys import (
    Config,
    config_from_dict,
    load_config,
    save_config,
    with_overrides,
)
from res_unet.config.reference import reference_markdown
from res_unet.config.registry import MODELS
from res_unet.config.upgrade import upgrade_keys
from res_unet.core.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.json"
    path.write_text(text)
    return path


def test_empty_config_gives_defaults():
    cfg, notices = config_from_dict({})
    assert cfg == Config()
    assert notices == []
    assert cfg.TARGET_SIZE == [256, 256]
    assert cfg.n_label_classes == 2
    assert cfg.LOSS == {"dice": 1.0, "focal": 1.0, "boundary": 1.0}


def test_defaults_are_not_shared_between_instances():
    a, b = Config(), Config()
    a.TARGET_SIZE.append(3)
    assert b.TARGET_SIZE == [256, 256]


def test_original_toolbox_config_is_accepted():
    original = {
        "TARGET_SIZE": [512, 512], "KERNEL_SIZE": 7, "NCLASSES": 1, "BATCH_SIZE": 4,
        "N_DATA_BANDS": 3, "DO_CRF_REFINE": True, "DO_TRAIN": True, "PATIENCE": 25,
        "IMS_PER_SHARD": 50, "MAX_EPOCHS": 200, "VALIDATION_SPLIT": 0.5, "RAMPUP_EPOCHS": 20,
        "SUSTAIN_EPOCHS": 0, "EXP_DECAY": 0.9, "START_LR": 1e-7, "MIN_LR": 1e-7,
        "MAX_LR": 1e-5, "MEDIAN_FILTER_VALUE": 3, "DOPLOT": True, "ROOT_STRING": "lakes",
        "USEMASK": False, "AUG_ROT": 5, "AUG_ZOOM": 0.05, "AUG_WIDTHSHIFT": 0.05,
        "AUG_HEIGHTSHIFT": 0.05, "AUG_HFLIP": True, "AUG_VFLIP": False, "AUG_LOOPS": 3,
        "AUG_COPIES": 3, "REMAP_CLASSES": {"0": 0, "3": 1}, "DO_AUG": True,
    }
    cfg, notices = config_from_dict(original)
    assert cfg.KERNEL_SIZE == 7 and cfg.TARGET_SIZE == [512, 512]
    assert cfg.AUG_ROT == 5.0 and isinstance(cfg.AUG_ROT, float)
    assert cfg.REMAP_CLASSES == {"0": 0, "3": 1}
    assert not hasattr(cfg, "AUG_LOOPS")
    assert notices == ["config: AUG_LOOPS has no effect here (examples are streamed, so memory "
                       "is bounded anyway; AUG_COPIES sets how many augmented copies are "
                       "written)"]


def test_gym_config_is_mapped_with_notices():
    gym = {
        "TARGET_SIZE": [768, 768], "MODEL": "simple_resunet", "NCLASSES": 2, "KERNEL": 7,
        "STRIDE": 2, "BATCH_SIZE": 7, "FILTERS": 6, "N_DATA_BANDS": 3, "DROPOUT": 0.1,
        "DROPOUT_CHANGE_PER_LAYER": 0.0, "DROPOUT_TYPE": "standard",
        "USE_DROPOUT_ON_UPSAMPLING": False, "LOSS": "dice", "LOSS_WEIGHTS": True,
        "SET_GPU": "0", "TESTTIMEAUG": True, "OTSU_THRESHOLD": False, "FILTER_VALUE": 3,
        "HOT_START": False, "INITIAL_EPOCH": 0, "SET_PCI_BUS_ID": True,
        "WRITE_MODELMETADATA": True,
    }
    cfg, notices = config_from_dict(gym)
    assert cfg.MODEL == "resunet"
    assert cfg.KERNEL_SIZE == 7
    assert cfg.LOSS == {"dice": 1.0}
    assert cfg.CLASS_WEIGHTS == "auto"
    assert cfg.NCLASSES == 2 and cfg.n_label_classes == 2
    assert cfg.TESTTIMEAUG is True
    text = "\n".join(notices)
    for key in ("STRIDE", "FILTER_VALUE", "SET_PCI_BUS_ID", "WRITE_MODELMETADATA", "KERNEL",
                "simple_resunet", "LOSS_WEIGHTS"):
        assert key in text


def test_gym_otsu_and_loss_names():
    cfg, _ = config_from_dict({"OTSU_THRESHOLD": True, "LOSS": "cat"})
    assert cfg.THRESHOLD == "otsu"
    assert cfg.LOSS == {"ce": 1.0}
    cfg, _ = config_from_dict({"LOSS": "dice+focal"})
    assert cfg.LOSS == {"dice": 1.0, "focal": 1.0}


@pytest.mark.parametrize("raw, expected", [
    ({"MODEL": "segformer"}, "MODEL 'segformer' is not available"),
    ({"LOSS": "hinge"}, "LOSS 'hinge' is not available"),
])
def test_gym_values_without_equivalent_are_errors(raw, expected):
    with pytest.raises(UserError, match=expected):
        config_from_dict(raw)


def test_upgrade_drops_comment_keys():
    cfg, notices = upgrade_keys({"_comment": "hi", "NCLASSES": 3})
    assert cfg == {"NCLASSES": 3} and notices == []


def test_unknown_key_suggests_closest():
    with pytest.raises(UserError, match="unknown key TARGET_SIZ; did you mean TARGET_SIZE"):
        config_from_dict({"TARGET_SIZ": [256, 256]})
    with pytest.raises(UserError, match="unknown key max_epochs; did you mean MAX_EPOCHS"):
        config_from_dict({"max_epochs": 3})


@pytest.mark.parametrize("raw, expected", [
    ({"NCLASSES": "3"}, "NCLASSES must be int, got '3'"),
    ({"DO_AUG": 1}, "DO_AUG must be bool"),
    ({"TARGET_SIZE": 256}, "TARGET_SIZE must be list"),
    ({"BATCH_SIZE": 2.5}, "BATCH_SIZE must be int"),
    ({"REMAP_CLASSES": {"1": "a"}}, "REMAP_CLASSES must be dict"),
])
def test_wrong_types(raw, expected):
    with pytest.raises(UserError, match=expected):
        config_from_dict(raw)


@pytest.mark.parametrize("raw, expected", [
    ({"VALIDATION_SPLIT": 1.5}, "VALIDATION_SPLIT=1.5 is above the maximum"),
    ({"BATCH_SIZE": 0}, "BATCH_SIZE=0 is below the minimum 1"),
    ({"MODEL": "vgg"}, "MODEL='vgg' is not one of"),
    ({"TARGET_SIZE": [8, 256]}, "TARGET_SIZE=\\[8, 256\\] is below the minimum"),
    ({"FIT_MODE": "stretch"}, "FIT_MODE='stretch' is not one of"),
    ({"PIXEL_SIZE": 1e9}, r"PIXEL_SIZE=1000000000.0 is above the maximum 100000.0 \(valid: "
                          r"0.001 to 100000\)$"),
    ({"PIXEL_SIZE": 0}, r"PIXEL_SIZE=0.0 is below the minimum 0.001 \(valid: 0.001 to 100000\)$"),
    ({"SCENE_PIXEL_SIZE": 2e5}, r"SCENE_PIXEL_SIZE=200000.0 is above the maximum 100000.0"),
])
def test_out_of_range(raw, expected):
    with pytest.raises(UserError, match=expected):
        config_from_dict(raw)


@pytest.mark.parametrize("raw, expected", [
    ({"MIN_LR": 1e-3, "MAX_LR": 1e-4}, "MIN_LR=0.001 is larger than MAX_LR"),
    ({"START_LR": 1e-3, "MAX_LR": 1e-4}, "START_LR=0.001 is larger than MAX_LR"),
    ({"TARGET_SIZE": [250, 256]}, "not divisible by 16.*use e.g. \\[256, 256\\]"),
    ({"TARGET_SIZE": [240, 240], "MODEL": "efficientnet_unet"}, "not divisible by 32"),
    ({"KERNEL_SIZE": 4}, "KERNEL_SIZE=4 must be odd"),
    ({"NCLASSES": 3, "CLASS_WEIGHTS": [1, 2]}, "CLASS_WEIGHTS has 2 values but there are 3"),
    ({"NCLASSES": 3, "IGNORE_CLASS": 3}, "IGNORE_CLASS=3 is not a class"),
    ({"CLASS_NAMES": ["water"]}, "CLASS_NAMES has 1 names but there are 2 classes"),
    ({"NCLASSES": 3, "CLASS_NAMES": ["a", "b"]}, "CLASS_NAMES has 2 names but there are 3"),
    ({"IGNORE_CLASS": 1}, "IGNORE_CLASS needs a multiclass model"),
    ({"LOSS": {"dice": 1, "lovasz": 1}}, "LOSS terms \\['lovasz'\\] unknown"),
    ({"LOSS": {"dice": 0}}, "at least one term with a positive weight"),
    ({"THRESHOLD": 1.5}, "THRESHOLD=1.5 must be between 0 and 1"),
    ({"THRESHOLD": "max"}, "must be a number, 'otsu' or null"),
    ({"HOT_START": True}, "HOT_START needs INITIAL_WEIGHTS"),
    ({"SPLIT_GROUP_PATTERN": "(unclosed"}, "not a valid regex"),
    ({"VALIDATION_GROUPS": ["tile4", "tile5", "tile4"]}, "names a group twice"),
    ({"REMAP_CLASSES": {"x": 1}}, "REMAP_CLASSES key 'x'"),
])
def test_inconsistent_values(raw, expected):
    with pytest.raises(UserError, match=expected):
        config_from_dict(raw)


def test_class_names_default_and_given():
    assert config_from_dict({"NCLASSES": 3})[0].class_names == ["class 0", "class 1", "class 2"]
    cfg, _ = config_from_dict({"CLASS_NAMES": ["land", "water"]})
    assert cfg.class_names == ["land", "water"]


def test_depth_changes_divisibility():
    cfg, _ = config_from_dict({"TARGET_SIZE": [96, 96], "DEPTH": 5})  # 96 = 3 * 32
    assert cfg.downsampling_factor == 32
    with pytest.raises(UserError, match="not divisible by 64"):
        config_from_dict({"TARGET_SIZE": [96, 96], "DEPTH": 6})


def test_model_and_encoder_choices_are_the_registry_names():
    fields = Config.__dataclass_fields__
    assert fields["MODEL"].metadata["choices"] == tuple(MODELS)
    assert set(fields["ENCODER"].metadata["choices"]) == {
        e for architecture in MODELS.values() for e in architecture.encoders}
    for name, architecture in MODELS.items():
        for encoder in architecture.encoders or (Config.ENCODER,):
            cfg, _ = config_from_dict({"MODEL": name, "ENCODER": encoder})
            assert (cfg.MODEL, cfg.ENCODER) == (name, encoder)
            assert cfg.downsampling_factor == architecture.downsampling_factor(cfg)
    with pytest.raises(UserError, match="MODEL='unet3p' is not one of 'resunet', "):
        config_from_dict({"MODEL": "unet3p"})


def test_encoder_must_be_one_the_model_accepts(monkeypatch):
    narrow = dataclasses.replace(MODELS["efficientnet_unet"], encoders=("B0", "B1"))
    monkeypatch.setitem(MODELS, "efficientnet_unet", narrow)
    with pytest.raises(UserError, match=r"ENCODER 'lite0' does not fit MODEL "
                                        r"'efficientnet_unet'; use 'B0' or 'B1'$"):
        config_from_dict({"MODEL": "efficientnet_unet", "ENCODER": "lite0"})
    assert config_from_dict({"MODEL": "resunet", "ENCODER": "lite0"})[0].ENCODER == "lite0"


def test_config_and_model_registry_import_without_tensorflow():
    """Commands check the config before importing TensorFlow (5-7 s): neither the config
    nor the model registry it takes names and size constraints from may import it."""
    code = ("import sys, res_unet.config.keys, res_unet.config.registry, res_unet.models; "
            "print(sorted(m for m in ('keras', 'tensorflow') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_every_problem_is_reported_one_per_line():
    with pytest.raises(UserError) as err:
        config_from_dict({"TARGET_SIZ": [1], "BATCH_SIZE": "8", "MIN_LR": 1.0, "MAX_LR": 0.1})
    lines = str(err.value).splitlines()
    assert len(lines) == 3
    assert any("TARGET_SIZ" in x for x in lines)
    assert any("BATCH_SIZE" in x for x in lines)
    assert any("MIN_LR=1.0 is larger than MAX_LR" in x for x in lines)


def test_json_syntax_errors_name_the_line(tmp_path):
    path = write(tmp_path, '{\n  "NCLASSES": 1,\n  "BATCH_SIZE": 4,\n}\n')
    with pytest.raises(UserError, match=r"c.json line 4: invalid JSON \(remove the trailing comma"):
        load_config(path)
    path = write(tmp_path, '{\n  // binary water\n  "NCLASSES": 1\n}\n')
    with pytest.raises(UserError, match=r"line 2: invalid JSON \(JSON has no comments"):
        load_config(path)
    path = write(tmp_path, '{"NCLASSES": 1 "BATCH_SIZE": 3}')
    with pytest.raises(UserError, match=r"line 1: invalid JSON \(Expecting ',' delimiter\)"):
        load_config(path)



@pytest.mark.parametrize("text", [
    '{\n  "NCLASSES": 1, // binary water\n  "BATCH_SIZE": 4\n}\n',
    '{ // binary water\n  "NCLASSES": 1\n}\n',
    '{\n  "NCLASSES": 1 // binary water\n}\n',
    '{\n  "NCLASSES": 1, /* binary\n water */ "BATCH_SIZE": 4\n}\n',
    '{\n  "NCLASSES": 1,\n  # binary water\n  "BATCH_SIZE": 4\n}\n',
], ids=["after-comma", "after-brace", "after-value", "block", "hash-line"])
def test_a_comment_is_reported_as_a_comment_with_the_underscore_key_fix(tmp_path, text):
    """JSON has no comments; wherever one sits the message says so and names the config's
    own convention (a key starting with '_', which load_config ignores), never 'remove the
    trailing comma'."""
    path = write(tmp_path, text)
    with pytest.raises(UserError) as info:
        load_config(path)
    message = str(info.value)
    assert "trailing comma" not in message and "\n" not in message
    assert "JSON has no comments" in message
    assert 'a key starting with "_"' in message and '"_comment"' in message
    assert message.startswith(f"{path} line ")

def test_missing_file_and_non_object(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.json")
    with pytest.raises(UserError, match="must be a JSON object"):
        load_config(write(tmp_path, "[1, 2]"))


def test_load_prints_upgrade_notices(tmp_path, capsys):
    cfg = load_config(write(tmp_path, json.dumps({"KERNEL": 5, "STRIDE": 2})))
    assert cfg.KERNEL_SIZE == 5
    err = capsys.readouterr().err
    assert "note:" in err and "STRIDE has no effect" in err
    # A run folder's config.json from before AUG_LOOPS went: read quietly for the run.
    old_run = write(tmp_path, json.dumps({"AUG_LOOPS": 1, "NCLASSES": 1}))
    assert load_config(old_run, notes=False).NCLASSES == 1
    assert capsys.readouterr().err == ""


def test_save_and_reload_round_trip(tmp_path):
    cfg, _ = config_from_dict({"NCLASSES": 4, "CLASS_WEIGHTS": [1, 2, 3, 4], "THRESHOLD": 0.4})
    save_config(cfg, tmp_path / "out" / "config.json")
    assert load_config(tmp_path / "out" / "config.json") == cfg
    assert not list((tmp_path / "out").glob("*.tmp*"))


def test_reference_lists_every_key():
    text = reference_markdown()
    for name in Config.__dataclass_fields__:
        assert f"`{name}`" in text


def test_example_configs_are_valid():
    paths = sorted((REPO / "config").glob("*.json"))
    assert paths, "config/ has no example configs"
    for path in paths:
        load_config(path)


def test_docs_config_reference_is_current():
    reference = (REPO / "docs" / "config.md").read_text()
    assert reference_markdown() in reference, (
        "docs/config.md is stale: run python docs/generate.py")


def test_reference_config_lists_every_key_with_its_default():
    raw = json.loads((REPO / "config" / "reference.json").read_text())
    keys = {k for k in raw if not k.startswith("_")}
    assert keys == set(Config.__dataclass_fields__)
    cfg, _ = config_from_dict(raw)
    assert cfg == Config()
    assert all(f"_{k}" in raw for k in keys), "every key is explained by a _KEY comment"
    assert {k: raw[f"_{k}"] for k in keys} == {
        k: f.metadata["doc"] for k, f in Config.__dataclass_fields__.items()}


def test_empty_or_non_json_file_and_duplicate_keys_get_a_fix(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("  \n")
    with pytest.raises(UserError, match="the config file is empty; start from one in config/"):
        load_config(empty)
    prose = tmp_path / "prose.json"
    prose.write_text("TARGET_SIZE: 256\n")
    with pytest.raises(UserError, match=r"a config is a JSON object like \{\"TARGET_SIZE\""):
        load_config(prose)
    twice = tmp_path / "twice.json"
    twice.write_text('{"NCLASSES": 1, "SEED": 3, "NCLASSES": 4}')
    with pytest.raises(UserError, match="NCLASSES given more than once; keep one"):
        load_config(twice)


def test_non_finite_numbers_are_refused(tmp_path):
    path = tmp_path / "nan.json"
    path.write_text('{"MAX_LR": NaN, "AUG_ROT": Infinity}')
    with pytest.raises(UserError) as info:
        load_config(path)
    assert "MAX_LR=nan is not a finite number" in str(info.value)
    assert "AUG_ROT=inf is not a finite number" in str(info.value)


def test_a_config_that_is_no_small_regular_file_is_refused_before_reading(tmp_path, no_hang):
    """A FIFO (would hang), /dev/zero (would read without end), a folder and a file larger
    than any config: one line each, naming the file, before anything is read."""
    import os

    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    big = tmp_path / "big.json"
    big.write_text('{"_comment": "' + "x" * (5 * 2**20) + '"}')
    for path, said in ((fifo, "is a FIFO (named pipe), not a config file"),
                       (Path("/dev/zero"), "is a device, not a config file"),
                       (tmp_path, "is a folder, not a config file"),
                       (big, "larger than any config (5.0 MB or more, at most 4 MB)")):
        with pytest.raises(UserError) as info:
            load_config(path)
        assert str(info.value) == f"{path}: {said}; " + str(info.value).split("; ", 1)[1]
        assert "\n" not in str(info.value)


def test_a_config_nested_thousands_deep_is_one_line(tmp_path):
    deep = write(tmp_path, '{"_x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(UserError, match=r"c.json: nested too deeply to be a config \(lists or "
                                        r"objects inside each other thousands of times\)"):
        load_config(deep)


def test_with_overrides_validates_each_value_as_a_config_file_does():
    cfg = Config()
    out = with_overrides(cfg, {"MAX_EPOCHS": 3, "TILE_OVERLAP": 0, "LOSS": "dice"})
    assert (out.MAX_EPOCHS, out.TILE_OVERLAP, out.LOSS) == (3, 0.0, {"dice": 1.0})
    assert isinstance(out.TILE_OVERLAP, float)
    assert cfg.MAX_EPOCHS == 100  # the given config is left as it was
    assert with_overrides(cfg, {}) is cfg
    flags = {"MAX_EPOCHS": "--epochs", "TARGET_SIZE": "--tile-size", "DEPTH": "--depth"}
    with pytest.raises(UserError) as info:
        with_overrides(cfg, {"MAX_EPOCHS": 0, "TILE_OVERLAP": "x", "MAX_EPOHS": 1}, flags=flags)
    assert str(info.value).splitlines() == [
        "command line (--epochs): MAX_EPOCHS=0 is below the minimum 1",
        "command line: TILE_OVERLAP must be float, got 'x'",
        "command line: unknown key MAX_EPOHS; did you mean MAX_EPOCHS?"]


def test_with_overrides_names_the_flags_a_rule_between_keys_is_about():
    flags = {"TARGET_SIZE": "--tile-size", "DEPTH": "--depth"}
    with pytest.raises(UserError) as info:
        with_overrides(Config(), {"TARGET_SIZE": [250, 250], "DEPTH": 4}, flags=flags)
    assert str(info.value).startswith("command line (--tile-size, --depth): TARGET_SIZE "
                                      "[250, 250] is not divisible by 16")
    with pytest.raises(UserError, match=r"^cli \(--layer\): LABEL_LAYER is empty"):
        with_overrides(Config(), {"LABEL_LAYER": ""}, source="cli",
                       flags={"LABEL_LAYER": "--layer"})
