"""``lightning-saver inspect`` and ``convert`` on s3:// URLs (moto): ranged reads, atomic uploads."""

from __future__ import annotations

import json

import numpy as np
import torch
from s3_helpers import options_for

from lightning_saver.commands import convert, inspect
from lightning_saver.saving.saver import CheckpointSaver, load
from lightning_saver.storage import storage_for
from lightning_saver.tf import read_checkpoint, write_checkpoint


def test_inspect_a_url_reads_only_the_header(s3, fault_proxy, capsys):
    big = torch.randn(512, 1024)  # 2 MiB that inspect must not download
    CheckpointSaver(storage_options=s3.options).save({"big": big, "b": torch.ones(3)}, s3.url("ck", "m"), 7)
    faults = fault_proxy.inject()
    options = json.dumps(options_for(fault_proxy.endpoint))
    assert inspect.main([s3.url("ck"), "--storage-options", options, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["path"] == s3.url("ck", "m_7.safetensors")
    assert out["tensors"]["big"] == {"dtype": "F32", "shape": [512, 1024], "nbytes": 2 << 20}
    assert faults.sent < 200_000, faults.requests  # headers only: the 2 MiB tensor never came
    assert inspect.main([s3.url("ck", "m_7.safetensors"), "--storage-options", options, "--verify"]) == 0
    assert "all checksums verified" in capsys.readouterr().out


def test_inspect_names_a_missing_url(s3, capsys):
    options = json.dumps(s3.options)
    assert inspect.main([s3.url("nothing", "here.safetensors"), "--storage-options", options]) == 1
    assert "here.safetensors" in capsys.readouterr().err


def test_convert_to_and_from_s3(s3, tmp_path, capsys):
    options = json.dumps(s3.options)
    prefix = str(tmp_path / "tf" / "model")
    write_checkpoint(prefix, {"dense/kernel": np.arange(6, dtype=np.float32).reshape(2, 3)})
    assert convert.main([prefix, s3.url("st", "model.safetensors"), "--storage-options", options]) == 0
    got = load(s3.url("st", "model.safetensors"), storage_options=s3.options)
    assert torch.equal(got["dense/kernel"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert convert.main([s3.url("st", "model.safetensors"), s3.url("tf", "back"), "--storage-options",
                         options]) == 0
    store = storage_for(s3.url("tf"), s3.options)
    assert store.listdir(s3.url("tf")) == ["back.data-00000-of-00001", "back.index"]
    local = tmp_path / "down"
    local.mkdir()
    for name in store.listdir(s3.url("tf")):  # TensorFlow's own reader on the uploaded bundle
        (local / name).write_bytes(store.read_bytes(store.join(s3.url("tf"), name)))
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(local / "back"))
    expected = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(reader.get_tensor("dense/kernel"), expected)
    assert read_checkpoint(str(local / "back"))["dense/kernel"].shape == (2, 3)
