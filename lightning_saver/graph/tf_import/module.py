"""Turn a compiled plan into a ``torch.fx.GraphModule``.

Each converter step becomes a ``call_function`` node calling the converter itself with the node's
attrs as keyword arguments. Variables become attributes named by ``variables.param_name``:
trainable floating-point variables are ``nn.Parameter``s, the others (moving averages, steps)
persistent buffers. Both share memory with the imported graph's values, so training the module
changes what ``graph.run`` computes. Folded constants become non-persistent buffers
(``const:<tensor name>``), so they stay out of the state dict.
"""

from __future__ import annotations

import heapq
import re
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from lightning_saver.errors import GraphImportError
from lightning_saver.graph.tf_import.attr_access import direct_attributes
from lightning_saver.graph.tf_import.cond import SWITCH_OPS, conditional_regions, execute_with_deadness
from lightning_saver.graph.tf_import.conditionals import Conditional
from lightning_saver.graph.tf_import.functions import (
    Branches,
    CompiledFunction,
    WhileLoop,
    pick_branch,
    truth,
)
from lightning_saver.graph.tf_import.importer import GraphIndex, Ref, ref_name
from lightning_saver.graph.tf_import.plan import Plan, Step, sum_into_dying
from lightning_saver.graph.tf_import.variables import VariableStore, param_name


def output_of(result: Any, index: int) -> Any:
    """Output ``index`` of a converter result (a tuple for multi-output ops, else the tensor)."""
    if type(result) is tuple or type(result) is list:
        return result[index]
    return result


def _single_output(index: GraphIndex, op: str) -> bool:
    op_def = index.op_defs.get(op)
    if op_def is None or len(op_def.output_arg) != 1:
        return False
    arg = op_def.output_arg[0]
    return not (arg.number_attr or arg.type_list_attr)


