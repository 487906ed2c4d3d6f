"""Output-folder locks and plain names (res_unet/core/folders.py)."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from res_unet.core import folders
from res_unet.core.errors import UserError
from res_unet.core.folders import (
    LOCK_FILE,
    check_plain_name,
    folder_lock,
    reading_lock,
    settings_lock,
)

REPO = Path(__file__).resolve().parents[2]


def hold(folder: Path, shared: bool = False, settings: str | None = None) -> subprocess.Popen:
    """Another process holding the lock of ``folder`` (and a settings lock) until killed."""
    code = textwrap.dedent(f"""
        import contextlib, sys, time
        from pathlib import Path
        from res_unet.core.folders import folder_lock, settings_lock
        with contextlib.ExitStack() as held:
            held.enter_context(folder_lock(Path({str(folder)!r}), "holder", shared={shared}))
            if {settings!r} is not None:
                held.enter_context(settings_lock(Path({str(folder)!r}), {settings!r}, "holder"))
            print("ready", flush=True)
            time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "ready"
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_a_second_process_is_refused_with_the_holders_pid(tmp_path):
    holder = hold(tmp_path / "out")
    try:
        with pytest.raises(UserError) as info, folder_lock(tmp_path / "out", "me"):
            pass
        message = str(info.value)
        assert "\n" not in message
        assert f"{tmp_path / 'out'}: in use by holder (PID {holder.pid} on " in message
        assert "choose another output folder" in message
        # a shard (shared) is refused by an exclusive holder too
        with pytest.raises(UserError, match="in use by holder"), \
                folder_lock(tmp_path / "out", "me", shared=True):
            pass
    finally:
        stop(holder)
    # kill -9 leaves no stale lock: the kernel released it with the process
    with folder_lock(tmp_path / "out", "me"):
        pass


def test_shards_share_the_lock_but_exclude_a_whole_run(tmp_path):
    holder = hold(tmp_path / "out", shared=True)
    try:
        with folder_lock(tmp_path / "out", "me", shared=True):
            pass
        with pytest.raises(UserError, match="in use by holder"), \
                folder_lock(tmp_path / "out", "me"):
            pass
    finally:
        stop(holder)


def test_shards_of_other_settings_are_refused_whatever_the_timing(tmp_path):
    out = tmp_path / "out"
    holder = hold(out, shared=True, settings="model A")
    try:
        with folder_lock(out, "me", shared=True):
            with pytest.raises(UserError, match="shards with other models or settings are "
                                                "writing here"), \
                    settings_lock(out, "model B", "me"):
                pass
            with settings_lock(out, "model A", "me"):  # the same settings join in
                pass
    finally:
        stop(holder)
    # the holder was killed: its settings no longer run, so others may start
    with folder_lock(out, "me", shared=True), settings_lock(out, "model B", "me"):
        pass


def test_a_run_leaves_no_lock_file_and_no_folder_it_did_not_fill(tmp_path):
    with folder_lock(tmp_path / "new", "me") as folder:
        assert (folder / LOCK_FILE).is_file()
    assert not (tmp_path / "new").exists(), "a refused or failed run leaves nothing behind"
    with folder_lock(tmp_path / "kept", "me") as folder:
        (folder / "result.png").write_bytes(b"x")
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["result.png"]
    (tmp_path / "mine").mkdir()
    with folder_lock(tmp_path / "mine", "me"):
        pass
    assert (tmp_path / "mine").is_dir(), "a folder the user made is never removed"


@pytest.mark.parametrize("name", ["data", "lakes-2024_v1", "a.b"])
def test_plain_names_pass(name):
    assert check_plain_name(name, "ROOT_STRING") == name


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "/tmp/x", "a/b", "a\\b", ".hidden",
                                  "x\0y", 3, None])
def test_names_with_a_folder_part_are_refused(name):
    with pytest.raises(UserError, match=r"ROOT_STRING=.* must be a plain file name"):
        check_plain_name(name, "config.json: ROOT_STRING")


def _plant(kind: str, at: Path, target: Path) -> None:
    """Put a ``kind`` of non-lock file at the lock path ``at`` (``target``: a user's file)."""
    if kind == "link":
        at.symlink_to(target)
    elif kind == "dangling link":
        at.symlink_to(target.with_name("created_by_the_lock"))
    elif kind == "link to /dev/null":
        at.symlink_to("/dev/null")
    elif kind == "hard link":
        os.link(target, at)
    elif kind == "folder":
        at.mkdir()
    elif kind == "FIFO":
        os.mkfifo(at)
    elif kind == "another user's file":
        at.write_text("")
        at.chmod(0o666)
        try:
            os.chown(at, os.geteuid() + 1000, -1)
        except PermissionError:
            pytest.skip("giving a file to another user needs root")


@pytest.mark.parametrize("kind,said", [
    ("link", "is a symbolic link"), ("dangling link", "is a symbolic link"),
    ("link to /dev/null", "is a symbolic link"), ("hard link", "has 2 hard links"),
    ("folder", "is a folder"), ("FIFO", "is a FIFO"),
    ("another user's file", "belongs to another user (uid ")])
