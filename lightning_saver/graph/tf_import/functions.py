"""Functional ops (``If``, ``StatelessIf``, ``PartitionedCall``, ``StatefulPartitionedCall``).

TF2 writes ``tf.cond`` and ``tf.function`` calls as ops that name a ``FunctionDef`` of the graph's
library. Each function body is turned into a small graph of its own (its arguments become
placeholders, ``node:out_arg:i`` inputs become flat output indices), compiled once into a plan
and cached, so ``run`` calls it like any converter. Variables reach a function as resource
arguments that already hold their value; a function that assigns a variable is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tensorboard.compat.proto import graph_pb2, meta_graph_pb2, node_def_pb2

from lightning_saver.errors import GraphImportError
from lightning_saver.graph.tf_import.importer import GraphIndex, Ref, parse_tensor_name
from lightning_saver.graph.tf_import.variables import VariableStore

FUNCTION_OPS = frozenset({"If", "StatelessIf", "PartitionedCall", "StatefulPartitionedCall"})
# output arg names of multi-output ops whose OpDefs a function body's graph may lack
_OUTPUT_NAMES = {
    "FusedBatchNorm": ("y", "batch_mean", "batch_variance", "reserve_space_1", "reserve_space_2"),
    "FusedBatchNormV2": ("y", "batch_mean", "batch_variance", "reserve_space_1", "reserve_space_2"),
    "FusedBatchNormV3": ("y", "batch_mean", "batch_variance", "reserve_space_1", "reserve_space_2",
                         "reserve_space_3"),
    "SoftmaxCrossEntropyWithLogits": ("loss", "backprop"),
    "SparseSoftmaxCrossEntropyWithLogits": ("loss", "backprop"),
    "TopKV2": ("values", "indices"),
    "Unique": ("y", "idx"),
}


def _flat_index(node: Any, arg: str, index: int, op_defs: dict[str, Any]) -> int:
    op_def = op_defs.get(node.op)
    if op_def is not None:
        offset = 0
        for out in op_def.output_arg:
            if out.name == arg:
                return offset + index
            if out.number_attr:
                offset += node.attr[out.number_attr].i
            elif out.type_list_attr:
                offset += len(node.attr[out.type_list_attr].list.type)
            else:
                offset += 1
    names = _OUTPUT_NAMES.get(node.op)
    return names.index(arg) + index if names and arg in names else index


def _body_ref(text: str, nodes: dict[str, Any], op_defs: dict[str, Any]) -> str:
    """A function-body input (``arg``, ``node:out:i``, ``^node``) in GraphDef spelling."""
    if text.startswith("^"):
        return text
    parts = text.split(":")
    if len(parts) == 3 and parts[0] in nodes:
        return f"{parts[0]}:{_flat_index(nodes[parts[0]], parts[1], int(parts[2]), op_defs)}"
    return text


class CompiledFunction:
    """One FunctionDef as a graph with a cached plan from its arguments to its outputs."""

    def __init__(self, fdef: Any, library: FunctionLibrary) -> None:
        self.name = fdef.signature.name
        op_defs = library.op_defs
        nodes = {n.name: n for n in fdef.node_def}
        graph = graph_pb2.GraphDef()
        self.args = [a.name for a in fdef.signature.input_arg]
        for arg in self.args:
            graph.node.append(node_def_pb2.NodeDef(name=arg, op="Placeholder"))
        for node in fdef.node_def:
            copy = graph.node.add()
            copy.CopyFrom(node)
            del copy.input[:]
            copy.input.extend(_body_ref(i, nodes, op_defs) for i in node.input)
        self.outputs = [parse_tensor_name(_body_ref(fdef.ret[a.name], nodes, op_defs))
                        for a in fdef.signature.output_arg]
        self.index = GraphIndex(meta_graph_pb2.MetaGraphDef(graph_def=graph))
        self.index.op_defs = op_defs
        self.index.library = library
        self.store = VariableStore({}, lambda name: None)
        self.callers: list[str] = []
        self._plan: Any = None

    def plan(self) -> Any:
        """The compiled body (arguments fed, outputs fetched), made on first use."""
        if self._plan is None:
            from lightning_saver.graph.tf_import.plan import compile_plan

            feeds: list[Ref] = [(a, 0) for a in self.args]
            context = f" in function {self.name!r} (called by {', '.join(map(repr, self.callers))})"
            self._plan = compile_plan(self.index, self.store, self.outputs, feeds, context)
            if any(step.kind == "assign" for step in self._plan.steps):
                raise GraphImportError(f"function {self.name!r} assigns a variable, which is not supported")
        return self._plan

    def __call__(self, *inputs: Any) -> tuple[Any, ...]:
        return tuple(self.plan().execute({(a, 0): v for a, v in zip(self.args, inputs, strict=True)}))


class FunctionLibrary:
    """The graph's FunctionDefs by name, compiled on first call."""

    def __init__(self, meta: Any, op_defs: dict[str, Any]) -> None:
        self.defs = {f.signature.name: f for f in meta.graph_def.library.function}
        self.op_defs = op_defs
        self._compiled: dict[str, CompiledFunction] = {}

    def get(self, name: str, needed_by: str) -> CompiledFunction:
        compiled = self._compiled.get(name)
        if compiled is None:
            if name not in self.defs:
                raise GraphImportError(f"node {needed_by!r} calls function {name!r}, which the graph lacks")
            compiled = self._compiled[name] = CompiledFunction(self.defs[name], self)
        if needed_by not in compiled.callers:
            compiled.callers.append(needed_by)
        return compiled


def _truth(value: Any) -> bool:
    tensor = torch.as_tensor(value)
    return bool(tensor) if tensor.numel() == 1 else tensor.numel() > 0


def function_op(index: GraphIndex, node: Any, cond: Any = None) -> Callable[..., Any]:
    """The callable running functional op ``node``: an If picks a branch, a call runs ``f``.

    With a constant ``cond`` an If is resolved now to its branch's ``CompiledFunction``, called
    without the condition (so ``to_module`` can inline it).
    """
    library = getattr(index, "library", None)
    if library is None:
        library = index.library = FunctionLibrary(index.meta, index.op_defs)
    if node.op in ("If", "StatelessIf") and cond is not None:
        branch = "then_branch" if _truth(cond) else "else_branch"
        return library.get(node.attr[branch].func.name, node.name)
    if node.op in ("If", "StatelessIf"):
        then_fn = library.get(node.attr["then_branch"].func.name, node.name)
        else_fn = library.get(node.attr["else_branch"].func.name, node.name)

        def run_if(cond: Any, *inputs: Any) -> tuple[Any, ...]:
            return then_fn(*inputs) if _truth(cond) else else_fn(*inputs)

        return run_if
    return library.get(node.attr["f"].func.name, node.name)
