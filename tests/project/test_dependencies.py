"""The dependency lists agree: setup.cfg (what pip installs) is the source, and install/
(requirements files for pip, environment.yml for conda) lists the same packages with the
same version bounds, so an install by any route gets what the code was tested with."""

from __future__ import annotations

import configparser
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "install"


def _lines(text: str) -> set[str]:
    """Requirement lines of a text: stripped, without comments and blank lines."""
    found = set()
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            found.add(line.replace(" ", ""))
    return found


def _setup_cfg() -> dict[str, set[str]]:
    """install_requires and each extra of setup.cfg, as sets of requirement lines."""
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg", encoding="utf-8")
    groups = {"install": _lines(parser["options"]["install_requires"])}
    groups |= {name: _lines(value) for name, value in parser["options.extras_require"].items()}
    return groups


def _requirements(name: str) -> tuple[set[str], set[str]]:
    """(requirements, files included with -r) of install/NAME."""
    lines = _lines((INSTALL / name).read_text(encoding="utf-8"))
    included = {line.removeprefix("-r") for line in lines if line.startswith("-r")}
    return {line for line in lines if not line.startswith("-r")}, included


def _environment() -> set[str]:
    """The packages of install/environment.yml (conda and pip), without python, pip and the
    editable install of the project itself."""
    deps, inside = set(), False
    for raw in (INSTALL / "environment.yml").read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if line.startswith("dependencies:"):
            inside = True
        elif inside and line.strip().startswith("- "):
            item = line.strip()[2:].strip()
            if item != "pip:" and item != "pip" and not item.startswith(("python=", "-e ")):
                deps.add(item.replace(" ", ""))
        elif inside and line and not line.startswith(" "):
            inside = False
    return deps


def test_the_dependency_lists_of_setup_cfg_and_install_agree():
    cfg = _setup_cfg()
    assert cfg["install"] and cfg["test"]
    # The full CPU install: the runtime, the pretrained Lite weights, OpenVINO and the STAC
    # API search (pystac-client).
    full = cfg["install"] | cfg["pretrained"] | cfg["openvino"] | cfg["stac"]
    runtime, included = _requirements("requirements.txt")
    assert (runtime, included) == (full, set()), (
        f"install/requirements.txt differs from setup.cfg: missing {sorted(full - runtime)}, "
        f"extra {sorted(runtime - full)}")
    test, included = _requirements("requirements-test.txt")
    assert (test, included) == (cfg["test"], {"requirements.txt"}), (
        f"install/requirements-test.txt: missing {sorted(cfg['test'] - test)}, "
        f"extra {sorted(test - cfg['test'])}")
    gpu, included = _requirements("requirements-gpu.txt")
    assert (gpu, included) == (cfg["gpu"], {"requirements.txt"})
    conda = _environment()
    assert conda == full, (f"install/environment.yml differs from setup.cfg: missing "
                           f"{sorted(full - conda)}, extra {sorted(conda - full)}")
    assert cfg["tensorboard"] <= cfg["test"]
