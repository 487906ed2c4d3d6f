"""The folders a user names: one command at a time in each, and names that stay inside.

Locks. Every command that writes an output folder (make_tfrecords, train_resunet,
seg_images_in_folder) holds :func:`folder_lock` on it for the whole run: an ``flock`` on the
hidden file ``.res_unet.lock`` inside the folder. The kernel releases it when the process
ends, however it ends (kill -9 included), so a lock is never stale. A second command on the
same folder is refused at once with one line naming the process that holds it. Shards of one
segmentation (``--shard i/n``) share the folder: they take the lock shared, and
:func:`settings_lock` lets only shards of the same settings in at a time.

Plain names. A value from a config or a file that becomes part of an output path
(ROOT_STRING, the shard names of a manifest) must be a plain file name:
:func:`check_plain_name`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from res_unet.errors import UserError

LOCK_FILE = ".res_unet.lock"
_SETTINGS_GATE = ".res_unet.settings.lock"
_SETTINGS_PREFIX = ".res_unet.settings-"


def check_plain_name(value: Any, what: str) -> str:
    """Return ``value`` when it is a plain file name (no folder part, not ``.``/``..``, no
    NUL, not hidden); else raise UserError naming ``what`` (e.g. "config.json: ROOT_STRING").
    """
    ok = (isinstance(value, str) and value not in ("", ".", "..") and "/" not in value
          and "\\" not in value and "\0" not in value and not value.startswith("."))
    if not ok:
        raise UserError(f"{what}={value!r} must be a plain file name (letters, digits, '-', "
                        "'_', no folder part and no leading '.'); outputs only go into the "
                        "folder you name")
    return value


def _holder(path: Path) -> str:
    """Who holds the lock file at ``path``, from what the holder wrote into it."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
        return f"{info['command']} (PID {info['pid']} on {info['host']}, since {since})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _open_locked(path: Path, shared: bool, blocking: bool = False) -> int | None:
    """Open ``path`` (created, with its folder, if missing) and flock it; the file
    descriptor, or None when another process holds it in a conflicting way.

    Lock files are removed by their last holder while it still holds them; so the lock is
    only kept when ``path`` still names the locked file afterwards, else taken again.
    """
    flags = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB)
    for _ in range(100):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:  # the folder was removed by its last user meanwhile
            continue
        try:
            fcntl.flock(fd, flags)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
    raise UserError(f"{path}: the lock file keeps disappearing; is another program removing "
                    "files in this folder?")


def _remove_unused(path: Path) -> bool:
    """Remove the lock file ``path`` unless someone holds it; True when it is held."""
    fd = _open_locked(path, shared=False)
    if fd is None:
        return True
    try:
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)
    return False


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, command: str, shared: bool = False
                ) -> Iterator[Path]:
    """Hold the output lock of ``folder`` (created if missing) for the ``with`` block.

    ``shared`` is for the shards of one job (every holder shared); otherwise the lock is
    exclusive. Raises UserError, naming the holder's command, PID and host, when another
    process holds it in a conflicting way. On leaving, the last holder removes the lock file,
    and the folder when this call created it and nothing else was written there (a refused
    or failed run leaves nothing behind). Yields the folder.
    """
    folder = Path(folder)
    created = not folder.exists()
    path = folder / LOCK_FILE
    fd = _open_locked(path, shared)
    if fd is None:
        raise UserError(f"{folder}: in use by {_holder(path)}; wait until it has finished, or "
                        "choose another output folder")
    try:
        info = {"command": command, "pid": os.getpid(), "host": socket.gethostname(),
                "started": time.time(), "shared": shared}
        if not shared or os.fstat(fd).st_size == 0:  # shards: the first one speaks for all
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
        yield folder
    finally:
        os.close(fd)
        if not _remove_unused(path) and created:
            with contextlib.suppress(OSError):  # not empty: the run wrote something
                folder.rmdir()


def _settings_digest(settings: Any) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str)
                          .encode("utf-8")).hexdigest()[:16]


@contextlib.contextmanager
def _gate(folder: Path) -> Iterator[None]:
    """A short exclusive section among the shards of ``folder`` (blocking)."""
    path = folder / _SETTINGS_GATE
    fd = _open_locked(path, shared=False, blocking=True)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # still ours: waiters see the new file and retry
        os.close(fd)


@contextlib.contextmanager
def settings_lock(folder: Path, settings: Any, command: str) -> Iterator[None]:
    """For shards sharing ``folder`` (each holding :func:`folder_lock` shared): hold, for the
    ``with`` block, a lock that says "shards of these settings are running here".

    Raises UserError when shards of other ``settings`` (any JSON-able value, e.g. the output
    fingerprint) run in ``folder`` now: whatever the timing, only one set of settings writes
    a folder at a time. ``command`` names the command in the message.
    """
    mine = folder / f"{_SETTINGS_PREFIX}{_settings_digest(settings)}.lock"
    with _gate(folder):
        for other in sorted(folder.glob(f"{_SETTINGS_PREFIX}*.lock")):
            if other != mine and _remove_unused(other):
                raise UserError(f"{folder}: {command} shards with other models or settings "
                                f"are writing here ({_holder(folder / LOCK_FILE)}); wait until "
                                "they have finished, or choose another output folder")
        fd = _open_locked(mine, shared=True, blocking=True)
    try:
        yield
    finally:
        os.close(fd)
        with _gate(folder):
            _remove_unused(mine)
