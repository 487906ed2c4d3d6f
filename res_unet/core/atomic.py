"""Atomic file writes: a temp file in the target folder, then a rename.

A crash or Ctrl-C leaves either the old file or the complete new one, never a partial file;
temp files are named ``.NAME.PID@HOST-*.tmp`` and removed on failure. A process killed
outright (kill -9, power loss) cannot remove its own: :func:`clean_stale_temporaries`
removes those of processes of this host that no longer run, on the next run.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


def usual_mode(directory: bool = False) -> int:
    """The permission bits a new file (or folder) gets under the current umask.

    mkstemp and mkdtemp create private (0600/0700) temp files; outputs renamed from them
    should be readable as any other new file would be.
    """
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def check_writable(folder: str | os.PathLike) -> None:
    """Raise UserError unless files can be created in ``folder`` (or, when it does not exist
    yet, in its nearest existing parent): checked by creating and removing a temp file, so
    read-only mounts, /proc and permissions all count, before any work starts."""
    from res_unet.core.errors import UserError

    folder = Path(folder)
    probe_in = folder
    while not probe_in.exists() and probe_in != probe_in.parent:
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise UserError(f"{folder}: {probe_in} is a file, not a folder; choose another "
                        "output folder")
    try:
        fd, name = tempfile.mkstemp(dir=probe_in, prefix=f".probe.{owner_tag()}-")
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise UserError(f"{folder}: cannot write there ({exc.strerror or exc}); choose a "
                        "writable output folder") from None


def check_output_folder(out: Path, what: str,
                        inputs: Sequence[tuple[str, str | os.PathLike]] = ()) -> None:
    """The checks every command makes on its --out folder ``out`` before any work starts,
    each a UserError: ``out`` is a file; ``out`` is one of the folders the command reads
    (``inputs``: (role, folder) pairs, e.g. ("images", images_dir)), where the ``what``
    written (dataset, run, outputs) would mix with the input; nothing can be written there
    (:func:`check_writable`)."""
    from res_unet.core.errors import UserError

    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another --out")
    for role, folder in inputs:
        if out.resolve() == Path(folder).resolve():
            raise UserError(f"{out}: is also the {role} folder; write the {what} to another "
                            f"--out (its files would mix with the {role})")
    check_writable(out)


def owner_tag() -> str:
    """``PID@HOST`` of this process, put into temporary names so that a later run can tell
    a dead process's leftovers from a live one's (another shard writing the same folder)."""
    return f"{os.getpid()}@{_host()}"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"


_TEMP_NAME = re.compile(r"^\..+\.(\d+)@([A-Za-z0-9_]+)-")


def is_temporary(name: str) -> bool:
    """Whether a file or folder name is of our temporary naming (``.NAME.PID@HOST-...``)."""
    return _TEMP_NAME.match(name) is not None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders of our naming in ``folder`` (not below it)
    whose writer was a process of this host that is no longer running. Returns what was
    removed. Temporaries of live processes and of other hosts are left alone."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    host = _host()
    for path in folder.iterdir():
        match = _TEMP_NAME.match(path.name)
        if not match or match.group(2) != host or _alive(int(match.group(1))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{owner_tag()}-",
                               suffix=".tmp" + "".join(path.suffixes))
    os.close(fd)
    os.chmod(tmp, usual_mode())
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as exc:
        # A full disk fails in write() or fsync(), which name no file: name the output.
        if exc.filename is None and exc.errno is not None:
            exc.filename = str(path)
        raise
    finally:
        tmp_path.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write bytes or text to ``path`` atomically (fsynced before the rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        fh.flush()
        os.fsync(fh.fileno())


def write_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]],
              float_format: str | None = None) -> None:
    """Write dict rows (columns from the first row) as a CSV file atomically, "\n" line
    ends. ``float_format`` (e.g. ".6f") formats floats, else they are written as repr;
    None becomes an empty cell. Nothing is written for no rows."""
    if not rows:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else (format(v, float_format) if float_format
                                                   and isinstance(v, float) else v)
                         for k, v in row.items()})
    write_atomic(path, buf.getvalue())
