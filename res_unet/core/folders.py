"""The folders a user names: one command at a time in each, and names that stay inside.

Locks. Every command that writes an output folder (make_tfrecords, train_resunet,
seg_images_in_folder) holds :func:`folder_lock` on it for the whole run: an ``flock`` on the
hidden file ``.res_unet.lock`` inside the folder. The kernel releases it when the process
ends, however it ends (kill -9 included), so a lock is never stale. A second command on the
same folder is refused at once with one line naming the process that holds it. Shards of one
segmentation (``--shard i/n``) share the folder: they take the lock shared, and
:func:`settings_lock` lets only shards of the same settings in at a time. A command that
reads a folder another command writes (train_resunet's ``--data``, seg_images_in_folder's
``--model``) holds :func:`reading_lock` on it: shared among readers, refused while a writer
holds the folder, and refusing a writer while it is read.

Lock files are opened without following links (``O_NOFOLLOW``) and must be regular files of
ours with one link: a symbolic link, folder, FIFO, device, hard link or another user's file
planted under the lock's name is refused with one line; nothing is written through it and
nothing it points to is removed.

Plain names. A value from a config or a file that becomes part of an output path
(ROOT_STRING, the shard names of a manifest) must be a plain file name:
:func:`check_plain_name`.

Files a user names. Configs, model cards and manifests are read by :func:`read_small_text`
(a regular file of at most :data:`MAX_JSON_BYTES`, so a FIFO or a device cannot hang the
command) and parsed by :func:`loads_json` (nesting too deep for the parser is one line).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from res_unet.core.errors import UserError

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


def printable(value: Any, limit: int = 200) -> str:
    """``str(value)`` cut to ``limit`` characters, every non-printable character (escape
    sequences, line breaks, other control characters) written as its escape (``\\x1b``), so
    that a value read from a file prints as one harmless line."""
    text = str(value)[:limit]
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


# A holder writes who it is just after taking the lock: a refusal that finds the file empty
# in between reads it again, every 20 ms for up to this long, before naming nobody.
HOLDER_WAIT_SECONDS = 1.0


def _holder(path: Path) -> str:
    """Who holds the lock file at ``path``, from what the holder wrote into it (read without
    following a link, at most 4 KB, every field escaped: the file is anyone's data)."""
    try:
        deadline = time.monotonic() + HOLDER_WAIT_SECONDS
        while True:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                regular = stat.S_ISREG(os.fstat(fd).st_mode)
                data = os.read(fd, 4096) if regular else b""
            finally:
                os.close(fd)
            if data or not regular or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        info = json.loads(data.decode("utf-8"))
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["started"])))
        return (f"{printable(info['command'])} (PID {int(info['pid'])} on "
                f"{printable(info['host'])}, since {since})")
    except (OSError, ValueError, KeyError, TypeError, OverflowError, RecursionError):
        return "another process"


def check_no_links(*folders: Path) -> None:
    """Raise UserError when one of ``folders`` (folders res_unet writes by name inside an
    output folder, such as a run's backup/) or anything below it is a symbolic link: writers
    such as TensorFlow's checkpoints open files by name, and would write through it."""
    found = [folder for folder in folders if folder.is_symlink()] + [
        Path(root) / name for folder in folders for root, dirs, files in os.walk(folder)
        for name in (*dirs, *files) if (Path(root) / name).is_symlink()]
    if found:
        raise UserError(f"{found[0]}: is a symbolic link inside the output folder, where "
                        "res_unet writes its own files; nothing was written through it: remove "
                        "it and run the command again")


# Configs, model cards, manifests and the like are a few KB: a file above this is not one.
MAX_JSON_BYTES = 4 * 2**20


