"""Issue #12 on the saving side: damaged state files and siblings fall back instead of failing,
rotation deletes only what a saver of this directory wrote, bad arguments write nothing, and two
savers of one series are detected. Each test fails on the code before the fix."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from lightning_saver.cli import main as cli_main
from lightning_saver.errors import ConcurrentSaverError, CorruptCheckpointError, DiskFullError
from lightning_saver.formats import safetensors_io as sio
from lightning_saver.saving import state_file
from lightning_saver.saving.lock import locked
from lightning_saver.saving.saver import CheckpointSaver, latest_checkpoint, load
from lightning_saver.saving.state_file import STATE_NAME
from lightning_saver.storage.local import LocalStorage

W = {"w": torch.ones(3)}


def files(d):
    return sorted(os.listdir(d))


def saves(d, steps, keep=2, prefix="m"):
    saver = CheckpointSaver(max_to_keep=keep)
    for s in steps:
        saver.save(W, str(d / prefix), global_step=s)
    saver.wait()
    return saver


# ---------------------------------------------------------------- 10. a damaged state file falls back


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: b"\xff" + raw[1:],  # a flipped first byte: not UTF-8
        lambda raw: b"[" * 100000 + b"]" * 100000,
        lambda raw: raw.replace(b'"step": 1,', b'"step": 1e400,'),
        lambda raw: raw.replace(b'"wall_time": ', b'"wall_time": 1e400, "x": '),
        lambda raw: raw.replace(b'"version": 1', b'"version": 1e400'),
        lambda raw: raw.replace(b'"checkpoints": [', b'"checkpoints": 7, "y": ['),
    ],
)
def test_a_damaged_state_file_falls_back_to_scanning(tmp_path, caplog, damage):
    saves(tmp_path, [0, 1])
    state = tmp_path / STATE_NAME
    state.write_bytes(damage(state.read_bytes()))
    with caplog.at_level(logging.WARNING, logger="lightning_saver"):
        assert latest_checkpoint(tmp_path) == str(tmp_path / "m_1.safetensors")
        assert latest_checkpoint(tmp_path, verify=True) == str(tmp_path / "m_1.safetensors")
        saves(tmp_path, [2])
    assert f"{STATE_NAME} is damaged" in caplog.text
    assert files(tmp_path) == [STATE_NAME, "m_1.safetensors", "m_2.safetensors"]


# ---------------------------------------------------------------- 11. one malformed sibling


def _malformed_sibling(tmp_path, kind):
    path = tmp_path / "m_5.safetensors"
    sio.save_file(W, path, info={"global_step": 5, "wall_time": time.time()})
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    if kind == "checksum":
        ours = json.loads(header["__metadata__"]["lightning_saver"])
        ours["checksum"] = "crc32c"
        header["__metadata__"]["lightning_saver"] = json.dumps(ours)
        text = json.dumps(header).encode()
    else:
        text = b'{"w":' + b"[" * 50000 + b"]" * 50000 + b"}"
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])
    return path


@pytest.mark.parametrize("kind", ["checksum", "nested"])
def test_one_malformed_sibling_is_skipped_by_a_saver_and_named_by_readers(tmp_path, caplog, capsys, kind):
    saves(tmp_path, [1, 2], keep=5)
    os.remove(tmp_path / STATE_NAME)  # a restarted saver has to scan
    bad = _malformed_sibling(tmp_path, kind)
    with caplog.at_level(logging.WARNING, logger="lightning_saver"):
        saves(tmp_path, [3], keep=5)
    assert "m_5.safetensors" in caplog.text
    for read in (lambda: load(bad), lambda: CheckpointSaver().restore({"w": torch.zeros(3)}, bad)):
        with pytest.raises(CorruptCheckpointError, match=r"m_5\.safetensors"):
            read()
    assert cli_main(["inspect", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "m_5.safetensors" in err and "Traceback" not in err


# ---------------------------------------------------------------- 13. rotation deletes only its own files


def test_a_copied_in_checkpoint_is_never_rotated_away(tmp_path):
    other = tmp_path / "other"
    saves(other, [1], keep=5)
    run = tmp_path / "run"
    saves(run, [2, 3], keep=2)
    (run / "m_1.safetensors").write_bytes((other / "m_1.safetensors").read_bytes())  # older step
    saves(run, [4, 5], keep=2)
    assert files(run) == [STATE_NAME, "m_1.safetensors", "m_4.safetensors", "m_5.safetensors"]


def test_a_lookalike_of_another_prefix_is_never_rotated_away(tmp_path):
    CheckpointSaver().save(W, str(tmp_path / "m_5"))  # prefix "m_5", no step: m_5.safetensors
    saves(tmp_path, [6, 7, 8], keep=1)  # series "m" would read m_5.safetensors as its step 5
    assert files(tmp_path) == [STATE_NAME, "m_5.safetensors", "m_8.safetensors"]


def test_a_crafted_state_file_cannot_delete_other_files(tmp_path):
    saves(tmp_path, [1], keep=1)
    (tmp_path / "README.md").write_text("keep me")
    doc = json.loads((tmp_path / STATE_NAME).read_text())
    (series,) = doc["series"].values()
    series["checkpoints"].insert(0, dict(series["checkpoints"][0], name="README.md", wall_time=0.0))
    (tmp_path / STATE_NAME).write_text(json.dumps(doc))
    saves(tmp_path, [2, 3], keep=1)
    assert files(tmp_path) == ["README.md", STATE_NAME, "m_3.safetensors"]


def test_a_file_a_kill_left_unrecorded_is_still_rotated(tmp_path):
    saves(tmp_path, [1, 2], keep=2)
    before = (tmp_path / STATE_NAME).read_bytes()
    saves(tmp_path, [3], keep=5)  # as if killed after the rename, before the state file update:
    (tmp_path / STATE_NAME).write_bytes(before)  # m_3 exists, unrecorded
    saves(tmp_path, [4], keep=2)
    assert files(tmp_path) == [STATE_NAME, "m_3.safetensors", "m_4.safetensors"]


# ---------------------------------------------------------------- 14. arguments checked before writing


@pytest.mark.parametrize(
    "kwargs", [{"max_to_keep": 2.5}, {"max_to_keep": True}, {"keep_every_n_hours": -1}, {"save_top_k": "3"}]
)
def test_bad_constructor_arguments_write_nothing(tmp_path, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        CheckpointSaver(**kwargs).save(W, str(tmp_path / "m"), global_step=1)
    assert files(tmp_path) == []


@pytest.mark.parametrize("step", [True, torch.tensor(False), 1.5])
def test_a_bool_or_fractional_step_writes_nothing(tmp_path, step):
    with pytest.raises(TypeError, match="global_step must be"):
        CheckpointSaver().save(W, str(tmp_path / "m"), global_step=step)
    assert files(tmp_path) == []


# ---------------------------------------------------------------- 15. smaller ones


def test_a_254_byte_file_name_can_be_saved(tmp_path):
    prefix = "p" * (254 - len("_7.safetensors"))
    path = CheckpointSaver().save(W, str(tmp_path / prefix), global_step=7)
    assert len(os.path.basename(path)) == 254 and torch.equal(load(path)["w"], W["w"])


def test_enospc_on_the_state_file_names_it_and_leaves_no_checkpoint(tmp_path, monkeypatch):
    saves(tmp_path, [1], keep=5)
    before = {n: (tmp_path / n).read_bytes() for n in files(tmp_path)}

    def full(sink):
        raise OSError(errno.ENOSPC, "No space left on device")

    def write_state(self, path, data):  # the state file's write runs out of space, through the real commit
        self.write_atomic(path, full, nbytes=len(data))

    monkeypatch.setattr(LocalStorage, "write_bytes", write_state)
    with pytest.raises(DiskFullError, match=rf"save the state file {tmp_path / STATE_NAME}"):
        CheckpointSaver(max_to_keep=5).save(W, str(tmp_path / "m"), global_step=2)
    assert {n: (tmp_path / n).read_bytes() for n in files(tmp_path)} == before


def test_state_decoding_errors_name_the_file(tmp_path):
    from lightning_saver.formats.state_codec import STATE_KEY, decode_state

    doc = {"version": 1, "state": {"a": {"$tensor": "gone"}}}
    with pytest.raises(CorruptCheckpointError, match=r"x\.safetensors: .*'gone'"):
        decode_state({}, {STATE_KEY: json.dumps(doc)}, source="x.safetensors")


# ---------------------------------------------------------------- 16. two savers of one series


def test_two_savers_of_one_series_are_detected(tmp_path):
    a, b = CheckpointSaver(max_to_keep=3), CheckpointSaver(max_to_keep=3)
    a.save(W, str(tmp_path / "m"), global_step=1)
    b.save(W, str(tmp_path / "m"), global_step=2)
    with pytest.raises(ConcurrentSaverError, match="another saver wrote checkpoints of .*m_{step}"):
        a.save(W, str(tmp_path / "m"), global_step=3)
    # another prefix in the same directory is fine
    CheckpointSaver().save(W, str(tmp_path / "n"), global_step=1)
    b.save(W, str(tmp_path / "m"), global_step=4)


def test_a_second_process_saving_the_same_series_is_detected(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, torch
        from lightning_saver.errors import ConcurrentSaverError
        from lightning_saver.saving.saver import CheckpointSaver
        saver = CheckpointSaver(max_to_keep=2)
        start = int(sys.argv[1])
        try:
            for step in range(start, start + int(sys.argv[2])):
                saver.save({{"w": torch.ones(2)}}, {str(tmp_path / "m")!r}, global_step=step)
                print("saved", step, flush=True)
                sys.stdin.readline()
        except ConcurrentSaverError as exc:
            print("detected", exc, flush=True)
        """
    )
    first = subprocess.Popen([sys.executable, "-c", script, "0", "3"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert first.stdout is not None and first.stdin is not None
    assert first.stdout.readline().split() == ["saved", "0"]
    second = subprocess.run([sys.executable, "-c", script, "100", "2"], input="\n\n", capture_output=True,
                            text=True, timeout=120)
    assert second.stdout.split() == ["saved", "100", "saved", "101"], second.stderr
    out, _ = first.communicate("\n\n\n", timeout=120)
    assert out.startswith("detected another saver wrote checkpoints of"), out
    # nothing of the second saver was lost: what the state file records is on disk, and vice versa
    recorded = [c["name"] for s in json.loads((tmp_path / STATE_NAME).read_text())["series"].values()
                for c in s["checkpoints"]]
    on_disk = [n for n in files(tmp_path) if n.endswith(".safetensors")]
    assert sorted(recorded) == sorted(on_disk) == ["m_100.safetensors", "m_101.safetensors"]


def test_the_directory_lock_excludes_another_process(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from lightning_saver.saving.lock import locked
            with locked({str(tmp_path)!r}):
                print("held", flush=True)
                time.sleep(30)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(ConcurrentSaverError, match="stayed locked by another saver"):
            with locked(str(tmp_path), timeout_s=0.2):
                pass
    finally:
        holder.kill()
        holder.wait()
    with locked(str(tmp_path), timeout_s=5):  # the kernel released it with the process
        pass


def test_the_state_file_reader_never_raises_on_any_bytes(tmp_path):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=150, deadline=None)
    @given(st.binary(max_size=300) | st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    ).map(lambda doc: json.dumps(doc).encode()))
    def check(raw):
        (tmp_path / STATE_NAME).write_bytes(raw)
        result = state_file.load_state(str(tmp_path))
        assert result is None or isinstance(result, state_file.DirectoryState)

    check()