class _Builder:
    def __init__(self, plan: Plan, index: GraphIndex, store: VariableStore, parent: _Builder | None = None,
                 prefix: str = "") -> None:
        self.plan, self.index, self.store, self.prefix = plan, index, store, prefix
        self.root = parent.root if parent else nn.Module()
        self.graph = parent.graph if parent else fx.Graph()
        self.env: dict[Ref, fx.Node] = {}
        self.calls: dict[str, fx.Node] = {}
        self.single: dict[str, bool] = {}

    def placeholder(self, ref: Ref, used: set[str]) -> None:
        base = re.sub(r"\W", "_", ref[0] if ref[1] == 0 else ref_name(ref)) or "input"
        if base[0].isdigit():
            base = "_" + base
        name, k = base, 1
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        self.env[ref] = self.graph.placeholder(name)

    def variable(self, name: str) -> fx.Node:
        target = param_name(name)
        if not hasattr(self.root, target):
            value = self.store.read(name)
            info = self.store.variables[name]
            if info.trainable and value.is_floating_point():
                self.root.register_parameter(target, nn.Parameter(value))
            else:
                self.root.register_buffer(target, value)
        return self.graph.get_attr(target)

    def constant(self, ref: Ref) -> fx.Node:
        value = self.plan.consts[ref]
        target = "const:" + self.prefix + param_name(ref_name(ref))
        if not isinstance(value, torch.Tensor):
            if not (isinstance(value, np.ndarray) and value.dtype == object):
                raise GraphImportError(
                    f"to_module: tensor {ref_name(ref)} is a constant of type {type(value).__name__}"
                )
            if not hasattr(self.root, target):  # strings (Assert messages): a plain attribute
                setattr(self.root, target, value)
        elif not hasattr(self.root, target):
            self.root.register_buffer(target, value, persistent=False)
        return self.graph.get_attr(target)

    def value(self, ref: Ref) -> fx.Node:
        if ref in self.env:
            return self.env[ref]
        if ref in self.plan.consts:
            node = self.env[ref] = self.constant(ref)
            return node
        call = self.calls.get(ref[0])
        if call is None:
            raise GraphImportError(f"to_module: tensor {ref_name(ref)} is not computed by the subgraph")
        if self.single[ref[0]]:
            if ref[1] != 0:
                raise GraphImportError(f"to_module: {ref[0]!r} has one output, not {ref_name(ref)}")
            node = call
        else:
            node = self.graph.call_function(output_of, (call, ref[1]))
        self.env[ref] = node
        return node

    def step(self, step: Any) -> None:
        if step.kind == "read":
            self.env[(step.name, 0)] = self.variable(step.variable)
            return
        if step.kind == "function" and isinstance(step.func, CompiledFunction):
            self.inline(step, step.func)
            return
        if step.kind == "function" and isinstance(step.func, (WhileLoop, Branches, Conditional)):
            self.control_flow(step, step.func)
            return
        if step.kind == "function":
            raise GraphImportError(
                f"to_module: node {step.name!r} ({step.op}) calls a graph function; modules support graphs "
                "without functional ops (graph.run handles them; freezing the model inlines them)"
            )
        if step.kind == "region":
            self.add_child(step, step.func, "cond_region")
            return
        if step.kind != "call":
            raise GraphImportError(
                f"to_module: node {step.name!r} ({step.op}) changes variable {step.variable!r}; a module is "
                "a pure function of its inputs, so choose outputs that do not depend on assignments"
            )
        args = tuple(self.value(r) for r in step.inputs)
        self.calls[step.name] = self.graph.call_function(step.func, args, dict(step.kwargs))
        self.single[step.name] = "+" in step.op or _single_output(self.index, step.op)  # fused: one

    def inline(self, step: Any, function: CompiledFunction) -> None:
        """A function call (or an If whose condition is constant) becomes the function's own nodes."""
        args = [self.value(r) for r in step.inputs]
        sub = _Builder(function.plan(), function.index, function.store, self, f"{function.name}/")
        sub.env = {(a, 0): node for a, node in zip(function.args, args, strict=True)}
        steps, fetches = _with_region(sub.plan.fused_steps, sub.plan.fetches)
        for inner in steps:
            sub.step(inner)
        for k, ref in enumerate(fetches):
            self.env[(step.name, k)] = sub.value(ref)

    def subgraph(self, function: CompiledFunction) -> fx.GraphModule:
        """A function body as a GraphModule of its own (its arguments are its inputs)."""
        sub = _Builder(function.plan(), function.index, function.store)
        return sub.build([(a, 0) for a in function.args], single=False)

    def control_flow(self, step: Any, func: WhileLoop | Branches | Conditional) -> None:
        """A loop or a branch on a tensor becomes a submodule whose forward is Python control flow."""
        if isinstance(func, WhileLoop):
            child: nn.Module = LoopModule(self.subgraph(func.cond), self.subgraph(func.body), func.n_vars)
        elif isinstance(func, Conditional):  # a TF1 tf.cond: each branch is a list of this plan's steps
            branches = [_Builder(self.plan, self.index, self.store).build(
                func.inputs, single=False, steps=b.steps, fetches=b.outputs) for b in func.branches]
            child = BranchModule(branches, func.kind)
        else:
            child = BranchModule([self.subgraph(b) for b in func.branches], func.kind)
        self.add_child(step, child, "loop" if isinstance(func, WhileLoop) else "branch")

    def add_child(self, step: Any, child: nn.Module, base: str) -> None:
        target, k = base, 0
        while hasattr(self.root, target):
            k += 1
            target = f"{base}_{k}"
        self.root.add_module(target, child)
        args = tuple(self.value(r) for r in step.inputs)
        self.calls[step.name] = self.graph.call_module(target, args)
        self.single[step.name] = False

    def build(self, inputs: list[Ref], single: bool, steps: list[Any] | None = None,
              fetches: list[Ref] | None = None) -> fx.GraphModule:
        used: set[str] = set()
        for ref in inputs:
            self.placeholder(ref, used)
        steps, fetches = _with_region(self.plan.fused_steps if steps is None else steps,
                                      self.plan.fetches if fetches is None else fetches)
        for step in steps:
            self.step(step)
        outs = [self.value(r) for r in fetches]
        self.graph.output(outs[0] if single else tuple(outs))
        _sum_into_dying_residuals(self.graph)
        module = fx.GraphModule(self.root, self.graph, class_name="ImportedTFGraph")
        direct_attributes(module)
        module.tf_inputs = [ref_name(r) for r in inputs]
        module.tf_outputs = [ref_name(r) for r in self.plan.fetches]
        return module


