"""TensorFlow variables in an imported graph: where they are, their checkpoint keys, their values.

Reference variables (``VariableV2``/``Variable`` with ``Assign``) and resource variables
(``VarHandleOp`` with ``ReadVariableOp``/``AssignVariableOp``) are found through the graph and the
``variables`` collection (``VariableDef`` protos). A checkpoint key is the name a ``RestoreV2`` op
reads into the variable (a ``Saver`` may rename keys); without a restore subgraph it is the
variable's name.

Module parameter names: ``to_module`` names a variable's parameter after the variable with
``%`` written ``%25`` and ``.`` written ``%2E`` (torch refuses dots), e.g. ``dense/kernel``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from tensorboard.compat.proto import variable_pb2

from lightning_saver.errors import GraphImportError, StateMismatchError
from lightning_saver.graph.tf_import.attrs import decode_shape, decode_tensor, decode_type
from lightning_saver.graph.tf_import.importer import GraphIndex, Ref, execution_order, parse_tensor_name

VARIABLE_OPS = frozenset({"VariableV2", "Variable", "VarHandleOp"})
# op -> how it combines the old value with the new one
ASSIGN_OPS = {
    "Assign": "set", "AssignVariableOp": "set",
    "AssignAdd": "add", "AssignAddVariableOp": "add",
    "AssignSub": "sub", "AssignSubVariableOp": "sub",
}
_PASS_THROUGH = frozenset({"Identity", "Snapshot"})
# a TF1 tf.cond hands a branch its variables through a Switch (RefSwitch for ref variables)
_TO_VARIABLE = _PASS_THROUGH | {"Switch", "RefSwitch"}
_COLLECTIONS = ("variables", "local_variables", "trainable_variables", "model_variables")


@dataclass
class VariableInfo:
    """One variable: its node, dtype, shape, initial value and checkpoint key."""

    name: str
    op: str
    dtype: torch.dtype | str
    shape: list[int] | None
    trainable: bool
    initial_value: Ref | None
    checkpoint_key: str


def param_name(variable: str) -> str:
    """The module parameter name of a TF variable: ``a.b/c`` -> ``a%2Eb/c``."""
    return variable.replace("%", "%25").replace(".", "%2E")


def variable_name(param: str) -> str:
    """The inverse of ``param_name``."""
    return param.replace("%2E", ".").replace("%25", "%")


def resolve_variable(index: GraphIndex, ref: Ref) -> str | None:
    """The variable node a tensor refers to, following Identity and Switch; None when it is not a variable."""
    name = ref[0]
    for _ in range(64):
        node = index.nodes.get(name)
        if node is None:
            return None
        if node.op in VARIABLE_OPS:
            return name
        if node.op not in _TO_VARIABLE or not index.inputs[name]:
            return None
        name = index.inputs[name][0][0]
    return None


def _variable_defs(meta: Any) -> dict[str, Any]:
    defs: dict[str, Any] = {}
    for key in _COLLECTIONS:
        if key not in meta.collection_def:
            continue
        for raw in meta.collection_def[key].bytes_list.value:
            vdef = variable_pb2.VariableDef.FromString(raw)
            defs.setdefault(parse_tensor_name(vdef.variable_name)[0], vdef)
    return defs


def _trainable_names(meta: Any) -> set[str] | None:
    if "trainable_variables" not in meta.collection_def:
        return None
    names = set()
    for raw in meta.collection_def["trainable_variables"].bytes_list.value:
        names.add(parse_tensor_name(variable_pb2.VariableDef.FromString(raw).variable_name)[0])
    return names


def _initial_value(index: GraphIndex, name: str, vdef: Any) -> Ref | None:
    if vdef is not None and vdef.initial_value_name:
        return parse_tensor_name(vdef.initial_value_name)
    assign = vdef.initializer_name if vdef is not None and vdef.initializer_name else f"{name}/Assign"
    node = index.nodes.get(assign)
    if node is not None and node.op in ASSIGN_OPS and len(index.inputs[assign]) > 1:
        return index.inputs[assign][1]
    return None


def find_variables(index: GraphIndex) -> dict[str, VariableInfo]:
    """Every variable of the graph by node name, with its checkpoint key and initializer."""
    defs = _variable_defs(index.meta)
    trainable = _trainable_names(index.meta)
    keys = checkpoint_keys(index)
    found: dict[str, VariableInfo] = {}
    for name, node in index.nodes.items():
        if node.op not in VARIABLE_OPS:
            continue
        dtype = decode_type(node.attr["dtype"].type)
        vdef = defs.get(name)
        if trainable is not None:
            is_trainable = name in trainable
        elif vdef is not None:
            is_trainable = vdef.trainable
        else:
            is_trainable = isinstance(dtype, torch.dtype) and dtype.is_floating_point
        found[name] = VariableInfo(
            name=name,
            op=node.op,
            dtype=dtype,
            shape=decode_shape(node.attr["shape"].shape) if "shape" in node.attr else None,
            trainable=is_trainable,
            initial_value=_initial_value(index, name, vdef),
            checkpoint_key=keys.get(name, name),
        )
    return found


def _const_strings(index: GraphIndex, ref: Ref) -> list[str]:
    name = ref[0]
    while index.nodes[name].op in _PASS_THROUGH:
        name = index.inputs[name][0][0]
    node = index.nodes[name]
    if node.op != "Const":
        raise GraphImportError(f"restore op reads its tensor names from {name!r} ({node.op}), not a Const")
    values = decode_tensor(node.attr["value"].tensor, name)
    return [v.decode("utf-8", "replace") for v in values.reshape(-1)]


def _restore_ops(index: GraphIndex) -> list[str]:
    saver = index.meta.saver_def
    if saver.restore_op_name:
        root = parse_tensor_name(saver.restore_op_name)[0]
        if root in index.nodes:
            return [n for n in execution_order(index, [root], set()) if index.nodes[n].op == "RestoreV2"]
    return [n for n, node in index.nodes.items() if node.op == "RestoreV2"]


def _assigned_variable(index: GraphIndex, ref: Ref) -> str | None:
    """The variable that ``ref`` is assigned to, through Identity ops (a restore op's output)."""
    pending = [ref]
    for current in pending:
        for consumer, position in index.consumers.get(current[0], []):
            inputs = index.inputs[consumer]
            if position >= len(inputs) or inputs[position] != current:
                continue
            op = index.nodes[consumer].op
            if op in ASSIGN_OPS and position == 1:
                return resolve_variable(index, inputs[0])
            if op in _PASS_THROUGH:
                pending.append((consumer, 0))
    return None


def checkpoint_keys(index: GraphIndex) -> dict[str, str]:
    """Variable node name -> the key its Saver restores it from (the saver_def's restore op first)."""
    keys: dict[str, str] = {}
    for restore in _restore_ops(index):
        for i, key in enumerate(_const_strings(index, index.inputs[restore][1])):
            target = _assigned_variable(index, (restore, i))
            if target is not None:
                keys.setdefault(target, key)
    return keys


class VariableStore:
    """Current variable values; missing ones come from ``initialize(name)`` on first read."""

    def __init__(self, variables: Mapping[str, VariableInfo], initialize: Callable[[str], Any]) -> None:
        self.variables = variables
        self.values: dict[str, torch.Tensor] = {}
        self._initialize = initialize

    def read(self, name: str) -> torch.Tensor:
        value = self.values.get(name)
        if value is None:
            value = self._initialize(name)
            self.set(name, value)
            value = self.values[name]
        return value

    def set(self, name: str, value: Any) -> torch.Tensor:
        """Give ``name`` a value, in place when the shape and dtype allow (modules share storage)."""
        info = self.variables[name]
        new = torch.as_tensor(value)
        if isinstance(info.dtype, torch.dtype):
            new = new.to(info.dtype)
        if info.shape is not None and -1 not in info.shape and list(new.shape) != info.shape:
            raise StateMismatchError(
                f"variable {name!r} has shape {info.shape}, the new value has {list(new.shape)}"
            )
        old = self.values.get(name)
        if old is not None and old.shape == new.shape and old.dtype == new.dtype:
            with torch.no_grad():
                old.copy_(new)
            return old
        self.values[name] = new.detach().clone()
        return self.values[name]

    def is_initialized(self, name: str) -> torch.Tensor:
        return torch.tensor(name in self.values)

    def assign(self, name: str, value: torch.Tensor, *, mode: str = "set") -> torch.Tensor:
        if mode != "set":
            old = self.read(name)
            value = old + value if mode == "add" else old - value
        return self.set(name, value)

    def names(self, among: Iterable[str] | None = None) -> list[str]:
        return sorted(self.variables if among is None else set(among) & set(self.variables))
