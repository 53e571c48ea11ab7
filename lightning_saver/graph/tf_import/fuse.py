"""Plan rewrite shared by ``run`` and ``to_module``: a convolution and the ops after it that only
touch its channels become one step (:mod:`fused_conv` runs it).

TensorFlow writes a convolution's bias and an inference batch norm as separate ops after it:
``BiasAdd``, ``FusedBatchNorm(is_training=False)``, or, from Keras 3, ``Mul``/``AddV2``/``Sub`` by
per-channel vectors. All are ``y = conv(x, W) * s + t`` for vectors ``s``/``t``, which is
``conv(x, W * s) + t``: one convolution with a bias, and no passes over the activations (what
TensorFlow's grappler does with its fused conv kernels). After them a residual ``AddV2`` of a
tensor of the output's shape and a ``Relu``/``Relu6`` join the step too (in that order), as in
ResNet and MobileNet blocks. Before it, a zero ``Pad`` of the spatial dimensions (Keras'
``ZeroPadding2D``) that feeds only the convolution becomes the convolution's own padding; one that
feeds only a VALID ``MaxPool`` joins the pooling (:mod:`fused_pool`).

A ``MatMul`` read only by a ``BiasAdd`` of such a vector becomes one ``addmm`` step
(:mod:`fused_dense`); a ``Mean`` over constant axes and a plain ``MaxPool`` keep their inputs but
run functions that decide once per input shape (``ops_reduce.mean_over_constant_axes``,
``fused_pool.prepared_max_pool``).

Only ops whose intermediate output feeds nothing else are absorbed, and only vectors computed from
constants and variables (not from the fed inputs). The step keeps the original variables as its
inputs, so a module's parameters are still the variables, under their own names.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lightning_saver.graph.tf_import.fused_conv import Link, fused_conv
from lightning_saver.graph.tf_import.fused_dense import fused_mat_mul_bias
from lightning_saver.graph.tf_import.fused_pool import fused_pad_max_pool, prepared_max_pool
from lightning_saver.graph.tf_import.ops_reduce import mean_over_constant_axes

CONVS = frozenset({"Conv2D", "DepthwiseConv2dNative"})
BATCH_NORMS = frozenset({"FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3"})
# op -> how a per-channel vector v changes (s, t): "add" t += v, "sub" t -= v, "mul" s, t *= v
_AFFINE = {"BiasAdd": "add", "BiasAddV1": "add", "Add": "add", "AddV2": "add", "Sub": "sub", "Mul": "mul"}
_PADS = {"Pad": 2, "PadV2": 3}  # op -> its number of inputs
_ACTIVATIONS = {"Relu": "relu", "Relu6": "relu6"}
_AFTER = {"sum": ("relu", "relu6"), "relu": (), "relu6": ()}  # what may follow a non-affine link


def _static_refs(steps: Sequence[Any], consts: Any) -> set[Any]:
    """Refs computed from constants and variables only (never from a feed)."""
    static = set(consts)
    for step in steps:
        if step.kind == "read" or (step.kind == "call" and all(r in static for r in step.inputs)):
            static.update((step.name, k) for k in range(8))
    return static


def _link(step: Any, y: Any, static: set[Any], data_format: str) -> tuple[str, int, list[Any]] | None:
    """(mode, chain position, operand refs) when ``step`` can extend a chain ending in ``y``."""
    if step.kind != "call" or step.controls:
        return None
    if step.op in _ACTIVATIONS:
        return (_ACTIVATIONS[step.op], 0, []) if step.inputs == (y,) else None
    if step.op in BATCH_NORMS:
        ok = (not step.kwargs.get("is_training", True) and len(step.inputs) == 5 and step.inputs[0] == y
              and step.kwargs.get("data_format", "NHWC") == data_format)
        return ("bn", 0, list(step.inputs[1:])) if ok and all(r in static for r in step.inputs[1:]) else None
    mode = _AFFINE.get(step.op)
    if mode is None or len(step.inputs) != 2 or step.inputs[0] == step.inputs[1] or y not in step.inputs:
        return None
    pos = step.inputs.index(y)
    if step.op.startswith("BiasAdd") and (pos != 0 or step.kwargs.get("data_format", "NHWC")[:2]
                                          != data_format[:2]):
        return None
    if mode == "sub" and pos != 0:
        return None
    other = step.inputs[1 - pos]
    if other in static:
        return mode, pos, [other]
    return ("sum", pos, [other]) if step.op in ("Add", "AddV2") else None


def _chain(conv: Any, uses: Counter[Any], consumers: dict[Any, Any], static: set[Any],
           taken: dict[str, Any]) -> tuple[list[Link], list[Any]]:
    """The links that follow ``conv`` (none ``taken`` by another chain) and the fused step's inputs."""
    data_format = conv.kwargs.get("data_format", "NHWC")
    links: list[Link] = []
    inputs = list(conv.inputs)
    y = (conv.name, 0)
    while uses[y] == 1 and y in consumers:
        step = consumers[y]
        found = None if step.name in taken else _link(step, y, static, data_format)
        if found is None or (found[0] == "bn" and any(uses[(step.name, k)] for k in range(1, 6))):
            break
        mode, pos, operands = found
        if links and links[-1].mode in _AFTER and mode not in _AFTER[links[-1].mode]:
            break
        links.append(Link(step, mode, pos, (len(inputs) - 2, len(inputs) - 2 + len(operands))))
        inputs += operands
        y = (step.name, 0)
    return links, inputs


