"""Bad input: every error names the file (and tensor/key), says what was expected and what was found."""

import errno
import logging
import os
import pickle

import pytest
import safetensors.torch
import torch
from torch import nn

import lightning_saver
from lightning_saver import Saver, latest_checkpoint
from lightning_saver.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DiskFullError,
    FormatVersionError,
    StateMismatchError,
)
from lightning_saver.saving import commit


class Net(nn.Module):
    def __init__(self, width=4, extra=False, dtype=torch.float32):
        super().__init__()
        self.fc = nn.Linear(3, width).to(dtype)
        self.out = nn.Linear(width, 1)
        if extra:
            self.gate = nn.Linear(1, 1)


@pytest.fixture
def saved(tmp_path):
    return Saver().save(Net(), str(tmp_path / "net"), global_step=1)


def test_missing_file_is_file_not_found_naming_the_path(tmp_path):
    missing = tmp_path / "nope_3.safetensors"
    with pytest.raises(FileNotFoundError, match=r"checkpoint file not found: .*nope_3\.safetensors"):
        Saver().restore(Net(), missing)
    with pytest.raises(CheckpointNotFoundError, match="nope_3"):
        lightning_saver.load(missing)


class Evil:
    def __reduce__(self):
        return (open, (os.environ["EVIL_MARKER"], "w"))


