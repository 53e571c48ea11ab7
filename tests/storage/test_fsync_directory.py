"""``fsync_directory``: skips only platforms that cannot fsync a directory, raises everything else."""

from __future__ import annotations

import errno
import os

import pytest

from lightning_saver.storage import local
from lightning_saver.storage.local import fsync_directory


def test_an_existing_directory_is_fsynced(tmp_path, monkeypatch):
    real, synced = os.fsync, []

    def recording(fd):
        synced.append(os.path.samestat(os.fstat(fd), os.stat(tmp_path)))
        real(fd)

    monkeypatch.setattr(local.os, "fsync", recording)
    fsync_directory(str(tmp_path))  # no error on a real local directory
    assert synced == [True], "the directory itself was not fsynced"


def test_a_missing_directory_is_an_error_not_silence(tmp_path):
    # the old code returned quietly: the caller believed its rename durable
    with pytest.raises(FileNotFoundError):
        fsync_directory(str(tmp_path / "gone"))


def test_a_file_is_not_a_directory(tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        fsync_directory(str(tmp_path / "f"))


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOTSUP])
def test_file_systems_without_directory_fsync_are_skipped(tmp_path, monkeypatch, code):
    def no_dir_fsync(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(local.os, "fsync", no_dir_fsync)
    fsync_directory(str(tmp_path))


def test_an_io_error_of_the_directory_fsync_is_raised(tmp_path, monkeypatch):
    def failing(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(local.os, "fsync", failing)
    with pytest.raises(OSError) as info:
        fsync_directory(str(tmp_path))
    assert info.value.errno == errno.EIO
