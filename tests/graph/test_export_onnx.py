"""ONNX export: onnx.checker, ONNX Runtime at several batch sizes, names, both exporters, fallbacks."""

from __future__ import annotations

import onnx
import pytest
import torch
from export_check import assert_close, check_onnx, run_onnx, torch_outputs
from torch import nn

from lightning_saver import export_onnx


class TwoInOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.side = nn.Linear(5, 4)

    def forward(self, image: torch.Tensor, extra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.image(image), self.side(extra)
        return a + b, torch.softmax(a * b, dim=-1)


def _dims(path: str) -> dict[str, list[int | str]]:
    model = onnx.load(path)
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*model.graph.input, *model.graph.output]}


def test_dynamo_export_named_checked_and_batch_dynamic(tmp_path) -> None:
    torch.manual_seed(0)
    model = TwoInOut().eval()
    args = (torch.randn(2, 3, 8, 8), torch.randn(2, 5))
    path = check_onnx(tmp_path, model, args, atol=1e-5)  # onnx.checker(full_check) ran inside
    dims = _dims(path)
    assert set(dims) == {"image", "extra", "output_0", "output_1"}
    assert isinstance(dims["image"][0], str) and dims["image"][1:] == [3, 8, 8]
    for batch in (1, 7):
        run_args = (torch.randn(batch, 3, 8, 8), torch.randn(batch, 5))
        got = run_onnx(path, {"image": run_args[0].numpy(), "extra": run_args[1].numpy()})
        assert_close(got, torch_outputs(model, run_args), atol=1e-5, what=f"ORT batch {batch}")
    assert model.training is False


def test_torchscript_exporter_and_training_mode_restored(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.GELU()).train()
    path = export_onnx(model, (torch.randn(2, 4),), tmp_path / "m.onnx", exporter="torchscript")
    assert model.training  # exported in eval mode, mode restored
    x = torch.randn(6, 4)
    assert_close(run_onnx(path, {"input": x.numpy()}), torch_outputs(model, (x,)), atol=1e-5, what="ORT")


@pytest.mark.parametrize("batch", [1, 2])
def test_static_batch_fallback_when_the_model_fixes_the_batch(tmp_path, batch: int) -> None:
    class FixedBatch(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # the batch size written into the model: a view to one sample, a constant of batch 2
            return x.view(3, 4) * 2 if batch == 1 else x + torch.ones(2, 3, 4)

    with pytest.warns(UserWarning, match="FixedBatch .*static shapes"):
        path = check_onnx(tmp_path, FixedBatch(), (torch.randn(batch, 3, 4),), atol=1e-5)
    assert _dims(path)["x"] == [batch, 3, 4]


def test_bad_exporter_name(tmp_path) -> None:
    with pytest.raises(ValueError, match="exporter must be 'dynamo' or 'torchscript', got 'tf'"):
        export_onnx(nn.Linear(2, 2), (torch.randn(1, 2),), tmp_path / "m.onnx", exporter="tf")
    assert not list(tmp_path.iterdir())
