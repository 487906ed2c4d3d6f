"""The package's shape: data flows one way through the modules, and none grows unchecked.

docs/architecture.md's module map lists these layers; a module may import only from layers
before its own (lazy imports inside functions count too), so the flow config -> rasters ->
dataset -> model -> training -> run folder -> prediction -> outputs cannot turn back on
itself (and no import cycle can form).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import res_unet

PACKAGE = Path(res_unet.__file__).parent

# The packages, lowest first: a module may import from its own package and the ones before
# it, never after (the commands at the top of res_unet, "", come last).
PACKAGES = ["core", "config", "geo", "data", "models", "training", "inference", ""]
# Within them, module by module, left to right: a module may import only from layers before
# its own. The model package (models/**) counts as one unit, "models".
LAYERS = [
    ["core.errors", "geo.tiling", "geo.palette", "core.caches", "core.progress", "geo.grid"],
    ["core.atomic", "core.folders", "core.messages"],
    ["config.registry", "config.values", "cli"],
    ["config.upgrade"],
    ["config.rules"],
    ["config.keys", "geo.vector_files"],
    ["geo.scale", "geo.vectors", "geo.polygons", "geo.cog", "geo.pixeltypes",
     "config.reference"],
    ["geo.rasters", "geo.remote"],
    ["geo.stac"],
    ["geo.vrt"],
    ["geo.scenes"],
    ["data.pairing", "geo.writers"],
    ["data.labelsource", "data.augment", "data.split", "data.report"],
    ["data.records"],
    ["data.dataset"],
    ["training.devices"],
    ["models", "training.losses", "training.metrics", "training.schedule", "training.adam",
     "inference.openvino"],
    ["training.runfolder", "training.evaluation"],
    ["training.resume", "training.runwriter", "inference.runtime", "inference.settings"],
    ["training.train"],
    ["inference.postprocess", "inference.uncertainty"],
    ["inference.review"],
    ["inference.predict"],
    ["inference.scoring", "inference.fingerprint", "inference.outputs"],
    ["inference.segment"],
    ["workflow"],
    ["make_tfrecords", "train_resunet", "seg_images_in_folder", "demo"],
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}
# Longer modules say why at the top of their docstring ("Why this module is long: ..."),
# and none passes HARD_MAX_LINES.
MAX_LINES = 500
HARD_MAX_LINES = 600


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts == ("__init__",):
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _unit(module: str) -> str:
    """The layer unit of a dotted module name under res_unet: models.x.y -> models,
    geo.rasters -> geo.rasters, a package's own __init__ (geo) -> geo."""
    return "models" if module.split(".")[0] == "models" else module


def _package(module: str) -> str:
    """The package of a dotted module name under res_unet ('' for the top level)."""
    return module.split(".")[0] if "." in module or module in PACKAGES else ""


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (type hints only)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def _imports(path: Path) -> set[str]:
    """The res_unet modules a file imports at run time, anywhere in it, as dotted names under
    res_unet (``from res_unet.geo import rasters`` -> geo.rasters)."""
    names = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "res_unet" or node.module.startswith("res_unet."):
                base = node.module.removeprefix("res_unet").removeprefix(".")
                if (PACKAGE / base.replace(".", "/")).is_dir():  # a package: names are modules
                    names |= {f"{base}.{a.name}".lstrip(".") for a in node.names
                              if not a.name.startswith("__")
                              and f"{base}.{a.name}".lstrip(".") in _modules()}
                    if not base:
                        continue
                    names.add(base)  # names the package's __init__ defines (models)
                else:
                    names.add(base)
        elif isinstance(node, ast.Import):
            names |= {a.name.removeprefix("res_unet.") for a in node.names
                      if a.name.startswith("res_unet.")}
    return names


def test_every_module_has_a_layer():
    units = {_unit(m) for m in _modules() if m not in PACKAGES}
    assert units <= set(LAYER_OF), \
        f"add {sorted(units - set(LAYER_OF))} to LAYERS (and docs/architecture.md)"
    assert set(LAYER_OF) <= units, f"{sorted(set(LAYER_OF) - units)} no longer exist"


@pytest.mark.parametrize("module", sorted(set(_modules()) - set(PACKAGES)))
def test_packages_import_only_packages_before_their_own(module):
    own = PACKAGES.index(_package(module))
    later = sorted(name for name in _imports(_modules()[module])
                   if PACKAGES.index(_package(name)) > own)
    assert not later, f"{module} (package {_package(module) or 'res_unet'}) imports {later}, " \
                      "from packages after its own"


def test_every_package_says_what_it_holds_and_may_import():
    for name in PACKAGES[:-1]:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text())) or ""
        assert "import" in doc, f"res_unet/{name}/__init__.py: say what it may import"


def test_tests_mirror_the_packages():
    tests = Path(__file__).resolve().parents[1]
    for path in tests.glob("*/test_*.py"):
        assert path.parent.name in {*PACKAGES[:-1], "commands", "project"}, path


@pytest.mark.parametrize("module", sorted(set(_modules()) - set(PACKAGES)))
def test_imports_flow_one_way(module):
    path = _modules()[module]
    unit = _unit(module)
    backwards = sorted(name for name in _imports(path)
                       if _unit(name) != unit and LAYER_OF.get(_unit(name), -1) >= LAYER_OF[unit])
    assert not backwards, f"res_unet/{path.relative_to(PACKAGE)} imports {backwards}, which " \
                          "come at or after its own layer"


@pytest.mark.parametrize("module", sorted(_modules()))
def test_long_modules_say_why(module):
    path = _modules()[module]
    text = path.read_text(encoding="utf-8")
    n_lines = len(text.splitlines())
    assert n_lines <= HARD_MAX_LINES, (
        f"res_unet/{path.relative_to(PACKAGE)} has {n_lines} lines, more than "
        f"{HARD_MAX_LINES}: split it")
    if n_lines <= MAX_LINES:
        return
    doc = ast.get_docstring(ast.parse(text)) or ""
    assert "Why this module is long:" in doc, (
        f"res_unet/{path.relative_to(PACKAGE)} has {len(text.splitlines())} lines; split it "
        f"or say at the top of its docstring 'Why this module is long: ...'")


def test_importing_the_package_does_not_load_tensorflow():
    code = "import sys, res_unet, res_unet.config.keys; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_public_api_names_resolve():
    names = res_unet.__all__
    assert {"load_config", "make_dataset", "load_dataset", "build_model", "train_model",
            "load_run", "segment_folder"} <= set(names)
    for name in names:
        assert getattr(res_unet, name) is not None
    with pytest.raises(AttributeError):
        res_unet.no_such_name  # noqa: B018