def _spatial_pad(step: Any, consts: Any, data_format: str) -> tuple[tuple[int, int], ...] | None:
    """The spatial (before, after) amounts of a zero ``Pad``/``PadV2`` of a 4-D image, else None."""
    if step.kind != "call" or step.controls or step.op not in _PADS or len(step.inputs) != _PADS[step.op]:
        return None
    if any(ref not in consts for ref in step.inputs[1:]):
        return None
    if step.op == "PadV2" and torch.as_tensor(consts[step.inputs[2]]).item() != 0:
        return None
    amounts = torch.as_tensor(consts[step.inputs[1]])
    if tuple(amounts.shape) != (4, 2) or amounts.is_floating_point():
        return None
    rows = [tuple(int(v) for v in row) for row in amounts.tolist()]
    outer, spatial = (rows[:2], rows[2:]) if data_format.startswith("NC") else ((rows[0], rows[3]), rows[1:3])
    if any(outer[0] + outer[1]) or min(min(row) for row in spatial) < 0:
        return None
    return tuple((a, b) for a, b in spatial)


def fuse_convolutions(steps: list[Any], fetches: list[Any], consts: Any,
                      make_step: Callable[..., Any]) -> list[Any]:
    """``steps`` with each Conv2D/DepthwiseConv2dNative and the ops after it as one step, each
    zero ``Pad`` feeding only a ``MaxPool`` joined to it, each ``MatMul`` read only by a static
    ``BiasAdd`` joined to it, and each ``Mean`` over constant axes and plain ``MaxPool`` prepared."""
    steps = _fuse_pad_pools(_fuse_convs(steps, fetches, consts, make_step), fetches, consts, make_step)
    steps = _fuse_mat_mul_biases(steps, fetches, consts, make_step)
    return _prepared_steps(steps, consts, make_step)


def _fuse_mat_mul_biases(steps: list[Any], fetches: list[Any], consts: Any,
                         make_step: Callable[..., Any]) -> list[Any]:
    """Each ``MatMul`` whose only reader is a ``BiasAdd`` of a static vector joins it
    (:mod:`fused_dense`); the step keeps the ``BiasAdd``'s name and the bias as its third input."""
    uses = Counter(ref for step in steps for ref in step.inputs)
    uses.update(fetches)
    readers = {ref: step for step in steps for ref in step.inputs}
    static = _static_refs(steps, consts)
    replaced: dict[str, Any] = {}  # BiasAdd name -> the fused step
    absorbed: set[str] = set()  # the MatMuls joined to them
    for mm in steps:
        if mm.op != "MatMul" or mm.kind != "call" or mm.controls or len(mm.inputs) != 2:
            continue
        y = (mm.name, 0)
        add = readers.get(y)
        if (uses[y] != 1 or add is None or add.op not in ("BiasAdd", "BiasAddV1") or add.kind != "call"
                or add.controls or len(add.inputs) != 2 or add.inputs[0] != y or add.inputs[1] not in static):
            continue
        func = fused_mat_mul_bias(bool(mm.kwargs.get("transpose_a")), bool(mm.kwargs.get("transpose_b")))
        absorbed.add(mm.name)
        inputs = (*mm.inputs, add.inputs[1])
        replaced[add.name] = make_step(add.name, f"MatMul+{add.op}", "call", func, inputs, {})
    if not replaced:
        return steps
    return [replaced.get(step.name, step) for step in steps
            if not (step.kind == "call" and step.name in absorbed)]