@pytest.mark.parametrize("lock", ["folder", "shard", "settings gate", "reading"])
def test_a_planted_lock_file_is_refused_and_nothing_is_written_through_it(tmp_path, kind, said,
                                                                            lock):
    """A link (or folder, FIFO, hard link) planted at a lock file's name: one line, the file
    it points to keeps its bytes, a dangling link's target is not created, the planted thing
    stays where it was."""
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "precious.txt"
    target.write_text("the user's work\n")
    name = ".res_unet.settings.lock" if lock == "settings gate" else LOCK_FILE
    _plant(kind, out / name, target)
    with pytest.raises(UserError) as info:
        if lock == "settings gate":
            with folder_lock(out, "me", shared=True), settings_lock(out, "A", "me"):
                pass
        elif lock == "reading":
            with reading_lock(out, "me"):
                pass
        else:
            with folder_lock(out, "me", shared=lock == "shard"):
                pass
    message = str(info.value)
    assert message == (f"{out / name}: {said}" + message.split(said, 1)[1])
    assert "\n" not in message and "nothing was written through it: remove it" in message
    assert target.read_text() == "the user's work\n"
    assert not (tmp_path / "created_by_the_lock").exists()
    assert os.path.lexists(out / name), "the planted file is left to its owner"
    if kind == "another user's file":
        assert (out / name).read_text() == "", "nothing was written into it"


def held_empty_lock(folder: Path) -> int:
    """A lock of ``folder`` held (another open file: flock refuses this process too) by a
    holder that has not yet written who it is."""
    folder.mkdir()
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_a_holder_that_has_just_taken_the_lock_is_named_once_it_says_who_it_is(tmp_path):
    """Between a holder's lock and its first write the file is empty: the refusal reads it
    again and names the holder (two commands started at once saw 'another process')."""
    fd = held_empty_lock(tmp_path / "out")
    info = {"command": "holder", "pid": 4242, "host": "h", "started": time.time(),
            "shared": False}
    writer = threading.Timer(0.2, os.pwrite, (fd, json.dumps(info).encode(), 0))
    writer.start()
    try:
        with pytest.raises(UserError, match=r"in use by holder \(PID 4242 on h, since "), \
                folder_lock(tmp_path / "out", "me"):
            pass
    finally:
        writer.join()
        os.close(fd)


def test_a_holder_that_never_says_who_it_is_is_another_process(tmp_path, monkeypatch):
    monkeypatch.setattr(folders, "HOLDER_WAIT_SECONDS", 0.1)
    fd = held_empty_lock(tmp_path / "out")
    try:
        start = time.monotonic()
        with pytest.raises(UserError, match="in use by another process; wait until"), \
                folder_lock(tmp_path / "out", "me"):
            pass
        assert time.monotonic() - start < 2.0
    finally:
        os.close(fd)


def test_the_holders_command_line_is_printed_escaped(tmp_path):
    """A lock file's contents are anyone's data: escape sequences and line breaks in it are
    printed escaped, on one line."""
    out = tmp_path / "out"
    holder = hold(out)
    try:
        (out / LOCK_FILE).write_text(json.dumps({
            "command": "evil\x1b[2J\x1b[31m\nerror: fake line\u2028", "pid": holder.pid,
            "host": "h\rx", "started": 0}))
        with pytest.raises(UserError) as info, folder_lock(out, "me"):
            pass
    finally:
        stop(holder)
    message = str(info.value)
    assert message.isprintable()
    assert (f"in use by evil\\x1b[2J\\x1b[31m\\nerror: fake line\\u2028 (PID {holder.pid} on "
            "h\\rx, since ") in message


def test_readers_share_a_folder_and_exclude_its_writer(tmp_path):
    """reading_lock: readers together; a writer (folder_lock) refused while one reads, naming
    it; a reader refused while the writer holds the folder, naming the writer."""
    data = tmp_path / "data"
    data.mkdir()
    reader = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from res_unet.core.folders import reading_lock
        with reading_lock({str(data)!r}, "train_resunet"):
            print("ready", flush=True)
            time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert reader.stdout.readline().strip() == "ready"
    try:
        with reading_lock(data, "seg"):  # another reader
            pass
        with pytest.raises(UserError) as info, folder_lock(data, "make_tfrecords"):
            pass
        assert str(info.value).startswith(
            f"{data}: in use by train_resunet, reading it (PID {reader.pid} on ")
    finally:
        stop(reader)
    writer = hold(data)
    try:
        with pytest.raises(UserError) as info, reading_lock(data, "train_resunet"):
            pass
        assert str(info.value).startswith(f"{data}: being written by holder (PID {writer.pid}")
        assert str(info.value).endswith("wait until it has finished, then run train_resunet "
                                        "again")
    finally:
        stop(writer)
    with reading_lock(data, "train_resunet"):
        assert (data / LOCK_FILE).is_file()
    assert list(data.iterdir()) == [], "the last reader removes the lock file"
    with reading_lock(tmp_path / "missing", "train_resunet"):
        pass
    assert not (tmp_path / "missing").exists()


def test_a_holder_killed_outright_is_not_named_for_the_live_ones(tmp_path):
    """A shared holder killed with SIGKILL leaves its name in the lock file; the next shared
    holder writes its own, so a refused command is told who really holds the folder."""
    first = hold(tmp_path / "out", shared=True)
    stop(first)
    second = hold(tmp_path / "out", shared=True)
    try:
        with pytest.raises(UserError) as info, folder_lock(tmp_path / "out", "me"):
            pass
    finally:
        stop(second)
    assert f"in use by holder (PID {second.pid} on " in str(info.value)
