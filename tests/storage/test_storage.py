"""The storage verbs, the same tests on a local folder, memory:// and a real S3 server (moto)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lightning_saver.errors import (
    BackendNotInstalledError,
    CheckpointNotFoundError,
    ConcurrentSaverError,
    CorruptCheckpointError,
)
from lightning_saver.storage import LocalStorage, Storage, is_url, storage_for


def test_verbs_round_trip(place):
    store = storage_for(place.root, place.options)
    assert isinstance(store, Storage)
    store.makedirs(place.root)
    path = store.join(place.root, "m_1.safetensors")
    assert store.split(path) == (place.root, "m_1.safetensors")
    assert not store.exists(path)
    assert store.listdir(place.root) == []

    result = store.write_atomic(path, lambda sink: sink.write(b"0123456789") and "done", nbytes=10)
    assert result == "done"
    assert store.exists(path) and store.size(path) == 10
    assert store.read_bytes(path) == b"0123456789"
    assert store.read_range(path, 3, 4) == b"3456"
    with store.open_read(path) as f:
        f.seek(5)
        assert f.read(3) == b"567"
    store.write_bytes(store.join(place.root, "state.json"), b"{}")
    assert store.listdir(place.root) == ["m_1.safetensors", "state.json"]
    store.delete(path)
    store.delete(path)  # a missing object is not an error
    assert store.listdir(place.root) == ["state.json"]
    assert (store.local_path(path) is not None) == (place.kind == "local")


def test_short_read_and_missing_object_are_our_errors(place):
    store = storage_for(place.root, place.options)
    store.makedirs(place.root)
    path = store.join(place.root, "x.bin")
    store.write_bytes(path, b"abc")
    with pytest.raises(CorruptCheckpointError, match=r"x\.bin.*expected 10 bytes at offset 1"):
        store.read_range(path, 1, 10)
    missing = store.join(place.root, "nope.bin")
    with pytest.raises(CheckpointNotFoundError, match="nope.bin"):
        store.size(missing)
    with pytest.raises(CheckpointNotFoundError, match="nope.bin"):
        store.read_bytes(missing)


def test_a_failing_writer_leaves_nothing_and_keeps_the_old_object(place):
    store = storage_for(place.root, place.options)
    store.makedirs(place.root)
    path = store.join(place.root, "m.safetensors")
    store.write_bytes(path, b"old")

    def broken(sink):
        sink.write(b"new partial")
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError, match="writer died"):
        store.write_atomic(path, broken)
    assert store.read_bytes(path) == b"old"
    assert store.listdir(place.root) == ["m.safetensors"]


def test_urls_are_never_local_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_url("s3://b/k") and is_url("memory://x") and not is_url("ckpts/x") and not is_url("file:///tmp")
    assert isinstance(storage_for("file:///tmp/x"), LocalStorage)
    code = (  # a fresh process where s3fs cannot be imported
        "import sys; sys.modules['s3fs'] = None\n"
        "from lightning_saver.storage import storage_for\n"
        "from lightning_saver.errors import BackendNotInstalledError\n"
        "try:\n    storage_for('s3://bucket/ckpts')\n"
        "except BackendNotInstalledError as e:\n    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=True, cwd=tmp_path).stdout
    assert "ERR s3:// URLs need the s3fs package" in out and "pip install 'lightning_saver[s3]'" in out
    assert os.listdir(tmp_path) == []


def test_unknown_protocol_is_named():
    with pytest.raises(BackendNotInstalledError, match="nosuchproto"):
        storage_for("nosuchproto://x/y")


def test_local_lock_is_exclusive_across_processes(tmp_path):
    store = LocalStorage()
    code = (
        "import sys\nfrom lightning_saver.storage import LocalStorage\n"
        "from lightning_saver.errors import ConcurrentSaverError\n"
        "try:\n    LocalStorage().lock(sys.argv[1], 'model').__enter__()\n"
        "except ConcurrentSaverError as e:\n    print('LOCKED', e)\n"
    )
    with store.lock(str(tmp_path), "model"):
        with pytest.raises(ConcurrentSaverError, match="another saver in this process"):
            with store.lock(str(tmp_path), "model"):
                pass
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                             timeout=60, check=True).stdout
        assert "LOCKED" in out and "another process" in out
        with store.lock(str(tmp_path), "other"):  # another prefix is another lock
            pass
    with store.lock(str(tmp_path), "model"):  # released
        pass


def test_the_directory_lock_waits_for_its_holder_and_leaves_no_file(tmp_path):
    """The Saver's lock (``name`` None): the directory itself, waited for up to ``timeout_s``."""
    import threading
    import time

    store = LocalStorage()
    released = threading.Event()

    def hold():
        with store.lock(str(tmp_path)):
            held.set()
            time.sleep(0.3)
        released.set()

    held = threading.Event()
    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(10)
    with pytest.raises(ConcurrentSaverError, match="stayed locked by another saver"):
        with store.lock(str(tmp_path), timeout_s=0.05):
            pass
    with store.lock(str(tmp_path), timeout_s=10):  # waits for the holder instead of failing
        assert released.is_set()
    holder.join()
    assert os.listdir(tmp_path) == []


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    store = LocalStorage()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = tmp_path / f".m_1.safetensors.{dead}.0123abcd.tmp"
    stale.write_bytes(b"partial")
    live = tmp_path / f".m_2.safetensors.{os.getppid()}.89abcdef.tmp"  # a live writer's: left alone
    live.write_bytes(b"in flight")
    assert store.listdir(str(tmp_path)) == []  # temporaries are never listed
    assert store.remove_incomplete(str(tmp_path)) == [str(stale)]
    assert live.exists()


