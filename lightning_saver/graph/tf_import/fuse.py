"""Plan rewrite shared by ``run`` and ``to_module``: a convolution and the ops after it that only
touch its channels become one step (:mod:`fused_conv` runs it).

TensorFlow writes a convolution's bias and an inference batch norm as separate ops after it:
``BiasAdd``, ``FusedBatchNorm(is_training=False)``, or, from Keras 3, ``Mul``/``AddV2``/``Sub`` by
per-channel vectors. All are ``y = conv(x, W) * s + t`` for vectors ``s``/``t``, which is
``conv(x, W * s) + t``: one convolution with a bias, and no passes over the activations (what
TensorFlow's grappler does with its fused conv kernels). After them a residual ``AddV2`` of a
tensor of the output's shape and a ``Relu``/``Relu6`` join the step too (in that order), as in
ResNet and MobileNet blocks.

Only ops whose intermediate output feeds nothing else are absorbed, and only vectors computed from
constants and variables (not from the fed inputs). The step keeps the original variables as its
inputs, so a module's parameters are still the variables, under their own names.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from lightning_saver.graph.tf_import.fused_conv import Link, fused_conv

CONVS = frozenset({"Conv2D", "DepthwiseConv2dNative"})
BATCH_NORMS = frozenset({"FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3"})
# op -> how a per-channel vector v changes (s, t): "add" t += v, "sub" t -= v, "mul" s, t *= v
_AFFINE = {"BiasAdd": "add", "BiasAddV1": "add", "Add": "add", "AddV2": "add", "Sub": "sub", "Mul": "mul"}
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


def fuse_convolutions(steps: list[Any], fetches: list[Any], consts: Any,
                      make_step: Callable[..., Any]) -> list[Any]:
    """``steps`` with each Conv2D/DepthwiseConv2dNative and the ops after it as one step."""
    uses = Counter(ref for step in steps for ref in step.inputs)
    uses.update(fetches)
    consumers: dict[Any, Any] = {}
    for step in steps:
        for ref in step.inputs:
            consumers.setdefault(ref, step)
    static = _static_refs(steps, consts)
    replaced: dict[str, Any] = {}
    for conv in steps:
        if conv.op not in CONVS or conv.kind != "call" or conv.controls or len(conv.inputs) != 2:
            continue
        links, inputs = _chain(conv, uses, consumers, static, replaced)
        last = links[-1].step if links else conv
        for link in links:
            replaced[link.step.name] = None
        replaced[conv.name] = None
        replaced[last.name] = make_step(last.name, "+".join([conv.op] + [k.step.op for k in links]), "call",
                                        fused_conv(conv, links), tuple(inputs), {})
    if not replaced:
        return steps
    return [replaced.get(step.name, step) if step.kind == "call" and step.name in replaced else step
            for step in steps if not (step.kind == "call" and replaced.get(step.name, step) is None)]
