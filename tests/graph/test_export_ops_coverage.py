"""Converters for the ops model code uses beyond layers (#18 part 2): embedding bags, grid sampling,
boolean masks and other data-dependent selections, scatter reductions, sort and bucketize, windows,
trigonometry. One-op models, all exported once per format side by side (``run_side_by_side``), run
at another batch size than captured in TensorFlow (rewrites on and off) and ONNX Runtime, on
unit-variance and small-variance inputs, compared with torch at 1e-5.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from export_check import Fn, assert_close, other_batch, run_side_by_side, small_variance, torch_outputs
from torch import nn

from lightning_saver.errors import UnsupportedOpError
from lightning_saver.graph.onnx_export import export_onnx
from lightning_saver.graph.tf_export import export_meta_graph


def fn(f: Callable[..., Any]) -> Fn:
    return Fn(lambda self, *xs: f(*xs))


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _randint(high: int, *shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


def _bag(mode: str, **options: Any) -> nn.EmbeddingBag:
    torch.manual_seed(0)
    return nn.EmbeddingBag(10, 3, mode=mode, **options)


_OFFSETS = torch.tensor([0, 3, 3, 7])  # the second bag is empty


def _bags(mode: str, **options: Any) -> Fn:
    """Bags given by offsets over the flattened ids (DLRM's form), optionally with sample weights."""
    def forward(self: Fn, ids: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        offsets = torch.cat([_OFFSETS, torch.tensor([ids.numel()])]) if options.get("include_last_offset") \
            else _OFFSETS
        weights = None if w is None else w.reshape(-1)
        return self.mods["bag"](ids.reshape(-1), offsets, per_sample_weights=weights)

    return Fn(forward, bag=_bag(mode, **options))


def _grid(mode: str, padding: str, corners: bool) -> Fn:
    return fn(lambda x, g: F.grid_sample(x, g, mode=mode, padding_mode=padding, align_corners=corners))


_THETA = torch.tensor([[0.9, 0.2, 0.1], [-0.15, 1.1, -0.05]])


def _spatial_transformer(x: torch.Tensor) -> torch.Tensor:
    theta = _THETA.expand(x.shape[0], 2, 3)
    return F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)


def _mask_writes(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    copied = x.clone()
    copied[x > 0] = y[x > 0]  # one value per selected element
    added = x.clone()
    added.index_put_((x < 0,), y[x < 0] * 2, accumulate=True)
    return copied, added


def _scatter_reduces(x: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, ...]:
    index = i[:, :3] % 10
    src = x[:, :3] * 2
    return tuple(x.scatter_reduce(2, index, src, reduce, include_self=self_too)
                 for reduce in ("sum", "prod", "amax", "amin", "mean") for self_too in (True, False))


def _int_scatter_reduces(x: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # integer means floor-divide in torch
    return tuple(x.scatter_reduce(1, i % 6, x * 3 - 7, reduce, include_self=self_too)
                 for reduce in ("mean", "sum", "amax") for self_too in (True, False))


def _duplicate_index_writes(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    rows = torch.tensor([0, 2, 0, 4])
    added = x.index_add(1, rows, torch.ones(x.shape[0], 4, 10), alpha=0.5)
    accumulated = x.clone()
    accumulated[:, torch.tensor([1, 3])] += x[:, :2]
    put = x.transpose(0, 1).clone()
    put.index_put_((rows,), x.transpose(0, 1)[:4], accumulate=True)
    return added, accumulated, put.transpose(0, 1)


class TinyDLRM(nn.Module):
    """DLRM's shape: a dense MLP, two sum-pooled embedding bags, pairwise dot interactions, a top MLP."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.bottom = nn.Linear(3, 4)
        self.bags = nn.ModuleList([nn.EmbeddingBag(20, 4, mode="sum") for _ in range(2)])
        self.top = nn.Linear(4 + 3, 1)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        features = [torch.relu(self.bottom(dense))] + [bag(sparse[:, k]) for k, bag in enumerate(self.bags)]
        z = torch.stack(features, 1)
        pairs = (z @ z.transpose(1, 2))[:, torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2])]
        return self.top(torch.cat([features[0], pairs], 1))


class MeanAggregation(nn.Module):
    """A message-passing layer over a fixed graph (torch_geometric's mean aggregation, batched)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.register_buffer("source", torch.tensor([0, 1, 2, 3, 4, 0, 2]))
        self.register_buffer("target", torch.tensor([1, 2, 3, 4, 0, 3, 3]))
        self.message = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [graphs, 5 nodes, 6]
        messages = self.message(x[:, self.source])
        index = self.target[None, :, None].expand_as(messages)
        return x.scatter_reduce(1, index, messages, "mean", include_self=False)


_BOUNDS = torch.tensor([-1.0, -0.25, 0.0, 0.5, 1.5])


def _cases() -> dict[str, tuple[nn.Module, tuple[Any, ...]]]:
    img, seq, vec = _randn(2, 4, 6, 7), _randn(2, 5, 10, seed=1), _randn(2, 6, seed=2)
    ids, weights = _randint(10, 2, 6, seed=3), torch.rand(2, 6, generator=torch.Generator().manual_seed(4))
    grid = _randn(2, 5, 3, 2, seed=5) * 0.7  # inside [-1, 1] mostly, outside sometimes
    index = _randint(10, 2, 5, 10, seed=6)
    ties = _randint(4, 2, 9, seed=7)
    return {
        # embedding bags: fixed-size bags of a 2-D input, and offsets with weights and empty bags
        "bag_sum": (Fn(lambda s, x: s.mods["bag"](x), bag=_bag("sum")), (ids,)),
        "bag_mean": (Fn(lambda s, x: s.mods["bag"](x), bag=_bag("mean")), (ids,)),
        "bag_max": (Fn(lambda s, x: s.mods["bag"](x), bag=_bag("max")), (ids,)),
        "bag_offsets_weighted": (_bags("sum"), (ids, weights)),
        "bag_offsets_mean_padding": (_bags("mean", padding_idx=2), (ids,)),
        "bag_offsets_max_last": (_bags("max", include_last_offset=True), (ids,)),
        # grid sampling
        "grid_bilinear_zeros": (_grid("bilinear", "zeros", False), (img, grid)),
        "grid_bilinear_zeros_corners": (_grid("bilinear", "zeros", True), (img, grid)),
        "grid_bilinear_border": (_grid("bilinear", "border", False), (img, grid)),
        "grid_bilinear_border_corners": (_grid("bilinear", "border", True), (img, grid)),
        "grid_nearest_zeros": (_grid("nearest", "zeros", False), (img, grid)),
        "grid_nearest_border_corners": (_grid("nearest", "border", True), (img, grid)),
        "grid_bilinear_reflection": (_grid("bilinear", "reflection", False), (img, grid * 2)),
        "grid_bilinear_reflection_corners": (_grid("bilinear", "reflection", True), (img, grid * 2)),
        "grid_nearest_reflection": (_grid("nearest", "reflection", False), (img, grid * 2)),
        "spatial_transformer": (fn(_spatial_transformer), (img,)),
        # boolean masks, nonzero
        "mask_read": (fn(lambda x: (x[x > 0], x[:, x[0, :, 0, 0] > 0], x[x[:, 0, 0, 0] > 0])), (img,)),
        "masked_select_nonzero": (fn(lambda x, y: (torch.masked_select(x, y > 0), torch.nonzero(x > 0.5),
                                                   x.nonzero())), (seq, _randn(1, 5, 1, seed=8))),
        "mask_writes": (fn(_mask_writes), (img, _randn(2, 4, 6, 7, seed=9))),
        # scatter reductions, duplicate-index accumulation
        "scatter_reduce": (fn(_scatter_reduces), (seq, index)),
        "scatter_reduce_arg": (fn(lambda x, i: (x.scatter(2, i[:, :3], x[:, :3] * 2, reduce="add"),
                                                x.scatter(2, i[:, :3], x[:, :3], reduce="multiply"),
                                                x.scatter(2, i, 0.5, reduce="add"))), (seq, index)),
        "index_add_accumulate": (fn(_duplicate_index_writes), (seq,)),
        "scatter_reduce_int": (fn(_int_scatter_reduces), (ids, _randint(6, 2, 6, seed=13))),
        # sorting, bucketing
        "sort": (fn(lambda x: (x.sort(dim=-1), x.sort(dim=1, descending=True), x.argsort(dim=-1))), (seq,)),
        "sort_ties": (fn(lambda x: (x.sort(dim=-1, stable=True), x.sort(dim=-1, descending=True, stable=True),
                                    torch.argsort(x, dim=-1, stable=True))), (ties,)),
        "bucketize": (fn(lambda x: (torch.bucketize(x, _BOUNDS), torch.bucketize(x, _BOUNDS, right=True),
                                    torch.searchsorted(_BOUNDS, x, side="right"),
                                    torch.searchsorted(_BOUNDS.expand(x.shape[0], 5).contiguous(), x,
                                                       out_int32=True))), (vec * 2,)),
        "repeat_interleave": (fn(lambda x: (x.repeat_interleave(torch.tensor([1, 2, 0, 1, 3]), dim=1),
                                            torch.repeat_interleave(torch.tensor([2, 0, 1])))), (seq,)),
        "adaptive_max_pool": (fn(lambda x: (F.adaptive_max_pool2d(x, 1), F.adaptive_max_pool2d(x, (4, 3)),
                                            F.adaptive_max_pool2d(x, (2, 7)),
                                            F.adaptive_max_pool1d(x[:, 0], 4))), (img,)),
        # small models built on them
        "dlrm": (TinyDLRM(), (vec[:, :3], _randint(20, 2, 2, 4, seed=11))),
        "mean_aggregation": (MeanAggregation(), (_randn(2, 5, 6, seed=12),)),
        # windows, scans, elementwise math
        "tensor_unfold": (fn(lambda x: (x.unfold(2, 4, 2), x.unfold(1, 2, 1))), (seq,)),
        "logcumsumexp": (fn(lambda x: (x.logcumsumexp(1), x.logcumsumexp(-1))), (seq,)),
        "trig": (fn(lambda x: (torch.tan(x), torch.atan(x), torch.sinh(x), torch.cosh(x), torch.asinh(x),
                               torch.asin(torch.tanh(x)), torch.acos(torch.tanh(x)),
                               torch.atanh(torch.tanh(x) * 0.9),
                               torch.acosh(x.abs() + 1))), (vec,)),
        "atan2_hypot": (fn(lambda x, y: (torch.atan2(x, y), torch.hypot(x, y))),
                        (vec, _randn(2, 6, seed=10))),
        "classify": (fn(lambda x: (torch.isnan(x.log()), torch.isinf(1 / x.round()), torch.isfinite(x.log()),
                                   torch.nan_to_num(x.log(), nan=0.5, neginf=-2.0))), (vec,)),
        "one_hot": (fn(lambda x: F.one_hot(x, 10).float() * 2), (ids,)),
    }


CASES = _cases()


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_side_by_side(CASES, tmp_path_factory.mktemp("coverage"))


@pytest.mark.parametrize("name", list(CASES))
def test_converter(name: str, peers: dict[str, Any]) -> None:
    model, args = CASES[name]
    unit = other_batch(args)
    expected = {"": torch_outputs(model, unit), " small": torch_outputs(model, small_variance(unit))}
    for peer in ("TensorFlow", "TensorFlow plain", "ONNX Runtime"):
        for inputs, wanted in expected.items():
            assert_close(peers[peer + inputs][name], wanted, atol=1e-5, rtol=1e-5,
                         what=f"{peer}{inputs} {name}")


def test_bag_and_mask_cases_run_at_a_batch_other_than_captured() -> None:
    # the comparisons above are meaningful only if the inputs differ from the captured ones
    for name in ("bag_offsets_weighted", "mask_read", "grid_bilinear_zeros", "scatter_reduce"):
        _, args = CASES[name]
        assert other_batch(args)[0].shape[0] != args[0].shape[0]


@pytest.mark.parametrize("model, args, message", [
    (_grid("bicubic", "zeros", False), (_randn(2, 4, 6, 7), _randn(2, 5, 3, 2)),
     r"grid_sample with mode='bicubic', padding_mode='zeros' is not supported \(supported: mode 'bilinear' "
     r"or 'nearest' with padding_mode 'zeros', 'border' or 'reflection'.*aten\.grid_sampler_2d\.default"),
    (fn(lambda x: (x > 0).sort(dim=-1).values), (_randn(2, 6),), r"sort of a bool tensor .*int8"),
    (fn(lambda x: x[x[:, 0] > 0, torch.tensor([1])]), (_randn(2, 6),),
     r"boolean mask together with other index"),
    (fn(lambda x: x.cummax(1).values), (_randn(2, 6),), r"no converter for op aten\.cummax\.default"),
    (fn(lambda x: F.adaptive_max_pool2d(x, 2, return_indices=True)[1]), (_randn(2, 3, 4, 4),),
     r"adaptive max pooling indices \(return_indices=True\) are not supported"),
])
def test_unsupported_cases_say_what_is_supported(tmp_path, model: nn.Module, args: tuple[Any, ...],
                                                 message: str) -> None:
    with pytest.raises(UnsupportedOpError, match=message):
        export_meta_graph(model, args, tmp_path / "m.meta")


def test_onnx_names_an_op_it_cannot_translate(tmp_path) -> None:
    with pytest.raises(UnsupportedOpError, match=r"ONNX export: PyTorch's ONNX exporter has no translation "
                                                 r"for op aten\.cummax\.default at node 'cummax'"):
        export_onnx(fn(lambda x: x.cummax(1).values), (_randn(2, 6),), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_scatter_mean_in_onnx_is_torchs_not_the_exporters(tmp_path) -> None:
    """torch.onnx's own translation of scatter_reduce(mean) is off by several units: ours is lowered first."""
    from export_check import run_onnx

    model = fn(lambda x, i: x.scatter_reduce(1, i, x * 3, "mean", include_self=False))
    x, i = _randn(2, 8), _randint(8, 2, 8, seed=1)
    path = export_onnx(model, (x, i), tmp_path / "m.onnx")
    got = run_onnx(path, {"x": x.numpy(), "y": i.numpy()})
    np.testing.assert_allclose(got[0], torch_outputs(model, (x, i))[0], atol=1e-5, rtol=1e-5)


def test_onnx_export_survives_the_exporters_node_merging(tmp_path) -> None:
    """torch.onnx's optimizer merges the two equal clamps and places the survivor after its first
    reader (onnx.checker: 'Nodes in a graph must be topologically sorted'): we export unoptimized."""
    from export_check import check_onnx

    model = fn(lambda x: (torch.asin(x.clamp(-1, 1)), torch.acos(x.clamp(-1, 1))))
    check_onnx(tmp_path, model, (_randn(2, 6),), atol=1e-6, run_args=(_randn(3, 6, seed=1),))


def test_round_trip_through_our_importer(peers: dict[str, Any]) -> None:
    """import_meta_graph + restore of the same export gives torch's outputs, case by case."""
    from lightning_saver import import_meta_graph

    graph = import_meta_graph(peers["meta"])
    graph.restore(peers["meta"][: -len(".meta")])
    counts = [len(torch_outputs(model, args)) for model, args in CASES.values()]
    fetches = [f"output_{i}:0" for i in range(sum(counts))]
    got = iter(graph.run(fetches, feed_dict={f"{n}:0": v for n, v in peers["feeds"].items()}))
    for name, (model, args) in CASES.items():
        expected = torch_outputs(model, other_batch(args))
        ours = [np.asarray(next(got)) for _ in expected]
        assert_close(ours, expected, atol=1e-5, rtol=1e-5, what=f"import_meta_graph {name}")


def test_example_inputs_that_are_views_capture(tmp_path) -> None:
    """An example input sliced from another tensor (a view) used to fail in run_decompositions with
    "'NoneType' object has no attribute 'size'" (torch.export guards on the view's base)."""
    from export_check import check_onnx, check_tf

    model, wide = nn.Linear(3, 4), _randn(2, 6)
    check_tf(tmp_path, model, (wide[:, :3],), atol=1e-6, run_args=(_randn(5, 3, seed=1),))
    check_onnx(tmp_path, model, (wide[:, 1:4],), atol=1e-6, run_args=(_randn(5, 3, seed=1),))


def test_onnx_adaptive_max_pool_indices_to_sizes_that_do_not_divide(tmp_path) -> None:
    # torch.onnx has no translation for these; our lowering gives values and torch's flat indices
    from export_check import check_onnx

    model = fn(lambda x: F.adaptive_max_pool2d(x, (4, 3), return_indices=True))
    check_onnx(tmp_path, model, (_randn(2, 4, 6, 7),), atol=0.0, run_args=(_randn(3, 4, 6, 7, seed=1),))


def test_deformable_detr_samples_its_feature_maps_in_tf_and_onnx(tmp_path) -> None:
    """transformers' Deformable DETR (multi-scale deformable attention: grid_sample bilinear, zeros,
    align_corners=False, six calls), tiny config, exported at batch 2 and run at batch 3."""
    import warnings

    import transformers
    from export_check import run_onnx, run_tf

    torch.manual_seed(0)
    backbone = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1],
                                         out_features=["stage2", "stage3", "stage4"])
    config = transformers.DeformableDetrConfig(
        use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, d_model=32,
        encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=5, num_feature_levels=3, encoder_n_points=2,
        decoder_n_points=2)
    model = transformers.DeformableDetrModel(config).eval()
    example, run = _randn(2, 3, 64, 64), _randn(3, 3, 64, 64, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta = export_meta_graph(model, (), tmp_path / "detr.meta", kwargs={"pixel_values": example})
        onnx = export_onnx(model, (), tmp_path / "detr.onnx", kwargs={"pixel_values": example})
        with torch.no_grad():  # every output: reference points, hidden states, encoder states...
            expected = [t.numpy() for t in torch.utils._pytree.tree_leaves(model(pixel_values=run))]
    feeds = {"pixel_values": run.numpy()}
    assert_close(run_tf(meta, feeds, len(expected)), expected, atol=1e-5, rtol=1e-5,
                 what="TensorFlow Deformable DETR")
    assert_close(run_onnx(onnx, feeds), expected, atol=1e-5, rtol=1e-5, what="ONNX Runtime Deformable DETR")


def test_every_node_has_only_attrs_tf_knows_none_at_default(peers: dict[str, Any]) -> None:
    from export_check import assert_attrs_tf_knows_and_not_default
    from tensorboard.compat.proto import meta_graph_pb2

    with open(peers["meta"], "rb") as f:
        meta = meta_graph_pb2.MetaGraphDef.FromString(f.read())
    assert_attrs_tf_knows_and_not_default(meta.graph_def)
    used = {node.op for node in meta.graph_def.node}
    assert {"UnsortedSegmentSum", "Where", "UpperBound", "GatherNd", "TopKV2"} <= used
    assert {op.name for op in meta.meta_info_def.stripped_op_list.op} == used
