"""Parse a MetaGraphDef and find what a set of fetches needs, in execution order.

TensorFlow is not needed: the protos come from ``tensorboard.compat.proto``. ``_output_shapes``
attrs are only hints (see ``output_shape_hint``); nothing here relies on them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from google.protobuf import message, text_format
from tensorboard.compat.proto import graph_pb2, meta_graph_pb2

from lightning_saver.errors import CheckpointNotFoundError, GraphImportError
from lightning_saver.graph.tf_import.attrs import decode_shape
from lightning_saver.graph.tf_import.frames import ENTER_OPS, FrameLoop, collapse_frames

Ref = tuple[str, int]  # (node name, output index)


def load_meta_graph(source: Any) -> Any:
    """A ``MetaGraphDef`` from a path, bytes, or a MetaGraphDef/GraphDef message.

    Binary and text (``as_text=True``) MetaGraphDefs are read; a bare GraphDef (a frozen ``.pb``)
    is wrapped into a MetaGraphDef with no collections.

    Raises:
        CheckpointNotFoundError: the path does not exist.
        GraphImportError: the bytes are neither a MetaGraphDef nor a GraphDef.
    """
    if isinstance(source, meta_graph_pb2.MetaGraphDef):
        return source
    if isinstance(source, graph_pb2.GraphDef):
        return meta_graph_pb2.MetaGraphDef(graph_def=source)
    where = "<bytes>"
    if isinstance(source, (str, os.PathLike)):
        where = os.fspath(source)
        if not os.path.isfile(where):
            raise CheckpointNotFoundError(f"MetaGraph file {where!r} does not exist")
        with open(where, "rb") as f:
            source = f.read()
    if not isinstance(source, (bytes, bytearray, memoryview)):
        raise TypeError(
            f"import_meta_graph expects a path, bytes or a MetaGraphDef, got {type(source).__name__}"
        )
    return _parse(bytes(source), where)


def _parse(data: bytes, where: str) -> Any:
    meta = meta_graph_pb2.MetaGraphDef()
    try:
        meta.ParseFromString(data)
        if meta.graph_def.node:
            return meta
    except message.DecodeError:
        pass
    graph = graph_pb2.GraphDef()
    try:
        graph.ParseFromString(data)
        if graph.node and all(n.op for n in graph.node):
            return meta_graph_pb2.MetaGraphDef(graph_def=graph)
    except message.DecodeError:
        pass
    for proto in (meta_graph_pb2.MetaGraphDef(), graph_pb2.GraphDef()):
        try:
            text_format.Parse(data.decode("utf-8"), proto)
        except (text_format.ParseError, UnicodeDecodeError):
            continue
        if isinstance(proto, graph_pb2.GraphDef):
            return meta_graph_pb2.MetaGraphDef(graph_def=proto)
        return proto
    raise GraphImportError(
        f"{where}: not a TensorFlow MetaGraphDef or GraphDef (binary or text); "
        "write one with tf.compat.v1.train.export_meta_graph"
    )


def parse_tensor_name(name: str) -> Ref:
    """``"x"`` -> ("x", 0), ``"x:1"`` -> ("x", 1), ``"^x"`` -> ("x", -1) (a control input)."""
    if name.startswith("^"):
        return name[1:], -1
    node, sep, index = name.rpartition(":")
    if sep and index.isdigit():
        return node, int(index)
    return name, 0


def ref_name(ref: Ref) -> str:
    return f"{ref[0]}:{ref[1]}"


class GraphIndex:
    """The nodes of a GraphDef by name, their inputs, consumers and OpDefs."""

    def __init__(self, meta: Any, op_defs: dict[str, Any] | None = None) -> None:
        self.meta = meta
        self.nodes: dict[str, Any] = {}
        graph_nodes = list(meta.graph_def.node)
        # TF1 while_loop frames become one node each (frames.py), so the graph has no cycles
        self.loops: dict[str, FrameLoop] = {}
        if any(node.op in ENTER_OPS for node in graph_nodes):
            graph_nodes, self.loops = collapse_frames(graph_nodes)
        for node in graph_nodes:
            if node.name in self.nodes:
                raise GraphImportError(f"the graph holds two nodes named {node.name!r}")
            self.nodes[node.name] = node
        if op_defs is None:
            op_defs = {op.name: op for op in meta.meta_info_def.stripped_op_list.op}
        self.op_defs = op_defs
        self.inputs: dict[str, list[Ref]] = {}
        self.controls: dict[str, list[str]] = {}
        self.consumers: dict[str, list[tuple[str, int]]] = {name: [] for name in self.nodes}
        for node in graph_nodes:
            data, control = [], []
            for position, text in enumerate(node.input):
                ref = parse_tensor_name(text)
                if ref[1] < 0:
                    control.append(ref[0])
                else:
                    data.append(ref)
                if ref[0] in self.consumers:
                    self.consumers[ref[0]].append((node.name, position))
            self.inputs[node.name] = data
            self.controls[node.name] = control
        if meta.graph_def.library.function:
            self.functions = {f.signature.name for f in meta.graph_def.library.function}
        else:
            self.functions = set()

    def node(self, name: str, needed_by: str = "") -> Any:
        """The NodeDef called ``name``; a GraphImportError naming who asked when there is none."""
        try:
            return self.nodes[name]
        except KeyError:
            by = f" (needed by {needed_by})" if needed_by else ""
            raise GraphImportError(
                f"the graph has no node named {name!r}{by}; it has {len(self.nodes)} nodes"
            ) from None

    def is_stateful(self, op: str) -> bool:
        op_def = self.op_defs.get(op)
        return op_def is None or op_def.is_stateful

    def output_shape_hint(self, ref: Ref) -> list[int] | None:
        """The ``_output_shapes`` hint for a tensor, or None; never trusted for computation."""
        node = self.nodes.get(ref[0])
        if node is None or "_output_shapes" not in node.attr:
            return None
        shapes = node.attr["_output_shapes"].list.shape
        return decode_shape(shapes[ref[1]]) if ref[1] < len(shapes) else None

    def describe_consumers(self, name: str, among: Iterable[str] | None = None) -> str:
        """``"'a' (MatMul), 'b' (Identity)"``: who reads node ``name``'s outputs, for error messages."""
        # called for every node of a plan: copying a plan-sized set here made compiling quadratic
        allowed = among if among is None or isinstance(among, (set, frozenset)) else set(among)
        names = [c for c, _ in self.consumers.get(name, []) if allowed is None or c in allowed]
        names = list(dict.fromkeys(names))
        if not names:
            return "nothing else in the graph"
        text = ", ".join(f"{c!r} ({self.nodes[c].op})" for c in names[:5])
        return text + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def execution_order(index: GraphIndex, targets: Iterable[str], fed: set[Ref]) -> list[str]:
    """Node names the ``targets`` need (data and control inputs), inputs before consumers.

    A fed tensor cuts the graph: its producer is not visited through it.

    Raises:
        GraphImportError: a missing input node, or a cycle (TF1 loops were cut out by ``frames.py``).
    """
    state: dict[str, int] = {}  # 1 visiting, 2 done
    order: list[str] = []
    for target in targets:
        index.node(target, "the fetches")
        stack: list[tuple[str, bool]] = [(target, False)]
        while stack:
            name, expanded = stack.pop()
            if expanded:
                state[name] = 2
                order.append(name)
                continue
            if state.get(name) == 2:
                continue
            if state.get(name) == 1:
                raise GraphImportError(
                    f"node {name!r} ({index.nodes[name].op}) is part of a cycle that is not a TF1 "
                    "while_loop frame (Enter ... NextIteration)"
                )
            state[name] = 1
            stack.append((name, True))
            deps = [r[0] for r in index.inputs[name] if r not in fed] + index.controls[name]
            for dep in reversed(deps):
                index.node(dep, f"node {name!r}")
                if state.get(dep) != 2:
                    if state.get(dep) == 1:
                        raise GraphImportError(
                            f"node {dep!r} ({index.nodes[dep].op}) is part of a cycle through {name!r} "
                            "that is not a TF1 while_loop frame (Enter ... NextIteration)"
                        )
                    stack.append((dep, False))
    return order