def check_regular_file(path: Path, what: str) -> None:
    """Raise UserError unless ``path`` (following links) is a regular file: a FIFO would
    hang the command that reads it, a device (/dev/zero) never ends. ``what`` names the
    file in the message ("weights file")."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing or unreadable: the reader says so, naming the file
    if not stat.S_ISREG(mode):
        raise UserError(f"{path}: is {file_kind(mode)}, not a {what}; pass the {what} itself")


def read_small_text(path: str | os.PathLike, what: str, limit: int = MAX_JSON_BYTES) -> str:
    """The UTF-8 text of ``path``, a small file such as a config or a model card (``what``).

    Checked before reading: it must be a regular file (a FIFO is opened without waiting for
    a writer, then refused) of at most ``limit`` bytes, else UserError naming the file. A
    missing or unreadable file raises FileNotFoundError / OSError, undecodable bytes
    UnicodeDecodeError, as ``Path.read_text`` would.
    """
    path = Path(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UserError(f"{path}: is {file_kind(info.st_mode)}, not a {what} file; pass "
                            f"the {what} file itself")
        chunks, size = [], info.st_size
        if size <= limit:
            size = 0
        while size <= limit:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise UserError(f"{path}: larger than any {what} ({size / 2**20:.1f} MB or more, at "
                        f"most {limit / 2**20:g} MB); pass the right file")
    return b"".join(chunks).decode("utf-8")


def loads_json(text: str, path: str | os.PathLike, what: str, **kwargs: Any) -> Any:
    """``json.loads(text, **kwargs)``, with JSON nested too deeply for the parser (a
    RecursionError) as a UserError naming ``path``; json.JSONDecodeError passes."""
    try:
        return json.loads(text, **kwargs)
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to be a {what} (lists or objects inside "
                        "each other thousands of times); pass the right file") from None


_FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
               (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
               (stat.S_ISBLK, "a device"), (stat.S_ISLNK, "a symbolic link"))


def file_kind(mode: int) -> str:
    """What a ``st_mode`` is, in words ("a FIFO (named pipe)", "a folder", ...)."""
    return next((what for test, what in _FILE_KINDS if test(mode)), "not a regular file")


def _not_a_lock(path: Path, problem: str) -> UserError:
    return UserError(f"{path}: {problem}, not a lock file of yours; nothing was written through "
                     "it: remove it and run the command again, or choose another folder")


def _open_lock_file(path: Path, write: bool) -> int:
    """Open the lock file ``path`` (created when ``write``) without following a link; the
    file descriptor. Raises UserError when ``path`` is anything but a regular file (and, to
    write, one of this user with one link): a link, folder, FIFO, device, hard link, another
    user's file; and
    FileNotFoundError when its folder (or, reading, the file) is missing."""
    flags = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | (
        os.O_RDWR | os.O_CREAT if write else os.O_RDONLY)
    try:
        fd = os.open(path, flags, 0o644)
    except FileNotFoundError:
        raise
    except OSError as exc:
        try:
            found = os.lstat(path)
        except OSError:
            found = None
        if exc.errno == errno.ELOOP or (found and stat.S_ISLNK(found.st_mode)):
            problem = "is a symbolic link"
        elif found is not None and not stat.S_ISREG(found.st_mode):
            problem = f"is {file_kind(found.st_mode)}"
        elif found is not None and found.st_uid != os.geteuid():
            problem = f"belongs to another user (uid {found.st_uid})"
        else:
            problem = f"cannot be opened ({exc.strerror or exc})"
        raise _not_a_lock(path, problem) from None
    info = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = f"is {file_kind(info.st_mode)}"
    elif write and info.st_uid != os.geteuid():  # (reading one: nothing is written to it)
        problem = f"belongs to another user (uid {info.st_uid})"
    elif write and info.st_nlink != 1:
        problem = f"has {info.st_nlink} hard links (it is also another file)"
    if problem is not None:
        os.close(fd)
        raise _not_a_lock(path, problem)
    return fd


def _open_locked(path: Path, shared: bool, blocking: bool = False, write: bool = True
                 ) -> int | None:
    """Open ``path`` (created, with its folder, if missing, when ``write``) and flock it; the
    file descriptor, or None when another process holds it in a conflicting way.

    Lock files are removed by their last holder while it still holds them; so the lock is
    only kept when ``path`` still names the locked file afterwards, else taken again.
    """
    flags = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB)
    for _ in range(100):
        if write:
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = _open_lock_file(path, write)
        except FileNotFoundError:  # the folder (or file) was removed by its last user
            if not write:
                raise
            continue
        try:
            fcntl.flock(fd, flags)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raise
        try:
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
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


def _speaks_for_holders(fd: int) -> bool:
    """Whether the lock file ``fd`` names a holder that may still run: one of another host,
    or a live process of this one (a holder killed outright leaves its name behind)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        if info["host"] != socket.gethostname():
            return True
        os.kill(int(info["pid"]), 0)
    except PermissionError:  # another user's live process
        return True
    except (OSError, ValueError, KeyError, TypeError, OverflowError, RecursionError):
        return False
    return True


def _say_who(fd: int, command: str, shared: bool) -> None:
    """Write who holds the lock into it (shared holders: the first live one speaks for all)."""
    if not shared or not _speaks_for_holders(fd):
        info = {"command": command, "pid": os.getpid(), "host": socket.gethostname(),
                "started": time.time(), "shared": shared}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)


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
        _say_who(fd, command, shared)
        yield folder
    finally:
        os.close(fd)
        if not _remove_unused(path) and created:
            with contextlib.suppress(OSError):  # not empty: the run wrote something
                folder.rmdir()


def settings_digest(settings: Any) -> str:
    """A short digest (16 hex digits) of JSON-able ``settings``, the same in every process."""
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
    mine = folder / f"{_SETTINGS_PREFIX}{settings_digest(settings)}.lock"
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


@contextlib.contextmanager
def reading_lock(folder: str | os.PathLike, command: str,
                 writing: str | os.PathLike | None = None) -> Iterator[None]:
    """Hold a shared lock on ``folder``, which ``command`` reads (a dataset, a run folder),
    for the ``with`` block; nothing when ``folder`` is ``writing``, the folder the command
    itself holds (its own checks refuse that or know it).

    Readers share it; a command writing the folder (its :func:`folder_lock`) is refused while
    it is held, and a reader is refused (UserError naming the writer) while one writes. A
    folder that does not exist is left to the reader's own checks; in one this user cannot
    write, the lock file of a writer is used when there is one, else it is read unlocked.
    """
    folder = Path(folder)
    if not folder.is_dir() or (writing is not None
                               and folder.resolve() == Path(writing).resolve()):
        yield
        return
    path = folder / LOCK_FILE
    write = os.access(folder, os.W_OK | os.X_OK)
    try:
        fd = _open_locked(path, shared=True, write=write)
    except FileNotFoundError:  # read-only for us and no writer's lock file there
        yield
        return
    if fd is None:
        raise UserError(f"{folder}: being written by {_holder(path)}; wait until it has "
                        f"finished, then run {command} again")
    try:
        if write:
            _say_who(fd, f"{command}, reading it", shared=True)
        yield
    finally:
        os.close(fd)
        if write:
            _remove_unused(path)
