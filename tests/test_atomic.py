"""Atomic writes: complete file or nothing, usual permissions, suffixes kept for writers."""

import os

import pytest

from res_unet.atomic import atomic_path, usual_mode, write_atomic


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
