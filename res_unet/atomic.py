"""Atomic file writes: a temp file in the target folder, then a rename.

A crash or Ctrl-C leaves either the old file or the complete new one, never a partial file;
temp files are named ``.NAME.*.tmp`` and removed on failure.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def usual_mode(directory: bool = False) -> int:
    """The permission bits a new file (or folder) gets under the current umask.

    mkstemp and mkdtemp create private (0600/0700) temp files; outputs renamed from them
    should be readable as any other new file would be.
    """
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success rename it onto ``path``.

    For writers that need a file name (TFRecordWriter, rasterio, Keras ``save``). The temp
    name ends with the suffixes of ``path`` so format detection by extension still works.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keep every suffix ("x.weights.h5" -> ".x.weights.h5.abc123.tmp.weights.h5"): writers
    # such as Keras pick the format from the full compound suffix.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                               suffix=".tmp" + "".join(path.suffixes))
    os.close(fd)
    os.chmod(tmp, usual_mode())
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write bytes or text to ``path`` atomically (fsynced before the rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        fh.flush()
        os.fsync(fh.fileno())
