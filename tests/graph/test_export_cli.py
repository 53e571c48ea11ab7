"""``lightning-saver export``: checkpoint + model class -> ONNX and a TF MetaGraph that the peers run."""

from __future__ import annotations

import torch
from export_check import assert_close, run_onnx, run_tf, torch_outputs
from torch import nn

from lightning_saver import Saver
from lightning_saver.cli import main


class SmallNet(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.fc = nn.Linear(width, 2)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(pixels)).mean(dim=(2, 3)))


def test_export_from_saver_checkpoint_runs_in_tensorflow_and_onnx_runtime(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    model = SmallNet(width=6).eval()
    ckpt = Saver(max_to_keep=1).save(model, tmp_path / "ckpt" / "model", global_step=3)
    code = main(["export", "--checkpoint", ckpt, "--model-class", "test_export_cli.SmallNet",
                 "--init-args", '{"width": 6}', "--input-shape", "1,1,5,5",
                 "--onnx", str(tmp_path / "net.onnx"), "--meta", str(tmp_path / "net.meta")])
    assert code == 0
    printed = capsys.readouterr().out.split()
    assert str(tmp_path / "net.meta") in printed and str(tmp_path / "net.onnx") in printed
    x = torch.randn(4, 1, 5, 5)
    expected = torch_outputs(model, (x,))
    assert_close(run_tf(tmp_path / "net.meta", {"pixels": x.numpy()}, 1), expected, atol=1e-5, what="TF")
    assert_close(run_onnx(tmp_path / "net.onnx", {"pixels": x.numpy()}), expected, atol=1e-5, what="ORT")

    # our own TF checkpoint reads back as the state_dict (fc/weight -> fc.weight)
    code = main(["export", "--checkpoint", str(tmp_path / "net"), "--model-class", "test_export_cli.SmallNet",
                 "--init-args", '{"width": 6}', "--input-shape", "2,1,5,5",
                 "--meta", str(tmp_path / "again.meta"), "--freeze"])
    assert code == 0
    frozen = run_tf(tmp_path / "again.meta", {"pixels": x.numpy()}, 1, restore=False)
    assert_close(frozen, expected, atol=1e-5, what="TF frozen")


def test_export_reports_a_checkpoint_that_does_not_fit(tmp_path, capsys) -> None:
    ckpt = Saver(max_to_keep=1).save(SmallNet(width=6), tmp_path / "model", global_step=1)
    code = main(["export", "--checkpoint", ckpt, "--model-class", "test_export_cli.SmallNet",
                 "--input-shape", "1,1,5,5", "--meta", str(tmp_path / "m.meta")])
    err = capsys.readouterr().err
    assert code == 1 and "lightning-saver export:" in err and "size mismatch" in err
    assert not (tmp_path / "m.meta").exists()


def test_export_bad_model_class_and_nothing_to_do(tmp_path, capsys) -> None:
    bad_class = ["--model-class", "test_export_cli.Nope", "--meta", str(tmp_path / "m.meta")]
    assert main(["export", "--checkpoint", "x", *bad_class]) == 1
    assert "cannot be imported" in capsys.readouterr().err
    assert main(["export", "--checkpoint", "x", "--model-class", "test_export_cli.SmallNet"]) == 2
    assert "nothing to do" in capsys.readouterr().err