def test_probe_names_an_unwritable_directory(tmp_path):
    from lightning_saver.errors import StorageError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="cannot create checkpoint directory"):
        LocalStorage().probe(str(blocker / "sub"))


def test_saver_never_turns_a_url_into_a_local_folder(tmp_path, monkeypatch):
    import torch

    from lightning_saver.errors import LightningSaverError
    from lightning_saver.saving.saver import CheckpointSaver

    monkeypatch.chdir(tmp_path)
    with pytest.raises(LightningSaverError, match="nosuchproto"):
        CheckpointSaver().save({"x": torch.ones(2)}, "nosuchproto://bucket/ckpts/model", global_step=1)
    assert os.listdir(tmp_path) == []


def test_tf_bundle_writes_through_the_store(place):
    import numpy as np

    from lightning_saver.tf import write_checkpoint

    store = storage_for(place.root, place.options)
    prefix = place.path("model")
    write_checkpoint(prefix, {"a": np.arange(6, dtype=np.float32), "b": np.ones(3)}, max_shard_bytes=16,
                     storage_options=place.options)
    names = store.listdir(place.root)
    assert names == ["model.data-00000-of-00002", "model.data-00001-of-00002", "model.index"]
    write_checkpoint(prefix, {"a": np.arange(6, dtype=np.float32)}, storage_options=place.options)
    assert store.listdir(place.root) == ["model.data-00000-of-00001", "model.index"]  # stale shards gone


def test_tf_bundle_round_trip_through_a_store_read_by_tensorflow(place, tmp_path):
    import numpy as np
    import tensorflow as tf

    from lightning_saver.tf import list_checkpoint, read_checkpoint, write_checkpoint

    values = {"dense/kernel": np.arange(12, dtype=np.float32).reshape(3, 4), "step": np.array(7, np.int64)}
    prefix = place.path("model.ckpt-7")
    write_checkpoint(prefix, values, storage_options=place.options)
    got = read_checkpoint(prefix, storage_options=place.options)
    assert all(np.array_equal(got[k], v) for k, v in values.items())
    assert list_checkpoint(prefix, storage_options=place.options)["dense/kernel"].shape == (3, 4)
    store = storage_for(place.root, place.options)
    for name in store.listdir(place.root):  # the peer reads the bytes we uploaded
        (tmp_path / name).write_bytes(store.read_bytes(store.join(place.root, name)))
    reader = tf.train.load_checkpoint(str(tmp_path / "model.ckpt-7"))
    np.testing.assert_array_equal(reader.get_tensor("dense/kernel"), values["dense/kernel"])
