"""Atomic writes: complete file or nothing, usual permissions, suffixes kept for writers."""

import os
from pathlib import Path

import pytest

from res_unet.core.atomic import atomic_path, check_output_folder, usual_mode, write_atomic
from res_unet.core.errors import UserError


def test_write_atomic_writes_text_and_bytes_with_usual_permissions(tmp_path):
    write_atomic(tmp_path / "sub" / "a.txt", "hello")
    write_atomic(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "sub" / "a.txt").read_text() == "hello"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.bin").stat().st_mode & 0o777 == usual_mode()


def test_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "x.weights.h5"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.name.endswith(".tmp.weights.h5"), "writers pick formats by full suffix"
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["x.weights.h5"]


def test_interrupt_leaves_no_file(tmp_path):
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "out.png") as tmp:
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_stale_temporaries_of_dead_processes_are_cleaned(tmp_path):
    import subprocess
    import sys

    from res_unet.core.atomic import _host, clean_stale_temporaries, owner_tag

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    host = _host()
    stale_file = tmp_path / f".mask.png.{dead}@{host}-x1y2.tmp.png"
    stale_dir = tmp_path / f".dataset.{dead}@{host}-partial-abc"
    live = tmp_path / f".other.png.{owner_tag()}-q.tmp.png"
    foreign = tmp_path / f".far.png.{dead}@otherhost-q.tmp.png"
    mine = tmp_path / ".hidden_notes.txt"
    for path in (stale_file, live, foreign, mine):
        path.write_text("x")
    stale_dir.mkdir()
    (stale_dir / "data-train-00000.tfrec").write_text("partial")
    removed = clean_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([stale_file, stale_dir])
    assert not stale_file.exists() and not stale_dir.exists()
    assert live.exists() and foreign.exists() and mine.exists()
    assert clean_stale_temporaries(tmp_path / "missing") == []


def test_atomic_temp_names_carry_the_owner(tmp_path):
    from res_unet.core.atomic import owner_tag

    with atomic_path(tmp_path / "x.weights.h5") as tmp:
        assert tmp.name.startswith(f".x.weights.h5.{owner_tag()}-")
        assert tmp.name.endswith(".tmp.weights.h5")
        tmp.write_text("data")


def test_a_full_disk_names_the_file_being_written(tmp_path, capsys):
    """write() and fsync() on a full disk raise errors that name no file: the output being
    written is named, so the command's one line says where (not 'error: output:')."""
    import errno

    from res_unet.cli import run_command

    target = tmp_path / "history.csv"

    def fills_the_disk(argv):
        with atomic_path(target):
            raise OSError(errno.ENOSPC, "No space left on device")

    assert run_command(fills_the_disk, []) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {target}: No space left on device; free some space")
    assert list(tmp_path.iterdir()) == []


def test_a_link_at_the_name_is_replaced_never_written_through(tmp_path):
    """The rename that ends an atomic write replaces a symbolic link planted at the name:
    the file it points to keeps its bytes and a dangling link's target is not created.
    (This held before; it is what makes every output safe from planted links.)"""
    from res_unet.core.atomic import write_csv

    target = tmp_path / "precious.txt"
    target.write_text("the user's work\n")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("a.json", "b.csv"):
        (out / name).symlink_to(target)
    (out / "c.bin").symlink_to(tmp_path / "not_created")
    write_atomic(out / "a.json", "{}\n")
    write_csv(out / "b.csv", [{"x": 1}])
    with atomic_path(out / "c.bin") as tmp:
        tmp.write_bytes(b"new")
    assert target.read_text() == "the user's work\n"
    assert not (tmp_path / "not_created").exists()
    assert [(p.name, p.is_symlink(), p.read_bytes()) for p in sorted(out.iterdir())] == [
        ("a.json", False, b"{}\n"), ("b.csv", False, b"x\n1\n"), ("c.bin", False, b"new")]


def test_check_output_folder_refuses_a_file_an_input_and_an_unwritable_folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    check_output_folder(tmp_path / "new" / "out", "outputs", [("images", images)])
    assert not (tmp_path / "new").exists()  # checked, nothing made
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"file: exists and is not a folder; choose another"):
        check_output_folder(tmp_path / "file", "outputs")
    with pytest.raises(UserError) as caught:
        check_output_folder(images / ".." / "images", "dataset",
                            [("labels", tmp_path / "labels"), ("images", images)])
    assert str(caught.value) == (f"{images / '..' / 'images'}: is also the images folder; "
                                 "write the dataset to another --out (its files would mix "
                                 "with the images)")
    with pytest.raises(UserError, match="cannot write there"):
        check_output_folder(Path("/proc/res_unet_out"), "run")