def test_pickled_checkpoint_is_refused_and_never_unpickled(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    ckpt = tmp_path / "epoch=3.ckpt"
    torch.save({"state_dict": Net().state_dict(), "evil": Evil()}, ckpt)
    raw_pickle = tmp_path / "raw.pt"
    raw_pickle.write_bytes(pickle.dumps(Evil()))
    for path in (ckpt, raw_pickle):
        msg = rf"{path.name}: not a valid safetensors.*never unpickles"
        with pytest.raises(CorruptCheckpointError, match=msg):
            Saver().restore(Net(), path)
    assert not marker.exists()


def test_text_and_truncated_files_are_refused_naming_the_file(tmp_path, saved):
    text = tmp_path / "README.safetensors"
    text.write_text("this is a text file, not a checkpoint\n")
    with pytest.raises(CorruptCheckpointError, match=r"README\.safetensors: not a valid safetensors"):
        Saver().restore(Net(), text)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(open(saved, "rb").read()[:-7])
    with pytest.raises(CorruptCheckpointError, match=r"cut\.safetensors: .*truncated"):
        Saver().restore(Net(), cut)


def test_every_mismatch_is_listed_in_one_error(saved):
    target = Net(width=5, extra=True, dtype=torch.float64)
    with pytest.raises(StateMismatchError) as err:
        Saver().restore(target, saved)
    msg = str(err.value)
    assert "net_1.safetensors does not match the target" in msg
    assert "missing in the checkpoint: 'gate.weight' (the model expects F32 [1, 1])" in msg
    assert "shape mismatch for 'fc.weight': expected [5, 3], found [4, 3]" in msg
    assert "dtype mismatch for 'fc.weight': expected F64, found F32" in msg
    assert "shape mismatch for 'out.weight': expected [1, 5], found [1, 4]" in msg
    assert "pass strict=False" in msg


def test_unexpected_keys_and_strict_false(saved):
    small = nn.Module()
    small.fc = nn.Linear(3, 4)
    msg = r"unexpected in the checkpoint: 'out.weight' \(found F32 \[1, 4\]\)"
    with pytest.raises(StateMismatchError, match=msg):
        Saver().restore(small, saved)
    result = Saver().restore(small, saved, strict=False)
    assert set(result.unexpected_keys) == {"out.bias", "out.weight"} and result.missing_keys == []
    with pytest.raises(StateMismatchError, match="shape mismatch for 'fc.weight'"):
        Saver().restore(Net(width=2), saved, strict=False)  # shapes are never skipped


def test_a_changed_byte_is_refused_unless_verification_is_off(saved):
    raw = bytearray(open(saved, "rb").read())
    raw[-1] ^= 0x01
    open(saved, "wb").write(bytes(raw))
    msg = r"net_1\.safetensors: checksum mismatch in tensor '[a-z.]+'.*target now holds partial data"
    with pytest.raises(CorruptCheckpointError, match=msg):
        Saver().restore(Net(), saved)
    Saver().restore(Net(), saved, verify=False)
    Saver(verify=False).restore(Net(), saved)


def test_latest_checkpoint_verify_skips_a_corrupt_newest(tmp_path, caplog):
    saver = Saver(max_to_keep=3)
    for step in (1, 2, 3):
        saver.save({"w": torch.full((8,), float(step))}, str(tmp_path / "m"), global_step=step)
    newest = tmp_path / "m_3.safetensors"
    raw = bytearray(newest.read_bytes())
    raw[-3] ^= 0x40
    newest.write_bytes(bytes(raw))
    assert latest_checkpoint(tmp_path) == str(newest)  # cheap by default: no reading
    with caplog.at_level(logging.WARNING, logger="lightning_saver"):
        assert latest_checkpoint(tmp_path, verify=True) == str(tmp_path / "m_2.safetensors")
    assert "skipping corrupt checkpoint" in caplog.text and "m_3.safetensors" in caplog.text


def test_newer_format_version_is_refused_on_restore(tmp_path):
    path = tmp_path / "future.safetensors"
    safetensors.torch.save_file(Net().state_dict(), str(path),
                                metadata={"lightning_saver": '{"format_version": 2}'})
    msg = r"future\.safetensors was written with lightning_saver format version 2"
    with pytest.raises(FormatVersionError, match=msg):
        Saver().restore(Net(), path)


def test_bad_save_arguments(tmp_path):
    saver = Saver()
    with pytest.raises(ValueError, match="metadata key 'lightning_saver' is reserved"):
        saver.save(Net(), str(tmp_path / "m"), metadata={"lightning_saver": "mine"})
    with pytest.raises(TypeError, match="entry 'w' is str -> list"):
        saver.save({"w": [1, 2]}, str(tmp_path / "m"))
    with pytest.raises(TypeError, match="nn.Module or a mapping of tensors, found int"):
        saver.save(3, str(tmp_path / "m"))
    with pytest.raises(ValueError, match="global_step must be >= 0"):
        saver.save(Net(), str(tmp_path / "m"), global_step=-5)
    assert [p for p in os.listdir(tmp_path)] == []  # nothing written by refused saves


def test_free_space_is_checked_before_writing(tmp_path):
    msg = r"needs 1000000000000000000 bytes .*free.*checked before writing"
    with pytest.raises(DiskFullError, match=msg):
        commit.check_free_space(str(tmp_path / "huge.safetensors"), 10**18)


def test_disk_full_mid_write_removes_the_temp_and_says_what_was_needed(tmp_path):
    def write(fd):
        os.write(fd, b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    target = str(tmp_path / "m_1.safetensors")
    with pytest.raises(DiskFullError, match=r"m_1\.safetensors: it needs 4096 bytes") as err:
        commit.atomic_write(target, write, nbytes=4096)
    assert err.value.errno == errno.ENOSPC and err.value.needed_bytes == 4096
    assert os.listdir(tmp_path) == []


def test_latest_checkpoint_verify_catches_a_changed_header_via_the_state_file(tmp_path, caplog):
    saver = Saver(max_to_keep=3)
    for step in (1, 2):
        saver.save({"w": torch.full((8,), float(step))}, str(tmp_path / "m"), global_step=step)
    newest = tmp_path / "m_2.safetensors"
    raw = newest.read_bytes()
    forged = raw.replace(b'\\"global_step\\": 2', b'\\"global_step\\": 7')  # same length, valid JSON
    assert forged != raw
    newest.write_bytes(forged)
    lightning_saver.load(newest)  # every tensor checksum still holds
    with caplog.at_level(logging.WARNING, logger="lightning_saver"):
        assert latest_checkpoint(tmp_path, verify=True) == str(tmp_path / "m_1.safetensors")
    assert "m_2.safetensors: its header changed after it was saved" in caplog.text
