"""`lightning-saver inspect` and `convert` against real TensorFlow: a TF model's weights, converted with a
name map, give the same outputs in the torch module; converting back gives TF the same bytes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import safetensors.torch
import tensorflow as tf  # a pinned test dependency: imported, never skipped
import torch

from lightning_saver.cli import main
from lightning_saver.formats.name_map import NameMap, Rule
from lightning_saver.tf import read_checkpoint, write_checkpoint


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, kernel_size=(3, 2))
        self.fc = torch.nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # NCHW
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def _tf_model(tmp_path):
    rng = np.random.default_rng(0)
    weights = {
        "conv/kernel": rng.standard_normal((3, 2, 3, 4)).astype(np.float32),  # HWIO
        "conv/bias": rng.standard_normal(4).astype(np.float32),
        "fc/kernel": rng.standard_normal((4, 5)).astype(np.float32),  # [in, out]
        "fc/bias": rng.standard_normal(5).astype(np.float32),
        "global_step": np.array(12, np.int64),
        "note": np.array(b"trained in TF", dtype=object),
    }
    names = list(weights)
    prefix = str(tmp_path / "tf" / "model.ckpt-12")
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(weights[n]) for n in names])  # fmt: skip
    x = rng.standard_normal((2, 6, 5, 3)).astype(np.float32)  # NHWC
    h = tf.nn.relu(tf.nn.conv2d(x, weights["conv/kernel"], 1, "VALID") + weights["conv/bias"])
    y = tf.matmul(tf.reduce_mean(h, axis=[1, 2]), weights["fc/kernel"]) + weights["fc/bias"]
    return prefix, weights, x, y.numpy()


def test_convert_tf_to_torch_with_a_name_map_matches_tf_outputs(tmp_path, capsys):
    prefix, weights, x, expected = _tf_model(tmp_path)
    net = Net()
    map_file = tmp_path / "map.json"
    map_file.write_text(NameMap.for_module(net).to_json())
    dst = tmp_path / "model.safetensors"
    assert main(["convert", prefix, str(dst), "--name-map", str(map_file)]) == 0
    out = capsys.readouterr()
    assert "skipped 1 string tensor(s) safetensors cannot hold: note" in out.err
    state = safetensors.torch.load_file(dst)  # a plain safetensors reader reads it
    assert set(state) == {"conv.weight", "conv.bias", "fc.weight", "fc.bias", "global_step"}
    net.load_state_dict({k: v for k, v in state.items() if k != "global_step"})
    got = net(torch.from_numpy(x).permute(0, 3, 1, 2)).detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

    # and back: TF reads the re-exported checkpoint with the original bytes
    back = tmp_path / "back" / "model"
    assert main(["convert", str(dst), str(back), "--name-map", str(map_file)]) == 0
    reader = tf.train.load_checkpoint(str(back))
    for name, value in weights.items():
        if value.dtype != object:
            assert reader.get_tensor(name).tobytes() == value.tobytes(), name


def test_inspect_both_formats(tmp_path, capsys):
    prefix, _, _, _ = _tf_model(tmp_path)
    assert main(["inspect", prefix, "--verify"]) == 0
    out = capsys.readouterr().out
    assert "(tensorflow)" in out and "conv/kernel" in out and "float32" in out and "(3, 2, 3, 4)" in out
    assert "6 tensors" in out and "all checksums verified" in out and "num_shards: 1" in out
    # a directory with TF's checkpoint state file
    (tmp_path / "tf" / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-12"\n')
    assert main(["inspect", str(tmp_path / "tf"), "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["format"] == "tensorflow"
    assert body["tensors"]["fc/kernel"] == {"dtype": "float32", "shape": [4, 5], "nbytes": 80}

    st = tmp_path / "w.safetensors"
    safetensors.torch.save_file({"a": torch.zeros(2, 3)}, st, metadata={"epoch": "3"})
    assert main(["inspect", str(st)]) == 0
    out = capsys.readouterr().out
    assert "(safetensors)" in out and "(2, 3)" in out and "epoch: 3" in out


def test_cli_errors_are_messages_not_tracebacks(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 1
    assert "missing.index does not exist" in capsys.readouterr().err
    (tmp_path / "bad.index").write_bytes(b"\0" * 100)
    assert main(["convert", str(tmp_path / "bad"), str(tmp_path / "o.safetensors")]) == 1
    assert "wrong magic number" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()
    prefix = write_checkpoint(tmp_path / "w", {"dense/kernel": np.zeros((2, 3), np.float32)})
    (tmp_path / "map.json").write_text(
        json.dumps({"other/kernel": {"name": "fc.weight", "layout": "linear"}})
    )
    rc = main(["convert", prefix, str(tmp_path / "o.safetensors"), "--name-map", str(tmp_path / "map.json")])
    assert rc == 1
    assert "'other/kernel' is not in the source" in capsys.readouterr().err


def test_console_script_runs(tmp_path):
    prefix = write_checkpoint(tmp_path / "c", {"x": np.arange(3, dtype=np.int32)})
    proc = subprocess.run([sys.executable, "-m", "lightning_saver.cli", "inspect", prefix],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "int32" in proc.stdout and "(3,)" in proc.stdout


def test_name_map_layouts_against_tf_ops():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 7, 6, 2)).astype(np.float32)
    kt = rng.standard_normal((3, 3, 5, 2)).astype(np.float32)  # Conv2DTranspose kernel [H, W, out, in]
    expected = tf.nn.conv2d_transpose(x, kt, output_shape=[1, 9, 8, 5], strides=1, padding="VALID").numpy()
    nm = NameMap([Rule("up/kernel", "up.weight", "conv_transpose")])
    weight = nm.to_torch({"up/kernel": torch.from_numpy(kt)})["up.weight"]
    got = torch.nn.functional.conv_transpose2d(torch.from_numpy(x).permute(0, 3, 1, 2), weight)
    np.testing.assert_allclose(got.permute(0, 2, 3, 1).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert np.array_equal(nm.to_tf({"up.weight": weight})["up/kernel"].numpy(), kt)
    with pytest.raises(ValueError, match="unknown layout 'hwio'"):
        Rule("a", "b", "hwio")


def test_read_checkpoint_after_convert_keeps_dtypes(tmp_path):
    src = tmp_path / "m.safetensors"
    safetensors.torch.save_file({"h": torch.ones(2, dtype=torch.bfloat16), "i": torch.arange(3)}, src)
    assert main(["convert", str(src), str(tmp_path / "m")]) == 0
    got = read_checkpoint(tmp_path / "m", framework="torch")
    assert got["h"].dtype == torch.bfloat16 and got["i"].dtype == torch.int64


def test_inspect_and_convert_a_saver_directory(tmp_path, capsys):
    from lightning_saver.saving.saver import CheckpointSaver

    CheckpointSaver(max_to_keep=2).save(
        {"w": torch.ones(2, 3)}, tmp_path / "ck" / "variable_file", global_step=5
    )
    assert main(["inspect", str(tmp_path / "ck")]) == 0
    assert "variable_file_5.safetensors (safetensors)" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "ck"), str(tmp_path / "tf" / "model")]) == 0
    assert (
        tf.train.load_checkpoint(str(tmp_path / "tf" / "model")).get_tensor("w").tolist() == [[1.0] * 3] * 2
    )


def test_top_level_help_lists_every_subcommand_with_a_line(capsys):
    from pytorch_lightning.cli import LightningCLI

    from lightning_saver.cli import SUMMARY, TOOLS

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    expected = set(TOOLS) | set(LightningCLI.subcommands())
    assert set(SUMMARY) == expected
    for name in expected:
        assert any(line.split()[:1] == [name] and len(line.split()) > 2 for line in out.splitlines()), name


def test_console_fit_prints_no_warning_the_user_did_not_cause(tmp_path):
    import os

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_saver.cli", "fit",
         "--config", os.path.join(repo, "configs", "digits.yaml"),
         "--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs", "1",
         "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
         "--trainer.enable_progress_bar", "false"],
        capture_output=True, text=True, timeout=300, cwd=str(tmp_path))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    for noise in ("args parameter", "LeafSpec", "Warning:"):
        assert noise not in text, text[-3000:]


def test_inspect_says_what_was_given_and_what_was_expected(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "model_5.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "model_5.safetensors does not exist; expected an existing .safetensors file" in err
    assert ".index" not in err
    prefix = write_checkpoint(tmp_path / "graph", {"x": np.zeros(2, np.float32)})
    (tmp_path / "graph.meta").write_bytes(b"\x0a\x00")
    assert main(["inspect", str(tmp_path / "graph.meta")]) == 1
    err = capsys.readouterr().err
    assert "graph.meta is a TensorFlow MetaGraph (the graph, no tensors), not a checkpoint" in err
    assert f"its checkpoint is the prefix {prefix!r}" in err
