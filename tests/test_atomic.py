"""Atomic writes: the final file's mode follows the umask, and a failed write leaves no trace."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from isometry import atomic


@pytest.fixture
def restore_umask():
    """The process umask is restored after the test (the test sets its own)."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_get_the_mode_open_gives(tmp_path, restore_umask, mask):
    os.umask(mask)
    with open(tmp_path / "plain", "w") as f:
        f.write("x")
    written = [
        atomic.write_text(tmp_path / "a.txt", "x"),
        atomic.write_json(tmp_path / "a.json", {"a": np.arange(2)}),
        atomic.write_npz(tmp_path / "a.npz", a=np.arange(2)),
    ]
    assert _mode(tmp_path / "plain") == 0o666 & ~mask
    for path in written:
        assert _mode(path) == 0o666 & ~mask, path.name
    if mask == 0o022:
        assert _mode(written[0]) == 0o644


def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    target = atomic.write_text(tmp_path / "a.txt", "old")
    with pytest.raises(TypeError):
        atomic.write_bytes(target, object())  # not bytes: the write fails
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