def _prepared_steps(steps: list[Any], consts: Any, make_step: Callable[..., Any]) -> list[Any]:
    """Each ``Mean`` whose axis is a constant runs :func:`ops_reduce.mean_over_constant_axes`, each
    plain ``MaxPool`` :func:`fused_pool.prepared_max_pool` (same inputs and attrs, so the module's
    graph and its constants are unchanged)."""
    out = []
    for step in steps:
        if step.kind == "call" and not step.controls:
            func = None
            if step.op == "Mean" and len(step.inputs) == 2 and step.inputs[1] in consts:
                func = mean_over_constant_axes()
            elif step.op == "MaxPool" and len(step.inputs) == 1:
                func = prepared_max_pool(step)
            if func is not None:
                step = make_step(step.name, step.op, "call", func, step.inputs, step.kwargs)
        out.append(step)
    return out


def _fuse_pad_pools(steps: list[Any], fetches: list[Any], consts: Any,
                    make_step: Callable[..., Any]) -> list[Any]:
    uses = Counter(ref for step in steps for ref in step.inputs)
    uses.update(fetches)
    producers = {step.name: step for step in steps if step.kind == "call"}
    replaced: dict[str, Any] = {}  # pool name -> the fused step
    absorbed: set[str] = set()  # the pads joined to them
    for pool in steps:
        if (pool.op != "MaxPool" or pool.kind != "call" or pool.controls or len(pool.inputs) != 1
                or pool.inputs[0][1] != 0 or pool.kwargs.get("padding") != "VALID"):
            continue
        pad = producers.get(pool.inputs[0][0])
        if pad is None or uses[pool.inputs[0]] != 1 or pad.name in absorbed:
            continue
        pre = _spatial_pad(pad, consts, pool.kwargs.get("data_format", "NHWC"))
        if pre is None or len(pre) != 2:
            continue
        absorbed.add(pad.name)
        source = producers.get(pad.inputs[0][0]) if pad.inputs[0][1] == 0 else None
        nonnegative = source is not None and source.op.split("+")[-1] in _ACTIVATIONS
        func = fused_pad_max_pool(pad, pool, pre, nonnegative)
        replaced[pool.name] = make_step(pool.name, f"{pad.op}+MaxPool", "call", func, tuple(pad.inputs), {})
    if not replaced:
        return steps
    return [replaced.get(step.name, step) for step in steps
            if not (step.kind == "call" and step.name in absorbed)]


def _fuse_convs(steps: list[Any], fetches: list[Any], consts: Any,
                make_step: Callable[..., Any]) -> list[Any]:
    uses = Counter(ref for step in steps for ref in step.inputs)
    uses.update(fetches)
    consumers: dict[Any, Any] = {}
    for step in steps:
        for ref in step.inputs:
            consumers.setdefault(ref, step)
    static = _static_refs(steps, consts)
    producers = {step.name: step for step in steps if step.kind == "call"}
    replaced: dict[str, Any] = {}
    for conv in steps:
        if conv.op not in CONVS or conv.kind != "call" or conv.controls or len(conv.inputs) != 2:
            continue
        links, inputs = _chain(conv, uses, consumers, static, replaced)
        last = links[-1].step if links else conv
        for link in links:
            replaced[link.step.name] = None
        replaced[conv.name] = None
        # a Pad feeding only this convolution becomes its padding (Keras' ZeroPadding2D)
        pad = producers.get(conv.inputs[0][0]) if conv.inputs[0][1] == 0 else None
        pre = None
        if pad is not None and uses[conv.inputs[0]] == 1 and pad.name not in replaced:
            pre = _spatial_pad(pad, consts, conv.kwargs.get("data_format", "NHWC"))
        names = [conv.op] + [k.step.op for k in links]
        if pre is not None and pad is not None:
            replaced[pad.name], inputs[0], names = None, pad.inputs[0], [pad.op, *names]
        replaced[last.name] = make_step(last.name, "+".join(names), "call", fused_conv(conv, links, pre),
                                        tuple(inputs), {})
    if not replaced:
        return steps
    return [replaced.get(step.name, step) if step.kind == "call" and step.name in replaced else step
            for step in steps if not (step.kind == "call" and replaced.get(step.name, step) is None)]
