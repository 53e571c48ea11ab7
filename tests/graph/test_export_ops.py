"""One test per converter, parametrized over shapes and attributes: one-module torch models exported
to a TF MetaGraph (run in real TensorFlow, at another batch size than the capture) and to ONNX (run
in ONNX Runtime), each compared with torch at an explicit tolerance.

Capture costs about a second per model (``run_decompositions``) and the ONNX exporter a few more, so
every case is exported once per format as one model holding all cases side by side (``peers``, a
``ModuleDict`` keyed by case name, so an export error names the case's module ``cases.<name>``);
each test then compares its own outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from export_check import (
    Fn,
    assert_attrs_tf_knows_and_not_default,
    assert_close,
    check_tf,
    other_batch,
    run_onnx,
    run_tf_many,
    run_tf_plain,
    small_variance,
    torch_outputs,
    trained_bn,
)
from torch import nn

from lightning_saver.errors import UnsupportedOpError
from lightning_saver.graph.onnx_export import export_onnx
from lightning_saver.graph.tf_export import export_meta_graph


def module(layer: nn.Module) -> Fn:
    return Fn(lambda self, x: self.mods["layer"](x), layer=layer)


def fn(f: Callable[..., Any]) -> Fn:
    return Fn(lambda self, *xs: f(*xs))


@dataclass
class Case:
    model: nn.Module
    args: tuple[torch.Tensor, ...]
    atol: float = 1e-5
    onnx: bool = True  # False: PyTorch's ONNX exporter cannot export it right (said where)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _tiny_var(layer: nn.BatchNorm2d) -> nn.Module:
    """Running variances near the epsilon (1e-5), so a kernel that changed it would show."""
    trained_bn(layer)
    with torch.no_grad():
        layer.running_var.uniform_(2e-6, 2e-5)
        layer.weight.uniform_(0.5e-2, 1.5e-2)
    return layer


def _conv_bn(conv: nn.Module, bn: nn.Module, relu: bool = False) -> Fn:
    return Fn(lambda self, x: (F.relu if relu else (lambda v: v))(self.mods["bn"](self.mods["conv"](x))),
              conv=conv, bn=bn)


def _affine(layer: nn.Module) -> nn.Module:
    with torch.no_grad():  # weight and bias away from 1 and 0
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    return layer


_PERM = torch.tensor([2, 0, 3, 1])[None, :, None]


def _index_put(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    masked = x.clone()
    masked[masked > 0.5] = 0.0
    rows = x.clone()
    rows[:, torch.tensor([0, 2])] = 1.5
    added = x.transpose(0, 1).clone()  # channels first: index them, not the batch
    added.index_put_((torch.tensor([1, 3]),), torch.ones(8, 8), accumulate=True)
    return masked, rows, added.transpose(0, 1)


def _swin_mask(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    mask = torch.zeros_like(x)  # Swin's shifted-window mask, written slice by slice
    mask[:, :, 0:3] = 1.0
    mask[:, :, 3:, ::2] = 2.0
    mask[:, 1] = x[:, 2]
    return mask


def _cases() -> dict[str, Case]:
    torch.manual_seed(0)
    img, seq, vec = _randn(2, 4, 8, 8), _randn(2, 4, 10), _randn(2, 6)
    tok = torch.tensor([[1, 5, 0, 7], [2, 2, 9, 3]])
    c: dict[str, Case] = {
        # layers
        "linear": Case(module(nn.Linear(6, 3)), (vec,)),
        "linear_3d_nobias": Case(module(nn.Linear(10, 5, bias=False)), (seq,)),
        "linear_float64": Case(module(nn.Linear(6, 3).double()), (vec.double(),), 1e-10),
        "conv2d": Case(module(nn.Conv2d(4, 6, 3)), (img,)),
        "conv2d_stride_pad": Case(module(nn.Conv2d(4, 6, 3, stride=2, padding=1)), (img,)),
        "conv2d_dilation_rect": Case(module(nn.Conv2d(4, 5, (3, 1), padding=(2, 0), dilation=2)), (img,)),
        "conv2d_groups": Case(module(nn.Conv2d(4, 6, 3, groups=2, padding=1, bias=False)), (img,)),
        "conv2d_depthwise": Case(module(nn.Conv2d(4, 4, 3, groups=4, stride=2, padding=1)), (img,)),
        "conv2d_depthwise_x2": Case(module(nn.Conv2d(4, 8, 3, groups=4, padding="same")), (img,)),
        "conv1d": Case(module(nn.Conv1d(4, 6, 3, stride=2, padding=1)), (seq,)),
        "conv1d_depthwise_dilated": Case(module(nn.Conv1d(4, 4, 3, groups=4, dilation=2)), (seq,)),
        "conv_transpose2d": Case(module(nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1)),
                                 (img,)),
        "conv_transpose2d_plain": Case(module(nn.ConvTranspose2d(4, 3, 2, stride=2)), (img,)),
        "conv_transpose1d": Case(module(nn.ConvTranspose1d(4, 2, 4, stride=3, padding=2)), (seq,)),
        "batch_norm2d": Case(module(trained_bn(nn.BatchNorm2d(4))), (img,)),
        "batch_norm1d_no_affine": Case(module(trained_bn(nn.BatchNorm1d(6, affine=False))), (vec,)),
        # with variables, BN on a Conv2D becomes FusedBatchNormV3 that TF fuses into the conv kernel
        "conv_bn_relu": Case(_conv_bn(nn.Conv2d(4, 6, 3, padding=1, bias=False),
                                      trained_bn(nn.BatchNorm2d(6)), relu=True), (img,)),
        "conv_bias_bn_no_affine": Case(_conv_bn(nn.Conv2d(4, 6, 3, stride=2),
                                                trained_bn(nn.BatchNorm2d(6, affine=False))), (img,)),
        "conv_bn_tiny_variance": Case(_conv_bn(nn.Conv2d(4, 6, 1), _tiny_var(nn.BatchNorm2d(6)), relu=True),
                                      (img,)),
        "depthwise_bn": Case(_conv_bn(nn.Conv2d(4, 4, 3, groups=4, bias=False),
                                      trained_bn(nn.BatchNorm2d(4))), (img,)),
        "layer_norm": Case(module(nn.LayerNorm(10)), (seq,)),
        "layer_norm_affine": Case(module(_affine(nn.LayerNorm(10))), (seq,)),
        "linear_gelu": Case(Fn(lambda self, x: F.gelu(self.mods["f"](x)), f=nn.Linear(6, 16)), (vec * 2,)),
        "linear_gelu_tanh": Case(Fn(lambda self, x: F.gelu(self.mods["f"](x), approximate="tanh"),
                                    f=nn.Linear(6, 16)), (vec * 2,)),
        "linear_silu": Case(Fn(lambda self, x: F.silu(self.mods["f"](x)), f=nn.Linear(6, 16)), (vec * 2,)),
        "layer_norm_2d": Case(module(nn.LayerNorm([8, 8], elementwise_affine=False)), (img,)),
        "group_norm": Case(module(nn.GroupNorm(2, 4)), (img,)),
        "group_norm_1d": Case(module(nn.GroupNorm(4, 4)), (seq,)),
        "instance_norm": Case(module(nn.InstanceNorm2d(4, affine=True)), (img,), 1e-4),
        "embedding": Case(module(nn.Embedding(10, 3)), (tok,)),
        # activations
        "relu": Case(module(nn.ReLU()), (img,)),
        "relu6": Case(module(nn.ReLU6()), (img * 4,)),
        "gelu": Case(module(nn.GELU()), (img,)),
        "gelu_tanh": Case(module(nn.GELU(approximate="tanh")), (img,)),
        "silu": Case(module(nn.SiLU()), (img,)),
        "hardswish": Case(module(nn.Hardswish()), (img * 3,)),
        "hardsigmoid": Case(module(nn.Hardsigmoid()), (img * 3,)),
        "sigmoid": Case(module(nn.Sigmoid()), (img,)),
        "tanh": Case(module(nn.Tanh()), (img,)),
        "leaky_relu": Case(module(nn.LeakyReLU(0.1)), (img,)),
        "selu_celu_glu_softsign": Case(fn(lambda x: (F.selu(x), F.celu(x, 0.5), F.glu(x, 1), F.softsign(x))),
                                       (img,)),
        "elu": Case(module(nn.ELU(alpha=0.7)), (img,)),
        "softplus_log1p": Case(module(nn.Softplus()), (img,)),
        "mish": Case(module(nn.Mish()), (img,)),
        "softmax_last": Case(module(nn.Softmax(dim=-1)), (seq,)),
        "softmax_dim1": Case(module(nn.Softmax(dim=1)), (img,)),
        "log_softmax": Case(module(nn.LogSoftmax(dim=1)), (vec,)),
        # pooling
        "max_pool": Case(module(nn.MaxPool2d(2)), (img,)),
        "max_pool_pad_stride": Case(module(nn.MaxPool2d(3, stride=2, padding=1)), (img,)),
        "max_pool_ceil": Case(module(nn.MaxPool2d(3, stride=2, ceil_mode=True)), (img,)),
        "avg_pool": Case(module(nn.AvgPool2d(2)), (img,)),
        "avg_pool_pad": Case(module(nn.AvgPool2d(3, stride=2, padding=1)), (img,)),
        "avg_pool_pad_exclude": Case(module(nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)),
                                     (img,)),
        "avg_pool_ceil": Case(module(nn.AvgPool2d(3, stride=2, ceil_mode=True)), (img,)),
        "adaptive_avg_1": Case(module(nn.AdaptiveAvgPool2d(1)), (img,)),
        "adaptive_avg_2x4": Case(module(nn.AdaptiveAvgPool2d((2, 4))), (img,)),
        "max_pool1d": Case(module(nn.MaxPool1d(2)), (seq,)),
        "upsample_nearest": Case(module(nn.Upsample(scale_factor=2, mode="nearest")), (img,)),
        "upsample_bilinear": Case(module(nn.Upsample(scale_factor=2, mode="bilinear")), (img,)),
        "upsample_bilinear_corners": Case(module(nn.Upsample(size=(5, 11), mode="bilinear",
                                                             align_corners=True)), (img,)),
        "dropout_eval": Case(module(nn.Dropout(0.5)), (img,)),
        # tensor ops
        "flatten": Case(module(nn.Flatten()), (img,)),
        "reshape_batch": Case(fn(lambda x: x.reshape(x.shape[0], 2, -1)), (img,)),
        "view_flat": Case(fn(lambda x: x.view(-1, 8)), (img,)),
        "permute": Case(fn(lambda x: x.permute(0, 2, 3, 1)), (img,)),
        "transpose": Case(fn(lambda x: x.transpose(1, 2).contiguous()), (seq,)),
        "cat": Case(fn(lambda x, y: torch.cat([x, y, x], dim=1)), (seq, _randn(2, 2, 10, seed=3))),
        "stack": Case(fn(lambda x, y: torch.stack([x, y], dim=1)), (seq, _randn(2, 4, 10, seed=4))),
        "split": Case(fn(lambda x: torch.split(x, [3, 7], dim=-1)), (seq,)),
        "chunk": Case(fn(lambda x: x.chunk(2, dim=1)), (img,)),
        "slice": Case(fn(lambda x: x[:, 1:3, ::2, -4:]), (img,)),
        "select": Case(fn(lambda x: x[:, -1, 2] + x[:, 0, :, 1]), (img,)),
        "index_tensor": Case(fn(lambda x: x[:, torch.tensor([3, 0, -1])]), (seq,)),
        "unsqueeze_squeeze": Case(fn(lambda x: x.unsqueeze(1).squeeze(1).unsqueeze(-1)), (seq,)),
        "expand": Case(fn(lambda x: x[:, :, None].expand(-1, -1, 3)), (vec,)),
        "repeat": Case(fn(lambda x: x.repeat(1, 2, 1)), (seq,)),
        "pad": Case(fn(lambda x: F.pad(x, (1, 2, 0, 1), value=0.5)), (img,)),
        "pad_reflect_replicate": Case(fn(lambda x: (F.pad(x, (1, 1, 2, 2), mode="reflect"),
                                                    F.pad(x, (2, 0, 1, 1), mode="replicate"))), (img,)),
        "pixel_shuffle_flip": Case(fn(lambda x: (F.pixel_shuffle(x, 2), torch.flip(x, [1, 3]))), (img,)),
        "masked_fill_tril": Case(fn(lambda x: (x.masked_fill(x > 0.3, -1.0), torch.tril(x))), (img,)),
        "interpolate_nearest": Case(fn(lambda x: F.interpolate(x, scale_factor=2.0)), (img,)),
        "einsum": Case(fn(lambda x, y: torch.einsum("bchw,bcw->bch", x, y)), (img, _randn(2, 4, 8, seed=8))),
        # matmul and attention
        "matmul_3d": Case(fn(lambda x, y: x @ y), (seq, _randn(2, 10, 3, seed=5))),
        "matmul_4d": Case(fn(lambda x, y: torch.matmul(x, y.transpose(-1, -2))),
                          (img, _randn(2, 4, 5, 8, seed=6))),
        "attention_by_hand": Case(fn(lambda x: torch.softmax(x @ x.transpose(1, 2) / math.sqrt(10), -1) @ x),
                                  (seq,)),
        "sdpa": Case(fn(lambda x: F.scaled_dot_product_attention(x, x, x)), (img,)),
        "sdpa_causal": Case(fn(lambda x: F.scaled_dot_product_attention(x, x, x, is_causal=True)), (img,)),
        # reductions
        "sum_mean": Case(fn(lambda x: (x.sum(dim=1), x.mean(dim=(2, 3), keepdim=True))), (img,)),
        "amax_amin": Case(fn(lambda x: (x.amax(-1), x.min(dim=1).values)), (seq,)),
        "argmax": Case(fn(lambda x: x.argmax(dim=-1)), (seq,)),
        "var_std": Case(fn(lambda x: (x.var(dim=-1), x.std(dim=1, keepdim=True))), (seq,)),
        "prod_cumsum": Case(fn(lambda x: (x.prod(dim=-1), x.cumsum(dim=1))), (vec,)),
        "max_min_all": Case(fn(lambda x: (x.max(), x.min())), (vec,)),
        "norms_normalize": Case(fn(lambda x: (F.normalize(x, dim=1), x.norm(dim=-1), x.norm(p=1, dim=1),
                                              x.norm(p=float("inf"), dim=-1))), (seq,)),
        "topk": Case(fn(lambda x: (x.topk(3, dim=-1), x.topk(2, dim=1, largest=False).values)), (seq,)),
        "log2": Case(fn(lambda x: torch.log2(x.abs() + 1)), (img,)),
        # elementwise math and residuals
        "arith_scalars": Case(fn(lambda x: (2 - x) * 3 + x / 4 - 1), (img,)),
        "arith_broadcast": Case(fn(lambda x, y: x * y + x - y / (y.abs() + 1)),
                                (img, _randn(2, 4, 1, 8, seed=7))),
        "pow_sqrt_exp_log": Case(fn(lambda x: x.abs().sqrt() + x.pow(2) + torch.exp(x)
                                    + torch.log(x.abs() + 1) + x.abs().add(1).rsqrt() + x ** 3),
                                 (img,), 1e-4),
        "clamp_min_max": Case(fn(lambda x: torch.maximum(x.clamp(-0.5, 0.7), x.clamp(min=0.1))
                                 - torch.minimum(x, x * 2)), (img,)),
        "where_compare": Case(fn(lambda x: (torch.where(x > 0, x, -x), (x <= 0.5).float(), x == x.round())),
                              (img,)),
        "floor_div_remainder": Case(fn(lambda x: (torch.div(x * 5, 2, rounding_mode="floor"), (x * 5) % 3)),
                                    (img,), 1e-4),
        "residual": Case(Fn(lambda self, x: x + self.mods["f"](x),
                            f=nn.Sequential(nn.Linear(6, 6), nn.Tanh())), (vec,)),
        # bitwise and logical ops, C remainder, gathers, scatters, in-place writes (#18)
        "bitwise_bool": Case(fn(lambda x: ((x > 0) & (x < 1), (x > 0) | (x < -1), (x > 0) ^ (x > 0.5),
                                           ~(x > 0), torch.logical_xor(x > 0, x < 0.5))), (img,)),
        "bitwise_int": Case(fn(lambda x: (x & 3, x | 4, x ^ 5, ~x, x & x.flip(1))), (tok,)),
        "fmod_roll": Case(fn(lambda x: (torch.fmod(x * 5, 3), torch.fmod(x * 5, -2.5),
                                        torch.fmod(x, x.flip(1)), torch.roll(x, (1, -2), (2, 3)))),
                          (img,), 1e-4),
        "gather": Case(fn(lambda x: (torch.gather(x, 1, (x.abs() * 3).long() % 4),
                                     torch.gather(x, 2, (x[:, :, :3].abs() * 7).long() % 10))), (seq,)),
        "scatter": Case(fn(lambda x: (x.scatter(1, _PERM.expand(x.shape[0], 4, 10), x * 2),
                                      x.scatter(1, _PERM[:, :2].expand(x.shape[0], 2, 10), 0.5),
                                      x.scatter_add(2, (x.abs() * 7).long() % 10, x))), (seq,), 1e-4),
        "index_multi_unfold": Case(fn(lambda x: (x[:, torch.tensor([0, 3]), torch.tensor([1, -1])],
                                                 x[:, torch.tensor([[0], [2]]), :, torch.tensor([1, 5, 7])],
                                                 F.unfold(x, 2, stride=2), F.unfold(x, 3, padding=1))),
                                   (img,)),
        "index_put": Case(fn(_index_put), (img,)),
        "slice_select_scatter": Case(fn(_swin_mask), (img,)),
        # PyTorch's ONNX exporter gets a broadcasting copy_ wrong (it keeps the source's shape)
        "copy_broadcast": Case(fn(lambda x: torch.empty_like(x).copy_(x[:, :1])), (img,), onnx=False),
        "as_strided_after_permute": Case(fn(lambda x: (F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), 1),
                                                       F.adaptive_avg_pool2d(x.permute(0, 2, 3, 1), (2, 2)))),
                                         (img,)),
        "clamp_tensors_where_broadcast": Case(fn(lambda x, y: (
            torch.clamp(x, min=y, max=y + 0.5), torch.clamp_min(x, y), torch.clamp_max(x, y),
            torch.where(x > 0, x, y), torch.where(y > 0, 1.0, x), 1 - x)), (img, _randn(2, 4, 1, 8, seed=9))),
        "cast_int_to_float": Case(fn(lambda x: x.float() * 0.5 + x.sum(dim=1, keepdim=True)), (tok,)),
    }
    return c


CASES = _cases()


class AllCases(nn.Module):
    """Every case side by side: inputs concatenated in case order, outputs flattened in case order."""

    def __init__(self) -> None:
        super().__init__()
        self.cases = nn.ModuleDict({name: case.model for name, case in CASES.items()})

    def forward(self, *inputs: torch.Tensor) -> tuple[Any, ...]:
        outs, k = [], 0
        for name, model in self.cases.items():
            count = len(CASES[name].args)
            outs.append(model(*inputs[k:k + count]))
            k += count
        return tuple(outs)


def _split(flat: list[np.ndarray]) -> dict[str, list[np.ndarray]]:
    results, k = {}, 0
    for name, case in CASES.items():
        count = len(torch_outputs(case.model, case.args))
        results[name] = flat[k:k + count]
        k += count
    return results


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """All cases exported once per format, at another batch size than captured, run by every peer on
    unit-variance inputs and on small-variance ones ("small": x 1e-2, where an epsilon shows): TensorFlow
    as shipped (oneDNN and grappler rewrites on), TensorFlow with both off (a child process, since
    TF_ENABLE_ONEDNN_OPTS is read at import), and ONNX Runtime."""
    model = AllCases().eval()
    args = tuple(a for case in CASES.values() for a in case.args)
    run_args = tuple(a for case in CASES.values() for a in other_batch(case.args))
    small_args = small_variance(run_args)
    folder = tmp_path_factory.mktemp("ops")
    meta = export_meta_graph(model, args, folder / "all.meta")
    placeholders = [n.name for n in _read_meta(meta).graph_def.node if n.op == "Placeholder"]
    groups = [len(torch_outputs(c.model, c.args)) for c in CASES.values()]
    n_outputs = sum(groups)
    feed_sets = [dict(zip(placeholders, (a.numpy() for a in xs), strict=True))
                 for xs in (run_args, small_args)]
    # one session.run per case: TensorFlow optimises what each run needs, as if the case were alone
    fused: set[str] = set()
    tf_unit, tf_small = run_tf_many(meta, feed_sets, n_outputs, groups=groups, fused=fused)
    plain_unit, plain_small = run_tf_plain(meta, feed_sets, n_outputs)
    path = export_onnx(model, args, folder / "all.onnx")
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    ort = [session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), xs, strict=True)})
           for xs in (run_args, small_args)]
    return {"TensorFlow": _split(tf_unit), "TensorFlow small": _split(tf_small),
            "TensorFlow plain": _split(plain_unit), "TensorFlow plain small": _split(plain_small),
            "ONNX Runtime": _split(ort[0]), "ONNX Runtime small": _split(ort[1]),
            "meta": meta, "feeds": feed_sets[0], "fused": fused}


def _read_meta(path: str) -> Any:
    from tensorboard.compat.proto import meta_graph_pb2

    with open(path, "rb") as f:
        return meta_graph_pb2.MetaGraphDef.FromString(f.read())


@pytest.mark.parametrize("name", list(CASES))
def test_converter(name: str, peers: dict[str, Any]) -> None:
    case = CASES[name]
    unit = other_batch(case.args)
    expected = {"": torch_outputs(case.model, unit),
                " small": torch_outputs(case.model, small_variance(unit))}
    for peer in ("TensorFlow", "TensorFlow plain", "ONNX Runtime")[:3 if case.onnx else 2]:
        for inputs, wanted in expected.items():
            assert_close(peers[peer + inputs][name], wanted, atol=case.atol, rtol=1e-5,
                         what=f"{peer}{inputs} {name}")


# TensorFlow's rewrites whose kernels compute something else than the ops they replace: oneDNN's layer
# and instance norm drop the graph's epsilon (they use 1e-3); the fused GELUs are about 2e-4 off
LOSSY_REWRITES = {"_MklLayerNorm", "_MklFusedInstanceNorm", "_FusedMatMul:GeluExact",
                  "_FusedMatMul:GeluApproximate", "_MklFusedMatMul:GeluExact",
                  "_MklFusedMatMul:GeluApproximate"}


def test_tensorflow_rewrites_nothing_into_an_inexact_kernel(peers: dict[str, Any]) -> None:
    ran = peers["fused"]
    assert "_FusedMatMul" in ran or "_MklFusedMatMul" in ran or "_MklMatMul" in ran or "MatMul" in ran
    assert not ran & LOSSY_REWRITES, f"TensorFlow rewrote our graph into {sorted(ran & LOSSY_REWRITES)}"


# cases whose TF ops our importer (graph/tf_import) does not convert yet
IMPORTER_GAPS: set[str] = set()


def test_round_trip_through_our_importer(peers: dict[str, Any]) -> None:
    """import_meta_graph + restore of the same export gives torch's outputs, case by case."""
    from lightning_saver import import_meta_graph

    graph = import_meta_graph(peers["meta"])
    graph.restore(peers["meta"][: -len(".meta")])
    first, k = {}, 0
    for name, case in CASES.items():
        count = len(torch_outputs(case.model, case.args))
        first[name] = list(range(k, k + count))
        k += count
    wanted = [name for name in CASES if name not in IMPORTER_GAPS]
    fetches = [f"output_{i}:0" for name in wanted for i in first[name]]
    got = iter(graph.run(fetches, feed_dict={f"{n}:0": v for n, v in peers["feeds"].items()}))
    for name in wanted:
        case = CASES[name]
        expected = torch_outputs(case.model, other_batch(case.args))
        ours = [np.asarray(next(got)) for _ in expected]
        assert_close(ours, expected, atol=case.atol, rtol=1e-4, what=f"import_meta_graph {name}")