def _sum_into_dying_residuals(graph: fx.Graph) -> None:
    """Each fused convolution whose residual (a step's result) has no later reader calls the function
    that may sum into it (``plan.sum_into_dying``)."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in graph.nodes:
        if node.op == "call_function":
            here = order[node]
            node.target = sum_into_dying(
                node.target, node.args, lambda r: isinstance(r, fx.Node) and r.op == "call_function",
                lambda r, here=here: max(order[user] for user in r.users) == here)


def build_module(plan: Plan, index: GraphIndex, store: VariableStore, inputs: list[Ref],
                 single: bool) -> fx.GraphModule:
    """The GraphModule for ``plan`` (compiled with ``inputs`` as feeds); see the module docstring.

    Raises:
        GraphImportError: the path assigns a variable, or needs a string constant.
    """
    return _Builder(plan, index, store).build(inputs, single)



class LoopModule(nn.Module):
    """A ``while_loop``: ``cond`` and ``body`` are GraphModules; ``forward`` is the Python loop.

    Inputs are the loop variables then the invariants (tensors the loop only reads, e.g. weights),
    so autograd follows every iteration back to the parameters of the enclosing module.
    """

    def __init__(self, cond: fx.GraphModule, body: fx.GraphModule, n_vars: int) -> None:
        super().__init__()
        self.cond, self.body, self.n_vars = cond, body, n_vars

    def forward(self, *inputs: Any) -> tuple[Any, ...]:
        values, invariants = inputs[:self.n_vars], inputs[self.n_vars:]
        while truth(self.cond(*values, *invariants)[0]):
            values = self.body(*values, *invariants)
        return tuple(values)


class BranchModule(nn.Module):
    """``If`` (branches then, else) or ``Case`` on a tensor: ``forward`` runs the branch picked."""

    def __init__(self, branches: list[fx.GraphModule], kind: str) -> None:
        super().__init__()
        self.branches, self.kind = nn.ModuleList(branches), kind

    def forward(self, selector: Any, *inputs: Any) -> tuple[Any, ...]:
        return self.branches[pick_branch(self.kind, selector, len(self.branches))](*inputs)


class RegionModule(nn.Module):
    """Steps run with TF's dead-tensor rules (``cond.py``), the fallback for Switch/Merge graphs that
    ``conditionals.py`` cannot structure: ``forward`` takes the tensors the steps read and returns
    the fetched ones."""

    def __init__(self, steps: list[Any], inputs: list[Ref], outputs: list[Ref]) -> None:
        super().__init__()
        self.steps, self.inputs, self.outputs = steps, inputs, outputs

    def forward(self, *values: Any) -> tuple[Any, ...]:
        env = dict(zip(self.inputs, values, strict=True))
        return tuple(execute_with_deadness(self.steps, env, self.outputs))


def _with_region(steps: list[Any], fetches: list[Ref]) -> tuple[list[Any], list[Ref]]:
    """``steps`` with each ``tf.cond`` decided at run time (its Switches, branches and Merges)
    gathered into one region step, and where the fetches are then read from.

    When the conditionals cannot be told apart, or a step outside one sits between two of its
    steps, everything downstream of the first Switch becomes a single region.
    """
    if not any(step.op in SWITCH_OPS for step in steps):
        return steps, fetches
    regions = conditional_regions(steps)
    if regions is not None:
        done = _regions_in_order(steps, fetches, regions)
        if done is not None:
            return done
    inside: set[str] = set()
    for step in steps:
        if step.op in SWITCH_OPS or any(r[0] in inside for r in step.inputs + step.controls):
            inside.add(step.name)
    return _regions_in_order(steps, fetches, [[s for s in steps if s.name in inside]]) or (steps, fetches)


def _regions_in_order(steps: list[Any], fetches: list[Ref],
                      regions: list[list[Any]]) -> tuple[list[Any], list[Ref]] | None:
    """Replace each region by one step, in an order where every step follows what it reads;
    None when no such order exists (a step outside a region both reads and feeds it)."""
    group = {s.name: k for k, region in enumerate(regions) for s in region}
    names = [region[0].name + "/cond_region" for region in regions]
    reads_of = [[r for s in region for r in s.inputs if group.get(r[0]) != k]
                for k, region in enumerate(regions)]
    wanted = set(fetches) | {r for s in steps if s.name not in group for r in s.inputs}
    wanted.update(r for reads in reads_of for r in reads)
    remap: dict[Ref, Ref] = {}
    modules = []
    for k, region in enumerate(regions):
        for s in region:
            if s.kind not in ("call", "cond", "function"):
                raise GraphImportError(
                    f"to_module: node {s.name!r} ({s.op}) changes variable {s.variable!r} inside a tf.cond; "
                    "a module is a pure function of its inputs"
                )
        outputs = sorted(r for r in wanted if group.get(r[0]) == k)
        remap.update({r: (names[k], j) for j, r in enumerate(outputs)})
        modules.append(RegionModule(region, list(dict.fromkeys(reads_of[k])), outputs))
    # one item per step outside the regions and per region, placed by Kahn's algorithm in the
    # original order wherever the dependencies allow
    items: dict[str, Any] = {}
    position: dict[str, int] = {}
    for i, step in enumerate(steps):
        k = group.get(step.name)
        if k is None:
            items[step.name] = replace(step, inputs=tuple(remap.get(r, r) for r in step.inputs))
            position[step.name] = i
        elif names[k] not in items:
            reads = tuple(remap.get(r, r) for r in modules[k].inputs)
            items[names[k]] = Step(names[k], "Switch", "region", modules[k], reads)
            position[names[k]] = i
    waiting = {name: {r[0] for r in item.inputs if r[0] in items and r[0] != name}
               for name, item in items.items()}
    users: dict[str, list[str]] = {}
    for name, deps in waiting.items():
        for dep in deps:
            users.setdefault(dep, []).append(name)
    ready = [(position[n], n) for n, deps in waiting.items() if not deps]
    heapq.heapify(ready)
    placed = []
    while ready:
        _, name = heapq.heappop(ready)
        placed.append(items[name])
        for user in users.get(name, ()):
            waiting[user].discard(name)
            if not waiting[user]:
                heapq.heappush(ready, (position[user], user))
    if len(placed) != len(items):
        return None
    return placed, [remap.get(r, r) for r in fetches]
