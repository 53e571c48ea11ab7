"""Functional ops (``If``, ``Case``, ``While``, ``PartitionedCall`` and their stateless twins).

TF2 writes ``tf.cond``, ``tf.switch_case``, ``tf.while_loop`` and ``tf.function`` calls as ops that
name ``FunctionDef``s of the graph's library. Each function body is turned into a small graph of
its own (its arguments become placeholders, ``node:out_arg:i`` inputs become flat output
indices), compiled once into a plan and cached, so ``run`` calls it like any converter. Variables
reach a function as resource arguments that already hold their value; a function that assigns a
variable is refused. TF1 ``while_loop`` frames arrive here too, already cut into a condition and a
body over one graph (``frames.py``), and run as the same ``WhileLoop``.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from tensorboard.compat.proto import graph_pb2, meta_graph_pb2, node_def_pb2

from lightning_saver.errors import GraphImportError
from lightning_saver.graph.tf_import.frames import FrameLoop
from lightning_saver.graph.tf_import.importer import GraphIndex, Ref, parse_tensor_name
from lightning_saver.graph.tf_import.variables import VariableStore

IF_OPS = frozenset({"If", "StatelessIf"})
CASE_OPS = frozenset({"Case", "StatelessCase"})
WHILE_OPS = frozenset({"While", "StatelessWhile"})
FUNCTION_OPS = IF_OPS | CASE_OPS | WHILE_OPS | {"PartitionedCall", "StatefulPartitionedCall"}
# output arg names of multi-output ops whose OpDefs a function body's graph may lack (a MetaGraph's
# stripped_op_list holds only the ops of the graph itself, not of its functions)
_OUTPUT_NAMES = {
    "FusedBatchNorm": ("y", "batch_mean", "batch_variance", "reserve_space_1", "reserve_space_2"),
    "FusedBatchNormV2": ("y", "batch_mean", "batch_variance", "reserve_space_1", "reserve_space_2"),
    "FusedBatchNormV3": ("y", "batch_mean", "batch_variance", "reserve_space_1", "reserve_space_2",
                         "reserve_space_3"),
    "SoftmaxCrossEntropyWithLogits": ("loss", "backprop"),
    "SparseSoftmaxCrossEntropyWithLogits": ("loss", "backprop"),
    "TopKV2": ("values", "indices"),
    "Unique": ("y", "idx"),
    "TensorListPopBack": ("output_handle", "tensor"),
    "TensorArrayV3": ("handle", "flow"),
    "TensorArrayConcatV3": ("value", "lengths"),
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


_active_calls = threading.local()  # the functions running on this thread, to refuse recursion


class CompiledFunction:
    """A graph with a cached plan from its argument placeholders to its outputs (a FunctionDef's body)."""

    def __init__(self, name: str, graph: Any, args: list[str], outputs: list[Ref], library: FunctionLibrary,
                 kind: str = "function") -> None:
        self.name, self.args, self.outputs, self.kind = name, args, outputs, kind
        self.index = GraphIndex(meta_graph_pb2.MetaGraphDef(graph_def=graph), library.op_defs)
        self.index.library = library
        self.store = VariableStore({}, lambda name: None)
        self.callers: list[str] = []
        self._plan: Any = None

    @classmethod
    def from_fdef(cls, fdef: Any, library: FunctionLibrary) -> CompiledFunction:
        op_defs = library.op_defs
        nodes = {n.name: n for n in fdef.node_def}
        graph = graph_pb2.GraphDef()
        args = [a.name for a in fdef.signature.input_arg]
        for arg in args:
            graph.node.append(node_def_pb2.NodeDef(name=arg, op="Placeholder"))
        for node in fdef.node_def:
            copy = graph.node.add()
            copy.CopyFrom(node)
            del copy.input[:]
            copy.input.extend(_body_ref(i, nodes, op_defs) for i in node.input)
        outputs = [parse_tensor_name(_body_ref(fdef.ret[a.name], nodes, op_defs))
                   for a in fdef.signature.output_arg]
        return cls(fdef.signature.name, graph, args, outputs, library)

    def plan(self) -> Any:
        """The compiled body (arguments fed, outputs fetched), made on first use."""
        if self._plan is None:
            from lightning_saver.graph.tf_import.plan import compile_plan

            feeds: list[Ref] = [(a, 0) for a in self.args]
            context = f" in {self.kind} {self.name!r} (called by {', '.join(map(repr, self.callers))})"
            self._plan = compile_plan(self.index, self.store, self.outputs, feeds, context)
            from lightning_saver.graph.tf_import.conditionals import walk_steps

            if any(step.kind == "assign" for step in walk_steps(self._plan.steps)):
                raise GraphImportError(
                    f"{self.kind} {self.name!r} assigns a variable, which is not supported")
        return self._plan

    def __call__(self, *inputs: Any) -> tuple[Any, ...]:
        active: set[int] = _active_calls.__dict__.setdefault("ids", set())
        if id(self) in active:  # TensorFlow graphs have no recursion; a crafted library must not hang us
            raise GraphImportError(
                f"{self.kind} {self.name!r} calls itself (called by {', '.join(map(repr, self.callers))}); "
                "recursive functions are not supported"
            )
        active.add(id(self))
        try:
            return tuple(self.plan().execute({(a, 0): v for a, v in zip(self.args, inputs, strict=True)}))
        finally:
            active.discard(id(self))


class FunctionLibrary:
    """The graph's FunctionDefs by name, compiled on first call."""

    def __init__(self, meta: Any, op_defs: dict[str, Any]) -> None:
        self.defs = {f.signature.name: f for f in meta.graph_def.library.function}
        self.op_defs = op_defs
        self._compiled: dict[str, CompiledFunction] = {}
        self._loops: dict[str, WhileLoop] = {}

    def get(self, name: str, needed_by: str) -> CompiledFunction:
        compiled = self._compiled.get(name)
        if compiled is None:
            if name not in self.defs:
                raise GraphImportError(f"node {needed_by!r} calls function {name!r}, which the graph lacks")
            compiled = self._compiled[name] = CompiledFunction.from_fdef(self.defs[name], self)
        if needed_by not in compiled.callers:
            compiled.callers.append(needed_by)
        return compiled

    def frame_loop(self, loop: FrameLoop) -> WhileLoop:
        """The ``WhileLoop`` of a TF1 frame: a condition and a body compiled from the frame's graph."""
        made = self._loops.get(loop.name)
        if made is None:
            if loop.error:
                raise GraphImportError(loop.error)
            args = (loop.frame, loop.graph, loop.args)
            cond = CompiledFunction(*args, [loop.cond], self, "while_loop condition")
            body = CompiledFunction(*args, loop.body, self, "while_loop body")
            for part in (cond, body):
                part.callers.append(loop.name)
            made = self._loops[loop.name] = WhileLoop(loop.name, cond, body, loop.n_vars)
        return made


def truth(value: Any) -> bool:
    tensor = torch.as_tensor(value)
    return bool(tensor) if tensor.numel() == 1 else tensor.numel() > 0


class WhileLoop:
    """``while cond(*values, *invariants): values = body(*values, *invariants)``; returns the values.

    A functional ``While`` carries everything as values (no invariants); a TF1 frame passes the
    tensors it ``Enter``s as constants as invariants after its loop variables.
    """

    def __init__(self, name: str, cond: CompiledFunction, body: CompiledFunction, n_vars: int) -> None:
        self.name, self.cond, self.body, self.n_vars = name, cond, body, n_vars

    def __call__(self, *inputs: Any) -> tuple[Any, ...]:
        values, invariants = inputs[:self.n_vars], inputs[self.n_vars:]
        while truth(self.cond(*values, *invariants)[0]):
            values = self.body(*values, *invariants)
        return tuple(values)


class Branches:
    """``If`` (then, else: a true condition picks 0) or ``Case`` (an out-of-range index picks the last)."""

    def __init__(self, name: str, branches: list[CompiledFunction], kind: str) -> None:
        self.name, self.branches, self.kind = name, branches, kind

    def pick(self, selector: Any) -> int:
        return pick_branch(self.kind, selector, len(self.branches))

    def __call__(self, selector: Any, *inputs: Any) -> tuple[Any, ...]:
        return self.branches[self.pick(selector)](*inputs)


def pick_branch(kind: str, selector: Any, count: int) -> int:
    if kind == "if":
        return 0 if truth(selector) else 1
    index = int(torch.as_tensor(selector))
    return index if 0 <= index < count else count - 1


def _library(index: GraphIndex) -> FunctionLibrary:
    library = getattr(index, "library", None)
    if library is None:
        library = index.library = FunctionLibrary(index.meta, index.op_defs)
    return library


def function_op(index: GraphIndex, node: Any, selector: Any = None) -> Any:
    """The callable running functional op ``node`` (or TF1 loop frame, see ``frames.py``).

    An If or Case with a constant ``selector`` is resolved now to its branch's
    ``CompiledFunction``, called without the selector (so ``to_module`` can inline it).
    """
    library = _library(index)
    loop = index.loops.get(node.name)
    if loop is not None:
        return library.frame_loop(loop)
    if node.op in WHILE_OPS:
        cond = library.get(node.attr["cond"].func.name, node.name)
        body = library.get(node.attr["body"].func.name, node.name)
        return WhileLoop(node.name, cond, body, len(index.inputs[node.name]))
    if node.op in IF_OPS or node.op in CASE_OPS:
        if node.op in IF_OPS:
            names = [node.attr["then_branch"].func.name, node.attr["else_branch"].func.name]
        else:
            names = [f.name for f in node.attr["branches"].list.func]
        kind = "if" if node.op in IF_OPS else "case"
        if selector is not None:
            return library.get(names[pick_branch(kind, selector, len(names))], node.name)
        return Branches(node.name, [library.get(n, node.name) for n in names], kind)
    return library.get(node.attr["f"].func.name, node.name)