def test_every_op_of_every_case_has_only_attrs_tf_knows_none_at_default(peers: dict[str, Any]) -> None:
    meta = _read_meta(peers["meta"])
    assert_attrs_tf_knows_and_not_default(meta.graph_def)
    used = {node.op for node in meta.graph_def.node}
    assert {op.name for op in meta.meta_info_def.stripped_op_list.op} == used


@pytest.mark.parametrize("layer, message", [
    (nn.ConvTranspose2d(4, 4, 3, groups=2), r"ConvTranspose with groups > 1.*aten\.convolution\.default "
                                             r"at node .* in module 'mods\.layer' \(.*ConvTranspose2d\)"),
    (nn.AdaptiveAvgPool2d(3), "only output sizes that divide the input"),
    (nn.MaxPool2d(2, return_indices=True), "indices"),
])
def test_unsupported_attributes_say_what(tmp_path, layer: nn.Module, message: str) -> None:
    with pytest.raises(UnsupportedOpError, match=message):
        export_meta_graph(module(layer), (_randn(2, 4, 8, 8),), tmp_path / "m.meta")


def test_one_converter_alone_with_variables_restored(tmp_path) -> None:
    case = CASES["conv2d_groups"]
    check_tf(tmp_path, case.model, case.args, atol=case.atol, run_args=other_batch(case.args, 5))


def test_cumprod_in_tensorflow(tmp_path) -> None:
    # TensorFlow only: PyTorch's ONNX exporter has no translation for cumprod (prims.prod)
    model = fn(lambda x: x.cumprod(dim=1))
    check_tf(tmp_path, model, (_randn(2, 6),), atol=1e-5, rtol=1e-5, run_args=(_randn(4, 6, seed=2),))


def test_onnx_runner_sees_inputs_by_name(tmp_path) -> None:
    model = module(nn.Linear(6, 2))
    path = export_onnx(model, (torch.randn(2, 6),), tmp_path / "m.onnx", exporter="torchscript")
    x = torch.randn(4, 6)
    assert_close(run_onnx(path, {"x": x.numpy()}), torch_outputs(model, (x,)), atol=1e-5, what="ORT")
