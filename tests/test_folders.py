"""Output-folder locks and plain names (res_unet/folders.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from res_unet.errors import UserError
from res_unet.folders import LOCK_FILE, check_plain_name, folder_lock, settings_lock

REPO = Path(__file__).resolve().parents[1]


def hold(folder: Path, shared: bool = False, settings: str | None = None) -> subprocess.Popen:
    """Another process holding the lock of ``folder`` (and a settings lock) until killed."""
    code = textwrap.dedent(f"""
        import contextlib, sys, time
        from pathlib import Path
        from res_unet.folders import folder_lock, settings_lock
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
