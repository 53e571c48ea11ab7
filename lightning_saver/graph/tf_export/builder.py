"""A small GraphDef builder: nodes typed by their OpDefs, constants, names, shapes and dtypes.

Attrs are given as Python values and encoded by the type the OpDef declares; type attrs (``T``,
``N``, ``dtypes``) are inferred from the inputs; attrs at their default are not written. Python
values passed as inputs become ``Const`` nodes. Constant inputs fold through the layout helpers
(``transpose``, ``reshape``), so a frozen graph holds filters already in TensorFlow's layout.

Example::

    g = GraphBuilder()
    x = g.placeholder("x", DT_FLOAT, (None, 4))
    y = g.op("Relu", x)                     # T inferred from x; returns a TfTensor "Relu"
    g.op("Transpose", y, [1, 0])            # the perm list becomes an int32 Const
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from tensorboard.compat.proto import attr_value_pb2, graph_pb2, tensor_pb2, types_pb2, versions_pb2

from lightning_saver.formats import tf_dtypes
from lightning_saver.graph.tf_export.op_defs import fill_attr, op_def, shape_proto

Shape = tuple[int | None, ...] | None

# GraphDef producer version written into the graph; TensorFlow 2.x imports it (consumers check only
# min_consumer), and nothing we emit changed meaning across graph versions.
PRODUCER = 1205
_BAD_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.\-/]")
# TensorProto fields able to hold one repeated value (a "splat": TF fills the shape with it)
_SPLAT_FIELD = {
    tf_dtypes.DT_FLOAT: "float_val", tf_dtypes.DT_DOUBLE: "double_val", tf_dtypes.DT_INT32: "int_val",
    tf_dtypes.DT_INT64: "int64_val", tf_dtypes.DT_BOOL: "bool_val",
}


@dataclass(frozen=True)
class LazyVariable:
    """A variable not yet in the graph: its ``state_dict`` key and the layout steps asked of it so far
    (``("transpose", perm)``, ``("reshape", shape)``). The first op that reads it creates the variable
    in that layout (``GraphBuilder.materialize``), so filters are stored HWIO and matmul weights
    ``[in, out]``, and the graph transposes nothing per run."""

    key: str
    steps: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def then(self, kind: str, arg: Sequence[int]) -> LazyVariable:
        return replace(self, steps=(*self.steps, (kind, tuple(int(a) for a in arg))))


@dataclass(frozen=True)
class TfTensor:
    """One output of a node: ``ref`` is ``"node"`` or ``"node:i"``; ``value`` when known at export time."""

    ref: str
    dtype: int
    shape: Shape = None
    value: np.ndarray | None = None
    # (source, perm) when this tensor is a Transpose of ``source``, so inverse pairs cancel
    transposed_from: tuple[TfTensor, tuple[int, ...]] | None = None
    # a weight whose variable is created on first read, in the layout asked of it (see LazyVariable)
    lazy: LazyVariable | None = None

    @property
    def node_name(self) -> str:
        return self.ref.split(":")[0]

    @property
    def tensor_name(self) -> str:
        """The ``"node:i"`` form TensorFlow uses in signatures and ``session.run``."""
        return self.ref if ":" in self.ref else f"{self.ref}:0"

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    def with_meta(self, dtype: int, shape: Shape) -> TfTensor:
        return replace(self, dtype=dtype, shape=shape)


def tensor_proto(value: np.ndarray, dtype: int | None = None) -> tensor_pb2.TensorProto:
    """A TensorProto holding ``value`` (numeric as little-endian bytes, strings as ``string_val``)."""
    array = np.asarray(value)
    if array.dtype.kind in "US" or array.dtype == object:
        proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, tensor_shape=shape_proto(array.shape))
        proto.string_val.extend(str(v).encode() if not isinstance(v, bytes) else v for v in array.flat)
        return proto
    tf_dtype = tf_dtypes.from_numpy(array.dtype) if dtype is None else dtype
    array = array.astype(tf_dtypes.to_numpy(tf_dtype), copy=False)
    proto = tensor_pb2.TensorProto(dtype=tf_dtype, tensor_shape=shape_proto(array.shape))  # type: ignore[arg-type]
    proto.tensor_content = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
    return proto


def splat_proto(dtype: int, shape: Sequence[int], fill: float = 0.0) -> tensor_pb2.TensorProto:
    """A TensorProto of ``shape`` holding one repeated value, stored once."""
    proto = tensor_pb2.TensorProto(dtype=dtype, tensor_shape=shape_proto(tuple(shape)))  # type: ignore[arg-type]
    field = _SPLAT_FIELD.get(dtype)
    if field is None:
        return tensor_proto(np.full(tuple(shape), fill), dtype)
    kind = bool if dtype == tf_dtypes.DT_BOOL else int if "int" in field else float
    getattr(proto, field).append(kind(fill))
    return proto


class GraphBuilder:
    """Builds one GraphDef; ``scope`` prefixes the names of the nodes added next."""

    def __init__(self) -> None:
        self.graph = graph_pb2.GraphDef(versions=versions_pb2.VersionDef(producer=PRODUCER))
        self.scope = ""
        self._names: set[str] = set()
        self.ops_used: set[str] = set()
        # creates the variable of a LazyVariable tensor (set by the VariableStore)
        self.materialize: Callable[[TfTensor], TfTensor] | None = None

    def unique(self, name: str, *, scoped: bool = True) -> str:
        """A free node name, under the current scope, sanitized to TensorFlow's name rules."""
        base = _BAD_NAME_CHARS.sub("_", f"{self.scope}/{name}" if scoped and self.scope else name)
        if not base or not (base[0].isalnum() or base[0] == "."):
            base = "n" + base
        candidate, k = base, 0
        while candidate in self._names:
            k += 1
            candidate = f"{base}_{k}"
        self._names.add(candidate)
        return candidate

    def op(self, op_type: str, *inputs: Any, name: str | None = None, control: Sequence[str] = (),
           scoped: bool = True, out_shape: Shape = None, **attrs: Any) -> Any:
        """Add a node; returns its TfTensor, a list of them (several outputs) or its name (none)."""
        od = op_def(op_type)
        if len(inputs) != len(od.input_arg):
            raise TypeError(f"TensorFlow export: {op_type} takes {len(od.input_arg)} inputs, "
                            f"got {len(inputs)}")
        node = self.graph.node.add(op=op_type, name=self.unique(name or op_type, scoped=scoped))
        self.ops_used.add(op_type)
        types: dict[str, Any] = {k: v for k, v in attrs.items() if k in {a.name for a in od.attr}}
        for arg, value in zip(od.input_arg, inputs, strict=True):
            items = list(value) if (arg.number_attr or arg.type_list_attr) else [value]
            tensors = [self._as_input(v, arg, types) for v in items]
            if arg.number_attr:
                types.setdefault(arg.number_attr, len(tensors))
            if arg.type_list_attr:
                types.setdefault(arg.type_list_attr, [t.dtype for t in tensors])
            elif arg.type_attr and tensors:
                types.setdefault(arg.type_attr, tensors[0].dtype)
            node.input.extend(t.ref for t in tensors)
        node.input.extend("^" + c for c in control)
        unknown = set(attrs) - {a.name for a in od.attr}
        if unknown:
            raise TypeError(f"TensorFlow export: op {op_type} has no attr(s) {sorted(unknown)}")
        for attr in od.attr:
            self._set_attr(node, op_type, attr, types)
        defaults = {a.name: a.default_value.type for a in od.attr
                    if a.type == "type" and a.HasField("default_value")}
        return self._outputs(node.name, od, {**defaults, **types}, out_shape)

    def node(self, name: str) -> Any:
        """The NodeDef named ``name`` (a converter reading what an earlier one emitted)."""
        found = next((n for n in reversed(self.graph.node) if n.name == name), None)
        if found is None:
            raise KeyError(f"TensorFlow export: no node {name!r} in the graph built so far")
        return found

    def prune(self, keep: set[str]) -> int:
        """Drop the nodes nothing reads, except those named in ``keep`` and the stateful ones (inputs,
        variables): a Const left behind when its folded layout replaced it (a frozen filter transposed
        to HWIO), or a Transpose a later op sank below. Returns how many were dropped."""
        stateful = {"Placeholder", "PlaceholderWithDefault", "VariableV2", "Assign", "SaveV2", "RestoreV2",
                    "NoOp"}
        before = len(self.graph.node)
        while True:
            read = {ref.lstrip("^").split(":")[0] for n in self.graph.node for ref in n.input}
            live = [n for n in self.graph.node if n.name in read or n.name in keep or n.op in stateful]
            if len(live) == len(self.graph.node):
                break
            del self.graph.node[:]
            self.graph.node.extend(live)
        self.ops_used = {n.op for n in self.graph.node}
        return before - len(self.graph.node)

    def _as_input(self, value: Any, arg: Any, types: dict[str, Any]) -> TfTensor:
        if isinstance(value, TfTensor):
            return self.real(value)
        if arg.type:
            dtype = arg.type
        elif arg.type_attr in types:
            dtype = types[arg.type_attr]
        else:
            dtype = tf_dtypes.DT_FLOAT if isinstance(value, float) else tf_dtypes.DT_INT32
        return self.const(np.asarray(value), dtype)

    def _set_attr(self, node: Any, op_type: str, attr: Any, values: dict[str, Any]) -> None:
        if attr.name not in values:
            if not attr.HasField("default_value"):
                raise TypeError(f"TensorFlow export: op {op_type} needs attr {attr.name!r}")
            return
        value = attr_value_pb2.AttrValue()
        fill_attr(value, attr.type, values[attr.name])
        if attr.HasField("default_value") and value == attr.default_value:
            return
        node.attr[attr.name].CopyFrom(value)

    def _outputs(self, name: str, od: Any, types: dict[str, Any], shape: Shape) -> Any:
        outputs: list[TfTensor] = []
        for arg in od.output_arg:
            if arg.type_list_attr:
                dtypes = list(types[arg.type_list_attr])
            else:
                dtype = arg.type or types[arg.type_attr]
                dtypes = [dtype] * (int(types[arg.number_attr]) if arg.number_attr else 1)
            for dtype in dtypes:
                index = len(outputs)
                outputs.append(TfTensor(name if index == 0 else f"{name}:{index}", int(dtype), shape))
        if not outputs:
            return name
        return outputs[0] if len(outputs) == 1 and not od.output_arg[0].number_attr else outputs

    def real(self, x: TfTensor) -> TfTensor:
        """``x`` as a tensor in the graph: a lazy variable is created now, in its layout so far."""
        if x.lazy is None:
            return x
        assert self.materialize is not None, "a lazy variable without a VariableStore"
        return self.materialize(x)

    # --- constants and inputs ---------------------------------------------------------------

    def const(self, value: Any, dtype: int | None = None, name: str = "Const") -> TfTensor:
        """A ``Const`` node; ``dtype`` (a TF DataType) defaults to the value's own."""
        array = np.asarray(value)
        proto = tensor_proto(array, dtype)
        out = self.op("Const", name=name, value=proto, dtype=proto.dtype)
        known = None if proto.dtype == types_pb2.DT_STRING else array.astype(tf_dtypes.to_numpy(proto.dtype))
        return TfTensor(out.ref, proto.dtype, tuple(array.shape), known)

    def placeholder(self, name: str, dtype: int, shape: Shape) -> TfTensor:
        out = self.op("Placeholder", name=name, scoped=False, dtype=dtype, shape=shape)
        return out.with_meta(dtype, shape)

    def int_vector(self, items: Sequence[Any], dtype: int = tf_dtypes.DT_INT32) -> TfTensor:
        """A 1-D int tensor from ints and scalar TfTensors (dynamic sizes): a Const, or a Pack."""
        if all(not isinstance(v, TfTensor) for v in items):
            return self.const(np.asarray([int(v) for v in items], dtype=tf_dtypes.to_numpy(dtype)))
        parts = [v if isinstance(v, TfTensor) else self.const(np.asarray(int(v)), dtype) for v in items]
        parts = [self.cast(p, dtype) for p in parts]
        return self.op("Pack", parts, out_shape=(len(parts),))

    # --- helpers that fold constants ----------------------------------------------------------

    def cast(self, x: TfTensor, dtype: int) -> TfTensor:
        if x.dtype == dtype:
            return x
        if x.value is not None and x.value.size <= 64:
            return self.const(x.value, dtype)
        return self.op("Cast", x, SrcT=x.dtype, DstT=dtype, out_shape=x.shape)

    def transpose(self, x: TfTensor, perm: Sequence[int]) -> TfTensor:
        perm = tuple(int(p) for p in perm)
        if perm == tuple(range(len(perm))):
            return x
        shape = None if x.shape is None else tuple(x.shape[p] for p in perm)
        if x.lazy is not None:
            return replace(x, shape=shape, lazy=x.lazy.then("transpose", perm))
        if x.value is not None:
            return self.const(np.transpose(x.value, perm), x.dtype, name="Transpose")
        if x.transposed_from is not None:
            source, first = x.transposed_from
            if tuple(first[p] for p in perm) == tuple(range(len(perm))):
                return source
        out = self.op("Transpose", x, list(perm), out_shape=shape)
        return replace(out, transposed_from=(x, perm))

    def reshape(self, x: TfTensor, shape: Sequence[Any]) -> TfTensor:
        if x.value is not None and all(isinstance(d, int) for d in shape):
            return self.const(x.value.reshape(tuple(shape)), x.dtype, name="Reshape")
        if x.lazy is not None and x.shape is not None and None not in x.shape and \
                all(isinstance(d, int) for d in shape):
            target = [int(d) for d in shape]
            if -1 in target:  # the one free size, from the static total
                known = int(np.prod([d for d in target if d != -1]))
                target[target.index(-1)] = int(np.prod(x.shape)) // max(known, 1)  # type: ignore[arg-type]
            return replace(x, shape=tuple(target), lazy=x.lazy.then("reshape", target))
        known = tuple(d if isinstance(d, int) and d >= 0 else None for d in shape)
        return self.op("Reshape", x, self.int_vector(shape), out_shape=known)

    def scalar(self, value: float | int | bool, dtype: int) -> TfTensor:
        return self.const(np.asarray(value), dtype)
